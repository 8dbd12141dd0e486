"""Safe resume: every checkpoint records what the run is (the full resolved config, a fingerprint of the
data, the world layout and the run's id), and a resume compares that record with the current run before
anything is loaded or written. Every difference is listed in one error; only the settings in
:data:`CHANGEABLE` (which do not change what the run computes up to the checkpoint) may differ, or those
named by ``train.allow_changed`` (``--allow-changed KEY,...`` on the command line). docs/training.md#resume.

Pure functions over plain dicts, plus the file layout: ``<run_dir>/run_id`` (the run's id, written at its
first start) and ``<checkpoint>/meta.json`` (``{"step": n, "run": <record>}``, written into the checkpoint
directory before it is published, so a checkpoint and its record appear together)."""
from __future__ import annotations

import json
import os
import re
import uuid
from typing import Optional

from .checkpoint import META_FILE, atomic_write_text, read_latest, read_meta
from .config import RunConfig, to_dict
from .errors import CheckpointError, NexusConfigError

#: Settings a resume may change (a key or a whole section). Everything else is part of the run.
CHANGEABLE = (
    "train.steps",               # extend (or shorten) the run; cosine/wsd decay is a function of it
    "train.log_every", "train.eval_every", "train.eval_batches", "train.probe_every", "train.probe_batches",
    "train.checkpoint_every", "train.progress", "train.wandb",
    "train.run_dir",             # a run moved to another directory
    "train.resume", "train.allow_changed", "train.collective_timeout_s", "train.threads",
    "data.path",                 # the data's content is pinned by the data fingerprint instead
    "data.max_epochs",           # only a budget check
)

CHECKPOINT_NAME = re.compile(r"step_\d{8}")
RUN_ID_FILE = "run_id"


# ---------------------------------------------------------------------------------------------------
# the record

def world_layout(world_size: int, layout: str, num_sources: int) -> dict:
    """The ranks and how they are split: source-parallel source groups are contiguous blocks of ranks."""
    groups = None
    if layout == "source-parallel" and num_sources and world_size % num_sources == 0:
        g = world_size // num_sources
        groups = [list(range(i * g, (i + 1) * g)) for i in range(num_sources)]
    return {"size": int(world_size), "layout": layout, "source_groups": groups}


def data_fingerprint(manifest: dict, sources) -> dict:
    """The tokenizer's hash and, for each source the run reads, each split's sha256 and token count as the
    manifest records them (hand-written manifests without hashes give their token counts only)."""
    tok = manifest.get("tokenizer")
    fp = {"tokenizer": tok.get("sha256") if isinstance(tok, dict) else tok,
          "vocab_size": manifest.get("vocab_size"), "sources": {}}
    known = manifest.get("sources", {})
    for name in sources:
        info = known.get(name, {})
        files = info.get("files") or {}
        splits = {}
        for split in ("train", "val"):
            f = files.get(split, {})
            tokens = f.get("tokens", info.get(f"{split}_tokens"))
            if tokens or f:
                splits[split] = {"sha256": f.get("sha256"), "tokens": tokens}
        fp["sources"][name] = splits
    return fp


def run_record(config: dict, manifest: dict, world_size: int) -> dict:
    """What a checkpoint of this run records (``run_id`` is added at save time)."""
    names = list(config["data"]["sources"]) + list(config["data"]["ood"])
    rec = {"config": config, "data": data_fingerprint(manifest, names),
           "world": world_layout(world_size, config["nexus"]["layout"], len(config["data"]["sources"]))}
    return json.loads(json.dumps(rec))   # as it reads back from meta.json (tuples become lists)


# ---------------------------------------------------------------------------------------------------
# comparison

def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def default_settings() -> dict:
    """Every setting's default, flattened (``section.key``): what an older record that lacks a setting added
    later stands for."""
    return flatten(to_dict(RunConfig()))


def _covered(key: str, names) -> bool:
    return any(n == "all" or key == n or key.startswith(n + ".") for n in names)


def _show(v) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]   # a sha256
    return json.dumps(v)


