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
4. ``analyze``: per final checkpoint, downstream evaluation (:mod:`nexus_megatron.downstream`) and,
   for the arms listed under ``minima.arms``, closeness of the per-source minima
   (:mod:`nexus_megatron.minima`) (done = ``analysis.json``);
5. ``report``: tables (mean and 95% t-interval over seeds, paired differences against the reference)
   and PNG plots from the run directories, into ``<out>/report/``.

Jobs run as subprocesses, ``study.slots`` cores at a time (a torchrun job of N processes takes
min(N, slots) of them); logs in ``<out>/logs/``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import yaml

from .config import RunConfig, load_config, to_dict
from .errors import NexusConfigError

MATCHED_SUFFIX = "_matched"


# ---------------------------------------------------------------------------------------------------
# the study configuration

@dataclass
class ArmSpec:
    nproc: int = 1
    """Processes of this arm's runs (source-parallel needs a multiple of the number of sources)."""
    set: dict = field(default_factory=dict)
    """Dotted overrides of the shared ``run`` config, e.g. ``{optim.name: adamw}``."""
    label: str = ""
    description: str = ""


@dataclass
class PrepareSpec:
    enabled: bool = True
    train_tokens: int = 400_000
    val_tokens: int = 40_000
    tokenizer: str = "bpe"
    vocab_size: Optional[int] = None
    seed: int = 0


@dataclass
class MatchedSpec:
    enabled: bool = True
    arm: str = "adamw"
    """The arm that is continued (AdamW)."""
    target: str = "nexus_seq"
    """The arm whose final mean in-distribution validation loss it must reach (same seed)."""
    chunk_steps: int = 10
    """Continue this many steps at a time, then evaluate (the overshoot is at most one chunk)."""
    max_extra_steps: int = 150
    """Bound on the extra steps; if the target is not reached the comparison is made there and says so."""


@dataclass
class DownstreamSpec:
    enabled: bool = True
    tasks: list = field(default_factory=lambda: ["gsm_heldout", "asdiv", "piqa"])
    items: int = 300
    seed: int = 0
    batch_size: int = 16


@dataclass
class MinimaSpec:
    enabled: bool = True
    arms: list = field(default_factory=lambda: ["adamw", "adamw_matched", "nexus_seq", "nexus_sp"])
    steps: int = 40
    """Fine-tuning steps per source (fixed budget, the same for every model)."""
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_batches: int = 2
    """Validation batches (of ``batch_size``) per source for the mixture loss on the interpolation paths."""
    points: int = 11


@dataclass
class StudySpec:
    out: str = "runs/study"
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    slots: int = 2
    """Cores to use: single-process jobs run this many at a time."""
    reference: str = "adamw"
    """The arm every other arm is compared with (paired by seed)."""
    contrasts: list = field(default_factory=list)
    """Extra paired comparisons for the report, e.g. ``[[nexus_seq, gamma0], [nexus_seq, random_dir]]``
    (each arm minus its control, seed by seed)."""
    pkg_dir: Optional[str] = None
    """Where downloaded packages are cached (default: $NEXUS_PKG_DIR or ~/.cache/nexus_megatron/pkgs)."""
    prepare: PrepareSpec = field(default_factory=PrepareSpec)


@dataclass
class Study:
    study: StudySpec
    run: dict
    arms: Dict[str, ArmSpec]
    matched: MatchedSpec
    downstream: DownstreamSpec
    minima: MinimaSpec
    raw: dict = field(default_factory=dict, repr=False)


def _strict(cls, d, where: str):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise NexusConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f"; did you mean '{where}.{close[0]}'?" if close else ""
            raise NexusConfigError(f"unknown setting '{where}.{k}'{hint} (valid: {', '.join(fields)})")
        if k == "prepare" and cls is StudySpec:
            v = _strict(PrepareSpec, v, f"{where}.prepare")
        elif "float" in str(fields[k].type) and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        kw[k] = v
    return cls(**kw)


def set_dotted(raw: dict, key: str, value) -> None:
    """raw[a][b][c] = value for key "a.b.c"; a mapping value is merged into an existing mapping."""
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise NexusConfigError(f"setting {key!r}: {p!r} is not a section")
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in value.items():
            set_dotted(node[last], str(k), v)
    else:
        node[last] = value


