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

The per-source data: :class:`NexusDatasetProvider` (``ConfigContainer(dataset=NexusDatasetProvider(...))``) is
a Bridge ``DatasetProvider`` with ``dataloader_type="external"``: its ``build_datasets`` returns this package's
per-source iterator (:func:`~.data.build_source_iterator`), which Bridge passes through to the schedule; before
each of the K passes :func:`~.schedule.nexus_forward_backward` tells it the source to read. It subclasses
Bridge's ``megatron.bridge.data.base.DatasetProvider``, so it is built on first access
(``from nexus_megatron.engines.megatron.bridge import NexusDatasetProvider`` imports Bridge; the rest of this
module does not).

Status (docs/megatron.md, "NeMo / Megatron-Bridge"): tested through Bridge's own ``pretrain()`` on CPU
(tests/test_megatron_bridge.py). Not supported: validation data (``build_datasets`` returns no validation set),
resuming a Bridge checkpoint (refused: the per-source read positions are not in it), layouts other than
sequential.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Optional, Sequence

from megatron.core.optimizer import OptimizerConfig

from ...errors import NexusConfigError
from .megatron_lm import NexusSettings, build_nexus_optimizer, nexus_groups, nexus_schedule


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


def _build_dataset_provider_class():
    """``NexusDatasetProvider``: Bridge's ``DatasetProvider`` (imported here, not at module import)."""
    from megatron.bridge.data.base import DatasetProvider

    @dataclasses.dataclass(kw_only=True)
    class NexusDatasetProvider(DatasetProvider):
        """``ConfigContainer(dataset=NexusDatasetProvider(nexus=settings, data_path=[...], seq_length=...,
        micro_batch_size=...))``: the training data of a Nexus run in Bridge, one source per pass.

        ``data_path`` is spelled like Megatron-LM's ``--data-path`` (:func:`~.data.parse_data_path`: ``P`` or
        ``W1 P1 W2 P2 ...``, prepared source directories or indexed-dataset prefixes), in the order of
        ``nexus.sources`` (its weights are not used: the source weights are ``nexus.weights``);
        ``micro_batch_size`` and ``seq_length`` must equal the run's (``cfg.train`` / ``cfg.model``). ``nexus`` is
        the same :class:`~.megatron_lm.NexusSettings` object as the optimizer config's."""

        nexus: NexusSettings
        data_path: Sequence[str]
        seq_length: int
        micro_batch_size: int
        seed: int = 1234
        split: str = "969,30,1"
        eod: Optional[int] = None
        mask_eod: bool = False
        dataloader_type: str = "external"
        num_workers: int = 0

        def build_datasets(self, context):
            """Called by Bridge's setup (after the optimizer is built): (per-source train iterator, None, None)."""
            from megatron.core.num_microbatches_calculator import get_num_microbatches
            from .data import build_source_iterator, parse_data_path
            settings = check_bridge_settings(self.nexus)
            opt = settings.state.get("optimizer")          # built, and loaded from --load, before the data
            if getattr(opt, "iteration", 0):
                raise NexusConfigError(
                    f"checkpoint.load: resuming a Megatron-Bridge run with Nexus (at iteration {opt.iteration}) is "
                    "not supported: the per-source read positions are not in Bridge's checkpoint, so the run would "
                    "read its sources again from the start; start a new run (or use Megatron-LM's loop, "
                    "launch/pretrain_gpt_nexus.py, which resumes exactly)")
            if self.dataloader_type != "external":
                raise NexusConfigError(f"NexusDatasetProvider.dataloader_type={self.dataloader_type!r}: the "
                                       "per-source iterator is passed through as it is: use 'external'")
            specs = parse_data_path(self.data_path)
            names = [s.name for s in specs]
            if names != list(settings.sources):
                raise NexusConfigError(f"NexusDatasetProvider.data_path names the sources {names}; "
                                       f"NexusSettings.sources is {list(settings.sources)} (same names, same order)")
            n_mb = get_num_microbatches()
            k = settings.micro_steps or n_mb
            if n_mb % k:
                raise NexusConfigError(f"{n_mb} micro-batches per iteration are not a multiple of "
                                       f"K = micro_steps = {k}")
            it = build_source_iterator(nexus_groups(settings).layout, specs, self.seq_length, self.micro_batch_size,
                                       n_mb // k, seed=self.seed, split=self.split, eod=self.eod,
                                       mask_eod=self.mask_eod)
            return it, None, None

    NexusDatasetProvider.__qualname__ = "NexusDatasetProvider"     # importable by this name (Bridge's config YAML)
    NexusDatasetProvider.__module__ = __name__
    return NexusDatasetProvider


_LAZY = {}


def __getattr__(name):
    if name == "NexusDatasetProvider":
        if name not in _LAZY:
            _LAZY[name] = _build_dataset_provider_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
