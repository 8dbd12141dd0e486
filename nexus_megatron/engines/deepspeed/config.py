"""The user's ds_config.json, read for Nexus.

:func:`prepare_ds_config` reads the user's config the way DeepSpeed does (:mod:`.ds_view`: DeepSpeed's own
loader, its batch arithmetic and validation, run for the number of ranks of the run) and returns

* the Nexus settings it implies (``k`` = the ``gradient_accumulation_steps`` DeepSpeed derives, the clipping
  of the pseudo-gradient, the outer AdamW's settings from an ``optimizer`` section, the ``nexus`` section
  merged with what the caller passed), and
* the config handed to ``deepspeed.initialize``: the ``nexus`` and ``optimizer`` sections removed, one
  DeepSpeed optimizer step per Nexus micro-step (``gradient_accumulation_steps: 1``, ``train_batch_size``
  recomputed for DeepSpeed's data-parallel group), what counts DeepSpeed's steps (``steps_per_print``,
  ``flops_profiler.profile_step``) scaled by k so that it counts outer steps, DeepSpeed's own clipping off
  (Nexus clips the pseudo-gradient instead), ``zero_allow_untested_optimizer: true`` (the client optimizer is
  :class:`~nexus_megatron.engines.deepspeed.adapter.NexusAdamW`).

Everything DeepSpeed would refuse, and everything that cannot keep its meaning under Nexus, is an error
that names the key, raised here, before ``deepspeed.initialize`` and before any compute (the table of
features is in docs/deepspeed.md). Importing this module does not import DeepSpeed; reading a config does.
"""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional

from ...errors import NexusConfigError
from ...layout import LAYOUTS, LayoutConfig
from ...settings import NexusConfig, check_value, doc_of, names_on, nexus_config_from
from .ds_view import ds_view

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
    fp16: bool = False
    """fp16 with DeepSpeed's loss scaling (an overflow poisons the outer step it falls in)."""
    optimizer: Optional[dict] = None
    """The outer AdamW's settings from the ds_config's ``optimizer`` section (``torch.optim.AdamW`` keyword
    arguments, DeepSpeed's defaults filled in), or None without one."""


def load_ds_config(ds_config) -> dict:
    """The ds_config as a dict, read as DeepSpeed reads it: a path (hjson: comments and trailing commas
    allowed, a duplicated key refused), a JSON/hjson text, a urlsafe-base64 string or a dict (deep-copied).
    See :func:`.ds_view.read_ds_config` (imports DeepSpeed)."""
    from .ds_view import read_ds_config

    return read_ds_config(ds_config)


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


#: the ``optimizer.params`` DeepSpeed's Adam/AdamW (FusedAdam, or torch's with ``torch_adam``) takes
ADAM_PARAMS = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "bias_correction", "amsgrad",
               "foreach", "fp32_optimizer_states", "set_grad_none")