def load_study(path: Optional[str], overrides=(), raw: Optional[dict] = None) -> Study:
    """Read and validate a study YAML (``--set key=value`` overrides use dotted keys from the top, e.g.
    ``study.seeds=[0]`` or ``run.train.steps=20``). Every arm x seed run config is validated here."""
    if raw is None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise NexusConfigError(f"--config {path}: no such file (see configs/study_cpu.yaml)") from None
    raw = copy.deepcopy(raw)
    for a in overrides:
        if "=" not in a:
            raise NexusConfigError(f"--set {a!r}: write it as key=value, e.g. study.seeds=[0]")
        k, v = a.split("=", 1)
        set_dotted(raw, k.strip(), yaml.safe_load(v))
    valid = ("study", "run", "arms", "matched", "downstream", "minima")
    for k in raw:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            raise NexusConfigError(f"unknown study section {k!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                   + f" (valid: {', '.join(valid)})")
    arms_raw = raw.get("arms") or {}
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise NexusConfigError("arms: give at least one arm, e.g. `adamw: {set: {optim.name: adamw}}`")
    arms = {str(n): _strict(ArmSpec, a, f"arms.{n}") for n, a in arms_raw.items()}
    st = Study(study=_strict(StudySpec, raw.get("study"), "study"), run=dict(raw.get("run") or {}), arms=arms,
               matched=_strict(MatchedSpec, raw.get("matched"), "matched"),
               downstream=_strict(DownstreamSpec, raw.get("downstream"), "downstream"),
               minima=_strict(MinimaSpec, raw.get("minima"), "minima"), raw=raw)
    validate_study(st)
    return st


def _pos_int(v, name):
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise NexusConfigError(f"{name}={v!r}: must be an integer >= 1")


def validate_study(st: Study) -> None:
    s = st.study
    if not isinstance(s.seeds, list) or not s.seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in s.seeds):
        raise NexusConfigError(f"study.seeds={s.seeds!r}: a non-empty list of integers, e.g. [0, 1, 2]")
    if len(set(s.seeds)) != len(s.seeds):
        raise NexusConfigError(f"study.seeds={s.seeds!r}: each seed once")
    _pos_int(s.slots, "study.slots")
    for name in st.arms:
        if name.endswith(MATCHED_SUFFIX) or "/" in name or not name:
            raise NexusConfigError(f"arms.{name}: arm names must not contain '/' or end with {MATCHED_SUFFIX!r}")
    if s.reference not in st.arms:
        raise NexusConfigError(f"study.reference={s.reference!r} is not an arm ({', '.join(st.arms)})")
    for c in s.contrasts:
        if not (isinstance(c, list) and len(c) == 2 and all(a in st.arms for a in c)):
            raise NexusConfigError(f"study.contrasts: {c!r} is not a pair of arms [arm, control] "
                                   f"(arms: {', '.join(st.arms)})")
    tokens, seen = {}, {}
    for name, arm in st.arms.items():
        _pos_int(arm.nproc, f"arms.{name}.nproc")
        if not isinstance(arm.set, dict):
            raise NexusConfigError(f"arms.{name}.set: a mapping of dotted run settings, e.g. {{optim.name: adamw}}")
        cfg = arm_config(st, name, s.seeds[0])
        d = cfg.data
        if cfg.nexus.layout == "source-parallel" and cfg.optim.name == "nexus":
            K = len(d.sources)
            if arm.nproc % K:
                raise NexusConfigError(f"arms.{name}: nexus.layout=source-parallel with {K} sources needs nproc to "
                                       f"be a multiple of {K} (got {arm.nproc})")
        tokens[name] = arm.nproc * cfg.train.micro_steps * d.micro_batch_size * d.seq_len * cfg.train.steps
        B = d.micro_batch_size
        seen[name] = (cfg.train.eval_batches * B, cfg.train.probe_batches * B,
                      cfg.sharpness.batches * B if cfg.sharpness.enabled else 0)
    if len(set(seen.values())) > 1:
        raise NexusConfigError("the arms evaluate on different sequences: (train.eval_batches, train.probe_batches, "
                               "sharpness.batches) x data.micro_batch_size must be the same for every arm, got "
                               f"{seen}; set them per arm so that the comparison uses the same validation data")
    if len(set(tokens.values())) > 1:
        raise NexusConfigError("the arms train on different numbers of tokens (nproc x train.micro_steps x "
                               f"data.micro_batch_size x data.seq_len x train.steps): {tokens}; the study compares "
                               "at the same tokens, so make them equal")
    m = st.matched
    if m.enabled:
        for k in ("arm", "target"):
            if getattr(m, k) not in st.arms:
                raise NexusConfigError(f"matched.{k}={getattr(m, k)!r} is not an arm ({', '.join(st.arms)})")
        _pos_int(m.chunk_steps, "matched.chunk_steps")
        _pos_int(m.max_extra_steps, "matched.max_extra_steps")
    ds = st.downstream
    if ds.enabled:
        from .downstream import check_tasks
        check_tasks(ds.tasks)
        _pos_int(ds.items, "downstream.items")
        _pos_int(ds.batch_size, "downstream.batch_size")
    mi = st.minima
    if mi.enabled:
        known = set(st.arms) | ({m.arm + MATCHED_SUFFIX} if m.enabled else set())
        for a in mi.arms:
            if a not in known:
                raise NexusConfigError(f"minima.arms: {a!r} is not an arm ({', '.join(sorted(known))})")
        for k in ("steps", "batch_size", "eval_batches"):
            _pos_int(getattr(mi, k), f"minima.{k}")
        if mi.points < 3:
            raise NexusConfigError(f"minima.points={mi.points}: at least 3 (both ends and one inside)")
        if not (isinstance(mi.lr, (int, float)) and mi.lr > 0):
            raise NexusConfigError(f"minima.lr={mi.lr!r}: a learning rate > 0")


