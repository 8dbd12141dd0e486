"""Run configuration: small dataclasses, loaded from YAML with strict keys (a typo is an error that
names the key and suggests the closest valid one), overridable with ``--set section.key=value``."""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from .errors import NexusConfigError
from .layout import LAYOUTS
from .engines import ENGINES
from .settings import FIELDS, NexusConfig, names_on, nexus_config_of_section
from .sharpness import SharpnessConfig, validate_sharpness_config

OPTIMIZERS = ("nexus", "adamw")
SCHEDULES = ("cosine", "constant", "wsd")
WANDB_MODES = ("disabled", "offline", "online")


@dataclass
class ModelConfig:
    """A Llama-style decoder (transformers' LlamaForCausalLM), built from these numbers."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    """Grouped-query attention heads (default: num_heads)."""
    intermediate_size: Optional[int] = None
    """MLP width (default: the Llama rule, about 8/3 * hidden_size rounded up to a multiple of 64)."""
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    vocab_size: Optional[int] = None
    """Default: the prepared data's tokenizer vocabulary."""
    init_std: float = 0.02


@dataclass
class DataConfig:
    path: str = "data/small"
    """A directory written by ``nexus-megatron prepare-data``."""
    sources: list = field(default_factory=lambda: ["code", "math", "prose", "dictionary"])
    weights: Optional[list] = None
    """One weight per source (default uniform)."""
    ood: list = field(default_factory=lambda: ["shakespeare"])
    """Held-out sources: evaluated, never trained on."""
    seq_len: int = 128
    micro_batch_size: int = 4
    """Sequences per rank per micro-step."""
    max_epochs: float = 1.0
    """How many passes over a source's training tokens the run may make before it is an error."""


@dataclass
class OptimConfig:
    name: str = "nexus"
    """``nexus`` (outer AdamW on the Nexus pseudo-gradient) or ``adamw`` (the baseline on the same data)."""
    lr: float = 3e-3
    min_lr: float = 3e-4
    schedule: str = "cosine"
    """``cosine``, ``constant`` or ``wsd`` (warmup-stable-decay; the last ``decay_frac`` of steps decay)."""
    warmup_steps: int = 10
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: Optional[float] = 1.0
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
    mode: str = "disabled"
    project: str = "nexus-megatron"
    name: Optional[str] = None


@dataclass
class TrainConfig:
    steps: int = 100
    micro_steps: int = 4
    """k: micro-steps (gradient-accumulation micro-batches) per outer step."""
    seed: int = 0
    run_dir: str = "runs/run"
    log_every: int = 1
    eval_every: int = 25
    eval_batches: int = 8
    """Batches of micro_batch_size sequences per source per evaluation (split over the ranks)."""
    probe_every: int = 25
    """Every this many steps: per-source gradients at the current parameters on fixed batches, giving
    ``gnorm/<source>`` and ``cos/<a>|<b>`` (0 = never)."""
    probe_batches: int = 4
    checkpoint_every: int = 0
    """0 = only at the end."""
    resume: bool = True
    """Continue from run_dir/checkpoints/latest if it exists."""
    engine: str = "plain"
    """``plain`` (plain PyTorch, Nexus owns the collectives) or ``deepspeed`` (see docs/deepspeed.md)."""
    deepspeed_config: Optional[str] = None
    """ds_config.json used when ``engine: deepspeed`` (default: ZeRO-2, fp32). Its
    ``gradient_accumulation_steps`` must equal ``train.micro_steps``, ``train_micro_batch_size_per_gpu``
    ``data.micro_batch_size``; an optional ``nexus`` section must agree with this YAML (docs/deepspeed.md)."""
    collective_timeout_s: float = 600.0
    """Seconds a collective may wait for a peer before the rank fails (torch.distributed timeout)."""
    threads: int = 0
    """torch threads per process (0 = leave torch's default)."""
    progress: bool = True
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


