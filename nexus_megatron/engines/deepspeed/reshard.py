"""Resume a Nexus DeepSpeed run on another number of ranks (docs/deepspeed.md, "Resume on another number of
ranks").

DeepSpeed's own checkpoint is per rank: each ``zero_pp_rank_<r>_*`` file holds rank r's ZeRO partition of the
fp32 master weights, of AdamW's moments and (in the client optimizer's state) of the Nexus anchor and exact
displacement, cut for the number of ranks that wrote it. Next to those files every Nexus checkpoint holds the
same state as full, unpartitioned tensors, one entry per parameter (by name), read with
``torch.load(weights_only=True)``:

* :data:`FULL_STATE_FILE`, written by the publishing rank: AdamW's step count, the param groups'
  hyperparameters (the current lr), the lr scheduler, the Nexus counters and position in the outer step,
  DeepSpeed's step counters, the caller's client state, and ``shards``: which shard file holds each parameter;
* the shard files (:func:`shard_name`), one per rank of DeepSpeed's data-parallel group, each written by its
  rank: per parameter ``fp32`` (the master weights), ``anchor`` (theta_t), ``d_sum`` (the exact
  displacement's sum of normalized directions), ``exp_avg`` / ``exp_avg_sq`` (the outer AdamW). The parameters
  are dealt to the ranks by size (:func:`deal`), so each rank holds about 20 bytes x parameters / ranks in CPU
  memory during a save, never the whole model;
* :data:`FULL_STATE_INFO` (JSON): the number of ranks, DeepSpeed's data-parallel size and the layout that wrote it.

A resume whose ranks differ from the writer's reads these files instead of DeepSpeed's rank files (memory-
mapped: each tensor is read when its parameter is set) and writes every tensor into this run's partitions.
Both directions go through DeepSpeed's public fragment API (``deepspeed.utils.safe_get_full_fp32_param`` /
``safe_set_full_fp32_param``: ZeRO-1/2 and the bf16 optimizer through each parameter's ``_hp_mapping``, ZeRO-3
through its partitioned fp32 groups), so the element-to-rank mapping is DeepSpeed's own for every stage. The
per-partition tensors that are not master weights (anchor, displacement, moments) are passed through the same
API by putting them in the master partitions for the call and restoring the masters afterwards (every rank,
collectively). A checkpoint written before the shard files existed holds every tensor in
:data:`FULL_STATE_FILE` itself (``params``) and loads the same way.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist

from ...checkpoint import fsync_path
from ...errors import CheckpointError, NexusConfigError
from ...outer import without_world
from ...safe_load import read_marker, require_format, safe_torch_load

FULL_STATE_FILE = "nexus_full_state.pt"
FULL_STATE_FIELDS = ("fp32", "anchor", "d_sum", "exp_avg", "exp_avg_sq")
FULL_STATE_INFO = "nexus_full_state.json"
FIELDS = ("anchor", "d_sum", "exp_avg", "exp_avg_sq")
"""Per-partition tensors carried next to the fp32 master weights."""


def named_params(ds_engine) -> list:
    """``[(name, param)]`` of the module's trainable parameters, each once, in the module's order."""
    seen, out = set(), []
    for n, p in ds_engine.module.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def _unpartitioned_map(core) -> Optional[dict]:
    """Stage 0: ``id(module param) -> index of its master partition`` (the partition is the whole parameter,
    or DeepSpeed's fp32 copy of it under bf16); None for the partitioned kinds."""
    if core.kind == "stage0":
        return dict(core.index)
    if core.kind == "stage0-bf16":
        opt = core.ds_opt
        return {id(lp): core.index[id(hp)] for lps, hps in zip(opt.fp16_groups, opt.fp32_groups)
                for lp, hp in zip(lps, hps)}
    return None


def _full_of(core, params, per_part: Optional[list], keep: list) -> list:
    """Full tensors (one per param of ``params``) of a per-partition list (None: the master partitions).
    Collective over DeepSpeed's data-parallel group for the partitioned kinds; ``keep[i]`` False: take part in
    the collectives for param i and keep nothing (None in its place: another rank writes it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    direct = _unpartitioned_map(core)
    if direct is not None:
        src = per_part if per_part is not None else [p for p, _ in core.parts]
        return [src[direct[id(p)]].detach().reshape(p.shape).float().cpu().clone() if kp else None
                for p, kp in zip(params, keep)]
    masters = None
    if per_part is not None:
        masters = [p.data.clone() for p, _ in core.parts]
        for (p, _), t in zip(core.parts, per_part):
            p.data.copy_(t)
    try:
        out = []
        for p, kp in zip(params, keep):
            full = safe_get_full_fp32_param(p)
            out.append(full.detach().float().cpu().clone() if kp else None)
            del full
        return out
    finally:
        if masters is not None:
            for (p, _), m in zip(core.parts, masters):
                p.data.copy_(m)


def _parts_of(core, params, full: list, into_masters: bool) -> Optional[list]:
    """Write full tensors (one per param) into this run's partitions: into the master partitions
    (``into_masters``), else into new per-partition tensors (returned; the masters are left as they were)."""
    from deepspeed.utils import safe_set_full_fp32_param

    direct = _unpartitioned_map(core)
    if direct is not None:
        out = [p.data if into_masters else torch.zeros_like(p.data) for p, _ in core.parts]
        for p, v in zip(params, full):
            out[direct[id(p)]].copy_(v.reshape(out[direct[id(p)]].shape))
        return None if into_masters else out
    masters = None if into_masters else [p.data.clone() for p, _ in core.parts]
    for p, _ in core.parts:
        p.data.zero_()            # the partitions' padding (no parameter's element) stays 0
    for p, v in zip(params, full):
        safe_set_full_fp32_param(p, v.to(core.device))
    if into_masters:
        return None
    out = [p.data.clone() for p, _ in core.parts]
    for (p, _), m in zip(core.parts, masters):
        p.data.copy_(m)
    return out


def world_info(core, ds_engine) -> dict:
    return {"world_size": dist.get_world_size(), "dp_size": int(ds_engine.dp_world_size),
            "layout": core.layout.describe(), "kind": core.kind}


def shard_name(index: int, count: int) -> str:
    return f"nexus_full_state.{index:05d}-of-{count:05d}.pt"


def deal(numels: list, count: int) -> list:
    """Which of ``count`` writers holds each parameter: the largest first, each to the least loaded writer
    (ties to the lower index), so every writer holds about sum(numels) / count elements. Pure; every rank
    computes the same answer."""
    loads, out = [0] * count, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-int(numels[i]), i)):
        w = min(range(count), key=lambda r: (loads[r], r))
        out[i] = w
        loads[w] += int(numels[i])
    return out


def _writers(core, ds_engine) -> tuple:
    """``(count, mine)``: the number of shard files and the index of the one this rank writes (None: none). The
    shards are written by DeepSpeed's data-parallel ranks (source group 0 in the source-parallel layout, whose
    other groups hold the same state); with node-local storage (``use_node_local_storage``) the first rank of
    each node writes a single shard holding everything, on its own node's disk, as DeepSpeed does for its files."""
    if ds_engine.use_node_local_storage():
        return 1, (0 if ds_engine.local_rank == 0 else None)
    if core.sp and core.my_source:
        return core.groups.dp_size, None
    return core.groups.dp_size, core.groups.dp_ranks.index(core.rank)