def run_dir(st: Study, arm: str, seed: int) -> str:
    return os.path.join(st.study.out, arm, f"seed{seed}")


def arm_config(st: Study, arm: str, seed: int) -> RunConfig:
    """The run config of one arm and seed: the shared ``run`` section, the arm's overrides, then the
    seed (model init, data order, the sequential layout's source draws) and the run directory."""
    raw = copy.deepcopy(st.run)
    for k, v in st.arms[arm].set.items():
        set_dotted(raw, str(k), copy.deepcopy(v))
    for k, v in (("train.seed", seed), ("nexus.seed", seed), ("train.run_dir", run_dir(st, arm, seed)),
                 ("train.resume", True), ("train.progress", False)):
        set_dotted(raw, k, v)
    try:
        return load_config(None, [], base=raw)
    except NexusConfigError as e:
        raise NexusConfigError(f"arm {arm!r}, seed {seed}: {e}") from None


def arm_names(st: Study) -> List[str]:
    """The configured arms, then the matched arm when there is one."""
    out = list(st.arms)
    if st.matched.enabled:
        out.append(st.matched.arm + MATCHED_SUFFIX)
    return out


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
        rd = run_dir(st, arm, seed)
        if not os.path.isfile(os.path.join(rd, "summary.json")):
            return False
        cfg = arm_config(st, arm, seed)
        if not _same_config(os.path.join(rd, "config.json"), cfg):
            raise NexusConfigError(f"{rd} holds a finished run with a different configuration than arm {arm!r} "
                                   "of this study: delete that directory or use another study.out")
        return True
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
    for seed in st.study.seeds:
        for arm in order:
            cfg = arm_config(st, arm, seed)
            path = os.path.join(cfg_dir, f"{arm}_seed{seed}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
            nproc = st.arms[arm].nproc
            argv = [py, "-m", "nexus_megatron.cli", "train", "--config", path]
            if nproc > 1:
                argv += ["--nproc", str(nproc)]
            jobs.append(Job(f"train/{arm}/seed{seed}", argv, min(nproc, slots), [], _train_done(st, arm, seed)))
        if m.enabled:
            marm = m.arm + MATCHED_SUFFIX
            jobs.append(Job(f"match/{marm}/seed{seed}",
                            [py, "-m", "nexus_megatron.experiment", "match", study_json, str(seed)], 1,
                            [f"train/{m.arm}/seed{seed}", f"train/{m.target}/seed{seed}"],
                            _marker_done(os.path.join(run_dir(st, marm, seed), "match.json"), match_settings(st))))
        for arm in arm_names(st):
            if not st.downstream.enabled and not (st.minima.enabled and arm in st.minima.arms):
                continue
            dep = (f"match/{arm}/seed{seed}" if arm.endswith(MATCHED_SUFFIX) else f"train/{arm}/seed{seed}")
            jobs.append(Job(f"analyze/{arm}/seed{seed}",
                            [py, "-m", "nexus_megatron.experiment", "analyze", study_json, arm, str(seed)], 1,
                            [dep], _marker_done(os.path.join(run_dir(st, arm, seed), "analysis.json"),
                                                analysis_settings(st, arm))))
    return jobs


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
    if p.enabled:
        from .data.prepare import prepare_data
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

    from .checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
    from .train import train

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
    while True:
        step = int(load_checkpoint(latest_checkpoint(ckpt))["client_state"]["step"])
        last = _last(os.path.join(out, "metrics.jsonl"), "eval/loss")
        loss = float(last["eval/loss"]) if last else math.inf
        if loss <= target or step - base_steps >= m.max_extra_steps:
            break
        steps = min(step + m.chunk_steps, base_steps + m.max_extra_steps)
        raw = to_dict(base_cfg)
        for k, v in (("train.steps", steps), ("train.run_dir", out), ("train.resume", True),
                     ("train.eval_every", 10 ** 9), ("train.probe_every", 10 ** 9),   # at each chunk's end
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
    atomic_write_text(os.path.join(out, "match.json"), json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------------
# analyze: downstream evaluation and closeness of minima of one final checkpoint

def load_final_model(rd: str):
    """(RunConfig, model, client_state) of the newest checkpoint in a run directory."""
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .data.shards import load_manifest
    from .models import build_model

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


def run_analyze(st: Study, arm: str, seed: int) -> dict:
    import torch

    from .checkpoint import atomic_write_text
    from .data.shards import open_sources
    from .models import lm_loss

    torch.set_num_threads(1)
    rd = run_dir(st, arm, seed)
    cfg, model, client, manifest = load_final_model(rd)
    settings = analysis_settings(st, arm)
    out = {"settings": settings, "arm": arm, "seed": seed, "step": client["step"], "tokens": client["tokens"]}
    t0 = time.time()
    if settings["downstream"]:
        from .data.tokenizer import load_tokenizer
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
        B, n = mi.batch_size, mi.steps * mi.batch_size
        train_batches, val_batches = {}, {}
        for i, name in enumerate(names):
            tr = sources[name].train
            start = tr.windows - n
            if start < int(client["consumed"][i]):
                raise NexusConfigError(
                    f"minima: the fine-tuning data of source {name!r} (the last {n} sequences of its first epoch) "
                    f"overlaps what {rd} trained on ({client['consumed'][i]} of {tr.windows}): prepare more data "
                    "(study.prepare.train_tokens) or lower minima.steps / minima.batch_size")
            train_batches[name] = [tr.batch(start + t * B, B) for t in range(mi.steps)]
            val = sources[name].val
            val_batches[name] = [val.batch(b * B, B) for b in range(min(mi.eval_batches, val.windows // B or 1))]
        out["minima"] = closeness_of_minima(model, train_batches, val_batches, lambda m, b: lm_loss(m, b),
                                            lr=mi.lr, weight_decay=mi.weight_decay,
                                            betas=(cfg.optim.beta1, cfg.optim.beta2), points=mi.points)
        out["minima_s"] = time.time() - t1
    atomic_write_text(os.path.join(rd, "analysis.json"), json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------------------------------
# the command

def experiment(args) -> int:
    st = load_study(args.config, args.set)
    steps = [s.strip() for s in (args.only or "prepare,train,match,analyze,report").split(",") if s.strip()]
    valid = ("prepare", "train", "match", "analyze", "report")
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
    wanted = {"train": "train/", "match": "match/", "analyze": "analyze/"}
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
        from .study_report import write_report
        write_report(st, os.path.join(out, "report"), say=lambda m: print(m, flush=True))
    print(f"study finished in {time.time() - t0:.0f}s" + (f"; {len(failed)} job(s) did not finish: "
                                                           f"{', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="study YAML (configs/study_cpu.yaml, configs/study_gpu_130m.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study setting with a dotted key, e.g. study.seeds=[0] or run.train.steps=50")
    p.add_argument("--only", default=None,
                   help="comma-separated steps to run: prepare,train,match,analyze,report (default: all)")


def main(argv=None) -> int:
    """Internal entry points of the job subprocesses: ``match <study.json> <seed>`` and
    ``analyze <study.json> <arm> <seed>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with open(argv[1]) as f:
        st = load_study(None, [], raw=json.load(f))
    if argv[0] == "match":
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
