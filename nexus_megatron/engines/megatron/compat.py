"""Every per-version difference of megatron-core (0.16.x - 0.19.x) the adapter depends on, in one place.

The rest of the adapter calls these functions instead of the moved seams:

=====================================  ==========================  =======================================
seam                                   0.16.x                      0.17.x - 0.19.x
=====================================  ==========================  =======================================
gradients for a norm                   ``get_main_grads_for_       ``get_grads_for_grad_norm(group)``; the
                                       grad_norm()`` (all params)  default group leaves out the parameters
                                                                   of a separate grad-norm group (MTP)
separate grad-norm groups              none                        ``SEPARATE_GRAD_NORM_GROUPS`` (MTP)
clipping in the optimizer step         every param by the norm     main params by the main norm, each
                                       of all of them              group's params by its own norm
TP-duplicate filter of a norm          one TP group                + the expert TP group for expert params
staging before an explicit param sync  none                        ``prepare_model_params_for_param_sync()``
``ProcessGroupCollection`` data-       dp, dp_cp, intra_dp_cp,     + ``dp_cp_gtp_remat``,
parallel fields                        expt_dp, intra_expt_dp      ``expt_dp_gtp_remat`` (read first by
                                                                   ``finalize_model_grads`` when set)
``dist_checkpointing.save`` async   megatron-core's own         default ``nvrx`` (optional package):
                                                                   ask for ``mcore``
``megatron.training`` in the wheel     no (a Megatron-LM checkout) yes (extra ``[mlm]``); ``pretrain()``
                                                                   takes a config container (0.18+)
=====================================  ==========================  =======================================

Nothing here changes megatron-core; the functions only pick the call that exists.
"""
from __future__ import annotations

import math
from typing import List

import torch

from .version import megatron_core_version, parse_version

MCORE = parse_version(megatron_core_version())
"""The installed megatron-core as (major, minor, patch)."""


def separate_grad_norm_groups() -> tuple:
    """The grad-norm groups megatron-core keeps out of the main norm (0.17+: the MTP parameters)."""
    try:
        from megatron.core.optimizer.optimizer import SEPARATE_GRAD_NORM_GROUPS
    except ImportError:          # 0.16: one norm over every parameter
        return ()
    return tuple(SEPARATE_GRAD_NORM_GROUPS)


def grads_for_full_norm(opt) -> List[torch.Tensor]:
    """The gradients of *every* parameter of a (non-chained) Megatron optimizer for a norm, with Megatron's
    filters (TP duplicates, shared parameters): 0.16's ``get_main_grads_for_grad_norm()``; 0.17+'s
    ``get_grads_for_grad_norm()`` plus each separate group's."""
    if hasattr(opt, "get_grads_for_grad_norm"):
        out = list(opt.get_grads_for_grad_norm())
        for g in separate_grad_norm_groups():
            out += list(opt.get_grads_for_grad_norm(g))
        return out
    return list(opt.get_main_grads_for_grad_norm())


def _chained(inner) -> list:
    return list(getattr(inner, "chained_optimizers", [inner]))


@torch.no_grad()
def separate_group_norms(inner) -> dict:
    """``{group: norm}`` of each separate grad-norm group some rank of ``inner`` (a Megatron optimizer, chained or
    not) holds parameters of, computed as megatron-core 0.17+'s own step does (``ChainedOptimizer.
    _get_grad_norm_for_group`` / ``MegatronOptimizer._compute_grad_norms_by_group``): one norm over every child's
    gradients of the group when the children share their grad-stats group, else the children's norms in
    quadrature. 0.16 (no groups): ``{}``. Collective over the grad-stats group(s) when a group exists."""
    groups = separate_grad_norm_groups()
    if not groups or not hasattr(inner, "has_grad_norm_group"):
        return {}
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    children = _chained(inner)
    ref = children[0].get_grad_stats_parallel_group()
    shared = all(c.get_grad_stats_parallel_group() == ref for c in children)
    out = {}
    for g in groups:
        if not inner.has_grad_norm_group(g):       # cached, globally consistent over the grad-stats group(s)
            continue
        if shared:
            grads = [t for c in children for t in c.get_grads_for_grad_norm(g)]
            out[g] = float(get_grad_norm_fp32(grads, grad_stats_parallel_group=children[0].get_grad_stats_parallel_group()))
        else:
            sq = 0.0
            for c in children:
                n = float(get_grad_norm_fp32(c.get_grads_for_grad_norm(g),
                                             grad_stats_parallel_group=c.get_grad_stats_parallel_group()))
                sq += n * n if n else 0.0
            out[g] = math.sqrt(sq)
    return out


@torch.no_grad()
def full_grad_norm(inner) -> float:
    """The L2 norm of the whole gradient of a Megatron optimizer (chained or not), reduced over its grad-stats
    group: what 0.16's ``get_grad_norm()`` returns. From 0.17 ``get_grad_norm()`` leaves out the separate
    grad-norm groups (MTP); Nexus's per-source norm n_i must count every parameter, so those groups' norms
    (:func:`separate_group_norms`) are added in quadrature (one more scalar all-reduce per group, only when some
    rank holds such parameters)."""
    main = float(inner.get_grad_norm())
    extra = separate_group_norms(inner)
    if not extra:
        return main
    return math.sqrt(main * main + sum(n * n for n in extra.values()))


