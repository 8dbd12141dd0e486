"""``nexus-megatron convert-checkpoint PATH``: the one explicit step that lets a checkpoint written before
checkpoint format 2 resume.

Such a checkpoint holds pickled Python objects (numpy RNG states), so reading it can run code: converting
is the user's decision to trust it. Each of its files is read once with ``torch.load(weights_only=False)``,
rewritten as tensors and plain data (:func:`nexus_megatron.safe_load.to_plain`), checked to load with
``weights_only=True`` before anything on disk changes, and replaced atomically (written under a temporary
name, fsynced, renamed); the format marker is written last, so a conversion interrupted half-way is simply
run again. PATH is a run directory, a checkpoint root (holding ``latest``) or one checkpoint directory, of
any engine (plain, DeepSpeed, Megatron ``dist_checkpointing``).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pickle

import torch

from .checkpoint import atomic_write_text, checkpoint_format, fsync_path
from .errors import CheckpointError
from .safe_load import FORMAT, MARKER_FILE, UnsafeCheckpointError, marker_text, read_marker, safe_torch_load, \
    to_plain


def checkpoint_kind(path: str):
    """'plain', 'deepspeed', 'megatron' or None for a directory that is not one checkpoint."""
    if os.path.isfile(os.path.join(path, "state.pt")):
        return "plain"
    if os.path.isfile(os.path.join(path, "metadata.json")) and os.path.isfile(os.path.join(path, "common.pt")):
        return "megatron"
    if glob.glob(os.path.join(path, "*model_states.pt")) or glob.glob(os.path.join(path, "*optim_states.pt")):
        return "deepspeed"
    return None


def find_checkpoints(path: str) -> list:
    """Every checkpoint directory at or under ``path`` (a checkpoint, a checkpoint root, or a run directory
    with ``checkpoints/``), unfinished ``.tmp-*`` ones left out."""
    if not os.path.isdir(path):
        raise CheckpointError(f"convert-checkpoint: {path} is not a directory: pass a run directory, a checkpoint "
                              "root or one checkpoint directory")
    if checkpoint_kind(path):
        return [path]
    roots = [path] + ([os.path.join(path, "checkpoints")] if os.path.isdir(os.path.join(path, "checkpoints")) else [])
    found = []
    for root in roots:
        for name in sorted(os.listdir(root)):
            sub = os.path.join(root, name)
            if not name.startswith(".") and os.path.isdir(sub) and checkpoint_kind(sub):
                found.append(sub)
    if not found:
        raise CheckpointError(f"convert-checkpoint: no checkpoint under {path} (looked for state.pt, DeepSpeed's "
                              "*_states.pt and Megatron's common.pt + metadata.json)")
    return found


def _deepspeed_safe_globals():
    from .engines.deepspeed.safe_load import deepspeed_safe_globals
    return deepspeed_safe_globals()


def convert_file(path: str, extra_globals=()) -> bool:
    """Rewrite one torch file as tensors and plain data, atomically. Returns False if it already loads safely
    (nothing written). Raises UnsafeCheckpointError if even the plain rewrite would not load safely."""
    try:
        safe_torch_load(path, extra_globals=extra_globals)
        return False
    except (UnsafeCheckpointError, pickle.UnpicklingError):
        pass
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)   # the user chose to trust this file
    except Exception as e:   # truncated or not a checkpoint
        raise CheckpointError(f"convert-checkpoint: {path} cannot be read ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); it was not "
                              "changed") from e
    buf = io.BytesIO()
    torch.save(to_plain(obj), buf)
    buf.seek(0)
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            torch.load(buf, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnsafeCheckpointError(f"convert-checkpoint: {path} holds objects that have no plain-data form here "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); it was not changed") from e
    tmp = f"{path}.convert-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))
    return True


def convert_one(ckpt: str) -> str:
    """Convert one checkpoint directory in place; returns a one-line description."""
    kind = checkpoint_kind(ckpt)
    if kind == "plain":
        if checkpoint_format(ckpt) >= FORMAT and not convert_file(os.path.join(ckpt, "state.pt")):
            return f"{ckpt}: plain, already format {FORMAT}"
        changed = convert_file(os.path.join(ckpt, "state.pt"))
        meta_path = os.path.join(ckpt, "meta.json")
        meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
        meta["format"] = FORMAT
        atomic_write_text(meta_path, json.dumps(meta))
        return f"{ckpt}: plain, {'state.pt rewritten' if changed else 'state.pt already plain'}, format {FORMAT}"
    files = sorted(glob.glob(os.path.join(ckpt, "*.pt")))
    if kind == "deepspeed":
        extra = _deepspeed_safe_globals()
    else:   # megatron: common.pt (and legacy per-object *.pt); the .distcp shards' objects load through
        extra = ()   # megatron-core's allow-list (engines/megatron/safe_load.py)
        files = [os.path.join(ckpt, "common.pt")] + [f for f in glob.glob(os.path.join(ckpt, "**", "*.pt"),
                                                                          recursive=True)
                                                     if os.path.basename(f) != "common.pt"]
    changed = [os.path.basename(f) for f in files if convert_file(f, extra)]
    if read_marker(ckpt) < FORMAT:
        atomic_write_text(os.path.join(ckpt, MARKER_FILE), marker_text())
    return f"{ckpt}: {kind}, {len(changed)} of {len(files)} files rewritten, format {FORMAT}"


def convert_checkpoints(path: str) -> list:
    return [convert_one(c) for c in find_checkpoints(path)]


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory, checkpoint root or one checkpoint directory (any engine)")


def run_convert(args) -> int:
    print(f"convert-checkpoint: reading {args.path} with pickle (weights_only=False): only do this for checkpoints "
          "you trust")
    for line in convert_checkpoints(args.path):
        print(line)
    return 0