def gather_full_state(core, ds_engine, client_state: dict, publisher: bool) -> dict:
    """Collective: the run's whole state as full tensors, dealt into shards. Returns ``{"shard": (file name,
    {name: {field: tensor}}) or None, "meta": the non-tensor state or None}``: this rank's shard (None: it writes
    none) and, on the publishing rank, the rest (with ``shards``, the file of every parameter)."""
    named = named_params(ds_engine)
    names, params = [n for n, _ in named], [p for _, p in named]
    count, mine = _writers(core, ds_engine)
    owner = deal([int(getattr(p, "ds_numel", p.numel())) for p in params], count)
    keep = [mine is not None and owner[i] == mine for i in range(len(params))]
    client = core.client
    per_field = {"fp32": _full_of(core, params, None, keep)}
    per_field["anchor"] = _full_of(core, params, core.anchors, keep)
    per_field["d_sum"] = _full_of(core, params, core.d_sums, keep)
    for key in ("exp_avg", "exp_avg_sq"):
        per_field[key] = _full_of(core, params, [client.state[p][key] for p, _ in core.parts], keep)
    shard = None
    if mine is not None:
        shard = (shard_name(mine, count),
                 {n: {f: per_field[f][i] for f in FULL_STATE_FIELDS} for i, n in enumerate(names) if keep[i]})
    meta = None
    if publisher:
        steps = {float(client.state[p]["step"]) for p, _ in core.parts}
        if len(steps) != 1:
            raise RuntimeError(f"AdamW step counts differ between master partitions: {sorted(steps)}")
        nexus = {k: v for k, v in core.state_dict().items()
                 if k not in ("anchors", "d_sums", "part_numels", "control_deltas")}
        sched = ds_engine.lr_scheduler
        meta = {
            "shards": {n: shard_name(owner[i], count) for i, n in enumerate(names)},
            "adamw_step": steps.pop(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in client.param_groups],
            "lr_scheduler": sched.state_dict() if sched is not None else None,
            "nexus": nexus,
            "deepspeed": {"global_steps": int(ds_engine.global_steps), "global_samples": int(ds_engine.global_samples),
                          "skipped_steps": int(ds_engine.skipped_steps)},
            "client_state": client_state,
            "world": world_info(core, ds_engine),
        }
    return {"shard": shard, "meta": meta}