def grad_norm_group_of(param):
    """The separate grad-norm group a parameter is tagged with (0.17+: ``'mtp'`` for the MTP parameters), or
    ``None`` (the main group; always on 0.16)."""
    if not separate_grad_norm_groups():
        return None
    from megatron.core.optimizer import optimizer as mopt
    g = getattr(param, getattr(mopt, "GRAD_NORM_GROUP_ATTR", "grad_norm_group"), None)
    return g if g in separate_grad_norm_groups() else None


@torch.no_grad()
def clip_grads_like_megatron(inner, grad_norm) -> None:
    """Clip the gradients in ``main_param.grad`` of ``inner`` (chained or not) in place exactly as megatron-core's
    own ``ChainedOptimizer.step`` does on this version, for each child with ``clip_grad > 0``: 0.16 clips every
    parameter by ``grad_norm`` (the norm of all of them); 0.17+ clips the main group's parameters by
    ``grad_norm`` (``get_grad_norm()``, which leaves the separate groups out) and each separate group's
    parameters (MTP) by that group's own norm (:func:`separate_group_norms`)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    children = [c for c in _chained(inner) if not getattr(c, "is_stub_optimizer", False)]
    should_clip = any(c.config.clip_grad > 0.0 for c in children)
    group_norms = separate_group_norms(inner) if should_clip else {}
    for c in children:
        params = c.get_parameters()
        if not params or c.config.clip_grad <= 0.0:
            continue
        decoupled = c.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
        main, by_group = [], {}
        for p in params:
            g = grad_norm_group_of(p)
            if g is None:
                main.append(p)
            else:
                by_group.setdefault(g, []).append(p)
        if main:
            clip_grad_by_total_norm_fp32(main, max_norm=c.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=decoupled)
        for g, ps in by_group.items():
            if g in group_norms:
                clip_grad_by_total_norm_fp32(ps, max_norm=c.config.clip_grad, total_norm=group_norms[g],
                                             use_decoupled_grad=decoupled)


def is_tensor_parallel_duplicate(param, opt) -> bool:
    """Whether ``param`` (a parameter of Megatron optimizer ``opt``) is a tensor-parallel replica that a norm must
    skip. Expert parameters (``allreduce=False``) are filtered over the expert tensor-parallel group (0.17+
    passes ``opt.expert_tp_group``; 0.16 has one tensor-parallel group)."""
    import inspect
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate as unique
    kw = {"tp_group": getattr(opt, "tp_group", None)}
    if "expert_tp_group" in inspect.signature(unique).parameters:
        kw["expert_tp_group"] = getattr(opt, "expert_tp_group", None)
    return not unique(param, **kw)


def prepare_model_params_for_param_sync(opt) -> None:
    """0.17+: stage the optimizer-owned model params before an explicit DDP param sync (a no-op except for
    MXFP8 params that reuse the grad buffer); 0.16: nothing to do."""
    fn = getattr(opt, "prepare_model_params_for_param_sync", None)
    if fn is not None:
        fn()


DATA_PARALLEL_FIELDS = ("dp", "dp_cp", "intra_dp_cp", "expt_dp", "intra_expt_dp")
"""The ``ProcessGroupCollection`` fields that name the data-parallel group (every version)."""
GTP_DATA_PARALLEL_FIELDS = ("dp_cp_gtp_remat", "expt_dp_gtp_remat")
"""0.18+: data-parallel x generalized-TP groups (read before ``dp_cp`` by ``finalize_model_grads``)."""


def set_data_parallel_group(pgc, block) -> None:
    """Make ``block`` the data-parallel group of a ``ProcessGroupCollection`` in every field this version
    reads it from (the source block of the source-parallel layout)."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(type(pgc))} if dataclasses.is_dataclass(pgc) else set()
    for name in DATA_PARALLEL_FIELDS:
        setattr(pgc, name, block)
    for name in GTP_DATA_PARALLEL_FIELDS:
        if name in names:
            setattr(pgc, name, block)


def dist_checkpointing_async_save(sharded_state_dict, directory):
    """``dist_checkpointing.save(..., async_sharded_save=True)``: the request to ``execute_sync()``. 0.19
    defaults to the ``nvrx`` async strategy (the optional nvidia-resiliency-ext package); the adapter asks for
    megatron-core's own (``mcore``), which is what 0.16 always used."""
    import inspect
    from megatron.core import dist_checkpointing
    kw = {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kw["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded_state_dict, directory, async_sharded_save=True, **kw)


def has_megatron_training() -> bool:
    """megatron-core ships Megatron-LM's training loop (``megatron.training``) from 0.17 on."""
    import importlib.util
    try:
        return importlib.util.find_spec("megatron.training") is not None
    except (ImportError, ValueError):
        return False


def use_prebuilt_dataset_helpers() -> None:
    """megatron-core wheels ship the dataset helpers compiled (``helpers_cpp*.so``) but not their Makefile;
    ``megatron.training``'s initialization still runs ``make`` in that directory on rank 0 and exits when it
    fails. With the compiled module importable the compilation is skipped (a source checkout keeps it)."""
    import importlib.util
    import os
    from megatron.core.datasets import utils as dutils
    here = os.path.dirname(os.path.abspath(dutils.__file__))
    if os.path.exists(os.path.join(here, "Makefile")):
        return
    if importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None:
        dutils.compile_helpers = lambda: None


def pretrain_takes_config_container() -> bool:
    """``megatron.training.training.pretrain``'s first argument is a ``PretrainConfigContainer`` (0.18+)
    instead of the dataset provider (with ``extra_args_provider=`` / ``args_defaults=`` keywords)."""
    import inspect
    from megatron.training.training import pretrain
    params = list(inspect.signature(pretrain).parameters)
    return bool(params) and params[0] == "cfg_container"
