"""Checkpoints of a Nexus-on-Megatron run with megatron-core's ``dist_checkpointing`` (sharded, every
rank writes its own shards; resharding across data-parallel sizes is megatron-core's business).

What is saved: the model's sharded state dict, the optimizer's (``NexusMegatronOptimizer.sharded_state_dict``:
Megatron's Adam state and fp32 main params (the distributed optimizer in its ``dp_reshardable`` format by
default), plus the Nexus counters as common state), the lr scheduler, the iteration and any
``client_state`` (e.g. the per-source data positions of :class:`~.data.SourceRoutedIterator`).

The Nexus anchor is not stored separately: checkpoints are taken between outer steps, where the anchor
equals the fp32 main params and the displacement is zero (see :mod:`.optimizer`). Every rank's RNG states
(torch, CUDA, Megatron's model-parallel RNG tracker, numpy, random) are saved as one sharded object per rank
and restored on load when the number of ranks is unchanged, so dropout continues the same stream.

Atomic and durable: the checkpoint is written to ``<root>/.tmp-iter_<n>``; after every rank finished,
rank 0 fsyncs every file in it and the directory (:func:`nexus_megatron.checkpoint.publish_dir`), renames
it to ``<root>/iter_<n>`` and then replaces ``<root>/latest`` atomically, so a crash at any point leaves
the previous checkpoint loadable and a published one survives a power loss.

Loading runs no code from the checkpoint: see :mod:`.safe_load` for what megatron-core reads and how we
restrict it; a checkpoint without the format-2 marker is refused until ``nexus-megatron convert-checkpoint``.
"""
from __future__ import annotations

import contextlib
import os
import queue
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from ... import checkpoint as _ckpt
from ...errors import CheckpointError
from ...faults import fault_point
from ...safe_load import MARKER_FILE, marker_text, rng_to_plain, set_rng_from_plain
from .optimizer import sync_model_params
from .compat import dist_checkpointing_async_save
from .safe_load import safe_dist_checkpointing


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


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _rng_states() -> dict:
    """Tensors and numbers only (numpy's and python's states as :mod:`nexus_megatron.safe_load` dicts)."""
    from megatron.core import tensor_parallel
    st = {**rng_to_plain(python_key="random"), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_states(st: dict) -> None:
    from megatron.core import tensor_parallel
    set_rng_from_plain(st, python_key="random")   # (also the tuples of checkpoints written before format 2)
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(st["tracker"])


def _rng_sharded(data):
    """This rank's RNG states as a sharded object (one per rank; resuming on another number of ranks skips it)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    rank, world = _rank_world()
    return ShardedObject("rng_state", data, (world,), (rank,), replica_id=0)


@contextlib.contextmanager
def _in_process_write_results():
    """megatron-core's torch_dist writer hands its write results back through a process-global
    ``multiprocessing.Manager().Queue()``, made for saves that finish in a background process. Creating it
    starts a Manager server process that lives as long as the rank, ~250 MB, and that nothing stops when
    the rank is killed (kill -9, or torchrun's SIGTERM to the surviving ranks): it stays behind as an
    orphan. Our saves run synchronously in the rank itself (``execute_sync``), so an in-process queue
    carries the results; the global is put back afterwards, for anyone else's asynchronous saves."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:   # another layout of megatron-core: its own default
        yield
        return
    if not hasattr(fsa, "_results_queue"):
        yield
        return
    saved, fsa._results_queue = fsa._results_queue, queue.Queue()
    try:
        yield
    finally:
        fsa._results_queue = saved


def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler=None,
                    client_state: Optional[dict] = None, metadata: Optional[dict] = None) -> str:
    """Collective. Write checkpoint ``iteration`` under ``root`` and return its directory."""
    from megatron.core import dist_checkpointing

    rank, world = _rank_world()
    final = os.path.join(root, f"iter_{iteration:07d}")
    tmp = os.path.join(root, f".tmp-iter_{iteration:07d}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)   # a previous attempt killed mid-write
        os.makedirs(tmp)
    _barrier()
    sync_model_params(model_chunks)   # --overlap-param-gather: the last step's gather may still be pending
    sd = _model_sharded_state_dict(model_chunks)
    sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=False, metadata=metadata or DEFAULT_METADATA)
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["client_state"] = client_state or {}
    sd["rng_world_size"] = world
    sd["rng_state"] = _rng_sharded(_rng_states())
    # dist_checkpointing.save(...) is async_save(...).execute_sync() plus metadata.json; split, so that the
    # fault hook sits inside the write: rank 0's common.pt is on disk, no rank has written its shards.
    with _in_process_write_results():
        request = dist_checkpointing_async_save(sd, tmp)    # compat: megatron-core's own async strategy
        fault_point("checkpoint", iteration)
        request.execute_sync()   # every rank's shards (fsynced by megatron-core), .metadata, metadata.json
    _barrier()
    if rank == 0:   # the format marker: every file in it loads without running code (safe_load.py)
        _ckpt.atomic_write_text(os.path.join(tmp, MARKER_FILE), marker_text())
        _ckpt.publish_dir(tmp, final)
        _ckpt.atomic_write_text(os.path.join(root, "latest"), os.path.basename(final))
    _barrier()
    return final


def latest_checkpoint(root: str) -> Optional[str]:
    """The directory ``<root>/latest`` names; None if there is no ``latest``; CheckpointError if it names
    a directory that does not exist (rather than silently starting over)."""
    found = _ckpt.read_latest(root)
    if found is None:
        return None
    pointer, name = found
    path = os.path.join(root, name)
    if not name or not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"{pointer} names {name!r} but {path} is not a complete checkpoint: point 'latest' at "
                              "an existing iter_* directory, or start over without --load")
    return path


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
    with safe_dist_checkpointing(path):   # refuses old-format checkpoints and anything that would run code
        same_world = dist_checkpointing.load_common_state_dict(path).get("rng_world_size") == _rank_world()[1]
        if same_world:
            sd["rng_state"] = _rng_sharded(_rng_states())   # the structure to load into
        loaded = dist_checkpointing.load(sd, path)
    if len(model_chunks) == 1:
        _unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(model_chunks):
            _unwrap(c).load_state_dict(loaded[f"model{i}"])
    optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in loaded:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if same_world:
        _set_rng_states(loaded["rng_state"])
    return {"iteration": int(loaded["iteration"]), "client_state": loaded.get("client_state", {}), "path": path}
