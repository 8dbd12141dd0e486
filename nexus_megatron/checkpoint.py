"""Atomic, durable checkpoints. A checkpoint directory is written under a temporary name, every file in
it and the directory itself are fsynced, it is renamed into place (and the parent directory fsynced), and
the ``latest`` pointer is replaced atomically afterwards. A crash at any point leaves the previous
checkpoint loadable, and a published checkpoint survives a power loss. Loading runs no code: ``state.pt``
holds tensors and plain data only and is read with ``torch.load(weights_only=True)``
(:mod:`nexus_megatron.safe_load`); a checkpoint written before format 2 is refused until converted. The
plain engine's checkpoints (:func:`save_checkpoint`), DeepSpeed's (``engines/deepspeed/adapter.py``) and Megatron's
(``engines/megatron/checkpoint.py``) all go through :func:`publish_dir` and :func:`atomic_write_text`."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from typing import Optional

import torch

from .errors import CheckpointError
from .faults import fault_point
from .safe_load import FORMAT, UnsafeCheckpointError, require_format, safe_torch_load


def fsync_path(path: str) -> None:
    """Flush one file's (or directory's) data and metadata to stable storage. A directory whose file
    system cannot fsync directories (EINVAL on some network file systems) is skipped; a file's error is
    raised (its data may not be on disk)."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not is_dir:
            raise


def fsync_tree(root: str) -> None:
    """fsync every file under ``root``, then every directory, deepest first (``root`` last)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in sorted(filenames):
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def publish_dir(tmp: str, final: str) -> None:
    """Make the fully written directory ``tmp`` durable and rename it to ``final`` (replacing an older
    ``final``, e.g. one written before a crash but never named by ``latest``), then fsync the parent so the
    rename itself is durable. Call it once every writer has finished (after a barrier)."""
    fsync_tree(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


META_FILE = "meta.json"
TMP_PREFIX = ".tmp-"


def write_meta(ckpt_dir: str, step: int, run: Optional[dict] = None, fmt: Optional[int] = None) -> None:
    """``meta.json`` of a checkpoint directory that is not yet published (publish_dir fsyncs it): the step,
    the format number (``fmt``: plain-engine checkpoints, see :mod:`nexus_megatron.safe_load`) and the run's
    record (nexus_megatron/resume.py), so a checkpoint and its record appear together."""
    with open(os.path.join(ckpt_dir, META_FILE), "w") as f:
        json.dump({"step": step, **({"format": fmt} if fmt is not None else {}), **({"run": run} if run else {})}, f)


def read_meta(ckpt_dir: str) -> Optional[dict]:
    p = os.path.join(ckpt_dir, META_FILE)
    try:
        with open(p) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CheckpointError(f"{p} cannot be read ({e}); delete {ckpt_dir} and point 'latest' at an earlier "
                              "step_* directory, or start a new run_dir") from None


def clean_stale_tmp(ckpt_root: str) -> list:
    """Remove what a dead writer left in ``ckpt_root``: temporary checkpoint directories (``.tmp-*``) and
    temporary ``latest`` files (``latest.tmp-*``). Call it at the start of a run, on one rank, before any
    checkpoint is written (with the run_dir's lock held). Returns the removed paths."""
    removed = []
    try:
        names = sorted(os.listdir(ckpt_root))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for name in names:
        if not (name.startswith(TMP_PREFIX) or name.startswith(f"latest{TMP_PREFIX}")):
            continue
        path = os.path.join(ckpt_root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(path)
    return removed


def state_nbytes(state) -> int:
    """Bytes of the tensors in a (nested) state dict: about the size of its checkpoint file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _is_disk_full(e: BaseException, where: str, need: int) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    # torch's writer reports a failed write as a RuntimeError without the errno: judge by the free space
    if isinstance(e, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(where).free < max(need, 1)
        except OSError:
            return False
    return False


@contextlib.contextmanager
def disk_full_guard(where: str, final: str, need: int, cleanup: Optional[str] = None):
    """Around writing checkpoint ``final`` (about ``need`` bytes) under ``where``: on a failure ``cleanup``
    (the temporary directory) is removed, and a full disk becomes a one-line CheckpointError naming the path,
    the space needed and the space free."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        if not _is_disk_full(e, where, need):
            raise
        try:
            free = _mb(shutil.disk_usage(where).free)
        except OSError:
            free = "unknown"
        raise CheckpointError(
            f"no space left on the device of {where} while writing checkpoint {final}: it needs about {_mb(need)}, "
            f"{free} free; free space there (or move train.run_dir to a larger disk) and resume: the previous "
            "checkpoint is intact") from e


def save_checkpoint(ckpt_root: str, step: int, state: dict, keep: int = 2, run: Optional[dict] = None) -> str:
    """Write ``state`` (a dict of tensors and plain data) as checkpoint ``step`` with ``meta.json`` (the step
    and ``run``, the run's record); keep the newest ``keep``."""
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = os.path.join(ckpt_root, f"{TMP_PREFIX}{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_full_guard(ckpt_root, final, state_nbytes(state), cleanup=tmp):
        os.makedirs(tmp)
        with open(os.path.join(tmp, "state.pt"), "wb") as f:
            torch.save(state, f)
        fault_point("checkpoint", step)
        write_meta(tmp, step, run, fmt=FORMAT)
        publish_dir(tmp, final)
        atomic_write_text(os.path.join(ckpt_root, "latest"), name)
    done = sorted(d for d in os.listdir(ckpt_root) if d.startswith("step_"))
    for old in done[:-keep] if keep else []:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return final


def read_latest(ckpt_root: str) -> Optional[tuple]:
    """``(pointer file, name)`` of ``<ckpt_root>/latest``, or None when there is none: the one reader of the
    ``latest`` pointer (plain, DeepSpeed and Megatron checkpoints, and the resume check)."""
    pointer = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return pointer, f.read().strip()


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    found = read_latest(ckpt_root)
    if found is None:
        return None
    pointer, name = found
    path = os.path.join(ckpt_root, name)
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise CheckpointError(f"{pointer} names {name!r} but {path}/state.pt does not exist: point 'latest' at an "
                           "existing step_* directory, or start a new run_dir (train.resume=false starts over)")
    return path


def checkpoint_format(path: str) -> int:
    """The format number in ``path/meta.json`` (1: written before formats were numbered)."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return int(json.load(f).get("format", 1))
    except FileNotFoundError:
        return 1
    except (ValueError, OSError, AttributeError) as e:
        raise CheckpointError(f"{path}/meta.json cannot be read ({type(e).__name__}: {e}); delete the checkpoint "
                              "and point 'latest' at an earlier step_* directory, or start a new run_dir") from e


def load_checkpoint(path: str) -> dict:
    """Read checkpoint directory ``path`` without running code: a checkpoint older than format 2, or one
    whose ``state.pt`` holds anything but tensors and plain data, raises UnsafeCheckpointError (one line,
    naming the file and ``nexus-megatron convert-checkpoint``)."""
    state_file = os.path.join(path, "state.pt")
    require_format(path, checkpoint_format(path), state_file)
    try:
        return safe_torch_load(state_file, map_location="cpu")
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a truncated or corrupted file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it and point "
                           "'latest' at an earlier step_* directory, or start a new run_dir") from e
