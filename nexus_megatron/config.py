"""Run configuration: small dataclasses, loaded from YAML with strict keys (a typo is an error that
names the key and suggests the closest valid one), overridable with ``--set section.key=value``.

Value rules (type, range, choices) are declared once per setting, in the field's metadata
(``field(default=..., metadata=rule(...))``), and applied generically by :func:`check_fields` to every
section that declares them, so no badly typed or out-of-range value reaches transformers or the model.
Booleans are strict: ``true``/``false`` only (a quoted ``"false"`` is a string and an error, never truthy).
Float settings accept a numeric string (YAML 1.1 reads ``3e-4`` without a dot as a string) and nothing
else. Rules that tie two settings together stay in :func:`validate_run_config`."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .errors import NexusConfigError
from .faults import read_file_bytes
from .layout import LAYOUTS
from .engines import ENGINES
from .settings import FIELDS, NexusConfig, names_on, nexus_config_of_section
from .sharpness import SharpnessConfig, validate_sharpness_config

OPTIMIZERS = ("nexus", "adamw")
SCHEDULES = ("cosine", "constant", "wsd")
WANDB_MODES = ("disabled", "offline", "online")


# ---------------------------------------------------------------------------------------------------
# value rules, declared per setting in the dataclass field's metadata

SOURCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
RESERVED_SOURCE_NAMES = ("ood",)
"""``sharpness/lambda_c/ood`` is the held-out set's key: a source of that name would collide with it."""


@dataclass(frozen=True)
class Rule:
    """What values a setting takes: ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``choice`` (one of
    ``choices``), ``names`` (a list of source names), ``keys`` (a list of setting names) or ``numbers`` (a
    list of finite numbers); ``lo``/``hi`` bound numbers (``lo_open``/``hi_open``: strict); ``optional``: null
    (None) allowed; ``nonempty``: a list or string must not be empty."""

    kind: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    optional: bool = False
    nonempty: bool = False


def rule(kind: str, **kw) -> dict:
    """Field metadata declaring a setting's rule: ``field(default=1, metadata=rule("int", lo=1))``."""
    return {"rule": Rule(kind, **kw)}


def _range_text(r: Rule) -> str:
    if r.lo is not None and r.hi is not None:
        return f"in {'(' if r.lo_open else '['}{r.lo:g}, {r.hi:g}{')' if r.hi_open else ']'}"
    if r.lo is not None:
        return f"{'>' if r.lo_open else '>='} {r.lo:g}"
    return f"{'<' if r.hi_open else '<='} {r.hi:g}"


def _in_range(v, r: Rule) -> bool:
    if r.lo is not None and (v < r.lo or (r.lo_open and v == r.lo)):
        return False
    if r.hi is not None and (v > r.hi or (r.hi_open and v == r.hi)):
        return False
    return True


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:   # an integer beyond the float range
        return False


def check_value(value, r: Rule, name: str):
    """``value`` checked against ``r`` (a NexusConfigError naming ``name`` and the rule otherwise); returns it,
    a numeric string converted for a float setting."""
    if value is None:
        if r.optional:
            return None
        raise NexusConfigError(f"{name}=null: give a value (it has no 'unset' form)")
    k = r.kind
    if k == "bool":
        if not isinstance(value, bool):
            raise NexusConfigError(f"{name}={value!r}: must be true or false (a YAML boolean, unquoted; "
                                   "a quoted string is not read as a boolean)")
        return value
    if k == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise NexusConfigError(f"{name}={value!r}: must be an integer{' ' + _range_text(r) if r.lo is not None else ''}")
        if not _in_range(value, r):
            raise NexusConfigError(f"{name}={value!r}: must be an integer {_range_text(r)}")
        return value
    if k == "float":
        if isinstance(value, str):
            try:   # YAML 1.1 reads 3e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                raise NexusConfigError(f"{name}={value!r}: must be a finite number") from None
        if not _is_number(value) or not _finite(value):
            raise NexusConfigError(f"{name}={value!r}: must be a finite number")
        if not _in_range(value, r):
            raise NexusConfigError(f"{name}={value!r}: must be {_range_text(r)}")
        return value
    if k == "str":
        if not isinstance(value, str) or (r.nonempty and not value):
            raise NexusConfigError(f"{name}={value!r}: must be a{' non-empty' if r.nonempty else ''} string")
        return value
    if k == "choice":
        if not isinstance(value, str) or value not in r.choices:
            raise NexusConfigError(f"{name}={value!r}: use one of {', '.join(r.choices)}")
        return value
    if k == "names":
        if not isinstance(value, list) or (r.nonempty and not value):
            raise NexusConfigError(f"{name}={value!r}: must be a {'non-empty ' if r.nonempty else ''}list of "
                                   "prepared source names, e.g. [code, math]")
        for v in value:
            if not isinstance(v, str) or not SOURCE_NAME.match(v) or ".." in v or v in RESERVED_SOURCE_NAMES:
                raise NexusConfigError(
                    f"{name}: {v!r} is not a source name: use letters, digits, '_', '-' and '.' (not first, no "
                    f"'..'), not {', '.join(RESERVED_SOURCE_NAMES)} (names become directories under data.path "
                    "and parts of metric keys such as loss/<source> and cos/<a>|<b>)")
        return value
    if k == "keys":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise NexusConfigError(f"{name}={value!r}: must be a list of setting names, e.g. "
                                   "[model.num_heads, world.size]")
        return value
    if k == "numbers":
        if not isinstance(value, list) or not all(_is_number(v) and _finite(v) for v in value):
            raise NexusConfigError(f"{name}={value!r}: must be a list of finite numbers, e.g. [1, 2, 1]")
        return value
    raise AssertionError(f"unknown rule kind {k!r} of {name}")