def _save(path: str, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
    fsync_path(path)


def write_full_state_shard(ckpt_dir: str, full: dict) -> None:
    """This rank's shard (if it writes one) into a checkpoint directory that is not yet published."""
    if full["shard"] is not None:
        name, tensors = full["shard"]
        _save(os.path.join(ckpt_dir, name), tensors)


def write_full_state(ckpt_dir: str, full: dict) -> None:
    """The publisher's part, after every rank's shard is written (publish_dir fsyncs the directory)."""
    _save(os.path.join(ckpt_dir, FULL_STATE_FILE), full["meta"])
    info = os.path.join(ckpt_dir, FULL_STATE_INFO)
    with open(info, "w") as f:
        json.dump(full["meta"]["world"], f)
    fsync_path(info)


def _unreadable(path: str, ckpt_dir: str, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); delete {ckpt_dir} and point 'latest' "
                           "at an earlier step_* directory, or start a new run_dir")


def read_full_state(ckpt_dir: str) -> tuple:
    """``(state, params)`` of checkpoint ``ckpt_dir``: the non-tensor state and ``{name: {field: tensor}}``,
    the tensors memory-mapped from the shard files (or, written before shards existed, from
    :data:`FULL_STATE_FILE` itself). Every file is read with ``weights_only=True``; a missing or damaged one is a
    one-line CheckpointError."""
    require_format(ckpt_dir, read_marker(ckpt_dir), ckpt_dir)   # an old-format checkpoint: the convert command
    path = os.path.join(ckpt_dir, FULL_STATE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} has no {FULL_STATE_FILE}, so it cannot be loaded on another number of ranks: "
                              "resume it on the ranks that wrote it")
    try:
        st = safe_torch_load(path, map_location="cpu")
    except CheckpointError:
        raise
    except Exception as e:
        raise _unreadable(path, ckpt_dir, e) from e
    if "params" in st:
        return st, st["params"]
    params = {}
    for name in sorted(set(st["shards"].values())):
        shard = os.path.join(ckpt_dir, name)
        if not os.path.isfile(shard):
            raise CheckpointError(f"{ckpt_dir} lacks {name} (one of the full state's shard files), so it cannot be "
                                  "loaded on another number of ranks: resume it on the ranks that wrote it, or point "
                                  "'latest' at an earlier step_* directory")
        try:
            params.update(safe_torch_load(shard, map_location="cpu", mmap=True))
        except CheckpointError:
            raise
        except Exception as e:
            raise _unreadable(shard, ckpt_dir, e) from e
    lost = sorted(n for n, f in st["shards"].items() if n not in params)
    if lost:
        raise CheckpointError(f"{ckpt_dir}: the full state's shard files lack {lost[:3]}; resume it on the ranks "
                              "that wrote it, or point 'latest' at an earlier step_* directory")
    return st, params


