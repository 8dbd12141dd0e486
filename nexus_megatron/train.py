"""The plain-PyTorch trainer: ``nexus-megatron train --config <yaml>`` under torchrun (gloo on CPU,
NCCL on GPU). Nexus or AdamW on the same data order; periodic per-source and OOD evaluation; a
per-source gradient probe (norms and pairwise cosines); metrics.jsonl, summary.json, W&B; atomic
checkpoints and exact resume."""
from __future__ import annotations

import json
import math
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .checkpoint import atomic_write_text, clean_stale_tmp
from .config import RunConfig, to_dict
from .data.shards import open_sources
from .errors import DataError, NexusConfigError
from .errors import RunLockError
from .faults import fault_point, inject_loss
from .layout import LayoutConfig, build_layout, source_parallel_group_size
from .models import build_model, count_params, lm_loss
from .resume import check_resume, default_settings, read_run_id, run_record, write_run_id
from .runlock import acquire as acquire_run_lock
from .runlock import held_by_launcher
from .safe_load import rng_to_plain, set_rng_from_plain
from .sharpness import build_sharpness_hook


# ---------------------------------------------------------------------------------------------------
# distributed setup

def init_distributed(timeout_s: float = 600.0):
    """Initialise torch.distributed from torchrun's environment (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return dist.get_rank(), world
    return 0, 1


def _all_reduce(t: torch.Tensor, op=None):
    """All-reduce over the world; CPU tensors go through the GPU under NCCL."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and not t.is_cuda:
            tmp = t.cuda()
            dist.all_reduce(tmp, op=op or dist.ReduceOp.SUM)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def local_device() -> torch.device:
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# schedule