def check_fields(obj, where: str) -> None:
    """Apply every field's declared rule to ``obj`` (a settings dataclass) in place."""
    for f in dataclasses.fields(obj):
        r = f.metadata.get("rule")
        if r is not None:
            setattr(obj, f.name, check_value(getattr(obj, f.name), r, f"{where}.{f.name}"))


@dataclass
class ModelConfig:
    """A Llama-style decoder (transformers' LlamaForCausalLM), built from these numbers."""

    hidden_size: int = field(default=128, metadata=rule("int", lo=1))
    num_layers: int = field(default=4, metadata=rule("int", lo=1))
    num_heads: int = field(default=4, metadata=rule("int", lo=1))
    num_kv_heads: Optional[int] = field(default=None, metadata=rule("int", lo=1, optional=True))
    """Grouped-query attention heads (default: num_heads)."""
    intermediate_size: Optional[int] = field(default=None, metadata=rule("int", lo=1, optional=True))
    """MLP width (default: the Llama rule, about 8/3 * hidden_size rounded up to a multiple of 64)."""
    tie_embeddings: bool = field(default=True, metadata=rule("bool"))
    rope_theta: float = field(default=10000.0, metadata=rule("float", lo=0, lo_open=True))
    vocab_size: Optional[int] = field(default=None, metadata=rule("int", lo=1, optional=True))
    """Default: the prepared data's tokenizer vocabulary."""
    init_std: float = field(default=0.02, metadata=rule("float", lo=0, lo_open=True))
    """Standard deviation of the normal initialization of the weights (must be > 0)."""


@dataclass
class DataConfig:
    path: str = field(default="data/small", metadata=rule("str", nonempty=True))
    """A directory written by ``nexus-megatron prepare-data``."""
    sources: list = field(default_factory=lambda: ["code", "math", "prose", "dictionary"],
                          metadata=rule("names", nonempty=True))
    weights: Optional[list] = field(default=None, metadata=rule("numbers", optional=True))
    """One weight per source (default uniform)."""
    ood: list = field(default_factory=lambda: ["shakespeare"], metadata=rule("names"))
    """Held-out sources: evaluated, never trained on."""
    seq_len: int = field(default=128, metadata=rule("int", lo=1))
    micro_batch_size: int = field(default=4, metadata=rule("int", lo=1))
    """Sequences per rank per micro-step."""
    max_epochs: float = field(default=1.0, metadata=rule("float", lo=0, lo_open=True))
    """How many passes over a source's training tokens the run may make before it is an error."""
    mixed_micro_batches: bool = field(default=False, metadata=rule("bool"))
    """Every micro-batch holds every source (``micro_batch_size / K`` sequences of each, K = number of
    sources) instead of one source per micro-step: Nexus's inner path with one normalized MIXTURE gradient per
    inner step and no cross-source term (the study's control, docs/results.md). Sequential layout only."""