def load_config(path: Optional[str] = None, overrides=(), base: Optional[dict] = None) -> RunConfig:
    """Load a YAML file (or start from ``base``), apply ``--set`` overrides, validate everything."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise NexusConfigError(f"--config {path}: no such file (the configs/ folder has examples)") from None
        except yaml.YAMLError as e:
            raise NexusConfigError(f"--config {path}: not valid YAML: {e}") from None
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
    for name in ("hidden_size", "num_layers", "num_heads"):
        _positive_int(getattr(m, name), f"model.{name}")
    if m.hidden_size % m.num_heads:
        raise NexusConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_kv_heads is not None:
        _positive_int(m.num_kv_heads, "model.num_kv_heads")
        if m.num_heads % m.num_kv_heads:
            raise NexusConfigError(f"model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
    if m.intermediate_size is not None:
        _positive_int(m.intermediate_size, "model.intermediate_size")
    if m.vocab_size is not None:
        _positive_int(m.vocab_size, "model.vocab_size")
    if not isinstance(d.sources, list) or not d.sources:
        raise NexusConfigError("data.sources must be a non-empty list of prepared source names")
    if not isinstance(d.ood, list):
        raise NexusConfigError("data.ood must be a list of held-out source names (may be empty)")
    overlap = set(d.sources) & set(d.ood)
    if overlap:
        raise NexusConfigError(f"data.ood {sorted(overlap)} also in data.sources: a held-out source must not be trained on")
    _positive_int(d.seq_len, "data.seq_len")
    _positive_int(d.micro_batch_size, "data.micro_batch_size")
    _number(d.max_epochs, "data.max_epochs", 0, lo_open=True)
    if o.name not in OPTIMIZERS:
        raise NexusConfigError(f"optim.name={o.name!r}: use one of {', '.join(OPTIMIZERS)}")
    if o.schedule not in SCHEDULES:
        raise NexusConfigError(f"optim.schedule={o.schedule!r}: use one of {', '.join(SCHEDULES)}")
    _number(o.lr, "optim.lr", 0, lo_open=True)
    _number(o.min_lr, "optim.min_lr", 0)
    if o.min_lr > o.lr:
        raise NexusConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}")
    if not (isinstance(o.warmup_steps, int) and o.warmup_steps >= 0):
        raise NexusConfigError(f"optim.warmup_steps={o.warmup_steps!r}: must be an integer >= 0")
    _number(o.decay_frac, "optim.decay_frac", 0)
    if o.decay_frac > 1:
        raise NexusConfigError(f"optim.decay_frac={o.decay_frac}: must be in [0, 1]")
    _number(o.weight_decay, "optim.weight_decay", 0)
    for b in ("beta1", "beta2"):
        v = getattr(o, b)
        _number(v, f"optim.{b}", 0)
        if v >= 1:
            raise NexusConfigError(f"optim.{b}={v}: must be in [0, 1)")
    _number(o.eps, "optim.eps", 0, lo_open=True)
    _number(o.clip_grad, "optim.clip_grad", 0, lo_open=True, allow_none=True)
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
    _positive_int(t.steps, "train.steps")
    _positive_int(t.micro_steps, "train.micro_steps")
    for name in ("log_every", "eval_every", "probe_every", "checkpoint_every", "threads"):
        v = getattr(t, name)
        if not (isinstance(v, int) and v >= 0):
            raise NexusConfigError(f"train.{name}={v!r}: must be an integer >= 0")
    _number(t.collective_timeout_s, "train.collective_timeout_s", 0, lo_open=True)
    _positive_int(t.eval_batches, "train.eval_batches")
    _positive_int(t.probe_batches, "train.probe_batches")
    if t.engine not in ENGINES:
        raise NexusConfigError(f"train.engine={t.engine!r}: use one of {', '.join(ENGINES)}")
    if t.deepspeed_config is not None and not (isinstance(t.deepspeed_config, str) and t.deepspeed_config):
        raise NexusConfigError(f"train.deepspeed_config={t.deepspeed_config!r}: give the path of a ds_config.json "
                               "(or leave it unset for the ZeRO-2 fp32 default)")
    if t.wandb.mode not in WANDB_MODES:
        raise NexusConfigError(f"train.wandb.mode={t.wandb.mode!r}: use one of {', '.join(WANDB_MODES)}")
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
