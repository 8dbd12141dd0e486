"""Loading checkpoints without running code.

A checkpoint is a file users pass around (a shared file system, a colleague, a bucket) and a scheduler
resumes from automatically, so nothing we load may execute Python: every ``torch.load`` of ours uses
``weights_only=True`` (torch's restricted unpickler: tensors, plain containers and numbers, and the few
classes registered with ``torch.serialization.add_safe_globals``). What is not a tensor is stored as plain
data: dataclasses as dicts, RNG states as tensors (:func:`rng_to_plain`).

Checkpoints carry a format number (:data:`FORMAT`; the plain engine's in ``meta.json``, DeepSpeed's and
Megatron's in :data:`MARKER_FILE` next to their files). One written before format 2 holds pickled Python
objects (numpy RNG states), so it is refused with a one-line error naming the file and the command that
converts it once, after the user has decided to trust it: ``nexus-megatron convert-checkpoint PATH``
(:mod:`nexus_megatron.convert_checkpoint`). See docs/reliability.md, "Security".
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import random
import re
from typing import Iterable

import numpy as np
import torch

from .errors import CheckpointError

FORMAT = 2
"""Checkpoint format: 2 = every file loads with ``torch.load(weights_only=True)``; absent (1) = older."""

MARKER_FILE = "nexus_checkpoint.json"
"""DeepSpeed and Megatron checkpoints: ``{"format": 2}`` in this file inside the checkpoint directory."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint a safe load refuses: written before format 2, or holding objects that would run code."""


def convert_hint(path: str) -> str:
    return (f"if you trust where it came from, convert it once with `nexus-megatron convert-checkpoint {path}` "
            "(docs/reliability.md, Security)")


def _unpickling_reason(e: BaseException) -> str:
    """The one informative line of torch's multi-line weights_only error (e.g. the refused global)."""
    text = str(e)
    m = re.search(r"(Unsupported global: GLOBAL [^\s]+|Unsupported operand [^\n]*|Trying to [^\n.]*)", text)
    if m:
        return m.group(1).rstrip(".")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return first[:200]


def safe_torch_load(path, map_location="cpu", extra_globals: Iterable = (), ckpt_dir=None, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` (with ``extra_globals`` allowed for this call only). A file
    holding anything else raises :class:`UnsafeCheckpointError` naming it (and the convert command for
    ``ckpt_dir``, default the file's directory); nothing in it is executed. ``mmap``: the tensors stay in the
    file (mapped, read page by page when used) instead of being copied into memory."""
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if reason.startswith("Unsupported operand"):   # not a pickle at all: damaged, not dangerous
            raise pickle.UnpicklingError(f"not a torch checkpoint ({reason})") from e
        raise UnsafeCheckpointError(
            f"checkpoint file {path} holds Python objects that a safe load refuses ({reason}); it "
            f"was written before checkpoint format {FORMAT} or by something else: "
            f"{convert_hint(ckpt_dir or os.path.dirname(str(path)))}") from e


def read_marker(ckpt_dir: str) -> int:
    """The format number of a DeepSpeed or Megatron checkpoint directory (1 if it has no marker)."""
    p = os.path.join(ckpt_dir, MARKER_FILE)
    if not os.path.isfile(p):
        return 1
    try:
        with open(p) as f:
            return int(json.load(f).get("format", 1))
    except (ValueError, OSError, AttributeError) as e:
        raise CheckpointError(f"{p} cannot be read ({type(e).__name__}: {e}); restore it from the run's other "
                              "files or start a new run_dir") from e


def marker_text() -> str:
    return json.dumps({"format": FORMAT}) + "\n"


def require_format(ckpt_dir: str, fmt: int, what: str) -> None:
    """Refuse (one line, naming ``what``) a checkpoint written before format :data:`FORMAT`."""
    if fmt < FORMAT:
        raise UnsafeCheckpointError(
            f"checkpoint {what} was written before checkpoint format {FORMAT} (its files hold pickled Python "
            f"objects, so loading it could run code): {convert_hint(ckpt_dir)}")


# -- RNG states as plain data -----------------------------------------------------------------------
def numpy_rng_to_plain(st) -> dict:
    """``np.random.get_state()`` (a tuple holding an ndarray) as a dict of a tensor and numbers."""
    name, key, pos, has_gauss, cached = st
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_rng_from_plain(d):
    """Inverse of :func:`numpy_rng_to_plain` (a tuple from ``np.random.get_state()`` passes through)."""
    if not isinstance(d, dict):
        return d
    key = d["key"].numpy().astype(np.uint32) if torch.is_tensor(d["key"]) else np.asarray(d["key"], np.uint32)
    return (d["bit_generator"], key, int(d["pos"]), int(d["has_gauss"]), float(d["cached_gaussian"]))


def python_rng_to_plain(st) -> dict:
    """``random.getstate()`` as a dict of a tensor and numbers."""
    version, internal, gauss_next = st
    return {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def python_rng_from_plain(d):
    if not isinstance(d, dict):
        return d
    state = tuple(int(x) for x in (d["state"].tolist() if torch.is_tensor(d["state"]) else d["state"]))
    return (int(d["version"]), state, d["gauss_next"])


def rng_to_plain(torch_key="torch", numpy_key="numpy", python_key="python") -> dict:
    """This process's torch, numpy and python RNG states as plain data (tensors and numbers)."""
    return {torch_key: torch.get_rng_state(), numpy_key: numpy_rng_to_plain(np.random.get_state()),
            python_key: python_rng_to_plain(random.getstate())}


def set_rng_from_plain(st: dict, torch_key="torch", numpy_key="numpy", python_key="python") -> None:
    torch.set_rng_state(st[torch_key])
    np.random.set_state(numpy_rng_from_plain(st[numpy_key]))
    random.setstate(python_rng_from_plain(st[python_key]))


def to_plain(obj):
    """Recursively replace what a safe load refuses but we know how to store as plain data: numpy RNG-state
    tuples and python ``random`` state tuples (as :func:`numpy_rng_to_plain` / :func:`python_rng_to_plain`
    dicts), numpy arrays and scalars (as tensors / numbers). Used by the one-time conversion of old files."""
    if isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "MT19937" and isinstance(obj[1], np.ndarray):
        return numpy_rng_to_plain(obj)
    if (isinstance(obj, tuple) and len(obj) == 3 and isinstance(obj[0], int) and isinstance(obj[1], tuple)
            and len(obj[1]) == 625):
        return python_rng_to_plain(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj))
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, to_plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(to_plain(v) for v in obj)
    return obj