@dataclass
class OptimConfig:
    name: str = field(default="nexus", metadata=rule("choice", choices=OPTIMIZERS))
    """``nexus`` (outer AdamW on the Nexus pseudo-gradient) or ``adamw`` (the baseline on the same data)."""
    lr: float = field(default=3e-3, metadata=rule("float", lo=0, lo_open=True))
    min_lr: float = field(default=3e-4, metadata=rule("float", lo=0))
    schedule: str = field(default="cosine", metadata=rule("choice", choices=SCHEDULES))
    """``cosine``, ``constant`` or ``wsd`` (warmup-stable-decay; the last ``decay_frac`` of steps decay)."""
    warmup_steps: int = field(default=10, metadata=rule("int", lo=0))
    decay_frac: float = field(default=0.2, metadata=rule("float", lo=0, hi=1))
    weight_decay: float = field(default=0.1, metadata=rule("float", lo=0))
    beta1: float = field(default=0.9, metadata=rule("float", lo=0, hi=1, hi_open=True))
    beta2: float = field(default=0.95, metadata=rule("float", lo=0, hi=1, hi_open=True))
    eps: float = field(default=1e-8, metadata=rule("float", lo=0, lo_open=True))
    clip_grad: Optional[float] = field(default=1.0, metadata=rule("float", lo=0, lo_open=True, optional=True))
    """Max gradient norm for AdamW (null = off). Nexus's pseudo-gradient has norm <= 1 by construction."""


def _nexus_fields(names) -> list:
    """(name, type, field) of NexusConfig's settings, for a dataclass that exposes them under their names."""
    return [(n, FIELDS[n].type, field(default=FIELDS[n].default, metadata=FIELDS[n].metadata)) for n in names]


NexusSection = dataclasses.make_dataclass("NexusSection", [
    ("layout", str, field(default="sequential", metadata={"doc": "'sequential' (one source per micro-step, all "
                                                                 "ranks) or 'source-parallel' (docs/nexus.md)"})),
    # gamma, gamma_mode, min_grad_norm, max_consecutive_skips, control: generated from NexusConfig
    *_nexus_fields(names_on("yaml")),
    ("seed", int, field(default=0, metadata={"doc": "seed of the sequential layout's per-micro-step source draws "
                                                    "(and of the control's random directions)"})),
    ("overlap_grad_reduce", bool, field(default=False, metadata={"doc": (
        "plain engine: start the gradient reduction of each bucket while backward is still running "
        "(per-parameter post-accumulate-grad hooks, asynchronous collectives), for Nexus (every micro-step) and "
        "the AdamW baseline (its one reduction, during the last micro-step's backward). Same results as without "
        "it (docs/performance.md). DeepSpeed: use the ds_config's zero_optimization.overlap_comm instead")})),
    ("bucket_size", int, field(default=10_000_000, metadata={"doc": "elements per gradient bucket when "
                                                                    "overlap_grad_reduce is on (10M fp32 = 40 MB)"})),
], namespace={"__doc__": "The YAML's ``nexus:`` section: the settings of :class:`nexus_megatron.settings.NexusConfig` "
                         "(same names, types, defaults, validation), the layout and its seed, and the plain "
                         "engine's gradient-reduction overlap. Each field's ``metadata['doc']`` documents it.",
              "__module__": __name__})


def nexus_config_of(cfg) -> NexusConfig:
    """The NexusConfig of a RunConfig's ``nexus`` section (``nexus.seed`` also seeds the control's directions)."""
    return nexus_config_of_section(cfg.nexus)


@dataclass
class WandbConfig:
    mode: str = field(default="disabled", metadata=rule("choice", choices=WANDB_MODES))
    project: str = field(default="nexus-megatron", metadata=rule("str", nonempty=True))
    name: Optional[str] = field(default=None, metadata=rule("str", nonempty=True, optional=True))


