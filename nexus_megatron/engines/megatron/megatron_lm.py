"""Nexus inside a Megatron-LM checkout (``megatron/training``, written against core_v0.16.x).

Megatron-LM has no optimizer plug-in point: ``setup_model_and_optimizer`` calls
``get_megatron_optimizer`` and ``train`` calls ``get_forward_backward_func`` and installs
``finalize_model_grads``, all looked up in ``megatron.training.training``'s namespace at call time.
:func:`enable_nexus` replaces those four names (``DDP``, ``get_megatron_optimizer``,
``get_forward_backward_func``, ``finalize_model_grads``) with Nexus-aware versions, so ``pretrain()``
runs Nexus unchanged otherwise. The few lines in ``pretrain_gpt.py`` (see docs/megatron.md)::

    from nexus_megatron.engines.megatron.megatron_lm import add_nexus_args, enable_nexus_from_args, \\
        nexus_datasets_provider
    enable_nexus_from_args()                                   # reads --nexus-* after Megatron parsed them
    pretrain(nexus_datasets_provider, ..., extra_args_provider=add_nexus_args)   # + --dataloader-type external

What each replacement does:

* ``DDP(...)``: Megatron's DistributedDataParallel with the layout's process groups
  (``pg_collection``; for source-parallel the source block is the data-parallel group).
* ``get_megatron_optimizer(...)``: Megatron's (Adam) optimizer with those groups, wrapped in
  :class:`~.optimizer.NexusMegatronOptimizer`. ``train_step``'s ``optimizer.step()`` is the outer step.
* ``get_forward_backward_func()``: the schedule, run as K passes with an inner step after each
  (:func:`~.schedule.nexus_forward_backward`); evaluation passes through.
* ``finalize_model_grads``: Megatron's, with the layout's groups.

With ``--sharpness-every N`` the Nexus optimizer also gets the critical-sharpness hook
(:mod:`.sharpness`, docs/sharpness.md) as its ``pre_outer_step``, with per-source probe batches from
``--data-path`` (validation split) and ``--sharpness-ood-data-path``; the measurements go to Megatron-LM's
TensorBoard and W&B writers under ``sharpness/...``.

This module is plumbing only; it is exercised in the tests against a stand-in ``megatron.training.training``
module with the same four names (Megatron-LM itself is not installed in the test environment).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ...errors import NexusConfigError
from ...layout import LAYOUTS, LayoutConfig
from ...nexus import NexusConfig
from ...settings import DEFAULTS, add_nexus_flags, names_on, nexus_config_from, nexus_config_from_flags
from ...sharpness import SharpnessConfig


@dataclass
class NexusSettings:
    sources: Sequence[str]
    weights: Optional[Sequence[float]] = None
    layout: str = "sequential"
    gamma: float = DEFAULTS.gamma                       # the defaults of NexusConfig (nexus_megatron.settings)
    gamma_mode: str = DEFAULTS.gamma_mode
    micro_steps: Optional[int] = None
    """K inner steps per iteration; None = one per Megatron micro-batch (get_num_microbatches())."""
    layout_seed: int = 0
    min_grad_norm: float = DEFAULTS.min_grad_norm
    max_consecutive_skips: int = DEFAULTS.max_consecutive_skips
    exact_displacement: bool = False
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    """Critical sharpness (off by default); needs ``probe_data``."""
    probe_data: dict = field(default_factory=dict)
    """Where the sharpness probe batches come from: ``data_path`` (Megatron-LM's --data-path), ``seq_length``,
    ``micro_batch_size``, ``split``, ``seed``, ``ood_data_path`` (list or None), ``eod``, ``mask_eod``."""
    state: dict = field(default_factory=dict)

    def layout_config(self) -> LayoutConfig:
        return LayoutConfig(mode=self.layout, sources=tuple(self.sources),
                            weights=tuple(self.weights) if self.weights else None, seed=self.layout_seed)

    def nexus_config(self) -> NexusConfig:
        return nexus_config_from(self)


def nexus_groups(settings: NexusSettings):
    """The layout's process groups (built on first use; collective the first time: every rank calls it)."""
    from .groups import build_nexus_groups
    if "groups" not in settings.state:
        settings.state["groups"] = build_nexus_groups(settings.layout_config())
    return settings.state["groups"]


def enable_nexus(settings: NexusSettings, training_module=None):
    """Patch ``megatron.training.training`` (or ``training_module``) to train with Nexus. Call before
    ``pretrain()``. Returns ``settings`` (``settings.state['optimizer']`` is the Nexus optimizer once built)."""
    from .groups import nexus_finalize_model_grads
    from .version import check_megatron_core_version

    check_megatron_core_version()
    T = training_module or sys.modules.get("megatron.training.training")
    if T is None:
        import importlib
        T = importlib.import_module("megatron.training.training")
    real_ddp, real_fb = T.DDP, T.get_forward_backward_func

    class NexusDDP(real_ddp):
        def __init__(self, *args, **kwargs):
            kwargs["pg_collection"] = nexus_groups(settings).pg_collection
            super().__init__(*args, **kwargs)

    def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True, **kw):
        return build_nexus_optimizer(settings, config, model_chunks, config_overrides, use_gloo_process_groups, **kw)

    def get_forward_backward_func(*args, **kwargs):
        return nexus_schedule(settings, real_fb(*args, **kwargs))

    def finalize_model_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        return nexus_finalize_model_grads(nexus_groups(settings))(model, num_tokens, pg_collection, force_all_reduce)

    T.DDP = NexusDDP
    T.get_megatron_optimizer = get_megatron_optimizer
    T.get_forward_backward_func = get_forward_backward_func
    T.finalize_model_grads = finalize_model_grads
    return settings



