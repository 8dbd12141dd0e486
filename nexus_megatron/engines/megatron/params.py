"""What Nexus, critical sharpness and the bench read from a Megatron optimizer: the per-model-chunk optimizers
of a ``ChainedOptimizer`` and the fp32 tensors each of them updates."""
from __future__ import annotations

from typing import List

import torch

from megatron.core.optimizer.optimizer import ChainedOptimizer


def optimizer_children(inner) -> list:
    """The optimizers of a ``ChainedOptimizer`` (one per model chunk / parameter group), or ``[inner]``."""
    if isinstance(inner, ChainedOptimizer):
        return list(inner.chained_optimizers)
    return [inner]


def main_params(child) -> List[torch.Tensor]:
    """The fp32 tensors the outer Adam updates (FP32Optimizer: the model params; Float16: fp32 copies;
    DistributedOptimizer: fp32 shards of this rank's data-parallel range)."""
    if getattr(child, "is_stub_optimizer", False) or getattr(child, "optimizer", None) is None:
        return []
    return [p for g in child.optimizer.param_groups for p in g["params"]]