def read_world(ckpt_dir: str) -> Optional[dict]:
    """The ranks that wrote checkpoint ``ckpt_dir`` (None: no full state, written before it existed)."""
    try:
        with open(os.path.join(ckpt_dir, FULL_STATE_INFO)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{ckpt_dir}/{FULL_STATE_INFO} cannot be read ({e}); delete {ckpt_dir} and point "
                              "'latest' at an earlier step_* directory, or start a new run_dir") from None


def needs_reshard(core, ds_engine, ckpt_dir: str) -> bool:
    """True when checkpoint ``ckpt_dir`` was written on other ranks than this run's (another number of ranks,
    DeepSpeed data-parallel size or source-group size); then it must carry the full state."""
    saved = read_world(ckpt_dir)
    now = world_info(core, ds_engine)
    if saved is None:
        return False      # DeepSpeed's own load (and the Nexus layout check) decide
    return (saved["world_size"], saved["dp_size"], saved["layout"]) != (now["world_size"], now["dp_size"], now["layout"])


def load_full_state(core, ds_engine, ckpt_dir: str) -> dict:
    """Collective: load checkpoint ``ckpt_dir``'s full state into this run's partitions (the ranks may differ
    from the writer's: the same algorithm state, cut for this run). Returns the saved client state."""
    st, saved = read_full_state(ckpt_dir)
    nx = st["nexus"]
    core_check = {**nx, "layout": without_world(nx["layout"])}
    if core_check["layout"] != without_world(core.layout.describe()) or nx["k"] != core.k:
        raise NexusConfigError(f"checkpoint {ckpt_dir} was written with layout {nx['layout']} and k={nx['k']}, this run "
                               f"has {core.layout.describe()} and k={core.k}: resume with the same nexus.layout, sources, "
                               "weights and gradient_accumulation_steps (only the number of ranks may change)")
    if core.control is not None and nx["micro"]:
        raise NexusConfigError(f"checkpoint {ckpt_dir} was written in the middle of an outer step: under nexus.control "
                               "its random path is resumed on the ranks that wrote it only; resume from a checkpoint "
                               "written between outer steps")
    named = named_params(ds_engine)
    missing = [n for n, _ in named if n not in saved]
    extra = sorted(set(saved) - {n for n, _ in named})
    bad = [n for n, p in named if n in saved and saved[n]["fp32"].numel() != int(getattr(p, "ds_numel", p.numel()))]
    if missing or extra or bad:
        raise NexusConfigError(f"checkpoint {ckpt_dir} holds another model (missing {missing[:3]}, extra {extra[:3]}, "
                               f"other sizes {bad[:3]}): resume with the same model settings")
    params = [p for _, p in named]
    client = core.client
    fields = {f: _parts_of(core, params, [saved[n][f] for n, _ in named], into_masters=False) for f in FIELDS}
    for i, (p, _) in enumerate(core.parts):
        core.anchors[i].copy_(fields["anchor"][i])
        core.d_sums[i].copy_(fields["d_sum"][i])
        state = client.state[p]
        state["exp_avg"].copy_(fields["exp_avg"][i])
        state["exp_avg_sq"].copy_(fields["exp_avg_sq"][i])
        state["step"] = torch.full_like(state["step"], st["adamw_step"])
    _parts_of(core, params, [saved[n]["fp32"] for n, _ in named], into_masters=True)
    if len(st["param_groups"]) != len(client.param_groups):
        raise NexusConfigError(f"checkpoint {ckpt_dir} has {len(st['param_groups'])} optimizer param groups, this run "
                               f"{len(client.param_groups)}: resume with the same model and optimizer settings")
    for g, saved_g in zip(client.param_groups, st["param_groups"]):
        g.update(saved_g)
    if st["lr_scheduler"] is not None and ds_engine.lr_scheduler is not None:
        ds_engine.lr_scheduler.load_state_dict(st["lr_scheduler"])
    for k, v in st["deepspeed"].items():
        setattr(ds_engine, k, v)
    core.step_index = nx["step_index"]
    core.book.load_state({"inner_steps": nx["micro"], "poisoned": nx["poisoned"], "gamma_t": nx["gamma"],
                          "stats": nx["stats"]})
    core.loaded = True
    return st["client_state"]
