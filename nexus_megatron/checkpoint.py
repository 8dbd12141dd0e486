"""Atomic checkpoints: a checkpoint is written to a temporary directory, fsynced, then renamed into
place, and the ``latest`` pointer is replaced atomically afterwards. A crash at any point leaves the
previous checkpoint loadable."""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from .errors import CheckpointError
from .faults import fault_point


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(ckpt_root: str, step: int, state: dict, keep: int = 2) -> str:
    """Write ``state`` (a dict of tensors and plain data) as checkpoint ``step``; keep the newest ``keep``."""
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fault_point("checkpoint", step)
    atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps({"step": step}))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(os.path.join(ckpt_root, "latest"), name)
    done = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
    for old in done[:-keep] if keep else []:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    pointer = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(ckpt_root, name)
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise CheckpointError(f"{pointer} names {name!r} but {path}/state.pt does not exist: point 'latest' at an "
                           "existing step_* directory, or start a new run_dir (train.resume=false starts over)")
    return path


def load_checkpoint(path: str) -> dict:
    try:
        with open(os.path.join(path, "state.pt"), "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or corrupted file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it and point "
                           "'latest' at an earlier step_* directory, or start a new run_dir") from e