def build_nexus_optimizer(settings: NexusSettings, config, model_chunks, config_overrides=None,
                          use_gloo_process_groups=True, **kw):
    """Megatron's (Adam) optimizer from ``config`` with the layout's groups, wrapped in Nexus (K =
    ``settings.micro_steps``, default: ``get_num_microbatches()``); kept in ``settings.state['optimizer']``.
    What the patched ``get_megatron_optimizer`` of :func:`enable_nexus` and Megatron-Bridge's
    ``NexusOptimizerConfig.provide`` (:mod:`.bridge`) return."""
    from .optimizer import get_nexus_megatron_optimizer
    k = settings.micro_steps
    if k is None:
        from megatron.core.num_microbatches_calculator import get_num_microbatches
        k = get_num_microbatches()
    kw.pop("pg_collection", None)
    if nexus_groups(settings).pg_collection is None:
        kw["use_gloo_process_groups"] = use_gloo_process_groups
    opt = get_nexus_megatron_optimizer(config, model_chunks, nexus_groups(settings), settings.nexus_config(),
                                       micro_steps=k, config_overrides=config_overrides,
                                       exact_displacement=settings.exact_displacement, **kw)
    settings.state["optimizer"] = opt
    opt.post_outer_step = report_step_stats
    if settings.sharpness.enabled:
        settings.state["sharpness"] = build_sharpness_hook_from_settings(settings, opt, model_chunks)
    return opt


def nexus_schedule(settings: NexusSettings, base):
    """``base`` (a ``get_forward_backward_func()`` result) as K passes with an inner step after each
    (:func:`~.schedule.nexus_forward_backward`) once ``settings.state['optimizer']`` exists; evaluation
    (``forward_only``) passes through. With the sharpness hook it also hands the iteration's batches to it."""
    from .schedule import nexus_forward_backward

    def run(**kw):
        opt = settings.state.get("optimizer")
        if opt is None or kw.get("forward_only", False):
            return base(**kw)
        hook = settings.state.get("sharpness")
        if hook is None:
            return nexus_forward_backward(opt, base)(**kw)
        from .sharpness import RecordingIterator
        it = kw["data_iterator"]
        if isinstance(it, (list, tuple)):
            if settings.sharpness.split == "step":
                raise NexusConfigError("--sharpness-split step with virtual pipeline stages (one data iterator per "
                                       "model chunk) is not supported: use --sharpness-split val")
            out = nexus_forward_backward(opt, base)(**kw)
            hook.begin_step(opt.iteration + 1)
            return out
        rec = RecordingIterator(it)
        out = nexus_forward_backward(opt, base)(**dict(kw, data_iterator=rec))
        hook.begin_step(opt.iteration + 1, rec.take())    # the iteration's own micro-batches
        return out
    return run

