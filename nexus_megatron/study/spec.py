"""The study configuration (``configs/study_*.yaml``): its sections as dataclasses, loading and validation,
and the names derived from it (arms, run directories, per-arm run configs). Read by the runner
(:mod:`.runner`) and the report (:mod:`.report`)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from ..config import RunConfig, load_config
from ..errors import NexusConfigError

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
    indexed: dict = field(default_factory=dict)
    """A user's own corpus: ``{source: Megatron indexed dataset prefix}`` for every training and OOD source
    (nexus_megatron/study/corpus.py); then ``vocab_size`` is the tokenizer's and ``eot_id`` its end-of-document id."""
    eot_id: int = 0


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
    eval_every: int = 0
    """Evaluate the continuation every this many steps (dense: the primary endpoint interpolates the OOD loss
    on these points at the target's ID loss); 0 = only at chunk ends."""


@dataclass
class LrSweepSpec:
    """The pre-registered lr choice of the reference (docs/results.md, "Pre-registration"): the arm ``arm`` is
    trained at each lr of ``values`` on the selection seeds ``seeds`` (kept apart from the study's seeds);
    the lr with the lowest mean final ID validation loss is selected and used by every arm in ``apply_to``."""
    enabled: bool = False
    arm: str = "adamw"
    values: list = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    seeds: list = field(default_factory=lambda: [1000, 1001])
    apply_to: list = field(default_factory=lambda: ["adamw"])


@dataclass
class MechanismsSpec:
    """Mechanism measures from each final checkpoint of ``arms`` (nexus_megatron/study/mechanisms.py)."""
    enabled: bool = False
    arms: list = field(default_factory=lambda: ["adamw", "nexus_seq"])
    half_sequences: int = 32
    """Validation sequences per half for the split-half gradient cosine (2x this per source)."""
    finetune_steps: int = 20
    finetune_batch: int = 8
    finetune_lr: float = 1e-3
    eval_sequences: int = 32
    """Validation sequences per source (and OOD source) for the interference matrix, the barriers and the
    relative sharpness."""
    points: int = 5
    """Points on each straight path between two fine-tuned endpoints (both ends included)."""
    sharpness_start: float = 0.01
    """First step length of the relative-sharpness searches along each source's unit gradient."""
    sharpness_eps: float = 0.0625


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
    lr_sweep: LrSweepSpec = field(default_factory=LrSweepSpec)
    mechanisms: MechanismsSpec = field(default_factory=MechanismsSpec)
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
    valid = ("study", "run", "arms", "matched", "downstream", "minima", "lr_sweep", "mechanisms")
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
               minima=_strict(MinimaSpec, raw.get("minima"), "minima"),
               lr_sweep=_strict(LrSweepSpec, raw.get("lr_sweep"), "lr_sweep"),
               mechanisms=_strict(MechanismsSpec, raw.get("mechanisms"), "mechanisms"), raw=raw)
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
    if s.prepare.indexed:
        if not isinstance(s.prepare.indexed, dict):
            raise NexusConfigError("study.prepare.indexed: a mapping {source: Megatron indexed dataset prefix}")
        if not isinstance(s.prepare.vocab_size, int) or s.prepare.vocab_size < 1:
            raise NexusConfigError("study.prepare.indexed needs study.prepare.vocab_size: the vocabulary size of the "
                                   "tokenizer that wrote the indexed datasets (e.g. 50257 for GPT-2)")
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
        if cfg.nexus.layout == "source-parallel":      # Nexus, or AdamW on the stratified layout
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
    if m.enabled and m.eval_every:
        _pos_int(m.eval_every, "matched.eval_every")
    sw = st.lr_sweep
    if sw.enabled:
        if sw.arm not in st.arms:
            raise NexusConfigError(f"lr_sweep.arm={sw.arm!r} is not an arm ({', '.join(st.arms)})")
        if not (isinstance(sw.values, list) and len(sw.values) >= 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in sw.values)):
            raise NexusConfigError(f"lr_sweep.values={sw.values!r}: at least two learning rates > 0, e.g. [1e-3, 3e-3, 1e-2]")
        if not (isinstance(sw.seeds, list) and sw.seeds and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in sw.seeds)):
            raise NexusConfigError(f"lr_sweep.seeds={sw.seeds!r}: a non-empty list of integers (selection seeds)")
        if set(sw.seeds) & set(s.seeds):
            raise NexusConfigError(f"lr_sweep.seeds {sorted(set(sw.seeds) & set(s.seeds))} are also study.seeds: the "
                                   "lr is selected on seeds kept apart from the evaluation; use others")
        for a in sw.apply_to:
            if a not in st.arms:
                raise NexusConfigError(f"lr_sweep.apply_to: {a!r} is not an arm ({', '.join(st.arms)})")
        for v in sw.values:
            sweep_config(st, float(v), sw.seeds[0])
    mc = st.mechanisms
    if mc.enabled:
        for a in mc.arms:
            if a not in st.arms:
                raise NexusConfigError(f"mechanisms.arms: {a!r} is not an arm ({', '.join(st.arms)})")
        for k in ("half_sequences", "finetune_steps", "finetune_batch", "eval_sequences"):
            _pos_int(getattr(mc, k), f"mechanisms.{k}")
        if not (isinstance(mc.points, int) and mc.points >= 3):
            raise NexusConfigError(f"mechanisms.points={mc.points!r}: at least 3 (both ends and one inside)")
        for k in ("finetune_lr", "sharpness_start"):
            if not (isinstance(getattr(mc, k), (int, float)) and getattr(mc, k) > 0):
                raise NexusConfigError(f"mechanisms.{k}={getattr(mc, k)!r}: a number > 0")
        if not (0 < mc.sharpness_eps < 1):
            raise NexusConfigError(f"mechanisms.sharpness_eps={mc.sharpness_eps!r}: in (0, 1)")
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
    lr = None
    sw = st.lr_sweep
    if sw.enabled and arm in sw.apply_to:
        lr = selected_lr(st)
        if lr is None:          # not selected yet: the first value stands in (validation only; no job runs it)
            lr = float(sw.values[0])
    return _config(st, arm, seed, run_dir(st, arm, seed), lr)


