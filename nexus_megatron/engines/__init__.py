"""Engine adapters for the trainer. Each engine (plain PyTorch, DeepSpeed, Megatron-core) lives in its
own module or folder and exposes the small interface of :class:`nexus_megatron.engines.base.Engine`.

:data:`REGISTRY` is the one list of the trainer's engines (``train.engine``): a name and how to build it.
Importing this package imports neither DeepSpeed nor megatron-core (each builder imports its engine).
Megatron-core is driven by its own launcher (``launch/pretrain_gpt_nexus.py``), not by the trainer."""
from __future__ import annotations

from typing import Callable, Dict


def _plain(cfg, model, layout, lr_lambda):
    from .plain import PlainEngine
    return PlainEngine(cfg, model, layout, lr_lambda)


def _deepspeed(cfg, model, layout, lr_lambda):
    from .deepspeed import build_deepspeed_engine
    return build_deepspeed_engine(cfg, model, layout, lr_lambda)


REGISTRY: Dict[str, Callable] = {"plain": _plain, "deepspeed": _deepspeed}
"""``train.engine`` name -> ``builder(cfg, model, layout, lr_lambda)`` returning an :class:`~.base.Engine`."""
ENGINES = tuple(REGISTRY)


def build_engine(cfg, model, layout, lr_lambda):
    """The engine named by ``cfg.train.engine`` (validated by the config: one of :data:`ENGINES`)."""
    return REGISTRY[cfg.train.engine](cfg, model, layout, lr_lambda)