@dataclass
class TrainConfig:
    steps: int = field(default=100, metadata=rule("int", lo=1))
    micro_steps: int = field(default=4, metadata=rule("int", lo=1))
    """k: micro-steps (gradient-accumulation micro-batches) per outer step."""
    seed: int = field(default=0, metadata=rule("int", lo=0))
    run_dir: str = field(default="runs/run", metadata=rule("str", nonempty=True))
    log_every: int = field(default=1, metadata=rule("int", lo=0))
    eval_every: int = field(default=25, metadata=rule("int", lo=0))
    eval_batches: int = field(default=8, metadata=rule("int", lo=1))
    """Batches of micro_batch_size sequences per source per evaluation (split over the ranks)."""
    probe_every: int = field(default=25, metadata=rule("int", lo=0))
    """Every this many steps: per-source gradients at the current parameters on fixed batches, giving
    ``gnorm/<source>`` and ``cos/<a>|<b>`` (0 = never)."""
    probe_batches: int = field(default=4, metadata=rule("int", lo=1))
    checkpoint_every: int = field(default=0, metadata=rule("int", lo=0))
    """0 = only at the end."""
    resume: bool = field(default=True, metadata=rule("bool"))
    """Continue from run_dir/checkpoints/latest if it exists."""
    allow_changed: list = field(default_factory=list, metadata=rule("keys"))
    """Settings a resume may change beyond the always-changeable ones (``--allow-changed KEY,...``; a section
    name covers its keys, ``all`` everything): docs/training.md#resume."""
    engine: str = field(default="plain", metadata=rule("choice", choices=ENGINES))
    """``plain`` (plain PyTorch, Nexus owns the collectives) or ``deepspeed`` (see docs/deepspeed.md)."""
    deepspeed_config: Optional[str] = field(default=None, metadata=rule("str", nonempty=True, optional=True))
    """ds_config.json used when ``engine: deepspeed`` (default: ZeRO-2, fp32). Its
    ``gradient_accumulation_steps`` must equal ``train.micro_steps``, ``train_micro_batch_size_per_gpu``
    ``data.micro_batch_size``; an optional ``nexus`` section must agree with this YAML (docs/deepspeed.md)."""
    collective_timeout_s: float = field(default=600.0, metadata=rule("float", lo=0, lo_open=True))
    """Seconds a collective may wait for a peer before the rank fails (torch.distributed timeout)."""
    threads: int = field(default=0, metadata=rule("int", lo=0))
    """torch threads per process (0 = leave torch's default)."""
    progress: bool = field(default=True, metadata=rule("bool"))
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    nexus: NexusSection = field(default_factory=NexusSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    """Critical sharpness, measured inside the outer step (docs/sharpness.md); off by default."""


# ---------------------------------------------------------------------------------------------------

def _from_dict(cls, d: Any, where: str):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise NexusConfigError(f"{where or 'config'}: expected a mapping of settings, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise NexusConfigError(f"unknown setting {name!r}{hint} (valid: {', '.join(fields)})")
        ftype = str(fields[key].type)
        if "float" in ftype and isinstance(value, str):
            try:   # YAML 1.1 reads 3e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        sub = _SECTIONS.get((cls, key))
        kwargs[key] = _from_dict(sub, value, name) if sub else value
    return cls(**kwargs)


_SECTIONS = {(RunConfig, "model"): ModelConfig, (RunConfig, "data"): DataConfig, (RunConfig, "optim"): OptimConfig,
             (RunConfig, "nexus"): NexusSection, (RunConfig, "train"): TrainConfig, (TrainConfig, "wandb"): WandbConfig,
             (RunConfig, "sharpness"): SharpnessConfig}


def _set_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise NexusConfigError(f"--set {assignment!r}: write it as section.key=value, e.g. optim.lr=1e-3")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise NexusConfigError(f"--set {assignment!r}: {p!r} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def read_config_file(path: str) -> dict:
    """The mapping in YAML file ``path``; every way the file can be unusable is a one-line error naming it."""
    where = f"--config {path}"
    if os.path.isdir(path):
        raise NexusConfigError(f"{where}: is a directory; give the path of a YAML file (the configs/ folder has examples)")
    data = read_file_bytes(path, NexusConfigError, f"{where}: no such file (the configs/ folder has examples)",
                           f"{where}: cannot be read ({{reason}}); check the path and its permissions")
    try:
        text = data.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
    except UnicodeDecodeError:
        raise NexusConfigError(f"{where}: not a text file (not UTF-8); give a YAML run config") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise NexusConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise NexusConfigError(f"{where}: holds a {type(raw).__name__}, not a mapping of sections (model:, data:, "
                               "optim:, nexus:, train:, ...)")
    return raw


def load_config(path: Optional[str] = None, overrides=(), base: Optional[dict] = None) -> RunConfig:
    """Load a YAML file (or start from ``base``), apply ``--set`` overrides, validate everything."""
    raw: dict = {}
    if path is not None:
        raw = read_config_file(path)
    if base:
        raw = {**base, **raw}
    for a in overrides:
        _set_override(raw, a)
    cfg = _from_dict(RunConfig, raw, "")
    validate_run_config(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _positive_int(value, name):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise NexusConfigError(f"{name}={value!r}: must be an integer >= 1")


def _number(value, name, lo=None, lo_open=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NexusConfigError(f"{name}={value!r}: must be a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise NexusConfigError(f"{name}={value!r}: must be {'>' if lo_open else '>='} {lo}")


def validate_run_config(cfg: RunConfig) -> None:
    m, d, o, n, t = cfg.model, cfg.data, cfg.optim, cfg.nexus, cfg.train
    for section, where in ((m, "model"), (d, "data"), (o, "optim"), (t, "train"), (t.wandb, "train.wandb")):
        if not dataclasses.is_dataclass(section):
            raise NexusConfigError(f"{where}: expected a mapping of settings, got {type(section).__name__}")
        check_fields(section, where)
    # rules that tie settings together
    if m.hidden_size % m.num_heads:
        raise NexusConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        raise NexusConfigError(f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
    overlap = set(d.sources) & set(d.ood)
    if overlap:
        raise NexusConfigError(f"data.ood {sorted(overlap)} also in data.sources: a held-out source must not be trained on")
    if o.min_lr > o.lr:
        raise NexusConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}")
    if d.mixed_micro_batches:
        if n.layout != "sequential":
            raise NexusConfigError(f"data.mixed_micro_batches=true needs nexus.layout=sequential (got {n.layout!r}): "
                                   "the source-parallel layout already has every source in every micro-step")
        if d.micro_batch_size % len(d.sources):
            raise NexusConfigError(f"data.mixed_micro_batches=true: data.micro_batch_size={d.micro_batch_size} must be "
                                   f"a multiple of the number of sources ({len(d.sources)}), the same share of each")
        if t.engine == "megatron":
            raise NexusConfigError("data.mixed_micro_batches=true runs on train.engine=plain or deepspeed (the "
                                   "Megatron engine reads its own data); set data.mixed_micro_batches=false")
    if n.layout not in LAYOUTS:
        raise NexusConfigError(f"nexus.layout={n.layout!r}: use one of {', '.join(LAYOUTS)}")
    nexus_config_of(cfg)   # gamma, gamma_mode, min_grad_norm, max_consecutive_skips, control, seed
    if n.control != "none" and (o.name != "nexus" or t.engine != "plain"):
        raise NexusConfigError(f"nexus.control={n.control} is a variant of Nexus on the plain engine: it needs "
                               f"optim.name=nexus and train.engine=plain (got {o.name}, {t.engine}); "
                               "set nexus.control=none")
    if not isinstance(n.overlap_grad_reduce, bool):
        raise NexusConfigError(f"nexus.overlap_grad_reduce={n.overlap_grad_reduce!r}: must be true or false")
    _positive_int(n.bucket_size, "nexus.bucket_size")
    if n.overlap_grad_reduce and t.engine != "plain":
        raise NexusConfigError(
            f"nexus.overlap_grad_reduce=true is the plain engine's overlap (train.engine={t.engine!r}): DeepSpeed "
            "overlaps its own reduction; set zero_optimization.overlap_comm (and reduce_bucket_size) in the "
            "ds_config instead, and nexus.overlap_grad_reduce=false")
    validate_sharpness_config(cfg.sharpness)
    if cfg.sharpness.enabled and t.engine not in ("plain", "deepspeed"):
        raise NexusConfigError(f"sharpness.enabled=true runs on train.engine=plain or deepspeed (got {t.engine!r}); "
                               "set sharpness.enabled=false")
    if o.warmup_steps >= t.steps and o.schedule != "constant":
        raise NexusConfigError(
            f"optim.warmup_steps={o.warmup_steps} is not below train.steps={t.steps}: the schedule would never "
            "leave warmup. Lower optim.warmup_steps or raise train.steps")
    if t.engine == "deepspeed":   # the ds_config against this YAML, before any process starts (no DeepSpeed import)
        from .engines.deepspeed.config import check_run_config
        check_run_config(cfg)
