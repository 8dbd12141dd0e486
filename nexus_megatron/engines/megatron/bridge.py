"""Nexus in NVIDIA Megatron-Bridge (``megatron.bridge``, the Megatron training library of NVIDIA NeMo).

Bridge has an optimizer plug-in point: ``megatron.bridge.training.optim.setup_optimizer`` calls
``config.optimizer.provide(model_chunks=..., config_overrides=..., use_gloo_process_groups=...,
pg_collection=...)`` when the ``OptimizerConfig`` it is given has a ``provide`` method.
:class:`NexusOptimizerConfig` is Megatron's ``OptimizerConfig`` (the outer Adam's settings) plus the Nexus
settings, and its ``provide`` returns the Nexus optimizer (:func:`~.megatron_lm.build_nexus_optimizer`, the
same one the Megatron-LM hook-in builds). Bridge's loop (``megatron.bridge.training.train``) calls
``get_forward_backward_func()`` once and then ``forward_backward_func(...)`` + ``optimizer.step()`` per
iteration, like Megatron-LM's: :func:`enable_nexus_bridge` replaces that name so that each iteration runs K
passes with an inner step after each (:func:`~.megatron_lm.nexus_schedule`). Only the ``sequential`` layout:
Bridge builds the model's DDP and ``finalize_model_grads`` with its own data-parallel groups, which is what
that layout uses.

Status (docs/megatron.md, "NeMo / Megatron-Bridge"): the optimizer seam and the schedule are tested through
Bridge's own ``setup_optimizer`` and ``train`` module (tests/test_megatron_bridge.py); a full run of Bridge's
``pretrain()`` is not (the per-source data of a run would come from a Bridge ``DatasetProvider`` with
``dataloader_type="external"``: not written).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Optional

from megatron.core.optimizer import OptimizerConfig

from ...errors import NexusConfigError
from .megatron_lm import NexusSettings, build_nexus_optimizer, nexus_schedule


@dataclasses.dataclass
class NexusOptimizerConfig(OptimizerConfig):
    """``ConfigContainer(optimizer=NexusOptimizerConfig(optimizer="adam", lr=..., nexus=NexusSettings(...)))``:
    the outer optimizer's settings are Megatron's ``OptimizerConfig`` fields; ``nexus`` holds the sources, their
    weights and the Nexus settings (gamma, K = ``micro_steps``, ...)."""

    nexus: Optional[NexusSettings] = None

    def outer_config(self) -> OptimizerConfig:
        """The plain ``OptimizerConfig`` of the outer optimizer (without ``nexus``; Megatron copies it per
        parameter group)."""
        return OptimizerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(OptimizerConfig)
                                  if f.init})

    def provide(self, model_chunks, config_overrides=None, use_gloo_process_groups=True, pg_collection=None):
        """Called by Bridge's ``setup_optimizer``: the Nexus optimizer over ``model_chunks``."""
        settings = check_bridge_settings(self.nexus, self.optimizer)
        if pg_collection is not None:
            raise NexusConfigError("Megatron-Bridge with dist.use_decentralized_pg=True (an explicit process-group "
                                   "collection) is not supported by Nexus: leave it False")
        return build_nexus_optimizer(settings, self.outer_config(), model_chunks, config_overrides,
                                     use_gloo_process_groups)


def check_bridge_settings(settings: Optional[NexusSettings], optimizer: str = "adam") -> NexusSettings:
    """Refuse, with the reason, what the Bridge path cannot run."""
    if settings is None:
        raise NexusConfigError("NexusOptimizerConfig.nexus: give NexusSettings(sources=[...], ...)")
    if optimizer != "adam":
        raise NexusConfigError(f"NexusOptimizerConfig.optimizer={optimizer!r}: the outer optimizer is Adam "
                               "(optimizer='adam')")
    if settings.layout != "sequential":
        raise NexusConfigError(f"NexusSettings.layout={settings.layout!r}: Megatron-Bridge builds DDP and "
                               "finalize_model_grads with its own data-parallel groups; use the sequential layout")
    return settings


def enable_nexus_bridge(settings: NexusSettings, train_module=None) -> NexusSettings:
    """Patch ``megatron.bridge.training.train`` (or ``train_module``) so its training iterations run Nexus's K
    passes once the optimizer from :class:`NexusOptimizerConfig` exists. Call before ``pretrain()`` with the
    same ``settings`` object as the config's ``nexus``."""
    check_bridge_settings(settings)
    T = train_module or importlib.import_module("megatron.bridge.training.train")
    real_fb = T.get_forward_backward_func
    if getattr(real_fb, "nexus_settings", None) is settings:
        return settings

    def get_forward_backward_func(*args, **kwargs):
        return nexus_schedule(settings, real_fb(*args, **kwargs))

    get_forward_backward_func.nexus_settings = settings
    T.get_forward_backward_func = get_forward_backward_func
    return settings