def differences(old: dict, new: dict, defaults: Optional[dict] = None) -> list:
    """``[(key, old, new)]`` for every recorded item that differs. A config key the old record does not
    have (a setting added by a later version) counts as its default ``defaults`` (a flat dict)."""
    diffs = []
    oc, nc = flatten(old.get("config", {})), flatten(new.get("config", {}))
    for key in sorted(set(oc) | set(nc)):
        missing = object()
        a = oc.get(key, (defaults or {}).get(key, missing))
        b = nc.get(key, missing)
        if a != b:
            diffs.append((key, None if a is missing else a, None if b is missing else b))
    ow, nw = old.get("world", {}), new.get("world", {})
    for key in ("size", "source_groups"):
        if ow.get(key) != nw.get(key):
            diffs.append((f"world.{key}", ow.get(key), nw.get(key)))
    od, nd = old.get("data", {}), new.get("data", {})
    for key in ("tokenizer", "vocab_size"):
        if od.get(key) != nd.get(key):
            diffs.append((f"data.fingerprint.{key}", od.get(key), nd.get(key)))
    os_, ns = od.get("sources", {}), nd.get("sources", {})
    for name in sorted(set(os_) & set(ns)):   # added or removed sources show as data.sources / data.ood
        for split in sorted(set(os_[name]) | set(ns[name])):
            a, b = os_[name].get(split), ns[name].get(split)
            if a != b:
                diffs.append((f"data.fingerprint.{name}.{split}", a, b))
    return diffs


def _describe(key: str, a, b) -> str:
    if key.startswith("data.fingerprint.") and (isinstance(a, dict) or isinstance(b, dict)):
        def one(x):
            return "none" if not x else f"sha256 {_show(x.get('sha256'))}, {x.get('tokens')} tokens"
        return f"{key} ({one(a)} -> {one(b)})"
    return f"{key} {_show(a)} -> {_show(b)}"


# ---------------------------------------------------------------------------------------------------
# resuming on another number of ranks

#: What a resume on another number of ranks changes together: the ranks (and the source groups they form) and
#: the micro-batch each rank reads. Accepted when the global batch (:func:`global_batch`) stays the same.
WORLD_CHANGE = ("world.size", "world.source_groups", "data.micro_batch_size")


def readers_per_source(world_size: int, layout: str, num_sources: int) -> Optional[int]:
    """Ranks that read one source's micro-batch in a micro-step: every rank (sequential), or one source group
    (source-parallel; None when the ranks cannot be split)."""
    if layout == "source-parallel":
        return world_size // num_sources if num_sources and world_size % num_sources == 0 else None
    return world_size


def global_batch(record: dict, defaults: Optional[dict] = None) -> Optional[int]:
    """Sequences of one source in one micro-step over all its readers (ranks x data.micro_batch_size): with the
    same sources, weights, seed and k, the same global batch means the same micro-batches in the same order (each
    rank reads its share of the same window ``consumed[s] .. consumed[s] + readers x B``), so the same run."""
    cfg = flatten(record.get("config", {}))
    d = defaults or {}
    B = cfg.get("data.micro_batch_size", d.get("data.micro_batch_size"))
    layout = cfg.get("nexus.layout", d.get("nexus.layout", "sequential"))
    K = len(cfg.get("data.sources") or ())
    size = record.get("world", {}).get("size")
    if B is None or size is None:
        return None
    r = readers_per_source(int(size), layout, K)
    return None if r is None else r * int(B)


def world_change_hint(old: dict, new: dict, defaults: Optional[dict] = None) -> str:
    """Why a change of the number of ranks changes the run, and the data.micro_batch_size that would keep it."""
    gb_old, gb_new = global_batch(old, defaults), global_batch(new, defaults)
    cfg = flatten(new.get("config", {}))
    r = readers_per_source(int(new["world"]["size"]), cfg.get("nexus.layout", "sequential"),
                           len(cfg.get("data.sources") or ()))
    keep = (f"data.micro_batch_size={gb_old // r} keeps it" if gb_old and r and gb_old % r == 0 else
            f"no data.micro_batch_size keeps it on {new['world']['size']} ranks")
    return (f"the global batch (ranks reading a source x data.micro_batch_size) would change from {gb_old} to {gb_new} "
            f"sequences per source and micro-step ({keep})")


