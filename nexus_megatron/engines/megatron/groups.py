"""Nexus source layouts on Megatron's process groups (ALGORITHMS.md §1.2).

* ``sequential``: every data-parallel rank reads the source drawn for the micro-step, so Megatron's
  own groups are used unchanged (``pg_collection=None``): DDP reduces over the whole data-parallel
  group, the grad-norm group is Megatron's (model-parallel group, or the whole distributed-optimizer
  instance).
* ``source-parallel``: the D data-parallel ranks are split into K contiguous blocks of S = D/K ranks
  (block i reads source i; the same blocks as Megatron's partial distributed optimizer,
  ``initialize_model_parallel(num_distributed_optimizer_instances=K)``). Megatron is given a
  :class:`~megatron.core.process_groups_config.ProcessGroupCollection` whose data-parallel group is
  the block, so DDP reduces (reduce-scatter with the distributed optimizer, all-reduce without) inside
  the block only and the distributed optimizer shards over the block; its grad-norm group becomes
  "block x model-parallel" (the instance), which is exactly the group over which source i's norm is
  reduced. Nexus then runs the one cross-source collective itself: the all-reduce of the scaled
  gradient shard over the ``cross`` group (the ranks at the same position of every block, Megatron's
  ``inter_distributed_optimizer_instance_group``).

Why not Megatron's partial distributed optimizer itself (``ddp_config.num_distributed_optimizer_instances=K``):
its inter-instance all-reduce runs inside DDP's ``start_grad_sync`` right after the intra-instance
reduce-scatter, with no seam between the two, so the per-source norm and the scale ``w_i / n_i``
cannot be applied before the sources are summed. With the collection above Megatron performs the first
half of the same schedule (reduce-scatter inside the block, shards of the block) and Nexus the second
half (scaled all-reduce of the shard across blocks): the same bytes on the wire as the partial
distributed optimizer, and it also works without the distributed optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from ...errors import NexusConfigError
from ...layout import LayoutConfig, SourceLayout, build_layout, new_groups

@dataclass
class NexusGroups:
    """The process groups of one Nexus layout on top of Megatron's ``parallel_state``."""

    layout: SourceLayout
    """Data assignment (which source this rank reads at each micro-step) and the source weights."""
    pg_collection: Optional[object]
    """Give this to ``DistributedDataParallel``, ``get_megatron_optimizer`` and ``finalize_model_grads``
    (``None`` = Megatron's default groups: the sequential layout)."""
    source_dp_group: object
    """The data-parallel ranks that read the same source in a micro-step (the gradient reduction group)."""
    cross_group: Optional[object]
    """One rank per source block, same position in each block (None if only one block)."""
    source_dp_size: int
    num_blocks: int

    @property
    def mode(self) -> str:
        return self.layout.mode

    @property
    def source_parallel(self) -> bool:
        return self.layout.mode == "source-parallel"


def _gather_dp_positions(dp_group):
    """[(global rank, tuple(dp ranks of its data-parallel group))] for every rank of the world."""
    mine = (dist.get_rank(), tuple(dist.get_process_group_ranks(dp_group)))
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def build_nexus_groups(layout_cfg: LayoutConfig) -> NexusGroups:
    """Collective (every rank must call it, after ``parallel_state.initialize_model_parallel``).

    Raises :class:`NexusConfigError` for settings the layout cannot serve (more sources than
    data-parallel ranks, a data-parallel size that is not a multiple of the number of sources, context or
    expert parallelism with the source-parallel layout)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise NexusConfigError("build_nexus_groups() needs megatron.core.parallel_state.initialize_model_parallel() first")
    dp = ps.get_data_parallel_group(with_context_parallel=True)
    mp = ps.get_model_parallel_group()
    layout = build_layout(layout_cfg, dp_group=dp, norm_group=mp)
    if layout.mode == "sequential":
        return NexusGroups(layout, None, dp, None, dist.get_world_size(dp), 1)

    if ps.get_context_parallel_world_size() > 1:
        raise NexusConfigError("nexus.layout=source-parallel with --context-parallel-size > 1 is not supported "
                               "yet: use nexus.layout=sequential or context-parallel-size 1")
    if ps.get_expert_model_parallel_world_size() > 1:
        raise NexusConfigError("nexus.layout=source-parallel with --expert-model-parallel-size > 1 is not supported "
                               "yet: use nexus.layout=sequential")
    K, S = layout.num_sources, layout.group_size
    positions = _gather_dp_positions(dp)
    # Source blocks and cross groups (the layout built those with more than one member).
    block = layout.source_group
    if block is None:                                   # S == 1: a group of one rank for DDP / the optimizer
        block = new_groups([[r] for r in range(dist.get_world_size())], singletons=True)
    cross = layout.cross_group                          # None when K == 1
    # Instances: source block i of every data-parallel group = all ranks (TP x PP x block) that share one
    # shard layout; the grad-norm group of the distributed optimizer.
    dp_index = {r: ranks.index(r) for r, ranks in positions}
    instance = new_groups([sorted(r for r, j in dp_index.items() if j // S == i) for i in range(K)],
                          singletons=True)
    from megatron.core.process_groups_config import ProcessGroupCollection
    from .compat import set_data_parallel_group
    pgc = ProcessGroupCollection()
    pgc.tp = ps.get_tensor_model_parallel_group()
    pgc.pp = ps.get_pipeline_model_parallel_group()
    pgc.mp = mp
    pgc.cp = ps.get_context_parallel_group()
    pgc.ep = ps.get_expert_model_parallel_group()
    pgc.tp_ep_pp = ps.get_expert_tensor_model_pipeline_parallel_group()
    pgc.embd = ps.get_embedding_group(check_initialized=False)
    pgc.pos_embd = ps.get_position_embedding_group(check_initialized=False)
    set_data_parallel_group(pgc, block)                 # every field this megatron-core reads it from
    pgc.intra_dist_opt = instance
    if cross is not None:
        pgc.inter_dist_opt = cross
    return NexusGroups(layout, pgc, block, cross, S, K)


def nexus_finalize_model_grads(groups: NexusGroups):
    """``config.finalize_model_grads_func`` for the layout: Megatron's ``finalize_model_grads`` with the
    layout's groups (for source-parallel, per-token loss normalization counts the tokens of the source
    block only)."""
    from megatron.core.distributed import finalize_model_grads

    pgc = groups.pg_collection

    def finalize(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
        return finalize_model_grads(model, num_tokens, pg_collection=pgc if pgc is not None else pg_collection,
                                    force_all_reduce=force_all_reduce)
    return finalize