# ---------------------------------------------------------------------------------------------------
# Megatron-LM argument plumbing
# ---------------------------------------------------------------------------------------------------

def add_sharpness_args(parser):
    """The --sharpness-* flags (Megatron-LM style; also used by launch/pretrain_gpt_nexus.py)."""
    s = parser.add_argument_group("critical sharpness")
    s.add_argument("--sharpness-every", type=int, default=0,
                   help="measure lambda_c along the update in every N-th iteration (0: off)")
    s.add_argument("--sharpness-batches", type=int, default=1,
                   help="fixed probe batches of --micro-batch-size sequences per source (dealt over the DP ranks)")
    s.add_argument("--sharpness-split", choices=["step", "val", "train"], default="step",
                   help="batches of the mixture loss: the iteration's own micro-batches (step), or fixed "
                        "validation / training windows of every source")
    s.add_argument("--sharpness-eps", type=float, default=0.0625, help="relative bisection tolerance")
    s.add_argument("--sharpness-max-doublings", type=int, default=12)
    s.add_argument("--sharpness-no-relative", action="store_false", dest="sharpness_relative",
                   help="skip the per-source and OOD relative sharpness")
    s.add_argument("--sharpness-ood-data-path", nargs="+", default=None,
                   help="held-out sets for sharpness/lambda_c/ood: indexed-dataset prefixes or prepared source "
                        "directories (their validation split; a prepared root = its OOD sources)")
    return parser


def sharpness_config_from_args(args) -> SharpnessConfig:
    """The --sharpness-* flags as a SharpnessConfig, with errors naming the flag."""
    if args.sharpness_every < 0:
        raise NexusConfigError(f"--sharpness-every {args.sharpness_every}: give N >= 1 to measure every N "
                               "iterations, or 0 for off")
    if args.sharpness_every == 0:
        return SharpnessConfig(enabled=False)
    for flag, v in (("--sharpness-batches", args.sharpness_batches),
                    ("--sharpness-max-doublings", args.sharpness_max_doublings)):
        if v < 1:
            raise NexusConfigError(f"{flag} {v}: must be an integer >= 1")
    if not 0 < args.sharpness_eps < 1:
        raise NexusConfigError(f"--sharpness-eps {args.sharpness_eps}: the relative bisection tolerance must be in "
                               "(0, 1), e.g. 0.0625")
    return SharpnessConfig(enabled=True, every=args.sharpness_every, eps=args.sharpness_eps,
                           max_doublings=args.sharpness_max_doublings, batches=args.sharpness_batches,
                           split=args.sharpness_split, relative=args.sharpness_relative)


def parse_ood_path(paths) -> list:
    """--sharpness-ood-data-path: prefixes / prepared source directories; a prepared root = its OOD sources."""
    from ...data.shards import load_manifest
    from .data import SourceSpec
    out = []
    for p in paths or []:
        p = p.rstrip("/")
        if os.path.isfile(os.path.join(p, "manifest.json")):
            man = load_manifest(p)
            out += [SourceSpec(n, 1.0, os.path.join(p, n)) for n, info in man["sources"].items()
                    if info.get("kind") == "ood"]
        else:
            out.append(SourceSpec(os.path.basename(p), 1.0, p))
    return out


def ood_samplers(paths, seq_length: int, seed: int, split: str) -> dict:
    """{name: validation sampler} of the OOD sets (prepared: val.bin; indexed: the --split validation range)."""
    from .data import build_eval_samplers
    specs = parse_ood_path(paths)
    return {s.name: v for s, v in zip(specs, build_eval_samplers(specs, seq_length, seed=seed, split=split))}


def writer_sink(step: int, metrics: dict) -> None:
    """Megatron-LM's TensorBoard / W&B writers (where this rank has them), finite values only."""
    try:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer
    except ImportError:
        return
    finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    tb, wb = get_tensorboard_writer(), get_wandb_writer()
    if tb is not None:
        for k, v in finite.items():
            tb.add_scalar(k, v, step)
    if wb is not None:
        wb.log(finite, step)


