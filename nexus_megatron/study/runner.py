"""``nexus-megatron experiment --config configs/study_cpu.yaml``: the multi-seed study of Nexus vs AdamW
(docs/results.md).

One command runs, in order, skipping whatever is already finished (each piece has its own directory
and a marker file, so an interrupted study resumes where it stopped):

1. ``prepare``: the prepared data (``prepare-data``, a no-op when up to date) and the downstream sets;
2. ``train``: every arm x seed with the ordinary trainer (``nexus-megatron train``, one process or
   torchrun), into ``<out>/<arm>/seed<s>/`` (done = ``summary.json``);
3. ``match``: the reference arm (AdamW) continued at its final learning rate, in chunks, until its mean
   in-distribution validation loss is at or below the target arm's (Nexus) of the same seed, or a bound
   on extra steps is hit, into ``<out>/<arm>_matched/seed<s>/`` (done = ``match.json``);
4. ``analyze``: per final checkpoint, downstream evaluation (:mod:`nexus_megatron.study.downstream`) and,
   for the arms listed under ``minima.arms``, closeness of the per-source minima
   (:mod:`nexus_megatron.study.minima`) (done = ``analysis.json``);
5. ``report``: tables (mean and 95% t-interval over seeds, paired differences against the reference)
   and PNG plots from the run directories, into ``<out>/report/``.

Jobs run as subprocesses, ``study.slots`` cores at a time (a torchrun job of N processes takes
min(N, slots) of them); logs in ``<out>/logs/``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import yaml

from ..config import RunConfig, load_config, to_dict
from ..errors import NexusConfigError
from .spec import (MATCHED_SUFFIX, Study, arm_config, arm_names, load_study, needs_selection, run_dir,
                   selected_lr, selection_path, set_dotted, sweep_config, sweep_dir)

# ---------------------------------------------------------------------------------------------------
# jobs

@dataclass
class Job:
    name: str
    argv: List[str]
    slots: int = 1
    deps: List[str] = field(default_factory=list)
    done: Callable[[], bool] = lambda: False
    env: dict = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_config(path: str, cfg: RunConfig) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == json.loads(json.dumps(to_dict(cfg)))
    except (OSError, ValueError):
        return False


def _train_done(st: Study, arm: str, seed: int) -> Callable[[], bool]:
    def done() -> bool:
        if needs_selection(st, arm) and selected_lr(st) is None:
            return False          # its lr is not chosen yet
        rd = run_dir(st, arm, seed)
        if not os.path.isfile(os.path.join(rd, "summary.json")):
            return False
        cfg = arm_config(st, arm, seed)
        if not _same_config(os.path.join(rd, "config.json"), cfg):
            raise NexusConfigError(f"{rd} holds a finished run with a different configuration than arm {arm!r} "
                                   "of this study: delete that directory or use another study.out")
        return True
    return done


def _sweep_done(st: Study, lr: float, seed: int) -> Callable[[], bool]:
    def done() -> bool:
        rd = sweep_dir(st, lr, seed)
        return os.path.isfile(os.path.join(rd, "summary.json")) and _same_config(os.path.join(rd, "config.json"),
                                                                                 sweep_config(st, lr, seed))
    return done


def _marker_done(path: str, settings: dict) -> Callable[[], bool]:
    def done() -> bool:
        try:
            with open(path) as f:
                return json.load(f).get("settings") == json.loads(json.dumps(settings))
        except (OSError, ValueError):
            return False
    return done


def match_settings(st: Study) -> dict:
    return dataclasses.asdict(st.matched)


def analysis_settings(st: Study, arm: str) -> dict:
    from .downstream import FORMAT_VERSION
    return {"downstream": ({**dataclasses.asdict(st.downstream), "format_version": FORMAT_VERSION}
                           if st.downstream.enabled else None),
            "minima": dataclasses.asdict(st.minima) if st.minima.enabled and arm in st.minima.arms else None}


def build_jobs(st: Study, study_json: str) -> List[Job]:
    """Seed by seed (so that a partial study has whole seeds): the trainings (widest first), the matched
    continuation, then the analyses of that seed."""
    py = sys.executable
    slots = st.study.slots
    jobs: List[Job] = []
    cfg_dir = os.path.join(st.study.out, "configs")
    os.makedirs(cfg_dir, exist_ok=True)
    order = sorted(st.arms, key=lambda a: -min(st.arms[a].nproc, slots))   # the widest jobs first
    m = st.matched
    sw = st.lr_sweep
    if sw.enabled:        # the pre-registered lr choice, on seeds apart from the study's, before anything uses it
        nproc = st.arms[sw.arm].nproc
        sweep_jobs = []
        for seed in sw.seeds:
            for lr in sw.values:
                cfg = sweep_config(st, float(lr), seed)
                path = os.path.join(cfg_dir, f"lr_sweep_lr{float(lr):g}_seed{seed}.yaml")
                with open(path, "w") as f:
                    yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
                argv = [py, "-m", "nexus_megatron.cli", "train", "--config", path]
                if nproc > 1:
                    argv += ["--nproc", str(nproc)]
                name = f"train/lr_sweep/lr{float(lr):g}/seed{seed}"
                sweep_jobs.append(name)
                jobs.append(Job(name, argv, min(nproc, slots), [], _sweep_done(st, float(lr), seed)))
        jobs.append(Job("train/select", [py, "-m", "nexus_megatron.study.runner", "select", study_json], 1, sweep_jobs,
                        lambda: selected_lr(st) is not None))
    for seed in st.study.seeds:
        for arm in order:
            nproc = st.arms[arm].nproc
            if needs_selection(st, arm):     # its config exists once the lr is selected: resolved by the job
                argv, deps = [py, "-m", "nexus_megatron.study.runner", "train", study_json, arm, str(seed)], ["train/select"]
            else:
                cfg = arm_config(st, arm, seed)
                path = os.path.join(cfg_dir, f"{arm}_seed{seed}.yaml")
                with open(path, "w") as f:
                    yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
                argv, deps = [py, "-m", "nexus_megatron.cli", "train", "--config", path], []
                if nproc > 1:
                    argv += ["--nproc", str(nproc)]
            jobs.append(Job(f"train/{arm}/seed{seed}", argv, min(nproc, slots), deps, _train_done(st, arm, seed)))
        if m.enabled:
            marm = m.arm + MATCHED_SUFFIX
            jobs.append(Job(f"match/{marm}/seed{seed}",
                            [py, "-m", "nexus_megatron.study.runner", "match", study_json, str(seed)], 1,
                            [f"train/{m.arm}/seed{seed}", f"train/{m.target}/seed{seed}"],
                            _marker_done(os.path.join(run_dir(st, marm, seed), "match.json"), match_settings(st))))
        for arm in arm_names(st):
            if not st.downstream.enabled and not (st.minima.enabled and arm in st.minima.arms):
                continue
            dep = (f"match/{arm}/seed{seed}" if arm.endswith(MATCHED_SUFFIX) else f"train/{arm}/seed{seed}")
            jobs.append(Job(f"analyze/{arm}/seed{seed}",
                            [py, "-m", "nexus_megatron.study.runner", "analyze", study_json, arm, str(seed)], 1,
                            [dep], _marker_done(os.path.join(run_dir(st, arm, seed), "analysis.json"),
                                                analysis_settings(st, arm))))
        if st.mechanisms.enabled:
            for arm in st.mechanisms.arms:
                jobs.append(Job(f"mechanisms/{arm}/seed{seed}",
                                [py, "-m", "nexus_megatron.study.runner", "mechanisms", study_json, arm, str(seed)], 1,
                                [f"train/{arm}/seed{seed}"],
                                _marker_done(os.path.join(run_dir(st, arm, seed), "mechanisms.json"),
                                             mechanisms_settings(st))))
    return jobs


def mechanisms_settings(st: Study) -> dict:
    return dataclasses.asdict(st.mechanisms)


def run_select(st: Study) -> dict:
    """The pre-registered lr choice: the lowest mean final ID validation loss over the selection seeds."""
    from ..checkpoint import atomic_write_text
    from .stats import select_by_mean

    sw = st.lr_sweep
    res = {}
    for lr in sw.values:
        res[float(lr)] = []
        for seed in sw.seeds:
            with open(os.path.join(sweep_dir(st, float(lr), seed), "summary.json")) as f:
                res[float(lr)].append(float(json.load(f)["final"]["eval/loss"]))
    sel = select_by_mean(res)
    out = {"values": [float(v) for v in sw.values], "seeds": list(sw.seeds), "arm": sw.arm,
           "selected": float(sel["selected"]), "at_edge": sel["at_edge"],
           "mean_id_loss": {f"{k:g}": v for k, v in sel["means"].items()},
           "id_loss": {f"{k:g}": v for k, v in res.items()}}
    atomic_write_text(selection_path(st), json.dumps(out, indent=1))
    return out


def run_train_arm(st: Study, arm: str, seed: int) -> int:
    """Train one arm whose config depends on the lr selection (resolved now)."""
    if needs_selection(st, arm) and selected_lr(st) is None:
        raise NexusConfigError(f"arm {arm!r} takes the lr the sweep selects, and {selection_path(st)} is missing: "
                               "run the sweep first (`--only train` runs it)")
    cfg = arm_config(st, arm, seed)
    path = os.path.join(st.study.out, "configs", f"{arm}_seed{seed}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    argv = [sys.executable, "-m", "nexus_megatron.cli", "train", "--config", path]
    if st.arms[arm].nproc > 1:
        argv += ["--nproc", str(st.arms[arm].nproc)]
    return subprocess.call(argv)


def run_jobs(jobs: List[Job], slots: int, log_dir: str, say=print) -> dict:
    """Run the jobs (dependencies first, at most ``slots`` cores busy); returns {name: record}."""
    os.makedirs(log_dir, exist_ok=True)
    t0 = time.time()
    rec: Dict[str, dict] = {}
    pending = []
    for j in jobs:
        if j.done():
            rec[j.name] = {"status": "skipped (already done)", "wall_s": 0.0}
        else:
            pending.append(j)
    if rec:
        say(f"{len(rec)} of {len(jobs)} jobs already done; {len(pending)} to run")
    running: Dict[str, tuple] = {}
    ok = {n for n, r in rec.items()}
    failed: set = set()
    while pending or running:
        for name, (proc, job, ts, fh) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            fh.close()
            del running[name]
            wall = time.time() - ts
            if rc == 0:
                ok.add(name)
                rec[name] = {"status": "ok", "wall_s": wall}
                say(f"[{time.time() - t0:6.0f}s] done   {name} ({wall:.0f}s)")
            else:
                failed.add(name)
                rec[name] = {"status": f"failed (exit {rc})", "wall_s": wall}
                say(f"[{time.time() - t0:6.0f}s] FAILED {name} (exit {rc}); log: {fh.name}")
        for j in list(pending):
            if any(d in failed for d in j.deps):
                pending.remove(j)
                failed.add(j.name)
                rec[j.name] = {"status": "not run (a dependency failed)", "wall_s": 0.0}
        free = slots - sum(job.slots for _, job, _, _ in running.values())
        for j in list(pending):
            if not all(d in ok for d in j.deps):
                continue
            if j.slots > free:
                break          # keep the order: a wide job is not starved by narrow ones behind it
            pending.remove(j)
            log = os.path.join(log_dir, j.name.replace("/", "_") + ".log")
            fh = open(log, "w")
            env = dict(os.environ)
            env.setdefault("OMP_NUM_THREADS", "1")
            env["MASTER_PORT"] = str(_free_port())
            env.update(j.env)
            proc = subprocess.Popen(j.argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
            running[j.name] = (proc, j, time.time(), fh)
            free -= j.slots
            say(f"[{time.time() - t0:6.0f}s] start  {j.name} ({j.slots} core{'s' if j.slots > 1 else ''})")
        if pending and not running and not any(all(d in ok for d in j.deps) for j in pending):
            for j in pending:    # cannot happen with build_jobs' dependencies; never spin forever
                rec[j.name] = {"status": "not run (unmet dependency)", "wall_s": 0.0}
                failed.add(j.name)
            pending = []
        time.sleep(0.2)
    return rec


# ---------------------------------------------------------------------------------------------------
# prepare

def prepare(st: Study, say=print) -> None:
    p = st.study.prepare
    cfg = arm_config(st, st.study.reference, st.study.seeds[0])
    if p.enabled and p.indexed:        # a user's own corpus: one Megatron indexed dataset per source
        from .corpus import import_indexed_corpus
        import_indexed_corpus(cfg.data.path, p.indexed, list(cfg.data.sources), list(cfg.data.ood),
                              val_tokens=p.val_tokens, train_tokens=p.train_tokens, vocab_size=p.vocab_size,
                              eot_id=p.eot_id, log=say)
    elif p.enabled:
        from ..data.prepare import prepare_data
        prepare_data(cfg.data.path, sources=tuple(cfg.data.sources), ood=tuple(cfg.data.ood),
                     train_tokens_per_source=p.train_tokens, val_tokens_per_source=p.val_tokens,
                     tokenizer=p.tokenizer, vocab_size=p.vocab_size, seed=p.seed, pkg_dir=st.study.pkg_dir,
                     log=say)
    if st.downstream.enabled:
        from .downstream import build_items
        for t in st.downstream.tasks:   # fetches the eval packages once, before any job needs them
            build_items(t, 1, st.downstream.seed, st.study.pkg_dir)


# ---------------------------------------------------------------------------------------------------
# match: the reference continued at its final learning rate until it reaches the target's loss

def _last(metrics_path: str, key: str):
    last = None
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if key in r:
                        last = r
    return last


def _read_metrics_list(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_match(st: Study, seed: int) -> dict:
    import torch

    from ..checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
    from ..train import train

    torch.set_num_threads(1)
    m = st.matched
    base_dir, target_dir = run_dir(st, m.arm, seed), run_dir(st, m.target, seed)
    out = run_dir(st, m.arm + MATCHED_SUFFIX, seed)
    with open(os.path.join(base_dir, "summary.json")) as f:
        base = json.load(f)
    with open(os.path.join(target_dir, "summary.json")) as f:
        target = float(json.load(f)["final"]["eval/loss"])
    base_cfg = arm_config(st, m.arm, seed)
    base_steps = base_cfg.train.steps
    ckpt = os.path.join(out, "checkpoints")
    if latest_checkpoint(ckpt) is None:        # start: the reference's final state, lr frozen at its last value
        os.makedirs(out, exist_ok=True)
        base_ckpt = latest_checkpoint(os.path.join(base_dir, "checkpoints"))
        state = load_checkpoint(base_ckpt)
        sched = state["scheduler"]
        sched["base_lrs"] = list(sched["_last_lr"])
        save_checkpoint(ckpt, state["client_state"]["step"], state, run=(read_meta(base_ckpt) or {}).get("run"))
        shutil.copyfile(os.path.join(base_dir, "metrics.jsonl"), os.path.join(out, "metrics.jsonl"))
        shutil.copyfile(os.path.join(base_dir, "summary.json"), os.path.join(out, "summary.json"))
        shutil.copyfile(os.path.join(base_dir, "config.json"), os.path.join(out, "config.json"))
    final_lr = float(load_checkpoint(latest_checkpoint(ckpt))["scheduler"]["base_lrs"][0])
    from .stats import value_at_first_crossing

    def curve():   # [(step, ID loss, OOD loss)]: the reference's last evaluation, then the continuation's
        evs = [r for r in _read_metrics_list(os.path.join(out, "metrics.jsonl")) if "eval/loss" in r]
        pts = [r for r in evs if r["step"] > base_steps]
        last_base = [r for r in evs if r["step"] <= base_steps][-1:]
        return [(r["step"], float(r["eval/loss"]), float(r.get("eval/ood_loss", math.nan))) for r in last_base + pts]
    while True:
        step = int(load_checkpoint(latest_checkpoint(ckpt))["client_state"]["step"])
        last = _last(os.path.join(out, "metrics.jsonl"), "eval/loss")
        loss = float(last["eval/loss"]) if last else math.inf
        if (loss <= target or value_at_first_crossing(curve(), target) is not None
                or step - base_steps >= m.max_extra_steps):
            break
        steps = min(step + m.chunk_steps, base_steps + m.max_extra_steps)
        raw = to_dict(base_cfg)
        for k, v in (("train.steps", steps), ("train.run_dir", out), ("train.resume", True),
                     ("train.eval_every", m.eval_every or 10 ** 9),   # dense, and at each chunk's end
                     ("train.probe_every", 10 ** 9),
                     ("optim.schedule", "constant"), ("optim.warmup_steps", 0), ("optim.lr", final_lr),
                     ("optim.min_lr", final_lr),
                     # the continuation changes the schedule on purpose (docs/training.md#resume); "run": a base
                     # checkpoint written before run records
                     ("train.allow_changed", ["optim.schedule", "optim.warmup_steps", "optim.lr", "optim.min_lr",
                                              "run"])):
            set_dotted(raw, k, v)
        cfg = load_config(None, [], base=raw)
        train(cfg)
    crossing = None       # the crossing of the target by linear interpolation between the last two evaluations
    evals = [r for r in _read_metrics_list(os.path.join(out, "metrics.jsonl")) if "eval/loss" in r]
    if loss <= target and len(evals) >= 2 and evals[-1]["step"] > base_steps:
        a, b = evals[-2], evals[-1]
        if a["eval/loss"] > target and a["eval/loss"] != b["eval/loss"]:
            f = (a["eval/loss"] - target) / (a["eval/loss"] - b["eval/loss"])
            crossing = a["step"] + f * (b["step"] - a["step"]) - base_steps
    result = {
        "settings": match_settings(st), "seed": seed, "target_arm": m.target, "target_loss": target,
        "base_loss": float(base["final"]["eval/loss"]), "base_steps": base_steps, "base_tokens": base["tokens"],
        "steps": step, "extra_steps": step - base_steps,
        "extra_tokens": int(last["tokens"]) - int(base["tokens"]) if last else 0,
        "loss": loss, "reached": loss <= target, "lr": final_lr,
        "extra_steps_interpolated": crossing if crossing is not None else float(step - base_steps),
    }
    # the pre-registered primary endpoint: the OOD loss on the reference's own ID -> OOD curve at the target's ID
    # loss (first crossing, linear between the two evaluations around it); None when not reached
    at = value_at_first_crossing(curve(), target)
    result["curve"] = curve()
    result["ood_at_target"] = at["value"] if at else None
    result["extra_steps_at_target"] = at["step"] - base_steps if at else None
    result["reached"] = at is not None
    atomic_write_text(os.path.join(out, "match.json"), json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------------
# analyze: downstream evaluation and closeness of minima of one final checkpoint

def load_final_model(rd: str):
    """(RunConfig, model, client_state) of the newest checkpoint in a run directory."""
    from ..checkpoint import latest_checkpoint, load_checkpoint
    from ..data.shards import load_manifest
    from ..models import build_model

    with open(os.path.join(rd, "config.json")) as f:
        cfg = load_config(None, [], base=json.load(f))
    path = latest_checkpoint(os.path.join(rd, "checkpoints"))
    if path is None:
        raise NexusConfigError(f"{rd} has no checkpoint: train it first")
    state = load_checkpoint(path)
    manifest = load_manifest(cfg.data.path)
    vocab = cfg.model.vocab_size or int(manifest["vocab_size"])
    model = build_model(cfg.model, vocab, cfg.data.seq_len, cfg.train.seed, eot_id=int(manifest.get("eot_id", 0)))
    model.load_state_dict(state["model"])
    model.eval()
    return cfg, model, state["client_state"], manifest


def finetune_batches(tr, name: str, consumed: int, steps: int, B: int, rd: str, what: str, knobs: str) -> list:
    """``steps`` batches of ``B`` sequences from the end of a source's first epoch, which the run in ``rd``
    (``consumed`` sequences) never read; an error naming ``knobs`` when they would overlap."""
    n = steps * B
    start = tr.windows - n
    if start < consumed:
        raise NexusConfigError(
            f"{what}: the fine-tuning data of source {name!r} (the last {n} sequences of its first epoch) overlaps "
            f"what {rd} trained on ({consumed} of {tr.windows}): prepare more data (study.prepare.train_tokens) or "
            f"lower {knobs}")
    return [tr.batch(start + t * B, B) for t in range(steps)]


def run_analyze(st: Study, arm: str, seed: int) -> dict:
    import torch

    from ..checkpoint import atomic_write_text
    from ..data.shards import open_sources
    from ..models import lm_loss

    torch.set_num_threads(1)
    rd = run_dir(st, arm, seed)
    cfg, model, client, manifest = load_final_model(rd)
    settings = analysis_settings(st, arm)
    out = {"settings": settings, "arm": arm, "seed": seed, "step": client["step"], "tokens": client["tokens"]}
    t0 = time.time()
    if settings["downstream"]:
        from ..data.tokenizer import load_tokenizer
        from .downstream import evaluate_tasks
        tinfo = manifest.get("tokenizer")
        tok_dir = os.path.join(cfg.data.path, tinfo.get("path", "tokenizer") if isinstance(tinfo, dict) else "tokenizer")
        if not os.path.isdir(tok_dir):
            raise NexusConfigError(f"downstream evaluation needs the data's tokenizer ({tok_dir} is missing): "
                                   "prepare the data with `nexus-megatron prepare-data` or set downstream.enabled=false")
        tok = load_tokenizer(tok_dir)
        ds = st.downstream
        out["downstream"] = evaluate_tasks(model, tok.encode, ds.tasks, n=ds.items, seed=ds.seed,
                                           max_len=cfg.data.seq_len, pkg_dir=st.study.pkg_dir,
                                           batch_size=ds.batch_size, pad_id=int(manifest.get("eot_id", 0)))
        out["downstream_s"] = time.time() - t0
    if settings["minima"]:
        from .minima import closeness_of_minima
        mi = st.minima
        t1 = time.time()
        names = list(cfg.data.sources)
        _, sources = open_sources(cfg.data.path, names, [], cfg.data.seq_len, cfg.train.seed)
        B = mi.batch_size
        train_batches, val_batches = {}, {}
        for i, name in enumerate(names):
            train_batches[name] = finetune_batches(sources[name].train, name, int(client["consumed"][i]), mi.steps, B,
                                                   rd, "minima", "minima.steps / minima.batch_size")
            val = sources[name].val
            val_batches[name] = [val.batch(b * B, B) for b in range(min(mi.eval_batches, val.windows // B or 1))]
        out["minima"] = closeness_of_minima(model, train_batches, val_batches, lambda m, b: lm_loss(m, b),
                                            lr=mi.lr, weight_decay=mi.weight_decay,
                                            betas=(cfg.optim.beta1, cfg.optim.beta2), points=mi.points)
        out["minima_s"] = time.time() - t1
    atomic_write_text(os.path.join(rd, "analysis.json"), json.dumps(out, indent=1))
    return out


def run_mechanisms(st: Study, arm: str, seed: int) -> dict:
    """The mechanism measures of one final checkpoint (:mod:`.mechanisms`) into ``mechanisms.json``."""
    import torch

    from ..checkpoint import atomic_write_text
    from ..data.shards import open_sources
    from ..models import lm_loss
    from .mechanisms import measure_mechanisms

    torch.set_num_threads(1)
    rd = run_dir(st, arm, seed)
    cfg, model, client, _ = load_final_model(rd)
    mc = st.mechanisms
    names, ood = list(cfg.data.sources), list(cfg.data.ood)
    _, sources = open_sources(cfg.data.path, names, ood, cfg.data.seq_len, cfg.train.seed)
    t0 = time.time()
    half, evalb, ft = {}, {}, {}
    for i, n in enumerate(names + ood):
        val = sources[n].val
        need = mc.eval_sequences + (2 * mc.half_sequences if n in names else 0)
        if val.windows < need:
            raise NexusConfigError(f"mechanisms: source {n!r} has {val.windows} validation sequences, the measures need "
                                   f"{need} (mechanisms.eval_sequences + 2 x mechanisms.half_sequences): prepare more "
                                   "validation data (study.prepare.val_tokens) or lower them")
        evalb[n] = val.batch(0, mc.eval_sequences)
        if n in names:      # the halves: validation sequences after the evaluation ones (disjoint from them)
            half[n] = val.batch(mc.eval_sequences, 2 * mc.half_sequences)
            ft[n] = finetune_batches(sources[n].train, n, int(client["consumed"][i]), mc.finetune_steps,
                                     mc.finetune_batch, rd, "mechanisms",
                                     "mechanisms.finetune_steps / mechanisms.finetune_batch")
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")   # GPU studies: on the GPU
    model.to(dev)
    half = {n: b.to(dev) for n, b in half.items()}
    evalb = {n: b.to(dev) for n, b in evalb.items()}
    ft = {n: [b.to(dev) for b in bs] for n, bs in ft.items()}
    r = measure_mechanisms(model, lambda m, b: lm_loss(m, b), half_batches=half, eval_batches=evalb,
                           finetune_batches=ft, finetune_lr=mc.finetune_lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                           points=mc.points, sharpness_start=mc.sharpness_start, sharpness_eps=mc.sharpness_eps)
    out = {"settings": mechanisms_settings(st), "arm": arm, "seed": seed, "step": client["step"], **r,
           "wall_s": time.time() - t0}
    atomic_write_text(os.path.join(rd, "mechanisms.json"), json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------------------------------
# the command

def experiment(args) -> int:
    st = load_study(args.config, args.set)
    steps = [s.strip() for s in (args.only or "prepare,train,match,analyze,mechanisms,report").split(",") if s.strip()]
    valid = ("prepare", "train", "match", "analyze", "mechanisms", "report")
    for s in steps:
        if s not in valid:
            raise NexusConfigError(f"--only {s!r}: use some of {', '.join(valid)} (comma separated)")
    out = st.study.out
    os.makedirs(out, exist_ok=True)
    study_json = os.path.join(out, "study.json")
    with open(study_json, "w") as f:
        json.dump(st.raw, f, indent=1)
    t0 = time.time()
    arms = ", ".join(f"{a} ({st.arms[a].nproc} proc)" for a in st.arms)
    print(f"study {out}: arms {arms}; seeds {st.study.seeds}; {st.study.slots} cores", flush=True)
    timing = {}
    if "prepare" in steps:
        prepare(st, say=lambda m: print(m, flush=True))
        timing["prepare_s"] = time.time() - t0
    jobs = build_jobs(st, study_json)
    wanted = {"train": "train/", "match": "match/", "analyze": "analyze/", "mechanisms": "mechanisms/"}
    jobs = [j for j in jobs if any(j.name.startswith(wanted[s]) for s in steps if s in wanted)]
    names = {j.name for j in jobs}
    for j in jobs:              # a dependency outside the selected steps must already be done
        j.deps = [d for d in j.deps if d in names]
    rec = run_jobs(jobs, st.study.slots, os.path.join(out, "logs"), say=lambda m: print(m, flush=True)) if jobs else {}
    timing["jobs"] = rec
    timing["total_s"] = time.time() - t0
    with open(os.path.join(out, f"timing_{time.strftime('%Y%m%d-%H%M%S')}.json"), "w") as f:
        json.dump(timing, f, indent=1)
    failed = [n for n, r in rec.items() if not (r["status"] == "ok" or r["status"].startswith("skipped"))]
    if "report" in steps:
        from .report import write_report
        write_report(st, os.path.join(out, "report"), say=lambda m: print(m, flush=True))
    print(f"study finished in {time.time() - t0:.0f}s" + (f"; {len(failed)} job(s) did not finish: "
                                                           f"{', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="study YAML (configs/study_cpu.yaml, configs/study_gpu_130m.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study setting with a dotted key, e.g. study.seeds=[0] or run.train.steps=50")
    p.add_argument("--only", default=None,
                   help="comma-separated steps to run: prepare,train,match,analyze,mechanisms,report (default: all)")


def main(argv=None) -> int:
    """Internal entry points of the job subprocesses: ``select <study.json>``, ``train <study.json> <arm> <seed>``
    (an arm whose lr the sweep selects), ``match <study.json> <seed>``, ``analyze <study.json> <arm> <seed>`` and
    ``mechanisms <study.json> <arm> <seed>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with open(argv[1]) as f:
        st = load_study(None, [], raw=json.load(f))
    if argv[0] == "select":
        print(json.dumps(run_select(st), indent=1))
    elif argv[0] == "train":
        return run_train_arm(st, argv[2], int(argv[3]))
    elif argv[0] == "mechanisms":
        r = run_mechanisms(st, argv[2], int(argv[3]))
        print(json.dumps({"arm": r["arm"], "seed": r["seed"], "mean_corrected_cosine": r["cosine"]["mean_corrected"],
                          "wall_s": r["wall_s"]}, indent=1))
    elif argv[0] == "match":
        r = run_match(st, int(argv[2]))
        print(json.dumps(r, indent=1))
    elif argv[0] == "analyze":
        r = run_analyze(st, argv[2], int(argv[3]))
        print(json.dumps({k: v for k, v in r.items() if k != "minima"}, indent=1))
    else:
        raise SystemExit(f"unknown job {argv[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