def _config(st: Study, arm: str, seed: int, rd: str, lr: Optional[float]) -> RunConfig:
    raw = copy.deepcopy(st.run)
    for k, v in st.arms[arm].set.items():
        set_dotted(raw, str(k), copy.deepcopy(v))
    if lr is not None:          # the lr sweep: the schedule's floor keeps its ratio to the peak
        o = raw.get("optim") or {}
        peak, floor = float(o.get("lr", 3e-3)), o.get("min_lr")
        set_dotted(raw, "optim.lr", float(lr))
        if floor is not None:
            set_dotted(raw, "optim.min_lr", float(lr) * float(floor) / peak)
    for k, v in (("train.seed", seed), ("nexus.seed", seed), ("train.run_dir", rd),
                 ("train.resume", True), ("train.progress", False)):
        set_dotted(raw, k, v)
    try:
        return load_config(None, [], base=raw)
    except NexusConfigError as e:
        raise NexusConfigError(f"arm {arm!r}, seed {seed}: {e}") from None


def sweep_dir(st: Study, lr: float, seed: int) -> str:
    return os.path.join(st.study.out, "lr_sweep", f"lr{lr:g}", f"seed{seed}")


def selection_path(st: Study) -> str:
    return os.path.join(st.study.out, "lr_sweep", "selected.json")


def sweep_config(st: Study, lr: float, seed: int) -> RunConfig:
    """The run config of the lr sweep's arm at ``lr`` on a selection seed."""
    return _config(st, st.lr_sweep.arm, seed, sweep_dir(st, lr, seed), lr)


def needs_selection(st: Study, arm: str) -> bool:
    return st.lr_sweep.enabled and arm in st.lr_sweep.apply_to


def selected_lr(st: Study) -> Optional[float]:
    """The lr the sweep selected (``<out>/lr_sweep/selected.json``), or None before the selection."""
    try:
        with open(selection_path(st)) as f:
            sel = json.load(f)
    except (OSError, ValueError):
        return None
    if sel.get("values") != [float(v) for v in st.lr_sweep.values] or sel.get("seeds") != list(st.lr_sweep.seeds):
        return None             # a selection of another sweep: selected again
    return float(sel["selected"])


def arm_names(st: Study) -> List[str]:
    """The configured arms, then the matched arm when there is one."""
    out = list(st.arms)
    if st.matched.enabled:
        out.append(st.matched.arm + MATCHED_SUFFIX)
    return out
