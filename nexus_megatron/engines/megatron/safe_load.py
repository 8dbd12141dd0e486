"""Megatron ``dist_checkpointing`` checkpoints loaded without running code.

What megatron-core 0.16 (``torch_dist`` backend) reads when it loads a checkpoint, and with what:

- ``metadata.json``: JSON (the backends to use).
- ``common.pt`` (iteration, scheduler, client state, the Nexus counters; megatron-core 0.19 writes no
  ``common.pt`` but a ``common_state`` sharded object that it reads with ``weights_only=True``): ``torch.load`` without a
  ``weights_only`` argument, i.e. torch's default; torch >= 2.6 defaults to ``weights_only=True`` unless
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set. We read it ourselves first with ``weights_only=True``.
- ``.metadata`` (torch.distributed.checkpoint's index of the shards): ``pickle.load``, unrestricted, in
  torch's ``FileSystemReader.read_metadata``. During our load the module's ``pickle`` is replaced by a
  restricted unpickler (:class:`MetadataUnpickler`) that admits only the dataclasses of
  ``torch.distributed.checkpoint`` and plain data.
- ``__*.distcp`` shards: tensors are read as raw bytes; every ``ShardedObject`` (our RNG states, the
  distributed optimizer's per-rank state) is ``torch.load(..., weights_only=False)`` in torch's
  ``DefaultLoadPlanner.load_bytes``. During our load each such object is first read with
  ``weights_only=True`` (:func:`safe_torch_load`); only bytes that pass are handed to the original.

megatron-core registers numpy arrays/dtypes (and a few of its own classes) with
``torch.serialization.add_safe_globals`` when it is imported, so under megatron-core ``weights_only=True``
also admits numpy arrays (rebuilt from their bytes, no code runs).
"""
from __future__ import annotations

import builtins
import collections
import contextlib
import io
import json
import os
import pickle
import re

from ...errors import CheckpointError
from ...safe_load import UnsafeCheckpointError, convert_hint, read_marker, require_format, safe_torch_load

_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint.storage")
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bool", "complex",
                  "slice", "bytearray"}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.distributed.checkpoint`` ``.metadata`` file admitting only its own dataclasses
    and enums, ``torch.Size``, torch dtypes / layouts / memory formats and plain containers."""

    def find_class(self, module, name):
        import torch
        if module in _SAFE_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type):   # its dataclasses and enums (rebuilt from their fields, no code runs)
                return obj
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.serialization" and name == "_get_layout":   # torch.layout by name (a lookup)
            from torch import serialization
            return serialization._get_layout
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")


class _RestrictedPickle:
    """Stands in for the ``pickle`` module inside torch's filesystem reader during a safe load."""

    def __init__(self, real, where):
        self._real, self._where = real, where

    def load(self, f, **kw):
        try:
            return MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise _Refused(f"checkpoint file {self._where}/.metadata holds Python objects that a safe load refuses "
                           f"({e}): {convert_hint(self._where)}") from e

    def __getattr__(self, name):
        return getattr(self._real, name)


class _Refused(UnsafeCheckpointError):
    pass


def _check_backends(path: str) -> None:
    p = os.path.join(path, "metadata.json")
    try:
        with open(p) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} cannot be read ({type(e).__name__}: {e})") from e
    if meta.get("sharded_backend") != "torch_dist" or meta.get("common_backend", "torch") != "torch":
        raise UnsafeCheckpointError(
            f"checkpoint {path} uses the backends {meta.get('sharded_backend')!r}/{meta.get('common_backend')!r} "
            "(metadata.json); only torch_dist/torch checkpoints, which nexus_megatron writes, load safely")


@contextlib.contextmanager
def safe_dist_checkpointing(path: str):
    """Around ``dist_checkpointing.load(..., path)``: refuses an old-format checkpoint (no format-2 marker)
    and one whose ``common.pt`` does not load with ``weights_only=True``; while inside, torch's DCP reader
    unpickles ``.metadata`` with :class:`MetadataUnpickler` and every sharded object must load with
    ``weights_only=True``. A refusal is re-raised as one UnsafeCheckpointError (DCP wraps errors raised
    on any rank into its own CheckpointException)."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
    from torch.distributed.checkpoint import filesystem as dcp_fs

    require_format(path, read_marker(path), path)
    _check_backends(path)
    common = os.path.join(path, "common.pt")
    if os.path.exists(common):   # 0.16; 0.19 keeps the common state as a sharded object of the DCP checkpoint
        safe_torch_load(common)  # (read back with torch.load(weights_only=True) by megatron-core itself)
    planner_cls = mcore_torch.MCoreLoadPlanner
    refused = []
    orig_load_bytes = planner_cls.load_bytes
    own = vars(planner_cls).get("load_bytes")   # None: inherited from torch's DefaultLoadPlanner

    def load_bytes(self, read_item, value):
        try:
            safe_torch_load(io.BytesIO(value.getbuffer().tobytes()) if isinstance(value, io.BytesIO) else value)
        except UnsafeCheckpointError as e:
            refused.append(UnsafeCheckpointError(
                f"checkpoint {path}: its object {read_item.dest_index.fqn!r} (in a __*.distcp file) holds Python "
                f"objects that a safe load refuses ({str(e).split('(', 1)[-1].split(')')[0]}): {convert_hint(path)}"))
            raise refused[-1] from e
        value.seek(0)
        return orig_load_bytes(self, read_item, value)

    saved_pickle = dcp_fs.pickle
    planner_cls.load_bytes = load_bytes
    dcp_fs.pickle = _RestrictedPickle(saved_pickle, path)
    try:
        yield
    except _Refused:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:   # DCP's CheckpointException is a BaseException
        cause = e
        while cause is not None:
            if isinstance(cause, _Refused):
                raise UnsafeCheckpointError(str(cause)) from e
            cause = cause.__cause__ or cause.__context__
        if refused:
            raise refused[0] from e
        # DCP gathers every rank's failure into one CheckpointException (tracebacks as text): our line in it
        m = re.search(r"checkpoint (file )?\S+ .*?a safe load refuses.*?\(docs/reliability\.md, Security\)", str(e))
        if m:
            raise UnsafeCheckpointError(m.group(0)) from e
        raise
    finally:
        dcp_fs.pickle = saved_pickle
        if own is not None:
            planner_cls.load_bytes = own
        else:
            del planner_cls.load_bytes   # the inherited DefaultLoadPlanner.load_bytes again