def report_step_stats(opt, sink=writer_sink) -> None:
    """After each outer step in Megatron-LM's loop: the Nexus statistics (``nexus/gnorm/<source>``, gamma, skipped
    steps and sources) to Megatron's TensorBoard / W&B writers at every iteration, and one ``[nexus]`` line on the
    last rank (where Megatron prints its own) every ``--log-interval`` iterations."""
    stats = opt.step_stats()
    sink(opt.iteration, stats)
    try:
        from megatron.training import get_args
        from megatron.training.utils import print_rank_last
        interval = max(1, int(getattr(get_args(), "log_interval", 1) or 1))
    except (ImportError, AssertionError, AttributeError):     # not inside Megatron-LM's loop
        return
    if opt.iteration % interval == 0:
        print_rank_last(f" [nexus] iteration {opt.iteration:8d} | " + " | ".join(
            f"{k}: {v:.6E}" if isinstance(v, float) else f"{k}: {v}" for k, v in sorted(stats.items())))


def build_sharpness_hook_from_settings(settings: NexusSettings, opt, model_chunks, sink=writer_sink):
    """The critical-sharpness hook for a Nexus optimizer built by the patched ``get_megatron_optimizer``."""
    from ...data.shards import SourceSampler
    from .data import build_eval_samplers, open_source, parse_data_path
    from .sharpness import build_megatron_sharpness_hook
    d = settings.probe_data
    missing = [k for k in ("data_path", "seq_length", "micro_batch_size") if d.get(k) is None]
    if missing:
        raise NexusConfigError(f"critical sharpness: NexusSettings.probe_data lacks {missing} (settings_from_args "
                               "fills them from Megatron-LM's arguments)")
    seq, seed, split = int(d["seq_length"]), int(d.get("seed", 1234)), d.get("split", "969,30,1")
    specs = parse_data_path(d["data_path"])
    train = [SourceSampler(open_source(s, seq, split, "train"), seq, seed, i) for i, s in enumerate(specs)]
    return build_megatron_sharpness_hook(
        settings.sharpness, opt, model_chunks, train_samplers=train,
        val_samplers=build_eval_samplers(specs, seq, seed=seed, split=split), names=[s.name for s in specs],
        weights=[s.weight for s in specs], micro_batch_size=int(d["micro_batch_size"]), seq_length=seq,
        ood_samplers=ood_samplers(d.get("ood_data_path"), seq, seed, split), eod=d.get("eod"),
        mask_eod=bool(d.get("mask_eod", False)), sink=sink)


def add_nexus_args(parser):
    """``extra_args_provider`` for Megatron-LM's ``pretrain()``: the --nexus-* and --sharpness-* flags."""
    add_sharpness_args(parser)
    g = parser.add_argument_group("nexus")
    g.add_argument("--nexus", action="store_true", help="train with Nexus (outer optimizer: --optimizer adam)")
    add_nexus_flags(g)            # --nexus-gamma, --nexus-gamma-mode, --nexus-min-grad-norm, --nexus-max-consecutive-skips
    g.add_argument("--nexus-layout", choices=list(LAYOUTS), default="sequential")
    g.add_argument("--nexus-micro-steps", type=int, default=None)
    g.add_argument("--nexus-exact-displacement", action="store_true")
    return parser


def _flag_settings(args) -> dict:
    """NexusConfig's settings from the --nexus-* flags (checked), under NexusSettings' names (the same)."""
    cfg = nexus_config_from_flags(args)
    return {name: getattr(cfg, name) for name in names_on("megatron")}


def settings_from_args(args) -> NexusSettings:
    from .data import parse_data_path
    specs = parse_data_path(args.data_path)
    probe = {"data_path": args.data_path, "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size,
             "split": args.split, "seed": args.seed, "ood_data_path": getattr(args, "sharpness_ood_data_path", None),
             "mask_eod": getattr(args, "eod_mask_loss", False)}
    return NexusSettings(sources=[s.name for s in specs], weights=[s.weight for s in specs], layout=args.nexus_layout,
                         **_flag_settings(args), micro_steps=args.nexus_micro_steps,
                         layout_seed=args.seed, exact_displacement=args.nexus_exact_displacement,
                         sharpness=sharpness_config_from_args(args) if hasattr(args, "sharpness_every")
                         else SharpnessConfig(), probe_data=probe)


