"""Checkpoints of a Nexus-on-Megatron run with megatron-core's ``dist_checkpointing`` (sharded, every
rank writes its own shards; resharding across data-parallel sizes is megatron-core's business).

What is saved: the model's sharded state dict, the optimizer's (``NexusMegatronOptimizer.sharded_state_dict``:
Megatron's Adam state and fp32 main params (the distributed optimizer in its ``dp_reshardable`` format by
default), plus the Nexus counters as common state), the lr scheduler, the iteration and any
``client_state`` (e.g. the per-source data positions of :class:`~.data.SourceRoutedIterator`).

The Nexus anchor is not stored separately: checkpoints are taken between outer steps, where the anchor
equals the fp32 main params (see :mod:`.optimizer`). A checkpoint directory is written to
``<root>/iter_<n>.tmp`` and renamed to ``<root>/iter_<n>`` after every rank finished, then
``<root>/latest`` is replaced atomically, so a crash leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from ...checkpoint import atomic_write_text


def _unwrap(chunk):
    """The model inside DDP / Float16Module wrappers (its state-dict keys have no ``module.`` prefix)."""
    m = chunk
    while isinstance(getattr(m, "module", None), torch.nn.Module):
        m = m.module
    return m


def _model_sharded_state_dict(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


DEFAULT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
"""The distributed optimizer's checkpoint format (megatron-core 0.16: ``dp_reshardable`` is fully parallel;
``fully_reshardable`` also reshards across TP/PP; the older ``fully_sharded_model_space`` default no
longer validates)."""


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler=None,
                    client_state: Optional[dict] = None, metadata: Optional[dict] = None) -> str:
    """Collective. Write checkpoint ``iteration`` under ``root`` and return its directory."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank() if dist.is_initialized() else 0
    final = os.path.join(root, f"iter_{iteration:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    sd = _model_sharded_state_dict(model_chunks)
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=False, metadata=metadata or DEFAULT_METADATA)
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["client_state"] = client_state or {}
    sd["rng_state"] = {"torch": torch.get_rng_state()}
    dist_checkpointing.save(sd, tmp)
    _barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest"), os.path.basename(final))
    _barrier()
    return final


def latest_checkpoint(root: str) -> Optional[str]:
    pointer = os.path.join(root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(root, f.read().strip())
    return path if os.path.isdir(path) else None


@torch.no_grad()
def load_checkpoint(root_or_dir: str, model_chunks, optimizer, scheduler=None,
                    metadata: Optional[dict] = None) -> Optional[dict]:
    """Collective. Load the latest checkpoint under ``root_or_dir`` (or that checkpoint directory) into
    the model chunks, the optimizer and the scheduler. Returns ``{"iteration", "client_state"}`` or
    None if there is no checkpoint."""
    from megatron.core import dist_checkpointing

    path = root_or_dir if os.path.isfile(os.path.join(root_or_dir, "metadata.json")) else latest_checkpoint(root_or_dir)
    if path is None:
        return None
    sd = _model_sharded_state_dict(model_chunks)
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=True, metadata=metadata or DEFAULT_METADATA)
    loaded = dist_checkpointing.load(sd, path)
    if len(model_chunks) == 1:
        _unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(model_chunks):
            _unwrap(c).load_state_dict(loaded[f"model{i}"])
    optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return {"iteration": int(loaded["iteration"]), "client_state": loaded.get("client_state", {}), "path": path}