def lr_lambda(cfg: RunConfig):
    o, steps = cfg.optim, cfg.train.steps
    floor = o.min_lr / o.lr

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "cosine":
            p = (step - o.warmup_steps) / max(steps - o.warmup_steps, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
        decay_start = int(steps * (1 - o.decay_frac))
        if step < decay_start:
            return 1.0
        p = (step - decay_start) / max(steps - decay_start, 1)
        return 1.0 - (1 - floor) * min(p, 1.0)
    return f


# ---------------------------------------------------------------------------------------------------
# data budget (checked before any compute)

def sample_counts(layout, steps: int, k: int, B: int, mixed: bool = False) -> list:
    """Sequences each source will have consumed after ``steps`` outer steps (``mixed``: every micro-batch holds
    ``B / K`` sequences of every source, data.mixed_micro_batches)."""
    K = layout.num_sources
    if mixed:
        return [steps * k * sum(r for _, r in layout.present(0, 0)) * (B // K)] * K
    counts = [0] * K
    for t in range(steps):
        for m in range(k):
            for src, readers in layout.present(t, m):
                counts[src] += readers * B
    return counts


def mixed_micro_batch(samplers, consumed: list, reader: int, B: int):
    """One micro-batch of ``B / K`` sequences from each of the K sources' training samplers (in source order),
    this rank's share at position ``reader`` among the readers (data.mixed_micro_batches)."""
    b = B // len(samplers)
    return torch.cat([s.batch(consumed[j] + reader * b, b) for j, s in enumerate(samplers)])


def planned_sample_counts(cfg: RunConfig, world: int) -> list:
    """:func:`sample_counts` of the layout a job of ``world`` data-parallel ranks will build, computed in one
    process (the launcher, before it starts the workers; checks the split of the ranks into source groups)."""
    names, t = cfg.data.sources, cfg.train
    if cfg.nexus.layout == "source-parallel":
        group = source_parallel_group_size(len(names), world, names)
        return [t.steps * t.micro_steps * group * cfg.data.micro_batch_size] * len(names)
    one = build_layout(_layout_config(cfg))   # sequential: every rank reads the same source in a micro-step
    return [world * c for c in sample_counts(one, t.steps, t.micro_steps, cfg.data.micro_batch_size,
                                             cfg.data.mixed_micro_batches)]


def check_data_budget(cfg: RunConfig, layout, sources, need=None) -> None:
    if need is None:
        need = sample_counts(layout, cfg.train.steps, cfg.train.micro_steps, cfg.data.micro_batch_size,
                             cfg.data.mixed_micro_batches)
    for i, name in enumerate(cfg.data.sources):
        have = sources[name].train.windows
        if need[i] > have * cfg.data.max_epochs:
            raise DataError(
                f"source {name!r} has {have} training sequences of {cfg.data.seq_len + 1} tokens but this run needs "
                f"{need[i]} ({need[i] / have:.2f} epochs > data.max_epochs={cfg.data.max_epochs}). Prepare more data "
                f"(prepare-data --size), lower train.steps / data.micro_batch_size, or raise data.max_epochs")


# ---------------------------------------------------------------------------------------------------
# evaluation and the gradient probe

@torch.no_grad()
def evaluate(model, sources, names, cfg: RunConfig, rank: int, world: int) -> dict:
    """Mean per-token loss of each source's validation split (first eval_batches*B sequences)."""
    model.eval()
    B = cfg.data.micro_batch_size
    sums = torch.zeros(len(names), 2, dtype=torch.float64)
    for i, name in enumerate(names):
        sampler = sources[name].val
        n = min(cfg.train.eval_batches * B, sampler.windows)
        mine = list(range(rank, n, world))
        for s in range(0, len(mine), B):
            idx = mine[s:s + B]
            batch = torch.stack([sampler.batch(j, 1)[0] for j in idx])
            sums[i, 0] += float(lm_loss(model, batch, reduction="sum"))
            sums[i, 1] += batch[:, 1:].numel()
    _all_reduce(sums)
    model.train()
    return {name: float(sums[i, 0] / sums[i, 1]) for i, name in enumerate(names)}


def probe_gradients(model, params, sources, names, cfg: RunConfig, rank: int, world: int) -> dict:
    """Each source's full gradient at the current parameters on fixed validation batches; returns
    ``gnorm/<source>``, ``cos/<a>|<b>`` and ``cos/mean``. Uses torch.autograd.grad, so no ``.grad`` is
    touched and no engine gradient hook fires (it runs between outer steps on any engine whose module
    holds full parameters)."""
    B = cfg.data.micro_batch_size
    flats = []
    for name in names:
        sampler = sources[name].val
        n = min(cfg.train.probe_batches * B, sampler.windows)
        tokens = n * cfg.data.seq_len
        flat = None
        mine = list(range(rank, n, world))
        for s in range(0, len(mine), B):
            batch = torch.stack([sampler.batch(j, 1)[0] for j in mine[s:s + B]])
            gs = torch.autograd.grad(lm_loss(model, batch, reduction="sum") / tokens, params, allow_unused=True)
            g = torch.cat([(t if t is not None else torch.zeros_like(p)).float().reshape(-1) for t, p in zip(gs, params)])
            flat = g if flat is None else flat.add_(g)
        if flat is None:
            flat = torch.cat([torch.zeros_like(p, dtype=torch.float32).reshape(-1) for p in params])
        flats.append(_all_reduce(flat))
    out, cos = {}, []
    norms = [float(torch.linalg.vector_norm(f, dtype=torch.float64)) for f in flats]
    for i, a in enumerate(names):
        out[f"gnorm/{a}"] = norms[i]
        for j in range(i + 1, len(names)):
            c = float(torch.dot(flats[i].double(), flats[j].double()) / max(norms[i] * norms[j], 1e-300))
            out[f"cos/{a}|{names[j]}"] = c
            cos.append(c)
    if cos:
        out["cos/mean"] = sum(cos) / len(cos)
    return out


# ---------------------------------------------------------------------------------------------------
# logging

class Logger:
    """metrics.jsonl (one object per outer step), W&B (rank 0) and a progress bar."""

    def __init__(self, cfg: RunConfig, run_dir: str, rank: int, resume_step: int):
        self.rank, self.path = rank, os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        self.bar = None
        if rank != 0:
            return
        if os.path.exists(self.path):  # drop lines past the checkpoint we resume from
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            keep.append(line)
                    except (ValueError, KeyError):
                        break
            atomic_write_text(self.path, "".join(keep))
        if cfg.train.wandb.mode != "disabled":
            import wandb
            self.wandb = wandb.init(mode=cfg.train.wandb.mode, project=cfg.train.wandb.project,
                                    name=cfg.train.wandb.name or os.path.basename(os.path.abspath(run_dir)),
                                    dir=run_dir, config=to_dict(cfg), resume="allow")
        if cfg.train.progress:
            import sys
            from tqdm import tqdm
            tty = sys.stderr.isatty()
            self.bar = tqdm(total=cfg.train.steps, initial=resume_step, desc=cfg.optim.name, unit="step",
                            dynamic_ncols=True, mininterval=0.5 if tty else 30.0)

    def log(self, rec: dict):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log(rec, step=rec["step"])
        if self.bar is not None:
            self.bar.update(1)
            post = {"loss": f"{rec['loss']:.3f}"}
            if "eval/ood_loss" in rec:
                post["ood"] = f"{rec['eval/ood_loss']:.3f}"
            self.bar.set_postfix(post, refresh=False)

    def close(self, summary: dict):
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            for k, v in summary.get("final", {}).items():
                self.wandb.summary[k] = v
            self.wandb.finish()


# ---------------------------------------------------------------------------------------------------

def build_engine(cfg: RunConfig, model, layout):
    """The engine adapter named by train.engine (see nexus_megatron/engines/)."""
    from .engines import ENGINES, build_engine as build
    if cfg.train.engine not in ENGINES:
        raise NexusConfigError(f"train.engine={cfg.train.engine!r}: use one of {', '.join(ENGINES)}")
    return build(cfg, model, layout, lr_lambda(cfg))


def _layout_config(cfg: RunConfig) -> LayoutConfig:
    d = cfg.data
    return LayoutConfig(mode=cfg.nexus.layout, sources=tuple(d.sources),
                        weights=tuple(d.weights) if d.weights else None, seed=cfg.nexus.seed)


def check_vocab_size(cfg: RunConfig, manifest: dict) -> int:
    vocab = cfg.model.vocab_size or int(manifest["vocab_size"])
    if vocab < int(manifest["vocab_size"]):
        raise NexusConfigError(f"model.vocab_size={vocab} is smaller than the data's tokenizer vocabulary "
                               f"({manifest['vocab_size']}): remove model.vocab_size or raise it")
    return vocab


def prepare_run_dir(run_dir: str) -> None:
    """Create ``run_dir`` (and its checkpoints/) or say in one line why it cannot be used."""
    where = f"train.run_dir={run_dir!r}"
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise NexusConfigError(f"{where} is a file, not a directory: choose another train.run_dir")
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    except OSError as e:
        raise NexusConfigError(f"{where} cannot be created ({e.strerror or e}: {e.filename or run_dir}): choose a "
                               "train.run_dir on a writable file system") from None
    probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise NexusConfigError(f"{where} is not writable ({e.strerror or e}): fix its permissions or choose "
                               "another train.run_dir") from None


def preflight(cfg: RunConfig, world: int) -> None:
    """Everything about a run of ``world`` processes that can be checked in one process before any worker
    starts: the split of the ranks into source groups, the data (manifest, files, token ids, enough
    sequences for the run), the model's vocabulary, the run directory. ``nexus-megatron train --nproc N``
    calls it in the launching command; each worker repeats the checks in :func:`train`."""
    d = cfg.data
    need = planned_sample_counts(cfg, world)
    manifest, sources = open_sources(d.path, list(d.sources), list(d.ood), d.seq_len, cfg.train.seed)
    check_vocab_size(cfg, manifest)
    check_data_budget(cfg, None, sources, need=need)
    prepare_run_dir(cfg.train.run_dir)


def take_run_lock(cfg: RunConfig, rank: int, world: int, held: list) -> None:
    """Rank 0 takes run_dir's lock (unless the launching command holds it); every rank fails if it cannot."""
    run_dir = cfg.train.run_dir
    if held_by_launcher(run_dir):
        return
    err = None
    if rank == 0:
        try:
            prepare_run_dir(run_dir)
            held.append(acquire_run_lock(run_dir))
        except (RunLockError, NexusConfigError) as e:
            err = e
    if world > 1:   # every rank learns whether rank 0 got it (the others stop with a pointer to rank 0's error)
        local_device()
        flag = _all_reduce(torch.tensor([1.0 if err is not None else 0.0]), op=dist.ReduceOp.MAX)
        if err is None and float(flag[0]):
            raise RunLockError(f"train.run_dir={run_dir!r}: rank 0 could not take the run lock (its error says why)")
    if err is not None:
        raise err


def train(cfg: RunConfig) -> dict:
    """Run (or resume) one training run; returns the summary (rank 0 also writes it to summary.json).
    Rank 0 holds run_dir's lock (``run.lock``) for the duration of the run."""
    held: list = []
    try:
        return _train(cfg, held)
    finally:
        for lock in held:
            lock.release()


def _train(cfg: RunConfig, held: list) -> dict:
    t_start = time.time()
    rank, world = init_distributed(cfg.train.collective_timeout_s)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = cfg.train.run_dir
    ckpt_root = os.path.join(run_dir, "checkpoints")
    tr, d = cfg.train, cfg.data
    names, ood = list(d.sources), list(d.ood)

    # -- everything that can be wrong is checked before compute -----------------------------------
    layout = build_layout(_layout_config(cfg))
    manifest, sources = open_sources(d.path, names, ood, d.seq_len, tr.seed)
    vocab = check_vocab_size(cfg, manifest)
    check_data_budget(cfg, layout, sources)
    take_run_lock(cfg, rank, world, held)   # one live run per run_dir
    # a resume must not change the run (resume.py): checked before anything else in run_dir is written
    record = run_record(to_dict(cfg), manifest, world)
    run_id = check_resume(run_dir, record, tr.allow_changed, defaults=default_settings()) if tr.resume else None
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        clean_stale_tmp(ckpt_root)   # a dead writer's temporary checkpoint (and the disk space it holds)
        write_run_id(run_dir, run_id)   # a new id unless this resumes a checkpoint
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)

    model = build_model(cfg.model, vocab, d.seq_len, tr.seed, eot_id=int(manifest.get("eot_id", 0)))
    if tr.engine == "plain":   # DeepSpeed places the model itself
        model.to(local_device())
    model.train()
    engine = build_engine(cfg, model, layout)
    sharp = build_sharpness_hook(cfg.sharpness, engine, sources, names, ood, layout.weights.tolist(),
                                 micro_batch_size=d.micro_batch_size, rank=rank, world=world)
    consumed = [0] * len(names)
    start_step, tokens = 0, 0

    client = engine.load(ckpt_root) if tr.resume else None
    if client is not None:
        if client["optimizer"] != cfg.optim.name:
            raise NexusConfigError(f"{ckpt_root} holds a run of optim.name={client['optimizer']!r}, this run "
                                   f"has {cfg.optim.name!r}: use another train.run_dir or set train.resume=false")
        start_step, tokens, consumed = client["step"], client["tokens"], list(client["consumed"])
        if sharp is not None and "sharpness" in client:
            sharp.load_state_dict(client["sharpness"])
        set_rng_from_plain(client["rng"])
    logger = Logger(cfg, run_dir, rank, start_step)

    B, L, k = d.micro_batch_size, d.seq_len, tr.micro_steps
    num_params = count_params(model)
    module = engine.module
    last_eval: dict = {}
    last_probe: dict = {}

    def do_eval(step: int) -> dict:
        losses = evaluate(module, sources, names + ood, cfg, rank, world)
        rec = {f"eval/loss/{n}": losses[n] for n in names}
        rec["eval/loss"] = sum(losses[n] for n in names) / len(names)
        for n in ood:
            rec[f"eval/loss/{n}"] = losses[n]
        if ood:
            rec["eval/ood_loss"] = sum(losses[n] for n in ood) / len(ood)
        return rec

    def save(step: int):
        engine.save(ckpt_root, step, {
            "step": step, "tokens": tokens, "consumed": list(consumed), "optimizer": cfg.optim.name,
            "config": to_dict(cfg), "run": {**record, "run_id": read_run_id(run_dir)},
            "rng": rng_to_plain(),   # tensors and numbers: checkpoints load with weights_only=True
            **({"sharpness": sharp.state_dict()} if sharp is not None else {}),
        })

    for step in range(start_step, tr.steps):
        t0 = time.time()
        lr = engine.lr()
        loss_acc = torch.zeros(len(names), 2, dtype=torch.float64)
        step_batches = []
        for m in range(k):
            present = layout.present(step, m)
            src = layout.source_for(step, m)
            reader, readers = layout.readers(src, step, m)
            if d.mixed_micro_batches:   # every source in every micro-batch: B / K sequences of each
                batch = mixed_micro_batch([sources[n].train for n in names], consumed, reader, B)
                for _, r in present:
                    for j in range(len(names)):
                        consumed[j] += r * (B // len(names))
            else:
                batch = sources[names[src]].train.batch(consumed[src] + reader * B, B)
                for s, r in present:
                    consumed[s] += r * B
            step_batches.append(batch)
            if sharp is not None and m == k - 1:   # before the last micro-step: DeepSpeed updates inside it
                sharp.begin_step(step + 1, step_batches)
            if not engine.poisoned:   # a poisoned step is skipped anyway: keep the data order, spare the compute
                loss = inject_loss(lm_loss(module, batch), step + 1)
                engine.backward(loss)
                loss_acc[src, 0] += float(loss.detach())
                loss_acc[src, 1] += 1
            engine.micro_step(src)
            if m == 0:
                fault_point("step", step + 1)
        info = engine.outer_step()
        tokens += world * k * B * L
        _all_reduce(loss_acc)
        rec = {"step": step + 1, "tokens": tokens, "lr": lr}
        total = loss_acc.sum(0)
        rec["loss"] = float(total[0] / total[1]) if total[1] else float("nan")
        for i, n in enumerate(names):
            if loss_acc[i, 1] and not d.mixed_micro_batches:   # mixed: no per-source training loss
                rec[f"loss/{n}"] = float(loss_acc[i, 0] / loss_acc[i, 1])
        rec.update(engine.step_stats())
        rec.update(engine.counters())
        if sharp is not None:
            rec.update(sharp.pop_metrics())
        if info.get("gamma") is not None:
            rec["nexus/gamma"] = info["gamma"]
        if "pseudo_grad_norm" in info:
            rec["nexus/pseudo_grad_norm"] = info["pseudo_grad_norm"]
        if "grad_norm" in info:
            rec["grad_norm"] = info["grad_norm"]
        done = step + 1
        if tr.probe_every and engine.supports_probe and (done % tr.probe_every == 0 or done == tr.steps):
            probe_module = module if engine.probe_module is None else engine.probe_module
            last_probe = probe_gradients(probe_module, engine.params, sources, names, cfg, rank, world)
            rec.update(last_probe)
        if tr.eval_every and (done % tr.eval_every == 0 or done == tr.steps):
            last_eval = do_eval(done)
            rec.update(last_eval)
        rec["time/step_s"] = time.time() - t0
        logger.log(rec)
        if (tr.checkpoint_every and done % tr.checkpoint_every == 0) or done == tr.steps:
            save(done)

    if not last_eval:
        last_eval = do_eval(tr.steps)
    summary = {
        "optimizer": cfg.optim.name, "layout": layout.describe(), "steps": tr.steps, "tokens": tokens,
        "params": num_params, "world_size": world, "wall_s": time.time() - t_start,
        "engine": engine.name, **engine.counters(),
        "final": {**last_eval, **last_probe},
    }
    if rank == 0:
        atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    logger.close(summary)
    return summary