def _number(value, name, lo=0.0, strict=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < lo or (strict and value == lo):
        raise NexusConfigError(f"ds_config {name}={value!r}: must be a number {'>' if strict else '>='} {lo}")
    return float(value)


def adamw_from_optimizer_section(section: dict, name: str) -> dict:
    """The outer AdamW's settings (``torch.optim.AdamW`` keyword arguments) from a ds_config ``optimizer``
    section, with the values DeepSpeed would use. ``name``: DeepSpeed's reading of ``optimizer.type``
    (lower-cased for its own optimizers).

    DeepSpeed builds ``adam`` and ``adamw`` as FusedAdam (``torch_adam: true``: torch's AdamW / Adam) with
    ``adam_w_mode = (type is AdamW) or params.adam_w_mode`` and ``adam_w_mode`` defaulting to **true**: type
    ``Adam`` is decoupled weight decay, i.e. AdamW, unless ``adam_w_mode: false`` is written. Defaults are
    FusedAdam's (``weight_decay`` 0, not torch AdamW's 0.01) unless ``torch_adam`` is set."""
    typ = section.get("type")
    if name not in ("adam", "adamw"):
        raise NexusConfigError(
            f"ds_config optimizer.type={typ!r}: the Nexus outer optimizer is AdamW; use type 'Adam' or 'AdamW' "
            "(their settings map onto it), or remove the 'optimizer' section and pass "
            "initialize(optimizer=torch.optim.AdamW(...))")
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise NexusConfigError("ds_config optimizer.params must be a mapping of settings")
    if "max_grad_norm" in params:
        raise NexusConfigError("ds_config optimizer.params.max_grad_norm: DeepSpeed refuses it as an optimizer "
                               "parameter; use the top-level 'gradient_clipping'")
    unknown = sorted(set(params) - set(ADAM_PARAMS))
    if unknown:
        raise NexusConfigError(f"ds_config optimizer.params.{unknown[0]}: not a setting of DeepSpeed's {typ} "
                               f"(valid: {', '.join(ADAM_PARAMS)})")
    torch_adam = bool(params.get("torch_adam", False))
    adam_w_mode = name == "adamw" or bool(params.get("adam_w_mode", True))
    default_wd = 0.01 if (torch_adam and adam_w_mode) else 0.0
    out = {"lr": _number(params.get("lr", 1e-3), "optimizer.params.lr"),
           "eps": _number(params.get("eps", 1e-8), "optimizer.params.eps"),
           "weight_decay": _number(params.get("weight_decay", default_wd), "optimizer.params.weight_decay")}
    betas = params.get("betas", (0.9, 0.999))
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and
            all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise NexusConfigError(f"ds_config optimizer.params.betas={betas!r}: must be two numbers in [0, 1)")
    out["betas"] = (float(betas[0]), float(betas[1]))
    if not adam_w_mode and out["weight_decay"] > 0:
        raise NexusConfigError(
            f"ds_config optimizer.type={typ!r} with adam_w_mode=false and weight_decay={out['weight_decay']}: that "
            "is Adam with L2 regularization (the decay added to the gradient, then normalized by Adam); the outer "
            "optimizer is AdamW (decoupled decay). Remove adam_w_mode (DeepSpeed's default is true, i.e. AdamW), "
            "or use type 'AdamW', or weight_decay 0")
    if params.get("bias_correction", True) is not True:
        raise NexusConfigError("ds_config optimizer.params.bias_correction=false: the outer AdamW always corrects "
                               "the bias of its moments; remove the setting")
    if params.get("amsgrad"):
        if not torch_adam:
            raise NexusConfigError("ds_config optimizer.params.amsgrad=true: DeepSpeed's FusedAdam refuses AMSGrad "
                                   "(it needs torch_adam: true)")
        out["amsgrad"] = True
    return out


def _walk_enabled(node, path=""):
    """Paths of every ``enabled: true`` inside ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{path}.{k}" if path else str(k)
            if k == "enabled" and v is True:
                yield here
            else:
                yield from _walk_enabled(v, here)


def _implied_world(cfg: dict, micro_steps: Optional[int]) -> Optional[int]:
    """The number of ranks a config implies when the caller does not know it yet (train_batch_size /
    (micro-batch x k)); None when it does not imply one."""
    tbs, mb = cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu")
    k = cfg.get("gradient_accumulation_steps", micro_steps)
    if tbs is None or mb is None or k is None:
        return None
    if tbs % (mb * k):
        raise NexusConfigError(
            f"ds_config train_batch_size={tbs} is not a multiple of train_micro_batch_size_per_gpu * "
            f"gradient_accumulation_steps = {mb} * {k}: DeepSpeed requires train_batch_size = micro-batch x "
            "gradient_accumulation_steps x ranks")
    return tbs // (mb * k)


def _k_origin(cfg: dict, world: int) -> str:
    if "gradient_accumulation_steps" in cfg:
        return f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']}"
    if "train_batch_size" in cfg:
        return (f"gradient_accumulation_steps derived by DeepSpeed = train_batch_size {cfg['train_batch_size']} / "
                f"(train_micro_batch_size_per_gpu {cfg.get('train_micro_batch_size_per_gpu', '?')} x {world} ranks)")
    return "gradient_accumulation_steps=1 (DeepSpeed's default)"


def prepare_ds_config(ds_config, *, world_size: Optional[int], micro_steps: Optional[int] = None,
                      layout: Optional[LayoutConfig] = None, nexus: Optional[NexusConfig] = None,
                      optim_name: str = "nexus", allow_scheduler: bool = True,
                      micro_steps_where: str = "micro_steps", micro_batch: Optional[int] = None,
                      micro_batch_where: str = "micro_batch", layout_where: str = "layout_config",
                      nexus_where: str = "nexus_config", outer_optimizer: Optional[dict] = None,
                      outer_optimizer_where: str = "optimizer") -> PreparedConfig:
    """Read the user's ds_config as DeepSpeed does, check it for Nexus and derive what DeepSpeed gets (see
    the module docstring and the feature table in docs/deepspeed.md).

    ``world_size``: all ranks of the run; DeepSpeed's batch arithmetic runs on it (``k`` is the
    ``gradient_accumulation_steps`` DeepSpeed derives). ``None`` (not known yet, e.g. when the YAML is loaded
    before the processes start): the number of ranks the config implies, if any. ``optim_name='adamw'`` is the
    AdamW baseline through DeepSpeed: the config keeps ``gradient_accumulation_steps = k`` and DeepSpeed's own
    clipping. ``outer_optimizer``: the outer AdamW's settings given elsewhere (the trainer's ``optim.*``); an
    ``optimizer`` section must then agree with them."""
    user = load_ds_config(ds_config)
    cfg = copy.deepcopy(user)
    autos = list(_find_auto(cfg))
    if autos:
        raise NexusConfigError(
            f"ds_config has 'auto' values in {', '.join(autos)}: only the HF Trainer / Accelerate integration fills "
            "them in; write the numbers (or true/false) in the file")
    section = check_nexus_section(cfg.pop("nexus", None))
    layout, nexus = merge_nexus(section, layout, nexus, layout_where, nexus_where)
    K = len(layout.sources)

    # -- DeepSpeed's own reading: validation and batch arithmetic -------------------------------------------
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in cfg:
            _int(cfg[key], key)
    gas_given = "gradient_accumulation_steps" in cfg
    if "train_micro_batch_size_per_gpu" not in cfg and micro_batch is not None:
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
    if not gas_given and "train_batch_size" not in cfg and micro_steps is not None:
        cfg["gradient_accumulation_steps"] = micro_steps
    if "train_batch_size" not in cfg and "train_micro_batch_size_per_gpu" not in cfg:
        raise NexusConfigError("ds_config: give train_micro_batch_size_per_gpu (and train_batch_size or "
                               "gradient_accumulation_steps); DeepSpeed needs one of the batch sizes")
    if gas_given and micro_steps is not None and cfg["gradient_accumulation_steps"] != micro_steps:
        raise NexusConfigError(
            f"ds_config gradient_accumulation_steps={cfg['gradient_accumulation_steps']} but {micro_steps_where}="
            f"{micro_steps}: under Nexus gradient_accumulation_steps is k, the number of micro-steps (inner steps) "
            "per outer step; make them equal")
    world = world_size if world_size is not None else _implied_world(cfg, micro_steps)
    tbs, mb = cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu")
    if world is not None and tbs is not None and mb is not None:
        if gas_given and tbs != mb * cfg["gradient_accumulation_steps"] * world:
            raise NexusConfigError(
                f"ds_config train_batch_size={tbs} != train_micro_batch_size_per_gpu * gradient_accumulation_steps "
                f"* ranks = {mb} * {cfg['gradient_accumulation_steps']} * {world}: fix one of them (under Nexus the "
                "three keep DeepSpeed's meaning)")
        if not gas_given and (tbs % (mb * world) or tbs < mb * world):
            raise NexusConfigError(
                f"ds_config train_batch_size={tbs} is not a multiple of train_micro_batch_size_per_gpu * ranks = "
                f"{mb} * {world}: DeepSpeed derives gradient_accumulation_steps (k under Nexus) as their quotient")
    view_cfg = cfg
    if world is None:                       # the ranks are not known: check everything but the batch product
        view_cfg = {k: v for k, v in cfg.items() if k != "train_batch_size"}
        if "train_micro_batch_size_per_gpu" not in view_cfg:
            view_cfg["train_micro_batch_size_per_gpu"] = cfg["train_batch_size"]
    view = ds_view(view_cfg, world or 1)
    k, mb = int(view.gradient_accumulation_steps), int(view.train_micro_batch_size_per_gpu)
    if world is None and not gas_given and micro_steps is not None:
        k = micro_steps
    if micro_steps is not None and k != micro_steps:
        raise NexusConfigError(
            f"ds_config {_k_origin(cfg, world)} is {k}, but {micro_steps_where}={micro_steps}: under Nexus it is k, "
            "the number of micro-steps per outer step; make them equal")
    if micro_batch is not None and mb != micro_batch:
        raise NexusConfigError(f"ds_config train_micro_batch_size_per_gpu={mb} but {micro_batch_where}="
                               f"{micro_batch}: make them equal")
    if world is not None and layout.mode == "source-parallel" and (world % K or K > world):
        raise NexusConfigError(
            f"nexus.layout=source-parallel: {world} rank(s) cannot be split into {K} equal source groups "
            f"({', '.join(layout.sources)}); use a multiple of {K} ranks, fewer sources, or nexus.layout=sequential")

    # -- what Nexus changes: mapped, or refused with the reason ------------------------------------------------
    nx = optim_name == "nexus"
    adamw = None
    if "optimizer" in cfg:
        opt = cfg.pop("optimizer")
        if not isinstance(opt, dict):
            raise NexusConfigError("ds_config 'optimizer' must be a mapping with 'type' and 'params'")
        adamw = adamw_from_optimizer_section(opt, view.optimizer_name)
        if outer_optimizer is not None:
            for key, value in adamw.items():
                if key in outer_optimizer and not _same(value, outer_optimizer[key]):
                    raise NexusConfigError(
                        f"ds_config optimizer.params.{key}={value!r} conflicts with {outer_optimizer_where} "
                        f"({key}={outer_optimizer[key]!r}): give it in one place, or make them equal")
    fp16 = view.float16_config
    if fp16.enabled and fp16.fp16_master_weights_and_grads:
        raise NexusConfigError("ds_config fp16.fp16_master_weights_and_grads=true: Nexus keeps theta_t + delta in the "
                               "master weights, which must be fp32 (fp16 would round the inner steps away); remove it")
    if view.torch_autocast_enabled:
        raise NexusConfigError("ds_config torch_autocast.enabled=true is not supported by the Nexus adapter yet; "
                               "use \"bf16\": {\"enabled\": true}")
    if nx and (view.bfloat16_config.bf16_master_weights_and_grads or view.bfloat16_config.bf16_optimizer_states):
        raise NexusConfigError("ds_config bf16.bf16_master_weights_and_grads / bf16_optimizer_states: Nexus keeps "
                               "theta_t + delta in the master weights, which must be fp32 (bf16 would round the "
                               "inner steps away); remove them")
    if not allow_scheduler and "scheduler" in cfg:
        raise NexusConfigError(
            "ds_config 'scheduler' section: the trainer drives the learning rate from optim.schedule / optim.lr / "
            "optim.warmup_steps; remove the 'scheduler' section from the ds_config (or use the Python API, which "
            "accepts it)")

    z = view.zero_config
    stage = int(view.zero_optimization_stage)
    for off in ("offload_optimizer", "offload_param"):
        sub = getattr(z, off)
        dev = getattr(sub, "device", "none") if sub is not None else "none"
        dev = getattr(dev, "value", dev)
        if dev not in (None, "none"):
            raise NexusConfigError(
                f"ds_config zero_optimization.{off}.device={dev!r}: ZeRO-Offload is not supported under Nexus: "
                "offloading is built around one CPU optimizer step per k micro-batches, and Nexus updates the master "
                "weights at every micro-step (k CPU updates and k host-device copies per outer step); remove it")
    for qw in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if getattr(z, qw):
            raise NexusConfigError(f"ds_config zero_optimization.{qw}=true: ZeRO++ quantizes the weights each "
                                   "forward sees to int8 blocks, a rounding far larger than the inner steps "
                                   "theta_t + delta at which Nexus evaluates the gradients; remove it")
    if z.zero_quantized_gradients:
        raise NexusConfigError("ds_config zero_optimization.zero_quantized_gradients=true: ZeRO++ gradient "
                               "quantization needs DeepSpeed's CUDA quantizer kernels and is not verified under Nexus; remove it")
    if z.zero_hpz_partition_size > 1:
        raise NexusConfigError(f"ds_config zero_optimization.zero_hpz_partition_size={z.zero_hpz_partition_size}: "
                               "ZeRO++ hierarchical "
                               "partitioning keeps a second copy of the parameters that the Nexus adapter does not "
                               "refresh when it restores the anchor (skipped steps, loads); remove it")
    if z.zenflow is not None:
        raise NexusConfigError("ds_config zero_optimization.zenflow: ZenFlow's asynchronous offloaded updates are "
                               "not supported under Nexus; remove it")
    if z.elastic_checkpoint:
        raise NexusConfigError("ds_config zero_optimization.elastic_checkpoint=true: the elastic format drops the "
                               "client optimizer's state (the Nexus anchor); set it to false")
    if not z.compute_grad_norm and nx:
        raise NexusConfigError("ds_config zero_optimization.compute_grad_norm=false: Nexus normalizes every "
                               "micro-step's gradient by DeepSpeed's global gradient norm; remove the setting")
    ckpt = cfg.get("checkpoint") if isinstance(cfg.get("checkpoint"), dict) else {}
    writer = ckpt.get("writer")
    ds_states = cfg.get("datastates_ckpt")
    if (isinstance(writer, dict) and writer.get("decoupled")) or (ds_states is not None and ds_states is not False):
        raise NexusConfigError("ds_config checkpoint.writer.decoupled=true / datastates_ckpt: these checkpoint writers "
                               "finish writing in the background after save_checkpoint returns, so the checkpoint "
                               "cannot be published atomically (a crash could leave a partial one under a loadable "
                               "name); remove them from the ds_config")
    if view.load_universal_checkpoint:
        raise NexusConfigError("ds_config checkpoint.load_universal=true: universal checkpoints do not carry the Nexus "
                               "state (the anchor shards and the outer step's position); resume with the same ranks, "
                               "ZeRO stage and layout, without load_universal")
    enabled = sorted(_walk_enabled(view.data_efficiency_config, "data_efficiency"), key=lambda p: -p.count("."))
    if enabled or view.data_efficiency_enabled:
        raise NexusConfigError(
            f"ds_config {(enabled or ['data_efficiency.enabled'])[0]}=true: DeepSpeed's data efficiency (curriculum "
            "sampling, random-LTD) counts its schedules in DeepSpeed steps, which are micro-steps under Nexus, and "
            "its sampler mixes data without regard to the sources; remove it")
    if view.hybrid_engine.enabled:
        raise NexusConfigError("ds_config hybrid_engine.enabled=true: DeepSpeed-Chat's hybrid (RLHF generation) "
                               "engine is not supported under Nexus; set it to false")
    if view.autotuning_config.enabled:
        raise NexusConfigError("ds_config autotuning.enabled=true: the autotuner launches its own experiments with "
                               "generated configs; run it without Nexus, then use the config it picks")
    if view.compile_config.deepcompile:
        raise NexusConfigError("ds_config compile.deepcompile=true: DeepCompile replaces DeepSpeed's ZeRO optimizer "
                               "step, which the Nexus adapter hooks into; remove it")
    if (cfg.get("sequence_parallel_size") or 1) > 1:
        raise NexusConfigError("ds_config sequence_parallel_size > 1: sequence parallelism is not supported by the "
                               "Nexus adapter")
    tp = cfg.get("tensor_parallel") if isinstance(cfg.get("tensor_parallel"), dict) else {}
    if (tp.get("autotp_size") or 1) > 1:
        raise NexusConfigError("ds_config tensor_parallel.autotp_size > 1: tensor parallelism is not supported by "
                               "the Nexus adapter")
    overlap_pg = bool(section.get("overlap_param_gather", False)) and nx
    if overlap_pg and stage not in (1, 2):
        raise NexusConfigError(
            f"ds_config nexus.overlap_param_gather=true with zero_optimization.stage={stage}: it overlaps ZeRO-1/2's "
            "parameter all-gather; stage 0 gathers nothing and ZeRO-3 already prefetches parameters during the "
            "forward (stage3_prefetch_bucket_size). Use stage 1 or 2, or remove nexus.overlap_param_gather")

    clip = cfg.get("gradient_clipping", 0.0) or 0.0
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
        raise NexusConfigError(f"ds_config gradient_clipping={clip!r}: must be a number >= 0 (0 = off)")

    if world is None:
        dp = 1
    elif layout.mode == "source-parallel" and nx:
        dp = world // K
    else:
        dp = world   # sequential; the AdamW baseline reduces over all ranks (the mixture weights scale the losses)

    # -- what DeepSpeed gets -------------------------------------------------------------------
    z_out = cfg.get("zero_optimization")
    if nx and stage in (1, 2) and isinstance(z_out, dict) and "use_multi_rank_bucket_allreduce" not in z_out:
        # Nexus reduces every micro-step: reduce each partition to its owner (a reduce-scatter's bytes) instead
        # of DeepSpeed 0.19's default all-reduce of the buckets, which sends twice that (docs/performance.md)
        z_out["use_multi_rank_bucket_allreduce"] = False
    cfg["train_micro_batch_size_per_gpu"] = mb
    if nx:
        # DeepSpeed takes one optimizer step per micro-step; what counts its steps is scaled to outer steps
        cfg["gradient_accumulation_steps"] = 1
        cfg["gradient_clipping"] = 0.0
        cfg["zero_allow_untested_optimizer"] = True
        cfg["train_batch_size"] = mb * dp
        if view.steps_per_print is not None:
            cfg["steps_per_print"] = int(view.steps_per_print) * k
        fp = view.flops_profiler_config
        if fp.enabled and fp.profile_step is not None:
            cfg.setdefault("flops_profiler", {})["profile_step"] = int(fp.profile_step) * k
        if fp16.enabled and not fp16.loss_scale:
            # the dynamic loss scale grows after loss_scale_window overflow-free DeepSpeed steps (micro-steps here):
            # x k keeps the growth rate per k micro-batches, i.e. per optimizer step, that the config was tuned for
            cfg["fp16"]["loss_scale_window"] = int(fp16.loss_scale_window) * k
    else:
        cfg["gradient_accumulation_steps"] = k
        cfg["gradient_clipping"] = float(clip)
        cfg["train_batch_size"] = mb * k * dp
    if world is not None:
        ds_view(cfg, dp)                    # what DeepSpeed will be given passes DeepSpeed's own checks
    bf16 = bool(view.bfloat16_config.enabled)
    fp16_on = bool(fp16.enabled)
    return PreparedConfig(ds=cfg, k=k, micro_batch=mb, clip=float(clip), layout=layout, nexus=nexus,
                          zero_stage=stage, bf16=bf16, dp_size=dp, user=user, overlap_param_gather=overlap_pg,
                          param_gather_bucket_size=int(section.get("param_gather_bucket_size", 40_000_000)),
                          optimizer=adamw, fp16=fp16_on)


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
    n, o = cfg.nexus, cfg.optim
    layout = LayoutConfig(mode=n.layout, sources=tuple(cfg.data.sources),
                          weights=tuple(cfg.data.weights) if cfg.data.weights else None, seed=n.seed)
    prepared = prepare_ds_config(
        raw, world_size=world_size, micro_steps=t.micro_steps, layout=layout,
        nexus=nexus_config_from(n),
        optim_name=cfg.optim.name, allow_scheduler=False, micro_steps_where="train.micro_steps",
        micro_batch=cfg.data.micro_batch_size, micro_batch_where="data.micro_batch_size",
        layout_where="the YAML (nexus.layout / data.sources / data.weights / nexus.seed)", nexus_where="nexus",
        outer_optimizer={"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay},
        outer_optimizer_where="the YAML's optim.lr / optim.beta1, optim.beta2 / optim.eps / optim.weight_decay")
    if prepared.fp16:
        raise NexusConfigError("ds_config fp16.enabled=true: the trainer on DeepSpeed runs fp32 or bf16 (fp16 is "
                               "supported through the Python API, engines.deepspeed.initialize); use \"bf16\": "
                               "{\"enabled\": true}")
    return prepared


__all__ = ["NEXUS_KEYS", "PreparedConfig", "load_ds_config", "prepare_ds_config", "default_trainer_ds_config",
           "check_run_config", "merge_nexus", "check_nexus_section", "adamw_from_optimizer_section", "ADAM_PARAMS"]
