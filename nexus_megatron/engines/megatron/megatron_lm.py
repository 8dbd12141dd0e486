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

This module is plumbing only; it is exercised in the tests against a stand-in ``megatron.training.training``
module with the same four names (Megatron-LM itself is not installed in the test environment).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ...layout import LayoutConfig
from ...nexus import NexusConfig


@dataclass
class NexusSettings:
    sources: Sequence[str]
    weights: Optional[Sequence[float]] = None
    layout: str = "sequential"
    gamma: float = 1.0
    gamma_mode: str = "update"
    micro_steps: Optional[int] = None
    """K inner steps per iteration; None = one per Megatron micro-batch (get_num_microbatches())."""
    layout_seed: int = 0
    min_grad_norm: float = 1e-8
    max_consecutive_skips: int = 10
    exact_displacement: bool = False
    state: dict = field(default_factory=dict)

    def layout_config(self) -> LayoutConfig:
        return LayoutConfig(mode=self.layout, sources=tuple(self.sources),
                            weights=tuple(self.weights) if self.weights else None, seed=self.layout_seed)

    def nexus_config(self) -> NexusConfig:
        return NexusConfig(gamma=self.gamma, gamma_mode=self.gamma_mode, min_grad_norm=self.min_grad_norm,
                           max_consecutive_skips=self.max_consecutive_skips)


def _groups(settings: NexusSettings):
    from .groups import build_nexus_groups
    if "groups" not in settings.state:
        settings.state["groups"] = build_nexus_groups(settings.layout_config())
    return settings.state["groups"]


def enable_nexus(settings: NexusSettings, training_module=None):
    """Patch ``megatron.training.training`` (or ``training_module``) to train with Nexus. Call before
    ``pretrain()``. Returns ``settings`` (``settings.state['optimizer']`` is the Nexus optimizer once built)."""
    from .groups import nexus_finalize_model_grads
    from .optimizer import get_nexus_megatron_optimizer
    from .schedule import nexus_forward_backward
    from .version import check_megatron_core_version

    check_megatron_core_version()
    T = training_module or sys.modules.get("megatron.training.training")
    if T is None:
        import importlib
        T = importlib.import_module("megatron.training.training")
    real_ddp, real_fb = T.DDP, T.get_forward_backward_func

    class NexusDDP(real_ddp):
        def __init__(self, *args, **kwargs):
            kwargs["pg_collection"] = _groups(settings).pg_collection
            super().__init__(*args, **kwargs)

    def get_megatron_optimizer(config, model_chunks, config_overrides=None, use_gloo_process_groups=True, **kw):
        k = settings.micro_steps
        if k is None:
            from megatron.core.num_microbatches_calculator import get_num_microbatches
            k = get_num_microbatches()
        kw.pop("pg_collection", None)
        if _groups(settings).pg_collection is None:
            kw["use_gloo_process_groups"] = use_gloo_process_groups
        opt = get_nexus_megatron_optimizer(config, model_chunks, _groups(settings), settings.nexus_config(),
                                           micro_steps=k, config_overrides=config_overrides,
                                           exact_displacement=settings.exact_displacement, **kw)
        settings.state["optimizer"] = opt
        return opt

    def get_forward_backward_func(*args, **kwargs):
        base = real_fb(*args, **kwargs)

        def run(**kw):
            opt = settings.state.get("optimizer")
            if opt is None or kw.get("forward_only", False):
                return base(**kw)
            return nexus_forward_backward(opt, base)(**kw)
        return run

    def finalize_model_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        return nexus_finalize_model_grads(_groups(settings))(model, num_tokens, pg_collection, force_all_reduce)

    T.DDP = NexusDDP
    T.get_megatron_optimizer = get_megatron_optimizer
    T.get_forward_backward_func = get_forward_backward_func
    T.finalize_model_grads = finalize_model_grads
    return settings


# ---------------------------------------------------------------------------------------------------
# Megatron-LM argument plumbing
# ---------------------------------------------------------------------------------------------------

def add_nexus_args(parser):
    """``extra_args_provider`` for Megatron-LM's ``pretrain()``: the --nexus-* flags."""
    g = parser.add_argument_group("nexus")
    g.add_argument("--nexus", action="store_true", help="train with Nexus (outer optimizer: --optimizer adam)")
    g.add_argument("--nexus-gamma", type=float, default=1.0)
    g.add_argument("--nexus-gamma-mode", choices=["update", "absolute"], default="update")
    g.add_argument("--nexus-layout", choices=["sequential", "source-parallel"], default="sequential")
    g.add_argument("--nexus-micro-steps", type=int, default=None)
    g.add_argument("--nexus-min-grad-norm", type=float, default=1e-8)
    g.add_argument("--nexus-exact-displacement", action="store_true")
    return parser


def settings_from_args(args) -> NexusSettings:
    from .data import parse_data_path
    specs = parse_data_path(args.data_path)
    return NexusSettings(sources=[s.name for s in specs], weights=[s.weight for s in specs], layout=args.nexus_layout,
                         gamma=args.nexus_gamma, gamma_mode=args.nexus_gamma_mode, micro_steps=args.nexus_micro_steps,
                         layout_seed=args.seed, min_grad_norm=args.nexus_min_grad_norm,
                         exact_displacement=args.nexus_exact_displacement)


_SETTINGS: dict = {}


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
    weights are the Nexus source weights), no validation set."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.training import get_args
    from .data import build_source_iterator, parse_data_path
    args = get_args()
    settings = _SETTINGS.get("settings") or settings_from_args(args)
    n_mb = get_num_microbatches()
    per_pass = n_mb // (settings.micro_steps or n_mb)
    it = build_source_iterator(_groups(settings).layout, parse_data_path(args.data_path), args.seq_length,
                               args.micro_batch_size, per_pass, seed=args.seed, split=args.split)
    return it, None, None