def check_compatible(old: dict, new: dict, allowed=(), defaults: Optional[dict] = None, where: str = "") -> list:
    """Raise NexusConfigError listing every difference that is neither in :data:`CHANGEABLE` nor allowed;
    return the accepted differences (for the log). The number of ranks (with data.micro_batch_size, see
    :data:`WORLD_CHANGE`) may change when the global batch stays the same (docs/training.md#resume)."""
    diffs = differences(old, new, defaults)
    keys = {d[0] for d in diffs}
    resharded = bool(keys & {"world.size", "world.source_groups"})
    same_batch = resharded and global_batch(old, defaults) is not None and \
        global_batch(old, defaults) == global_batch(new, defaults)

    def accepted(key):
        return (_covered(key, CHANGEABLE) or _covered(key, allowed)
                or (same_batch and key in WORLD_CHANGE))
    refused = [d for d in diffs if not accepted(d[0])]
    if refused:
        listing = ", ".join(_describe(*d) for d in refused)
        refused_keys = {d[0] for d in refused}
        hint = (f"; {world_change_hint(old, new, defaults)}"
                if resharded and not same_batch and refused_keys & set(WORLD_CHANGE) else "")
        raise NexusConfigError(
            f"resume would change the run{' of ' + where if where else ''}: {listing}{hint}; use the same settings, a "
            f"new train.run_dir, train.resume=false to start over, or --allow-changed {','.join(d[0] for d in refused)} "
            "(train.allow_changed) to resume anyway")
    return [d for d in diffs if not _covered(d[0], CHANGEABLE)]


# ---------------------------------------------------------------------------------------------------
# files

def read_run_id(run_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(run_dir, RUN_ID_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def write_run_id(run_dir: str, run_id: Optional[str] = None) -> str:
    """Write ``run_id`` (a new one when None) as the run's id; returns it."""
    run_id = run_id or uuid.uuid4().hex
    atomic_write_text(os.path.join(run_dir, RUN_ID_FILE), run_id + "\n")
    return run_id


def resolve_latest(ckpt_root: str) -> Optional[str]:
    """The checkpoint directory ``<ckpt_root>/latest`` names, or None when there is no ``latest``.
    ``latest`` must name a ``step_NNNNNNNN`` directory directly inside ``ckpt_root`` (no path, no link out of
    it). A name whose directory is missing is returned as is (the engine reports it)."""
    found = read_latest(ckpt_root)
    if found is None:
        return None
    pointer, name = found
    path = os.path.join(ckpt_root, name)
    inside = os.path.dirname(os.path.realpath(path)) == os.path.realpath(ckpt_root)
    if not CHECKPOINT_NAME.fullmatch(name) or (os.path.exists(path) and not inside):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint of this run: 'latest' must name "
                              f"a step_NNNNNNNN directory inside {ckpt_root}; point it at one, or start a new "
                              "train.run_dir")
    return path


def check_resume(run_dir: str, record: dict, allowed=(), defaults: Optional[dict] = None) -> Optional[str]:
    """Before a resume: compare the latest checkpoint's record with ``record`` (this run's). Returns the
    checkpoint's run id (None when there is nothing to resume); raises CheckpointError for a ``latest``
    outside checkpoints/ or of another run, NexusConfigError listing every refused difference."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    path = resolve_latest(ckpt_root)
    if path is None or not os.path.isdir(path):
        return None
    meta = read_meta(path)
    if not meta or "run" not in meta:
        if _covered("run", allowed):
            return read_run_id(run_dir)
        raise CheckpointError(f"{path} has no run record ({META_FILE} without 'run': written by an older version), "
                              "so a resume cannot check that the settings are the same: start a new train.run_dir, "
                              "or --allow-changed run to resume it unchecked")
    old = meta["run"]
    mine = read_run_id(run_dir)
    if mine and old.get("run_id") and old["run_id"] != mine:
        raise CheckpointError(f"{ckpt_root}/latest names {os.path.basename(path)}, a checkpoint of another run (run id "
                              f"{old['run_id']}, this run_dir's is {mine}): point 'latest' at a checkpoint of this "
                              "run, or start a new train.run_dir")
    check_compatible(old, record, allowed, defaults, where=run_dir)
    return old.get("run_id") or mine
