"""``nexus-megatron bench``: what Nexus costs next to AdamW, measured in one run.

On the same model, batch, engine and layout (synthetic tokens: timing and bytes do not depend on the
text), for the AdamW baseline and for Nexus in each source layout, with and without overlap of the
gradient reduction (plain engine: ``nexus.overlap_grad_reduce``; DeepSpeed: ``overlap_comm``; Megatron:
``overlap_grad_reduce`` and ``overlap_param_gather``, see :mod:`nexus_megatron.tools.bench_megatron`):

* step time: median over the timed outer steps (after warm-up) of the slowest rank's wall time;
  tokens/s from it;
* memory per rank: the exact bytes of the training state alive between outer steps (every tensor
  storage reachable from the engine, counted once, by category: parameters, gradient buffers,
  optimizer moments, fp32 master partitions, the Nexus anchor / displacement, other engine buffers),
  and the peak during the run: on a GPU ``torch.cuda.max_memory_allocated`` above the start of the
  run, on the CPU the growth of the peak resident set size (VmHWM, reset through
  /proc/self/clear_refs) -- activations, transient gradients and allocator behaviour included;
* bytes communicated per outer step and per micro-step: every collective of ``torch.distributed``
  called during the timed steps is counted (payload, and ring "bus" bytes sent per rank, see
  :func:`nexus_megatron.tools.plan.bus_factor`), by wrapping ``torch.distributed``'s collectives in this
  process before any engine is built (DeepSpeed binds its all-gather / reduce-scatter functions when
  it initialises, so it binds the counting ones);
* ratios Nexus / AdamW, and the plan model's prediction of the bytes (:mod:`nexus_megatron.tools.plan`);
* the interleaved ratio (``--pairs``, plain engine): AdamW and Nexus engines side by side, stepped
  alternately, one ratio per pair, the median with a bootstrap 95% interval (and the CPU-time ratio), next
  to the modelled elementwise bytes per parameter per micro-step of both (``plan.inner_step_passes``);
* the critical-sharpness hook (``sharpness.every=1``; plain engine, DeepSpeed through its seam, Megatron
  through ``pre_outer_step`` / ``step_with_pre_update``): forward passes and seconds per measurement,
  relative to the training step.

Runs under torchrun (``--nproc``), gloo on the CPU, NCCL on GPUs, the same command.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import time
import types
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import NexusConfigError
from .launch import under_launcher
from .measure import (COUNTER, CommCounter, PeakMemory, StateAccount, account_engine, HookFigures,  # noqa: F401 (bench's API)
                      max_over_ranks, payload_bytes, quiet_barrier, summarize_comm, sync_device)

BENCH_MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4}
BENCH_VOCAB = 8192
BENCH_SEQ, BENCH_MICRO_BATCH, BENCH_K = 128, 4, 4


# ---------------------------------------------------------------------------------------------------
# synthetic sources (same interface as the prepared-data samplers)
# ---------------------------------------------------------------------------------------------------

class SyntheticSampler:
    """Sequence ``j`` of a source: uniform random tokens seeded by (seed, source, split, j)."""

    windows = 1 << 40

    def __init__(self, vocab: int, seq_len: int, seed: int, source: int, split: int):
        self.vocab, self.seq_len, self.key = vocab, seq_len, (seed, source, split)

    def batch(self, start: int, count: int) -> torch.Tensor:
        from ..layout import hash_seed
        rows = [torch.randint(0, self.vocab, (self.seq_len + 1,),
                              generator=torch.Generator().manual_seed(hash_seed(*self.key, start + j)))
                for j in range(count)]
        return torch.stack(rows)


def synthetic_sources(names, vocab: int, seq_len: int, seed: int = 0) -> dict:
    return {n: types.SimpleNamespace(train=SyntheticSampler(vocab, seq_len, seed, i, 0),
                                     val=SyntheticSampler(vocab, seq_len, seed, i, 1))
            for i, n in enumerate(names)}


# ---------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------

def add_bench_arguments(a) -> None:
    a.add_argument("--config", help="run config for the model shape, seq_len, micro batch and k (default: a "
                                    f"{BENCH_MODEL['num_layers']}-layer, hidden-{BENCH_MODEL['hidden_size']} Llama, "
                                    f"vocab {BENCH_VOCAB}, {BENCH_MICRO_BATCH} x {BENCH_SEQ} tokens, k = {BENCH_K})")
    a.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config setting")
    a.add_argument("--nproc", type=int, default=1, help="processes on this machine (launches torchrun)")
    a.add_argument("--engine", choices=("plain", "deepspeed", "megatron"), default="plain")
    a.add_argument("--zero", type=int, default=2, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    a.add_argument("--bf16", action="store_true", help="DeepSpeed, Megatron: bf16 parameters and compute (slow on "
                                                       "CPUs)")
    a.add_argument("--dist-opt", action=argparse.BooleanOptionalAction, default=True,
                   help="Megatron: the distributed optimizer (default) or plain DDP")
    a.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=True,
                   help="Megatron: with --overlap on, overlap the gradient reduce-scatter with backward")
    a.add_argument("--overlap-param-gather", action=argparse.BooleanOptionalAction, default=True,
                   help="Megatron (distributed optimizer) and DeepSpeed ZeRO-1/2 under Nexus: with --overlap on, "
                        "overlap the parameter all-gather with the next forward (DeepSpeed: ds_config "
                        "nexus.overlap_param_gather, buckets of --bucket-size elements)")
    a.add_argument("--tp", type=int, default=1, help="Megatron: tensor-parallel size")
    a.add_argument("--layouts", default="sequential,source-parallel")
    a.add_argument("--overlap", default="off,on", help="off, on, or off,on: gradient-reduction overlap "
                                                       "(plain: nexus.overlap_grad_reduce; DeepSpeed: overlap_comm; "
                                                       "Megatron: --overlap-grad-reduce / --overlap-param-gather)")
    a.add_argument("--sources", type=int, default=2, help="number of (synthetic) data sources K")
    a.add_argument("--steps", type=int, default=3, help="timed outer steps per run")
    a.add_argument("--warmup", type=int, default=1, help="untimed outer steps before them")
    a.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole set of runs this many times, interleaved (the median is over every "
                        "timed step of every round: on a shared machine, load drifts hit all runs alike)")
    a.add_argument("--pairs", type=int, default=None,
                   help="interleaved timing: for each layout and overlap, an AdamW and a Nexus engine side by side, "
                        "this many pairs of timed steps alternating between them; reports the median per-pair "
                        "ratio with 95%% intervals next to the modelled bytes per parameter per micro-step "
                        "(default 6 on --engine plain; 0 = off; plain engine only)")
    a.add_argument("--bucket-size", type=int, default=1_000_000, help="elements per gradient bucket")
    a.add_argument("--ds-zero-set", action="append", default=[], metavar="KEY=VALUE",
                   help="DeepSpeed: set zero_optimization.KEY (JSON value), e.g. use_multi_rank_bucket_allreduce=false")
    a.add_argument("--sharpness", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the critical-sharpness hook (every engine: one AdamW and one Nexus run with "
                        "sharpness.every=1 on the first layout, overlap off)")
    a.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = default)")
    a.add_argument("--out", default=None, help="write every figure as JSON here (rank 0)")


def bench_argv(args) -> list:
    argv = ["bench"]
    if args.config:
        argv += ["--config", args.config]
    for s in args.set:
        argv += ["--set", s]
    argv += ["--engine", args.engine, "--zero", str(args.zero), "--layouts", args.layouts, "--overlap", args.overlap,
             "--sources", str(args.sources), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--rounds", str(args.rounds), *(["--pairs", str(args.pairs)] if args.pairs is not None else []),
             "--bucket-size", str(args.bucket_size), "--threads", str(args.threads),
             "--sharpness" if args.sharpness else "--no-sharpness"]
    if args.bf16:
        argv.append("--bf16")
    if args.engine == "megatron":
        argv += ["--tp", str(args.tp), "--dist-opt" if args.dist_opt else "--no-dist-opt",
                 "--overlap-grad-reduce" if args.overlap_grad_reduce else "--no-overlap-grad-reduce",
                 "--overlap-param-gather" if args.overlap_param_gather else "--no-overlap-param-gather"]
    for s in args.ds_zero_set:
        argv += ["--ds-zero-set", s]
    if args.out:
        argv += ["--out", args.out]
    return argv


def _split(value: str, allowed, what: str) -> list:
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if not items or bad:
        raise NexusConfigError(f"bench --{what}={value!r}: use a comma-separated list of {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def check_bench_args(args) -> dict:
    """Validate everything before any process starts; returns the base config dict of the runs."""
    from ..config import load_config, to_dict
    from ..layout import LAYOUTS

    for name in ("sources", "steps", "nproc", "bucket_size", "rounds"):
        v = getattr(args, name)
        if not (isinstance(v, int) and v >= 1):
            raise NexusConfigError(f"bench --{name.replace('_', '-')}={v!r}: must be an integer >= 1")
    if not (isinstance(args.warmup, int) and args.warmup >= 0):
        raise NexusConfigError(f"bench --warmup={args.warmup!r}: must be an integer >= 0")
    if args.pairs is None:
        args.pairs = 6 if args.engine == "plain" else 0
    if not (isinstance(args.pairs, int) and args.pairs >= 0):
        raise NexusConfigError(f"bench --pairs={args.pairs!r}: must be an integer >= 0")
    if args.pairs and args.engine != "plain":
        raise NexusConfigError(f"bench --pairs={args.pairs}: the interleaved pairs are implemented for --engine "
                               "plain only; pass --pairs 0 (or use --rounds to interleave whole runs)")
    args.layout_list = _split(args.layouts, LAYOUTS, "layouts")
    args.overlap_list = [v == "on" for v in _split(args.overlap, ("off", "on"), "overlap")]
    if args.ds_zero_set and args.engine != "deepspeed":
        raise NexusConfigError("bench --ds-zero-set: DeepSpeed settings need --engine deepspeed")
    if args.bf16 and args.engine == "plain":
        raise NexusConfigError("bench --bf16: the plain engine keeps fp32 parameters; use --engine deepspeed --bf16 "
                               "or --engine megatron --bf16")
    if args.engine == "megatron":
        from .bench_megatron import check_megatron_runtime
        check_megatron_runtime()
        world = args.nproc if not under_launcher() else int(os.environ.get("WORLD_SIZE", "1"))
        if not (isinstance(args.tp, int) and args.tp >= 1 and world % args.tp == 0):
            raise NexusConfigError(f"bench --tp={args.tp!r}: must divide the number of processes ({world})")
        if args.overlap_param_gather and not args.dist_opt and True in args.overlap_list:
            raise NexusConfigError("bench --overlap-param-gather needs the distributed optimizer: drop --no-dist-opt "
                                   "or pass --no-overlap-param-gather")
    elif args.tp != 1:
        raise NexusConfigError("bench --tp: tensor parallelism is measured on --engine megatron only")
    if args.config:
        raw = to_dict(load_config(args.config, args.set))
    else:
        raw = to_dict(load_config(None, args.set, base={"model": dict(BENCH_MODEL),
                                                         "data": {"seq_len": BENCH_SEQ,
                                                                  "micro_batch_size": BENCH_MICRO_BATCH},
                                                         "train": {"micro_steps": BENCH_K}}))
    # the configs' models use the GPT-2 tokenizer (50257); the built-in bench model a small vocabulary
    raw["model"]["vocab_size"] = raw["model"]["vocab_size"] or (50257 if args.config else BENCH_VOCAB)
    raw["data"].update(sources=[f"s{i}" for i in range(args.sources)], ood=[], weights=None)
    raw["optim"].update(lr=1e-3, min_lr=1e-4, warmup_steps=0, schedule="constant")
    raw["train"].update(steps=args.warmup + args.steps, progress=False, eval_every=0, probe_every=0,
                        wandb={"mode": "disabled", "project": "nexus-megatron", "name": None},
                        threads=args.threads)
    raw["sharpness"] = {"enabled": False}
    if "source-parallel" in args.layout_list:
        world = args.nproc if not under_launcher() else int(os.environ.get("WORLD_SIZE", "1"))
        if args.engine == "megatron":
            world //= args.tp          # the sources are dealt over the data-parallel ranks
        if world % args.sources or args.sources > world:
            raise NexusConfigError(
                f"bench: the source-parallel layout needs a number of processes ({world}) that is a multiple of "
                f"--sources ({args.sources}); change --nproc or --sources, or pass --layouts sequential")
    if args.engine != "megatron":   # (Megatron runs build their model from raw's model section directly)
        for spec in _specs(args):   # every run's config is valid (a bad --set fails here, not after some runs)
            _run_config(raw, spec, args)
    return raw


@dataclass
class Spec:
    optim: str
    layout: str
    overlap: bool
    sharpness: bool = False

    @property
    def label(self) -> str:
        return f"{self.optim} {self.layout} overlap={'on' if self.overlap else 'off'}" + \
            (" +sharpness" if self.sharpness else "")


def _specs(args) -> list:
    out = [Spec(optim, layout, ov) for layout in args.layout_list for ov in args.overlap_list
           for optim in ("adamw", "nexus")]
    if args.sharpness:
        lay = args.layout_list[0]
        out += [Spec("adamw", lay, False, True), Spec("nexus", lay, False, True)]
    return out


def _ds_config(raw: dict, args, overlap: bool, optim: str = "adamw") -> str:
    cfg = {"train_micro_batch_size_per_gpu": raw["data"]["micro_batch_size"],
           "gradient_accumulation_steps": raw["train"]["micro_steps"], "gradient_clipping": 1.0,
           "steps_per_print": 1 << 30, "wall_clock_breakdown": False, "bf16": {"enabled": bool(args.bf16)},
           "zero_optimization": {"stage": args.zero, "overlap_comm": overlap, "contiguous_gradients": True,
                                 "reduce_bucket_size": args.bucket_size, "allgather_bucket_size": args.bucket_size}}
    if args.zero == 3:
        cfg["zero_optimization"].update(stage3_prefetch_bucket_size=args.bucket_size,
                                        stage3_param_persistence_threshold=0)
    cfg["zero_optimization"].update(ds_zero_settings(args))
    if optim == "nexus" and overlap and args.overlap_param_gather and args.zero in (1, 2):
        # ZeRO-1/2 under Nexus: the per-micro-step parameter all-gather overlapped with the next forward
        # (engines/deepspeed/param_gather.py); DeepSpeed's AdamW gathers once per step, synchronously
        cfg["nexus"] = {"overlap_param_gather": True, "param_gather_bucket_size": args.bucket_size}
    return json.dumps(cfg)


def ds_zero_settings(args) -> dict:
    out = {}
    for item in args.ds_zero_set:
        if "=" not in item:
            raise NexusConfigError(f"bench --ds-zero-set {item!r}: write it as KEY=VALUE, e.g. overlap_comm=true")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            raise NexusConfigError(f"bench --ds-zero-set {item!r}: the value must be JSON (true, 5e8, ...)") from None
    return out


def _run_config(raw: dict, spec: Spec, args):
    from ..config import load_config

    r = copy.deepcopy(raw)
    r["optim"]["name"] = spec.optim
    r["nexus"].update(layout=spec.layout, bucket_size=args.bucket_size,
                      overlap_grad_reduce=bool(spec.overlap and args.engine == "plain"))
    r["train"]["engine"] = args.engine
    r["train"]["deepspeed_config"] = (_ds_config(raw, args, spec.overlap, spec.optim) if args.engine == "deepspeed"
                                      else None)
    if spec.sharpness:
        r["sharpness"] = {"enabled": True, "every": 1, "split": "step", "relative": True, "batches": 1}
    return load_config(None, [], base=r)


# ---------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------

PHASES = ("forward + backward", "inner steps", "outer step")
"""Where a bench step's time goes. A collective lands in the phase that issues or waits for it: Nexus's reduction
of every micro-step in "inner steps" (in "forward + backward" where it overlaps backward), AdamW's one
reduction of the step in "outer step" (in the last backward under the overlap); so does the wait for the
slowest rank at each collective."""


class PhaseClock:
    """Wall and CPU seconds per phase of one step: :meth:`lap` ends the current interval and books it to
    ``name`` (None: not booked). On a GPU the wall times are the device's, from CUDA events (no
    synchronization inside the step; :meth:`finish` reads them after the step has synchronized)."""

    def __init__(self, device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self.cuda = device.type == "cuda"
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self._events = []
        self._t, self._c = time.perf_counter(), time.process_time()
        if enabled and self.cuda:
            self._last = self._record()

    def _record(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def lap(self, name: Optional[str]) -> None:
        if not self.enabled:
            return
        t, c = time.perf_counter(), time.process_time()
        if name is not None:
            self.cpu[name] += c - self._c
            if not self.cuda:
                self.wall[name] += t - self._t
        if self.cuda:
            ev = self._record()
            if name is not None:
                self._events.append((name, self._last, ev))
            self._last = ev
        self._t, self._c = t, c

    def finish(self) -> None:
        """After the step's device synchronization: the GPU phases' times from their events."""
        for name, start, end in self._events:
            self.wall[name] += start.elapsed_time(end) / 1e3
        self._events = []


class BenchRun:
    """One engine of the bench on its own model and data stream, stepped one outer step at a time (so that
    :func:`run_one` can time it alone and :func:`run_pairs` can interleave two of them)."""

    def __init__(self, raw: dict, spec: Spec, args, sources: dict, rank: int, world: int, device):
        from ..layout import LayoutConfig, build_layout
        from ..models import build_model
        from ..sharpness import build_sharpness_hook
        from ..train import build_engine

        self.spec, self.world, self.device = spec, world, device
        self.cfg = cfg = _run_config(raw, spec, args)
        self.names = names = list(cfg.data.sources)
        self.layout = layout = build_layout(LayoutConfig(mode=spec.layout, sources=tuple(names), seed=cfg.nexus.seed))
        self.mem = PeakMemory(device)
        self.model = model = build_model(cfg.model, cfg.model.vocab_size, cfg.data.seq_len, seed=0)
        if cfg.train.engine == "plain":
            model.to(device)
        model.train()
        self.engine = engine = build_engine(cfg, model, layout)
        self.hook = None
        if spec.sharpness:
            self.hook = build_sharpness_hook(cfg.sharpness, engine, sources, names, [], layout.weights.tolist(),
                                             micro_batch_size=cfg.data.micro_batch_size, rank=rank, world=world)
        self.sources = sources
        self.consumed = [0] * len(names)
        self.figures = HookFigures()
        self.phases = {name: ([], []) for name in PHASES}
        """Per timed step, the wall and CPU seconds of each phase (:data:`PHASES`)."""

    def step(self, step: int, timed: bool, phases: bool = False) -> None:
        """One outer step (k micro-steps); its wall and CPU time are kept when ``timed`` (and, with ``phases``,
        the time of each phase: the interleaved pairs, whose table reports them)."""
        from ..models import lm_loss

        cfg, layout, engine, hook = self.cfg, self.layout, self.engine, self.hook
        B, k = cfg.data.micro_batch_size, cfg.train.micro_steps
        micro = []
        for m in range(k):
            src = layout.source_for(step, m)
            reader, _ = layout.readers(src, step, m)
            micro.append((src, self.sources[self.names[src]].train.batch(self.consumed[src] + reader * B, B)))
            for s, r in layout.present(step, m):
                self.consumed[s] += r * B
        sync_device(self.device)
        quiet_barrier()
        clock = PhaseClock(self.device, enabled=timed and phases)
        self.figures.start(timed)
        for m, (src, batch) in enumerate(micro):
            if hook is not None and m == k - 1:   # before the last micro-step: DeepSpeed's hook runs inside it
                hook.begin_step(step + 1, [b for _, b in micro])
            clock.lap(None)
            loss = lm_loss(engine.module, batch)
            engine.backward(loss)
            clock.lap(PHASES[0])
            engine.micro_step(src)
            clock.lap(PHASES[1])
        engine.outer_step()
        clock.lap(PHASES[2])
        self.figures.stop(timed, hook, self.device)
        clock.finish()
        if clock.enabled:
            for name, (wall, cpu) in self.phases.items():
                wall.append(clock.wall[name])
                cpu.append(clock.cpu[name])

    def close(self) -> None:
        buckets = getattr(getattr(self.engine, "opt", None), "buckets", None)
        if buckets is not None:
            buckets.remove()
        self.engine = self.model = self.hook = None

    def row(self, steps: int) -> dict:
        """Every figure of the run (collectives counted since the last ``COUNTER.take()``)."""
        from ..models import count_params

        cfg, spec, engine, device, world = self.cfg, self.spec, self.engine, self.device, self.world
        B, L, k = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.train.micro_steps
        comm = summarize_comm(COUNTER.take(), steps, k)
        state = account_engine(engine)
        peak = self.mem.peak()
        times = max_over_ranks(self.figures.times, device)
        cpu_times = max_over_ranks(self.figures.cpu_times, device)
        P = count_params(self.model) if cfg.train.engine == "plain" else _ds_num_params(engine)
        row = {"optim": spec.optim, "layout": spec.layout, "overlap": spec.overlap, "sharpness": spec.sharpness,
               "engine": cfg.train.engine, "step_s": statistics.median(times), "step_times": times,
               "cpu_times": cpu_times, "cpu_s": statistics.median(cpu_times),
               "tokens_per_s": world * k * B * L / statistics.median(times), "state": state, "peak_bytes": peak,
               "peak_what": self.mem.what, "comm": comm, "params": P, "flat_numel": _flat_numel(engine)}
        if self.hook is not None:
            self.figures.summarize(row, times, device)
        nx = getattr(engine, "nexus", None)
        pg = getattr(getattr(nx, "_core", None), "param_gather", None)
        if pg is not None:      # DeepSpeed ZeRO-1/2 with nexus.overlap_param_gather
            row["param_gather_buckets"] = pg.num_buckets
            row["param_gather_waited_in_forward"] = pg.stats["waited_in_forward"]
        buckets = getattr(getattr(engine, "opt", None), "buckets", None)
        if buckets is not None:
            row["buckets"] = len(buckets.ranges)
        return row


def run_one(raw: dict, spec: Spec, args, sources: dict, rank: int, world: int, device,
            steps: Optional[int] = None, warmup: Optional[int] = None) -> dict:
    steps = args.steps if steps is None else steps
    warmup = args.warmup if warmup is None else warmup
    run = BenchRun(raw, spec, args, sources, rank, world, device)
    COUNTER.take()
    for step in range(warmup + steps):
        if step == warmup:
            run.mem.reset_peak()   # the peak of the timed steps (over the memory before the model was built)
        run.step(step, timed=step >= warmup)
    row = run.row(steps)
    run.close()
    del run
    gc.collect()
    return row


def run_pairs(raw: dict, layout: str, overlap: bool, args, sources: dict, rank: int, world: int, device) -> dict:
    """The interleaved step-time ratio: an AdamW and a Nexus engine built side by side (same model init,
    same data), ``max(1, --warmup)`` untimed steps each, then ``--pairs`` pairs of timed outer steps,
    AdamW then Nexus, the order swapped every other pair (so a load drift or a cache left warm by the
    previous step favours neither). Each pair gives one ratio; see :func:`ratio_summary`."""
    runs = {o: BenchRun(raw, Spec(o, layout, overlap), args, sources, rank, world, device) for o in ("adamw", "nexus")}
    warm = max(1, args.warmup)
    for step in range(warm):
        for o in ("adamw", "nexus"):
            runs[o].step(step, timed=False)
    for i in range(args.pairs):
        order = ("adamw", "nexus") if i % 2 == 0 else ("nexus", "adamw")
        for o in order:
            runs[o].step(warm + i, timed=True, phases=True)
    COUNTER.take()   # (the pairs' collectives are not reported: the single runs count them)
    t = {o: max_over_ranks(r.figures.times, device) for o, r in runs.items()}
    c = {o: max_over_ranks(r.figures.cpu_times, device) for o, r in runs.items()}
    phases = {o: {name: {"wall": statistics.median(max_over_ranks(w, device)),
                         "cpu": statistics.median(max_over_ranks(cp, device))}
                  for name, (w, cp) in r.phases.items()} for o, r in runs.items()}
    for r in runs.values():
        r.close()
    del runs
    gc.collect()
    ratios = [n / a for n, a in zip(t["nexus"], t["adamw"])]
    cpu_ratios = [n / a for n, a in zip(c["nexus"], c["adamw"])]
    return {"layout": layout, "overlap": overlap, "pairs": args.pairs, "adamw_times": t["adamw"],
            "nexus_times": t["nexus"], "ratios": ratios, **ratio_summary(ratios),
            "adamw_cpu_times": c["adamw"], "nexus_cpu_times": c["nexus"], "cpu_ratios": cpu_ratios,
            "cpu": ratio_summary(cpu_ratios), "phases": phases}


def ratio_summary(ratios: list, resamples: int = 2000, seed: int = 0) -> dict:
    """Median of the per-pair ratios with a 95% percentile-bootstrap interval of the median (seeded: the same
    interval for the same ratios), and the geometric mean with a t 95% interval (on the log ratios)."""
    import random

    n = len(ratios)
    out = {"median": statistics.median(ratios) if n else math.nan}
    if n < 2:
        return {**out, "median_lo": math.nan, "median_hi": math.nan, "geomean": out["median"],
                "geomean_lo": math.nan, "geomean_hi": math.nan}
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(resamples))
    out["median_lo"], out["median_hi"] = meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]
    logs = [math.log(r) for r in ratios]
    m, sd = statistics.mean(logs), statistics.stdev(logs)
    half = T975[min(n - 1, len(T975)) - 1] * sd / math.sqrt(n)
    out.update(geomean=math.exp(m), geomean_lo=math.exp(m - half), geomean_hi=math.exp(m + half))
    return out


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
"""Student t 0.975 quantiles for 1..30 degrees of freedom (beyond 30: the 30 value, within 3% of 1.96)."""


def modelled_bytes(optim: str, layout: str, k: int) -> dict:
    """The plain engine's modelled elementwise bytes per parameter per micro-step (tools/plan.py)."""
    from .plan import bytes_per_micro_step, inner_step_passes
    return bytes_per_micro_step(inner_step_passes(optim, layout, k), k)