_SETTINGS: dict = {}


def register_settings(settings: NexusSettings) -> None:
    """The settings :func:`nexus_datasets_provider` reads (set by whoever called :func:`enable_nexus`)."""
    _SETTINGS["settings"] = settings


def enable_nexus_from_args():
    """Defer :func:`enable_nexus` until Megatron-LM has parsed its arguments: patches
    ``megatron.training.training.get_model`` to read ``get_args()`` (``--nexus`` and --nexus-*) on first use."""
    import importlib
    T = importlib.import_module("megatron.training.training")
    real_get_model = T.get_model

    def get_model(*a, **kw):
        from megatron.training import get_args
        args = get_args()
        if getattr(args, "nexus", False) and "settings" not in _SETTINGS:
            _SETTINGS["settings"] = enable_nexus(settings_from_args(args), T)
        return real_get_model(*a, **kw)
    T.get_model = get_model


def nexus_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """``train_valid_test_datasets_provider`` for Megatron-LM with ``--dataloader-type external`` and
    ``--nexus``: one :class:`~.data.SourceRoutedIterator` over ``--data-path`` (one dataset per source; the
    weights are the Nexus source weights); with ``--eval-iters > 0`` the validation stream of every source
    (:class:`~.data.ValidationIterator`, continuing from Megatron's ``consumed_valid_samples``); no test set."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.training import get_args
    from .data import build_source_iterator, build_validation_iterator, parse_data_path
    args = get_args()
    settings = _SETTINGS.get("settings") or settings_from_args(args)
    n_mb = get_num_microbatches()
    per_pass = n_mb // (settings.micro_steps or n_mb)
    it = build_source_iterator(nexus_groups(settings).layout, parse_data_path(args.data_path), args.seq_length,
                               args.micro_batch_size, per_pass, seed=args.seed, split=args.split)
    iteration = int(getattr(args, "iteration", 0) or 0)
    if iteration:
        opt = settings.state.get("optimizer")     # built before the data (setup_model_and_optimizer)
        skip_resumed_iterations(it, iteration, getattr(opt, "micro_steps", None) or settings.micro_steps)
    valid = None
    if (getattr(args, "eval_iters", 0) or 0) > 0:
        layout = nexus_groups(settings).layout
        valid = build_validation_iterator(parse_data_path(args.data_path), args.seq_length, args.micro_batch_size,
                                          layout.dp_rank, layout.dp_size,
                                          start_sample=int(getattr(args, "consumed_valid_samples", 0) or 0),
                                          seed=args.seed, split=args.split)
    return it, valid, None


def skip_resumed_iterations(it, iterations: int, micro_steps=None) -> None:
    """Megatron-LM's loop resumed at ``iterations`` (``--load``; its checkpoint has no per-source data
    positions): advance the per-source counters over the passes those iterations read, with each iteration's
    micro-batch count from Megatron's batch-size calculator (constant, or ``--step-batch-size-schedule``) and
    the layout's source draw of each pass, so the run continues on the samples it had not read yet."""
    from megatron.core.num_microbatches_calculator import (get_current_global_batch_size, get_num_microbatches,
                                                           update_num_microbatches)
    from megatron.training import get_args
    args = get_args()
    layout = it.layout
    consumed = 0
    try:
        for step in range(iterations):
            update_num_microbatches(consumed, consistency_check=False)
            n = get_num_microbatches()
            k = micro_steps or n             # None: one inner step per micro-batch
            it.set_pass_micro_batches(n // k)
            for m in range(k):
                it.set_micro_step(layout.source_for(step, m), step, m)
            consumed += get_current_global_batch_size()
    finally:
        update_num_microbatches(int(getattr(args, "consumed_train_samples", consumed) or consumed),
                                consistency_check=False)


# Megatron-LM (core 0.18+) calls a provider marked ``is_distributed`` on every rank, not only on tensor-parallel
# rank 0 (which would leave the other TP ranks without an iterator: Megatron's own get_batch broadcasts the batch,
# the GPT forward step here reads it). Every TP rank of a data-parallel rank reads the same samples.
nexus_datasets_provider.is_distributed = True
