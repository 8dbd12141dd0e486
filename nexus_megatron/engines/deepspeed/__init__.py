"""Nexus on DeepSpeed (ZeRO stages 0-3, fp32, bf16 and fp16, sequential and source-parallel layouts).

Public API (see docs/deepspeed.md)::

    from nexus_megatron.engines.deepspeed import initialize
    engine = initialize(model, "ds_config.json", optimizer=torch.optim.AdamW(model.parameters(), lr=3e-4))
    for batch in batches:                 # a micro-batch of engine.source_for_micro_step()
        engine.backward(engine(batch))
        engine.step()                     # every gradient_accumulation_steps-th call is the outer step

and :func:`build_deepspeed_engine` for the trainer (``train.engine: deepspeed``).

Importing this package does not import DeepSpeed; reading a ds_config does (:mod:`.ds_view`: DeepSpeed's
own loader and ``DeepSpeedConfig``).
"""
from __future__ import annotations

from .config import NEXUS_KEYS, PreparedConfig, load_ds_config, prepare_ds_config


def initialize(model, ds_config, layout_config=None, nexus_config=None, **kwargs):
    """Nexus on DeepSpeed; see :func:`nexus_megatron.engines.deepspeed.adapter.initialize`."""
    from .adapter import initialize as _initialize

    return _initialize(model, ds_config, layout_config, nexus_config, **kwargs)


def build_deepspeed_engine(cfg, model, layout, lr_lambda):
    """The trainer's Engine for ``train.engine: deepspeed``; see :mod:`.adapter`."""
    from .adapter import build_deepspeed_engine as _build

    return _build(cfg, model, layout, lr_lambda)


__all__ = ["initialize", "build_deepspeed_engine", "prepare_ds_config", "load_ds_config", "PreparedConfig",
           "NEXUS_KEYS"]