def pairs_table(pairs: list, k: int, load: tuple) -> list:
    """The interleaved ratio next to the modelled bytes per parameter per micro-step."""
    if not pairs:
        return []
    lines = ["", f"interleaved step-time ratio Nexus / AdamW ({pairs[0]['pairs']} pairs per row, AdamW and Nexus "
                 "alternating, order swapped every pair; load average "
                 f"{load[0]:.2f} at the start, {load[1]:.2f} at the end), next to the modelled elementwise bytes per "
                 "parameter per micro-step (reads + writes, fp32; the outer step's passes spread over the k "
                 "micro-steps; tools/plan.py inner_step_passes):",
             "| layout | overlap | AdamW step s | Nexus step s | ratio (median of pairs) | 95% CI (bootstrap) "
             "| geo. mean | 95% CI (t) | CPU-time ratio (median) | 95% CI (bootstrap) "
             "| Nexus B/param/micro-step | AdamW B/param/micro-step | extra |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        bn, ba = modelled_bytes("nexus", p["layout"], k), modelled_bytes("adamw", p["layout"], k)
        lines.append(f"| {p['layout']} | {'on' if p['overlap'] else 'off'} | {statistics.median(p['adamw_times']):.3f} "
                     f"| {statistics.median(p['nexus_times']):.3f} | **{p['median']:.3f}** | "
                     f"{p['median_lo']:.3f}-{p['median_hi']:.3f} | {p['geomean']:.3f} | "
                     f"{p['geomean_lo']:.3f}-{p['geomean_hi']:.3f} | {p['cpu']['median']:.3f} | "
                     f"{p['cpu']['median_lo']:.3f}-{p['cpu']['median_hi']:.3f} | {bn['total']:.0f} ({bn['inner']:.0f} + "
                     f"{bn['step']:.0f}) | {ba['total']:.0f} ({ba['inner']:.0f} + {ba['step']:.0f}) | "
                     f"{bn['total'] - ba['total']:.0f} |")
    lines.append("(ratio: wall time of the slowest rank; CPU-time ratio: CPU time of the busiest rank, all threads, "
                 "less sensitive to other jobs on a shared CPU; bytes: micro-step passes + the outer step's / k)")
    lines += ["", "where a step's time goes in those pairs: seconds per outer step, wall (CPU), median over the pairs' "
                  "steps of the slowest rank in each phase (a collective, and the wait for the slowest rank at it, "
                  "count in the phase that issues or waits for it):",
              "| layout | overlap | optimizer | " + " | ".join(PHASES) + " | wall - CPU, all phases |",
              "|---|---|---|" + "---|" * (len(PHASES) + 1)]
    for p in pairs:
        for o in ("adamw", "nexus"):
            ph = p["phases"][o]
            idle = sum(ph[n]["wall"] - ph[n]["cpu"] for n in PHASES)
            lines.append(f"| {p['layout']} | {'on' if p['overlap'] else 'off'} | {o} | "
                         + " | ".join(f"{ph[n]['wall']:.3f} ({ph[n]['cpu']:.3f})" for n in PHASES)
                         + f" | {idle:.3f} |")
    return lines


def time_allreduce(numel: int, device, repeats: int = 5) -> Optional[float]:
    """Median seconds of one fp32 all-reduce of ``numel`` elements over all ranks (uncounted): the unit
    of communication of the issue's targets, on this machine, now."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    buf = torch.zeros(numel, dtype=torch.float32, device=device if device.type == "cuda" else "cpu")
    times = []
    for i in range(repeats + 1):
        sync_device(device)
        quiet_barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        sync_device(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(max_over_ranks(times, device))


def _ds_num_params(engine) -> int:
    nx = getattr(engine, "nexus", None)
    ds = nx.ds_engine if nx is not None else engine.ds
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in ds.module.parameters())


def _flat_numel(engine) -> Optional[int]:
    opt = getattr(engine, "opt", None)
    buf = getattr(opt, "flat_grad", None)
    return None if buf is None else buf.numel()


# ---------------------------------------------------------------------------------------------------
# the plan model's prediction for a row, and the table
# ---------------------------------------------------------------------------------------------------

def plan_input_for(row: dict, raw: dict, args, world: int, device_type: str):
    from .plan import PlanInput

    m = raw["model"]
    z = ds_zero_settings(args)
    ds = {}
    if "use_multi_rank_bucket_allreduce" in z:
        ds["ds_bucket_allreduce"] = bool(z["use_multi_rank_bucket_allreduce"])
    if "stage3_max_reuse_distance" in z:
        ds["ds_reuse_distance"] = float(z["stage3_max_reuse_distance"])
    if row["engine"] == "deepspeed" and row.get("param_gather_buckets"):
        ds["param_gather_overlap"] = True
    if row["engine"] == "megatron":
        ds = {"tp": row["tp"], "dist_opt": row["dist_opt"], "param_gather_overlap": row["overlap_param_gather"]}
    return PlanInput(params=row["params"], hidden=m["hidden_size"], layers=m["num_layers"], heads=m["num_heads"],
                     vocab=m["vocab_size"], nodes=1, gpus_per_node=world, engine=row["engine"],
                     zero=args.zero if row["engine"] == "deepspeed" else None,
                     dtype="bf16" if args.bf16 else "fp32", micro_batch=raw["data"]["micro_batch_size"],
                     seq_len=raw["data"]["seq_len"], k=raw["train"]["micro_steps"], sources=args.sources,
                     padded_params=row.get("flat_numel") or row.get("grad_buffer_numel") or None, **ds)


def predicted(row: dict, raw: dict, args, world: int, device_type: str) -> dict:
    """The plan model's bytes for this row (the plain engine's ops are exact; DeepSpeed's are its model)."""
    from .plan import comm_ops, state_bytes, validate

    p = validate(plan_input_for(row, raw, args, world, device_type))
    ops = comm_ops(p, row["optim"], row["layout"], overlap=row["overlap"], buckets=row.get("buckets", 1))
    return {"bus_per_step": sum(o.bus for o in ops), "payload_per_step": sum(o.payload for o in ops),
            "ops": ops, "state": state_bytes(p, row["optim"], row["layout"], overlap=row["overlap"])}


def _mb(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f}"


def format_table(rows: list, raw: dict, args, world: int, device: torch.device) -> str:
    m, d = raw["model"], raw["data"]
    k = raw["train"]["micro_steps"]
    P = rows[0]["params"]
    ov = [n for n, on in (("overlap_grad_reduce", args.overlap_grad_reduce),
                          ("overlap_param_gather", args.overlap_param_gather and args.dist_opt)) if on]
    how = {"plain": "plain engine (fp32)",
           "deepspeed": f"DeepSpeed ZeRO-{args.zero} ({'bf16' if args.bf16 else 'fp32'}; overlap on = overlap_comm"
                        + (" + Nexus's nexus.overlap_param_gather" if args.overlap_param_gather and args.zero in (1, 2)
                           else "") + ")",
           "megatron": f"megatron-core {'distributed optimizer' if args.dist_opt else 'DDP'}, TP={args.tp} "
                       f"({'bf16' if args.bf16 else 'fp32'}; overlap on = {' + '.join(ov) or 'nothing'})"
                       + ("" if torch.cuda.is_available() else " UNDER THE TESTS' CPU SHIM")}[args.engine]
    backend = dist.get_backend() if dist.is_initialized() else "single process"
    tp = getattr(args, "tp", 1) if args.engine == "megatron" else 1
    dp = world // tp
    grad_ar = 4 * P / tp * (2 * (dp - 1) / dp) if dp > 1 else 0.0   # over the data-parallel group
    lines = [f"nexus-megatron bench: {how}, {world} rank(s) ({backend}, {device.type}), {'GPT' if args.engine == 'megatron' else 'Llama'} {P / 1e6:.2f}M params "
             f"(hidden {m['hidden_size']}, {m['num_layers']} layers, vocab {m['vocab_size']}), k = {k}, micro batch "
             f"{d['micro_batch_size']} x {d['seq_len']} tokens per rank, {args.sources} sources, median of {args.steps} "
             f"timed steps after {args.warmup} warm-up" + (f" x {args.rounds} interleaved rounds" if args.rounds > 1
                                                           else "") + f", buckets of {args.bucket_size:,} elements",
             "",
             "| optimizer | layout | overlap | step s | (min-max) | tokens/s | x AdamW | CPU s/step | x AdamW "
             "| state MB/rank | x AdamW | extra B/param | peak MB | bus MB/step | bus MB/micro-step "
             "| x one grad all-reduce | plan bus MB/step | calls/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        if r["optim"] == "adamw" and not r["sharpness"]:
            base[(r["layout"], r["overlap"])] = r
    for r in rows:
        if r["sharpness"]:
            continue
        a = base.get((r["layout"], r["overlap"]))
        c = r["comm"]
        pred = r.get("plan", {})
        x_step = r["step_s"] / a["step_s"] if a else math.nan
        x_cpu = r["cpu_s"] / a["cpu_s"] if a else math.nan
        x_state = r["state"]["total"] / a["state"]["total"] if a else math.nan
        extra = (r["state"]["total"] - a["state"]["total"]) / P if a else math.nan
        x_ar = c["bus_per_micro"] / grad_ar if grad_ar else math.nan
        lines.append(
            f"| {r['optim']} | {r['layout']} | {'on' if r['overlap'] else 'off'} | {r['step_s']:.3f} | "
            f"{min(r['step_times']):.2f}-{max(r['step_times']):.2f} | "
            f"{r['tokens_per_s']:.0f} | {x_step:.3f} | {r['cpu_s']:.3f} | {x_cpu:.3f} | "
            f"{_mb(r['state']['total'])} | {x_state:.3f} | {extra:.2f} | "
            f"{_mb(r['peak_bytes'])} | {c['bus_per_step'] / 2**20:.2f} | {c['bus_per_micro'] / 2**20:.2f} | "
            f"{x_ar:.3f} | {pred.get('bus_per_step', math.nan) / 2**20:.2f} | {c['calls_per_step']:.0f} |")
    lines += ["", "step s = median wall time of the slowest rank; CPU s/step = median CPU time (all threads) of the "
                  "busiest rank; "
                  f"state = every tensor storage the engine holds between outer steps (exact); peak = "
                  f"{rows[0]['peak_what']} during the run; bus bytes = ring bytes sent per rank "
                  f"(one fp32 gradient all-reduce over {dp} data-parallel ranks = {grad_ar / 2**20:.2f} MB)"]
    lines.append("state by category, MB per rank:")
    for r in rows:
        if r["sharpness"]:
            continue
        cats = ", ".join(f"{key} {_mb(v)}" for key, v in r["state"].items() if key != "total")
        lines.append(f"  {r['optim']} {r['layout']} overlap={'on' if r['overlap'] else 'off'}: {cats}")
    lines.append("collectives per outer step (op@group: calls, bus MB):")
    for r in rows:
        if r["sharpness"]:
            continue
        ops = "; ".join(f"{name}: {v['calls']:.0f}, {v['bus'] / 2**20:.2f}" for name, v in r["comm"]["ops"].items())
        lines.append(f"  {r['optim']} {r['layout']} overlap={'on' if r['overlap'] else 'off'}: {ops or 'none'}")
    tokens_per_step = dp * k * d["micro_batch_size"] * d["seq_len"]
    lines += sharpness_table(rows, k, tokens_per_step)
    return "\n".join(lines)


def sharpness_table(rows, k: int, tokens_per_step: int) -> list:
    """The hook's cost per measurement (every engine's bench): forward passes (one per probe eta, L0 included,
    shared by the mixture and every relative loss), parameter gathers, probe tokens (all ranks; next to the
    step's training tokens), seconds, and the measurement in training steps."""
    sh = [r for r in rows if r["sharpness"]]
    if not sh:
        return []
    lines = ["", "critical-sharpness hook (sharpness.every=1, split=step, relative=true: one shared line search for "
                 "the mixture and every source), per measurement (medians):",
             "| optimizer | layout | forward passes | param gathers | probe tokens / step tokens | s per measurement "
             "| training step s | x training step | s per forward pass / s per micro-step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sh:
        per_pass = r["sharpness_s"] / r["sharpness_passes"] if r["sharpness_passes"] else math.nan
        lines.append(f"| {r['optim']} | {r['layout']} | {r['sharpness_passes']:.0f} | "
                     f"{r.get('sharpness_gathers', math.nan):.0f} | "
                     f"{r.get('sharpness_probe_tokens', math.nan) / tokens_per_step:.2f} | {r['sharpness_s']:.3f} | "
                     f"{r['train_step_s']:.3f} | {r['sharpness_s'] / r['train_step_s']:.3f} | "
                     f"{per_pass / (r['train_step_s'] / k):.3f} |")
    return lines


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------

def run_bench(args) -> int:
    raw = check_bench_args(args)
    COUNTER.install()        # before any engine (DeepSpeed binds torch.distributed functions when it starts)
    from ..train import init_distributed, local_device

    rank, world = init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = local_device()
    if "source-parallel" in args.layout_list and (world % args.sources or args.sources > world):
        raise NexusConfigError(f"bench: source-parallel needs a multiple of --sources ({args.sources}) processes, "
                               f"got {world}")
    sources = synthetic_sources([f"s{i}" for i in range(args.sources)], raw["model"]["vocab_size"],
                                raw["data"]["seq_len"])
    rows = []
    specs = _specs(args)
    if rank == 0:
        print(f"bench: priming ({specs[0].label}, 1 step, discarded)", flush=True)
    run = run_one
    if args.engine == "megatron":
        from .bench_megatron import run_one_megatron as run
    run(raw, specs[0], args, sources, rank, world, device, steps=1, warmup=0)   # one-time allocations
    for rnd in range(args.rounds):
        for i, spec in enumerate(specs):
            if spec.sharpness and rnd:
                continue
            if rank == 0:
                print(f"bench: {spec.label}" + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""),
                      flush=True)
            row = run(raw, spec, args, sources, rank, world, device)
            if rnd:   # the same engine again: the timed steps join the first round's
                first = rows[i]
                first["step_times"] += row["step_times"]
                first["step_s"] = statistics.median(first["step_times"])
                first["cpu_times"] += row["cpu_times"]
                first["cpu_s"] = statistics.median(first["cpu_times"])
                first["tokens_per_s"] = world * raw["train"]["micro_steps"] * raw["data"]["micro_batch_size"] * \
                    raw["data"]["seq_len"] / first["step_s"]
                peaks = [x for x in (first["peak_bytes"], row["peak_bytes"]) if x is not None]
                first["peak_bytes"] = max(peaks) if peaks else None
                continue
            if not spec.sharpness:
                pred = predicted(row, raw, args, world, device.type)
                row["plan"] = {"bus_per_step": pred["bus_per_step"], "payload_per_step": pred["payload_per_step"],
                               "state": pred["state"]}
            rows.append(row)
    pairs = []
    load = [os.getloadavg()[0]]
    for lay in args.layout_list:
        for ov in args.overlap_list:
            if not args.pairs:
                continue
            if rank == 0:
                print(f"bench: interleaved pairs, {lay} overlap={'on' if ov else 'off'}", flush=True)
            pairs.append(run_pairs(raw, lay, ov, args, sources, rank, world, device))
    load.append(os.getloadavg()[0])
    ar = time_allreduce(rows[0]["params"], device)
    if rank == 0:
        print(format_table(rows, raw, args, world, device), flush=True)
        print("\n".join(pairs_table(pairs, raw["train"]["micro_steps"], tuple(load))), flush=True)
        if ar is not None:
            k = raw["train"]["micro_steps"]
            for r in rows:
                if r["optim"] == "adamw" and not r["sharpness"] and not r["overlap"]:
                    C = (r["step_s"] - ar) / k
                    print(f"one fp32 gradient all-reduce ({rows[0]['params'] / 1e6:.2f}M elements, {world} ranks): "
                          f"{ar:.4f} s (median of 5, measured after the runs); compute per micro-step ~ (AdamW step "
                          f"- one all-reduce) / k = {C:.3f} s ({r['layout']}); compute/comm ~ {C / ar:.1f}", flush=True)
                    break
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"world": world, "device": device.type, "engine": args.engine, "zero": args.zero,
                           "tp": args.tp, "dist_opt": args.dist_opt,
                           "allreduce_s": ar, "pairs": pairs, "loadavg": load,
                           "bf16": args.bf16, "config": raw, "rows": rows}, f, indent=1, default=str)
    if dist.is_initialized():
        dist.barrier()
    return 0
