"""The user's ds_config.json, read for Nexus (pure Python: importing this does not import DeepSpeed).

:func:`prepare_ds_config` takes the user's config unchanged and returns

* the Nexus settings it implies (``k`` = ``gradient_accumulation_steps``, the clipping of the
  pseudo-gradient, the ``nexus`` section merged with what the caller passed), and
* the config handed to ``deepspeed.initialize``: the ``nexus`` section removed, one DeepSpeed
  optimizer step per Nexus micro-step (``gradient_accumulation_steps: 1``, ``train_batch_size``
  recomputed for DeepSpeed's data-parallel group), DeepSpeed's own clipping off (Nexus clips the
  pseudo-gradient instead), ``zero_allow_untested_optimizer: true`` (the client optimizer is
  :class:`~nexus_megatron.engines.deepspeed.adapter.NexusAdamW`).

Everything that cannot keep its meaning under Nexus is an error that names the key, raised here,
before ``deepspeed.initialize`` and before any compute.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Optional

from ...errors import NexusConfigError
from ...layout import LAYOUTS, LayoutConfig
from ...settings import NexusConfig, check_value, doc_of, names_on, nexus_config_from

#: keys of the ``"nexus"`` section of a ds_config.json: NexusConfig's settings (names, docs and checks from
#: :mod:`nexus_megatron.settings`), the layout's, and DeepSpeed's parameter-gather overlap
NEXUS_KEYS = {
    **{name: doc_of(name) for name in names_on("ds_config")},
    "layout": "'sequential' (one source per micro-step, all ranks) or 'source-parallel'",
    "sources": "list of source names (source-parallel: source i is read by source group i)",
    "weights": "one weight per source (default uniform)",
    "seed": "seed of the sequential layout's per-micro-step source draws",
    "overlap_param_gather": "ZeRO-1/2: all-gather the updated parameters during the next forward pass, bucket by "
                            "bucket, instead of at the end of step() (default false)",
    "param_gather_bucket_size": "elements of the gathered parameters per bucket with overlap_param_gather "
                                "(default 40000000)",
}

_LAYOUT_KEYS = {"layout": "mode", "sources": "sources", "weights": "weights", "seed": "seed"}
_NEXUS_CFG_KEYS = names_on("ds_config")


def _label(name: str) -> str:
    return f"ds_config nexus.{name}"


@dataclass
class PreparedConfig:
    """What :func:`prepare_ds_config` returns."""

    ds: dict
    """The config for ``deepspeed.initialize`` (the user's, minus ``nexus``, with the changes above)."""
    k: int
    """Micro-steps per outer step (the user's ``gradient_accumulation_steps``)."""
    micro_batch: int
    """``train_micro_batch_size_per_gpu``."""
    clip: float
    """Max norm of the pseudo-gradient (``gradient_clipping``; 0 = off). AdamW baseline: of the gradient."""
    layout: LayoutConfig
    nexus: NexusConfig
    zero_stage: int
    bf16: bool
    dp_size: int
    """DeepSpeed's data-parallel size: all ranks (sequential) or one source group (source-parallel)."""
    user: dict = field(default_factory=dict)
    """The user's config as read (with the ``nexus`` section), for reference."""
    overlap_param_gather: bool = False
    """``nexus.overlap_param_gather``: ZeRO-1/2's parameter all-gather overlapped with the next forward
    (engines/deepspeed/param_gather.py)."""
    param_gather_bucket_size: int = 40_000_000
    """``nexus.param_gather_bucket_size``: elements of the gathered parameters per bucket."""


def load_ds_config(ds_config) -> dict:
    """A dict from a path to a JSON file, a JSON string or a dict (deep-copied)."""
    if isinstance(ds_config, dict):
        return copy.deepcopy(ds_config)
    if isinstance(ds_config, str):
        text = ds_config.strip()
        if text.startswith("{"):
            try:
                return json.loads(text)
            except ValueError as e:
                raise NexusConfigError(f"ds_config: not valid JSON: {e}") from None
        try:
            with open(ds_config) as f:
                return json.load(f)
        except FileNotFoundError:
            raise NexusConfigError(f"ds_config {ds_config}: no such file (configs/ds_config_*.json are examples)") from None
        except ValueError as e:
            raise NexusConfigError(f"ds_config {ds_config}: not valid JSON: {e}") from None
    raise NexusConfigError(f"ds_config must be a path, a JSON string or a dict, got {type(ds_config).__name__}")


def _enabled(section) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def _find_auto(node, path=""):
    """HF-Trainer-style "auto" placeholders (they are only filled in by transformers' integration)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _find_auto(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _find_auto(v, f"{path}[{i}]")
    elif node == "auto":
        yield path


def _int(value, name, lo=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise NexusConfigError(f"ds_config {name}={value!r}: must be an integer >= {lo}")
    return value


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def check_nexus_section(section) -> dict:
    """Validate the keys of the ``nexus`` section (unknown key = error naming it)."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise NexusConfigError(f"ds_config 'nexus' must be a mapping of settings, got {type(section).__name__}")
    for key in section:
        if key not in NEXUS_KEYS:
            close = difflib.get_close_matches(str(key), NEXUS_KEYS, n=1)
            hint = f"; did you mean 'nexus.{close[0]}'?" if close else ""
            raise NexusConfigError(f"ds_config: unknown setting 'nexus.{key}'{hint} (valid: {', '.join(NEXUS_KEYS)})")
    if "layout" in section and section["layout"] not in LAYOUTS:
        raise NexusConfigError(f"ds_config nexus.layout={section['layout']!r}: use one of {', '.join(LAYOUTS)}")
    for key in _NEXUS_CFG_KEYS:
        if key in section:
            check_value(key, section[key], _label(key))
    if "sources" in section and not (isinstance(section["sources"], list) and section["sources"]):
        raise NexusConfigError("ds_config nexus.sources must be a non-empty list of source names")
    if "weights" in section and section["weights"] is not None and not isinstance(section["weights"], list):
        raise NexusConfigError("ds_config nexus.weights must be a list with one weight per source")
    if "overlap_param_gather" in section and not isinstance(section["overlap_param_gather"], bool):
        raise NexusConfigError(f"ds_config nexus.overlap_param_gather={section['overlap_param_gather']!r}: must be "
                               "true or false")
    if "param_gather_bucket_size" in section:
        v = section["param_gather_bucket_size"]
        if isinstance(v, float) and v.is_integer():
            v = section["param_gather_bucket_size"] = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise NexusConfigError(f"ds_config nexus.param_gather_bucket_size={v!r}: must be an integer >= 1 "
                                   "(elements of the gathered parameters per bucket, e.g. 40000000)")
    return dict(section)


def merge_nexus(section: dict, layout: Optional[LayoutConfig], nexus: Optional[NexusConfig],
                layout_where: str = "layout_config", nexus_where: str = "nexus_config"):
    """LayoutConfig and NexusConfig from the ``nexus`` section and/or the caller's objects. A value given
    in both places must agree (else an error names both)."""
    if layout is not None:
        for key, attr in _LAYOUT_KEYS.items():
            if key in section:
                mine = getattr(layout, attr)
                theirs = section[key]
                if key == "weights" and theirs is not None and mine is not None:
                    theirs = tuple(float(w) for w in theirs)
                if key == "sources":
                    theirs = tuple(theirs)
                if not _same(mine, theirs):
                    raise NexusConfigError(
                        f"ds_config nexus.{key}={section[key]!r} conflicts with {layout_where}.{attr}={mine!r}: "
                        f"give it in one place, or make them equal")
    else:
        if "sources" not in section:
            raise NexusConfigError("ds_config nexus.sources is missing: list the data sources (or pass layout_config=)")
        try:
            layout = LayoutConfig(mode=section.get("layout", "sequential"), sources=tuple(section["sources"]),
                                  weights=tuple(section["weights"]) if section.get("weights") else None,
                                  seed=int(section.get("seed", 0)))
        except TypeError as e:
            raise NexusConfigError(f"ds_config nexus section: {e}") from None
    if nexus is not None:
        for key in _NEXUS_CFG_KEYS:
            if key in section and not _same(getattr(nexus, key), section[key]):
                raise NexusConfigError(
                    f"ds_config nexus.{key}={section[key]!r} conflicts with {nexus_where}.{key}="
                    f"{getattr(nexus, key)!r}: give it in one place, or make them equal")
    else:
        nexus = nexus_config_from(section, label=_label)
    return layout, nexus


def prepare_ds_config(ds_config, *, world_size: Optional[int], micro_steps: Optional[int] = None,
                      layout: Optional[LayoutConfig] = None, nexus: Optional[NexusConfig] = None,
                      optim_name: str = "nexus", allow_scheduler: bool = True,
                      micro_steps_where: str = "micro_steps", micro_batch: Optional[int] = None,
                      micro_batch_where: str = "micro_batch", layout_where: str = "layout_config",
                      nexus_where: str = "nexus_config") -> PreparedConfig:
    """Check the user's ds_config for Nexus and derive what DeepSpeed gets (see the module docstring).

    ``optim_name='adamw'`` is the AdamW baseline through DeepSpeed: the config keeps
    ``gradient_accumulation_steps = k`` and DeepSpeed's own clipping. ``world_size=None`` (not known yet,
    e.g. when the YAML is loaded before the processes start) skips the checks that need it."""
    user = load_ds_config(ds_config)
    cfg = copy.deepcopy(user)
    if not isinstance(cfg, dict):
        raise NexusConfigError("ds_config must be a JSON object")
    autos = list(_find_auto(cfg))
    if autos:
        raise NexusConfigError(
            f"ds_config {autos[0]}='auto': 'auto' values are only filled in by the HF Trainer integration; "
            "write the number (or true/false) in the file")

    section = check_nexus_section(cfg.pop("nexus", None))
    if "optimizer" in cfg:
        raise NexusConfigError(
            "ds_config 'optimizer' section: Nexus needs its own client optimizer (the outer AdamW, stepped once "
            "per outer step on the pseudo-gradient). Remove the 'optimizer' section and give the AdamW settings to "
            "nexus_megatron.engines.deepspeed.initialize(optimizer=torch.optim.AdamW(...) or {'lr': ..., ...}) "
            "(trainer: optim.lr, optim.beta1, optim.beta2, optim.eps, optim.weight_decay)")
    if _enabled(cfg.get("fp16")):
        raise NexusConfigError(
            "ds_config fp16.enabled=true: fp16 needs loss scaling, and a loss scale cannot keep its meaning when "
            "every micro-step's gradient is normalized (overflow would skip single inner steps and bias the "
            "pseudo-gradient). Use \"bf16\": {\"enabled\": true} instead (same memory, no loss scaling)")
    if _enabled(cfg.get("amp")):
        raise NexusConfigError("ds_config amp.enabled=true: apex AMP (fp16 loss scaling) is not supported under "
                               "Nexus; use \"bf16\": {\"enabled\": true}")
    if _enabled(cfg.get("torch_autocast")):
        raise NexusConfigError("ds_config torch_autocast.enabled=true is not supported by the Nexus adapter yet; "
                               "use \"bf16\": {\"enabled\": true}")
    if not allow_scheduler and "scheduler" in cfg:
        raise NexusConfigError(
            "ds_config 'scheduler' section: the trainer drives the learning rate from optim.schedule / optim.lr / "
            "optim.warmup_steps; remove the 'scheduler' section from the ds_config (or use the Python API, which "
            "accepts it)")

    z = cfg.get("zero_optimization", {}) or {}
    if not isinstance(z, dict):
        raise NexusConfigError("ds_config zero_optimization must be a mapping")
    stage = z.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise NexusConfigError(f"ds_config zero_optimization.stage={stage!r}: use 0, 1, 2 or 3")
    for off in ("offload_optimizer", "offload_param"):
        dev = (z.get(off) or {}).get("device", "none") if isinstance(z.get(off), dict) else "none"
        if dev not in (None, "none"):
            raise NexusConfigError(
                f"ds_config zero_optimization.{off}.device={dev!r}: ZeRO-Offload is not supported by the Nexus "
                "adapter yet (the inner steps run on the master partitions every micro-step); remove it")
    if z.get("cpu_offload") or z.get("cpu_offload_params"):
        raise NexusConfigError("ds_config zero_optimization.cpu_offload: ZeRO-Offload is not supported by the "
                               "Nexus adapter yet; remove it")
    writer = (cfg.get("checkpoint") or {}).get("writer") if isinstance(cfg.get("checkpoint"), dict) else None
    ds_states = cfg.get("datastates_ckpt")
    if (isinstance(writer, dict) and writer.get("decoupled")) or (ds_states is not None and ds_states is not False):
        raise NexusConfigError("ds_config checkpoint.writer.decoupled=true / datastates_ckpt: these checkpoint writers "
                               "finish writing in the background after save_checkpoint returns, so the checkpoint "
                               "cannot be published atomically (a crash could leave a partial one under a loadable "
                               "name); remove them from the ds_config")
    if z.get("elastic_checkpoint"):
        raise NexusConfigError("ds_config zero_optimization.elastic_checkpoint=true: the elastic format drops the "
                               "client optimizer's state (the Nexus anchor); set it to false")
    if z.get("compute_grad_norm") is False and optim_name == "nexus":
        raise NexusConfigError("ds_config zero_optimization.compute_grad_norm=false: Nexus normalizes every "
                               "micro-step's gradient by DeepSpeed's global gradient norm; remove the setting")
    if (z.get("mics_shard_size") or -1) > 0 or (z.get("zero_hpz_partition_size") or 1) > 1:
        raise NexusConfigError("ds_config zero_optimization.mics_shard_size / zero_hpz_partition_size: MiCS and "
                               "ZeRO++ hierarchical partitioning are not supported by the Nexus adapter yet; remove them")
    overlap_pg = bool(section.get("overlap_param_gather", False)) and optim_name == "nexus"
    if overlap_pg and stage not in (1, 2):
        raise NexusConfigError(
            f"ds_config nexus.overlap_param_gather=true with zero_optimization.stage={stage}: it overlaps ZeRO-1/2's "
            "parameter all-gather; stage 0 gathers nothing and ZeRO-3 already prefetches parameters during the "
            "forward (stage3_prefetch_bucket_size). Use stage 1 or 2, or remove nexus.overlap_param_gather")
    if optim_name == "nexus" and stage in (1, 2) and "use_multi_rank_bucket_allreduce" not in z:
        # Nexus reduces every micro-step: reduce each partition to its owner (a reduce-scatter's bytes) instead
        # of DeepSpeed 0.19's default all-reduce of the buckets, which sends twice that (docs/performance.md)
        z["use_multi_rank_bucket_allreduce"] = False

    # -- k and the batch sizes ----------------------------------------------------------------
    gas = cfg.get("gradient_accumulation_steps")
    if gas is not None:
        _int(gas, "gradient_accumulation_steps")
        if micro_steps is not None and gas != micro_steps:
            raise NexusConfigError(
                f"ds_config gradient_accumulation_steps={gas} but {micro_steps_where}={micro_steps}: under Nexus "
                "gradient_accumulation_steps is k, the number of micro-steps (inner steps) per outer step; "
                "make them equal")
        k = gas
    else:
        k = micro_steps if micro_steps is not None else 1
    _int(k, micro_steps_where if gas is None else "gradient_accumulation_steps")
    mb = cfg.get("train_micro_batch_size_per_gpu")
    tbs = cfg.get("train_batch_size")
    if mb is not None:
        _int(mb, "train_micro_batch_size_per_gpu")
        if micro_batch is not None and mb != micro_batch:
            raise NexusConfigError(f"ds_config train_micro_batch_size_per_gpu={mb} but {micro_batch_where}="
                                   f"{micro_batch}: make them equal")
    if tbs is not None and world_size is None:
        _int(tbs, "train_batch_size")
    elif tbs is not None:
        _int(tbs, "train_batch_size")
        if mb is None:
            mb = micro_batch
        if mb is None:
            if tbs % (k * world_size):
                raise NexusConfigError(
                    f"ds_config train_batch_size={tbs} is not a multiple of gradient_accumulation_steps * ranks "
                    f"= {k} * {world_size}")
            mb = tbs // (k * world_size)
        if tbs != mb * k * world_size:
            raise NexusConfigError(
                f"ds_config train_batch_size={tbs} != train_micro_batch_size_per_gpu * gradient_accumulation_steps "
                f"* ranks = {mb} * {k} * {world_size}: fix one of them (under Nexus the three keep DeepSpeed's meaning)")
    if mb is None:
        mb = micro_batch if micro_batch is not None else 1

    clip = cfg.get("gradient_clipping", 0.0) or 0.0
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
        raise NexusConfigError(f"ds_config gradient_clipping={clip!r}: must be a number >= 0 (0 = off)")

    layout, nexus = merge_nexus(section, layout, nexus, layout_where, nexus_where)
    K = len(layout.sources)
    if world_size is None:
        dp = 1
    elif layout.mode == "source-parallel":
        if world_size % K or K > world_size:
            raise NexusConfigError(
                f"nexus.layout=source-parallel: {world_size} rank(s) cannot be split into {K} equal source groups "
                f"({', '.join(layout.sources)}); use a multiple of {K} ranks, fewer sources, or nexus.layout=sequential")
        dp = world_size // K
    else:
        dp = world_size
    if optim_name != "nexus" and world_size is not None:
        dp = world_size   # the AdamW baseline reduces over all ranks (the mixture weights scale the losses)

    # -- what DeepSpeed gets -------------------------------------------------------------------
    cfg["train_micro_batch_size_per_gpu"] = mb
    if optim_name == "nexus":
        cfg["gradient_accumulation_steps"] = 1
        cfg["gradient_clipping"] = 0.0
        cfg["zero_allow_untested_optimizer"] = True
        cfg["train_batch_size"] = mb * dp
    else:
        cfg["gradient_accumulation_steps"] = k
        cfg["gradient_clipping"] = float(clip)
        cfg["train_batch_size"] = mb * k * dp
    bf16 = _enabled(cfg.get("bf16")) or _enabled(cfg.get("bfloat16"))
    return PreparedConfig(ds=cfg, k=k, micro_batch=mb, clip=float(clip), layout=layout, nexus=nexus,
                          zero_stage=int(stage), bf16=bf16, dp_size=dp, user=user, overlap_param_gather=overlap_pg,
                          param_gather_bucket_size=int(section.get("param_gather_bucket_size", 40_000_000)))


def default_trainer_ds_config(micro_batch: int, k: int) -> dict:
    """The trainer's ds_config when train.deepspeed_config is not set: ZeRO-2, fp32."""
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": k,
            "zero_optimization": {"stage": 2}, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def check_run_config(cfg, world_size: Optional[int] = None) -> PreparedConfig:
    """Validate a RunConfig with train.engine=deepspeed against its ds_config (no DeepSpeed import).
    ``world_size=None``: the checks that need the number of ranks are left to the start of training."""
    t = cfg.train
    raw = load_ds_config(t.deepspeed_config) if t.deepspeed_config else \
        default_trainer_ds_config(cfg.data.micro_batch_size, t.micro_steps)
    n = cfg.nexus
    layout = LayoutConfig(mode=n.layout, sources=tuple(cfg.data.sources),
                          weights=tuple(cfg.data.weights) if cfg.data.weights else None, seed=n.seed)
    return prepare_ds_config(
        raw, world_size=world_size, micro_steps=t.micro_steps, layout=layout,
        nexus=nexus_config_from(n),
        optim_name=cfg.optim.name, allow_scheduler=False, micro_steps_where="train.micro_steps",
        micro_batch=cfg.data.micro_batch_size, micro_batch_where="data.micro_batch_size",
        layout_where="the YAML (nexus.layout / data.sources / data.weights / nexus.seed)", nexus_where="nexus")


__all__ = ["NEXUS_KEYS", "PreparedConfig", "load_ds_config", "prepare_ds_config", "default_trainer_ds_config",
           "check_run_config", "merge_nexus", "check_nexus_section"]
