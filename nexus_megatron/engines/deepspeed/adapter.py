"""Nexus inside DeepSpeed: every Nexus micro-step is one DeepSpeed optimizer step.

How it fits into DeepSpeed (ZeRO stages 0-3, fp32 and bf16):

* DeepSpeed is built with ``gradient_accumulation_steps: 1``, so ``engine.backward(loss); engine.step()``
  after every micro-batch reduces that micro-batch's gradient over DeepSpeed's data-parallel group and
  hands it, on DeepSpeed's fp32 master partitions, to the client optimizer :class:`NexusAdamW`
  (ZeRO-1/2: ``single_partition_of_fp32_groups``; ZeRO-3: ``fp32_partitioned_groups_flat``; ZeRO-1 with
  fp32 gradient accumulation in bf16: ``BF16_Optimizer``'s flat partitions; stage 0: the fp32 parameters,
  or the fp32 copies of DeepSpeed's bf16 wrapper).
* :class:`NexusAdamW` keeps two extra fp32 tensors per master partition: the anchor ``A`` (theta_t) and
  ``S`` = the sum of the normalized directions of the micro-steps so far (the exact displacement,
  functional.py: delta = -gamma S). The master partition ``M`` holds ``A + delta``. An inner step on a
  partition is::

      d     = coef * g                # coef = w_i / n_i from layout.exchange_norms
      S     = S + d                   # functional.accumulate_direction
      M     = A - gamma * S           # functional.moved_point

  DeepSpeed then copies ``M`` to the bf16/fp32 model partition and all-gathers as usual, so the next
  forward pass sees theta_t + delta (ZeRO-1/2 with ``nexus.overlap_param_gather``: the gather runs during
  that forward, bucket by bucket, see param_gather.py). At the k-th micro-step: ``G = S / k``
  (functional.pseudo_gradient_from_sum: exact for every gamma_t, lr = 0 included), clipped to
  ``gradient_clipping``, ``M <- A``, AdamW step on ``M`` with grad ``G``, ``A <- M``, ``S <- 0``.
* Memory: 8 bytes per element of the rank's master partition (anchor + S): 8/D bytes per parameter under
  ZeRO-1/2/3 over D data-parallel ranks, 8 at stage 0.
* Norms: ``n_i`` is the L2 norm of the whole logical gradient. DeepSpeed steps ZeRO-1/2/3 client
  optimizers one parameter group (sub-group) at a time and sets the gradients of the other groups only
  when it reaches them, so the norm cannot be summed inside the first group's step. There, DeepSpeed's
  own global gradient norm is used (``_global_grad_norm``: computed in ``step()`` before the group loop
  from all groups' reduced partitions, all-reduced over the data-parallel group, unscaled, unclipped).
  Where DeepSpeed hands every group in one call (stage 0, ``BF16_Optimizer``) the sum of squares is
  computed here in fp64. Every rank then takes part in one all-reduce of a (K+1)-vector (squared norm
  per source, non-finite flag) over all ranks, so all ranks agree on the norms and on NaN/Inf.
* Layouts: sequential = DeepSpeed's data-parallel group is all ranks. Source-parallel = DeepSpeed gets an
  ``mpu`` whose data-parallel group is the source group, so DeepSpeed reduces (and ZeRO-partitions) inside
  the source group; each partition is scaled by its source's coefficient and all-reduced across the
  cross group (ranks at the same partition position in every source group): every group then holds
  the same ``d`` partition and takes the same steps.
* NaN/Inf: a non-finite norm on any rank, or DeepSpeed skipping the client optimizer (overflow), poisons
  the outer step: no inner updates, ``M <- A`` at the k-th micro-step, no AdamW step, no scheduler step.
* The learning-rate scheduler DeepSpeed holds is wrapped so that DeepSpeed's per-step call does nothing;
  the engine steps it once per applied outer step.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import re
import shutil
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist

from ... import checkpoint as _ckpt
from ...safe_load import MARKER_FILE, marker_text
from ...errors import CheckpointError, NexusConfigError
from ...faults import fault_point
from ...functional import accumulate_direction, clip_factor, moved_point, pseudo_gradient_from_sum, sum_sq
from ...layout import LayoutConfig, SourceLayout, build_layout, new_groups
from ...nexus import NexusConfig
from ...outer import BookViews, OuterBook, RandomDirectionControl, check_resume
from ..base import Engine
from .config import PreparedConfig, check_run_config, load_ds_config, prepare_ds_config
from .runtime import init_adamw_state, prepare_deepspeed_runtime
from .reshard import gather_full_state, load_full_state, needs_reshard, write_full_state, write_full_state_shard
from .safe_load import safe_ds_load

log = logging.getLogger("nexus_megatron.deepspeed")


# ---------------------------------------------------------------------------------------------------
# process groups and the mpu handed to DeepSpeed

class NexusGroups:
    """The groups of one layout (built by :func:`nexus_megatron.layout.new_groups`, the package's one group
    builder): DeepSpeed's data-parallel group (all ranks, or this rank's source group: the layout's), a
    one-rank model-parallel group per rank, and a group of all ranks. Collective."""

    def __init__(self, layout: Optional[SourceLayout] = None):
        ranks = list(range(dist.get_world_size()))
        self.everyone = new_groups([ranks], singletons=True)
        self.mp_group = new_groups([[r] for r in ranks], singletons=True)
        if layout is not None and layout.mode == "source-parallel":
            S = layout.group_size
            self.dp_ranks = [layout.dp_ranks[i] for i in range(layout.my_source * S, (layout.my_source + 1) * S)]
            self.dp_group = layout.source_group if S > 1 else self.mp_group
        else:
            self.dp_group, self.dp_ranks = self.everyone, ranks
        self.dp_size = len(self.dp_ranks)


class NexusMPU:
    """The ``mpu`` handed to ``deepspeed.initialize``: data parallel = :class:`NexusGroups`' DP group,
    no model parallelism (a one-rank group per rank, so DeepSpeed's norm all-reduces over the
    model-parallel group are no-ops)."""

    def __init__(self, groups: NexusGroups):
        self._g = groups

    def get_data_parallel_group(self):
        return self._g.dp_group

    def get_data_parallel_world_size(self):
        return self._g.dp_size

    def get_data_parallel_rank(self):
        return self._g.dp_ranks.index(dist.get_rank())

    def get_data_parallel_group_ranks(self):
        return list(self._g.dp_ranks)

    def get_model_parallel_group(self):
        return self._g.mp_group

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_rank()

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0

    def get_pipeline_model_parallel_group(self):
        return self._g.mp_group


# ---------------------------------------------------------------------------------------------------
# the client optimizer

class NexusAdamW(torch.optim.AdamW):
    """DeepSpeed's client optimizer under Nexus: a ``torch.optim.AdamW`` (the outer optimizer, stepped once
    per outer step on the pseudo-gradient) whose ``step()``, called by DeepSpeed after every micro-step,
    runs the Nexus inner step on the master partitions it is handed. Its ``state_dict()`` carries the
    Nexus state (anchor shards, counters, layout) next to AdamW's, so DeepSpeed's per-rank optimizer
    checkpoint files hold everything. Build it through :func:`initialize`, not directly."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, **kw):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **kw)
        self._nexus_core: Optional[_NexusCore] = None
        self._pending_nexus_state = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NexusConfigError("NexusAdamW.step() takes no closure")
        core = self._nexus_core
        if core is None:
            # Before initialize() binds it, only DeepSpeed calls step(): its stage-0 bf16 wrapper
            # (FP16_UnfusedOptimizer.initialize_optimizer_states) steps once with zero gradients to create the
            # optimizer state. Create the state and change nothing (a real AdamW step would apply weight decay).
            for g in self.param_groups:
                for p in g["params"]:
                    self.init_state(p, g)
            return
        core.client_step(self)

    def _adamw_step(self, p, group):
        """One plain AdamW step on the single tensor ``p`` (its grad set) with ``group``'s hyperparameters."""
        one = dict(group)
        one["params"] = [p]
        saved = self.param_groups
        self.param_groups = [one]
        try:
            torch.optim.AdamW.step(self)
        finally:
            self.param_groups = saved

    def init_state(self, p, group):
        """AdamW's state for ``p``, created now instead of at the first step (same values as torch's lazy
        initialisation), so the state exists, and is linked by DeepSpeed, before the first outer step."""
        init_adamw_state(self, p, group)

    def state_dict(self):
        sd = super().state_dict()
        if self._nexus_core is not None:
            sd["nexus"] = self._nexus_core.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        nx = state_dict.pop("nexus", None)
        super().load_state_dict(state_dict)
        if nx is not None:
            if self._nexus_core is None:
                self._pending_nexus_state = nx
            else:
                self._nexus_core.load_state_dict(nx)


def client_optimizer_from(optimizer, model, model_parameters=None) -> NexusAdamW:
    """NexusAdamW from what a DeepSpeed user has: a fresh ``torch.optim.AdamW`` (its param groups and
    settings are reused), a dict of AdamW settings, or None (torch's AdamW defaults)."""
    if isinstance(optimizer, NexusAdamW):
        return optimizer
    if optimizer is None:
        optimizer = {}
    if isinstance(optimizer, torch.optim.Optimizer):
        if type(optimizer) is not torch.optim.AdamW:
            raise NexusConfigError(
                f"optimizer={type(optimizer).__name__}: the Nexus outer optimizer is AdamW; pass "
                "torch.optim.AdamW(...) (its param groups and settings are reused) or a dict of AdamW settings")
        if optimizer.state:
            raise NexusConfigError("optimizer: pass a fresh torch.optim.AdamW (it already has state, which would "
                                   "be dropped); to continue a run use engine.load_checkpoint()")
        d = optimizer.defaults
        groups = [dict(g) for g in optimizer.param_groups]
        return NexusAdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                          amsgrad=d["amsgrad"], maximize=d.get("maximize", False))
    if isinstance(optimizer, dict):
        params = model_parameters if model_parameters is not None else \
            [p for p in model.parameters() if p.requires_grad]
        try:
            return NexusAdamW(params, **optimizer)
        except TypeError as e:
            raise NexusConfigError(f"optimizer settings {sorted(optimizer)}: {e} (use torch.optim.AdamW's "
                                   "arguments: lr, betas, eps, weight_decay, amsgrad)") from None
    raise NexusConfigError(f"optimizer must be torch.optim.AdamW, a dict of its settings or None, "
                           f"got {type(optimizer).__name__}")


# ---------------------------------------------------------------------------------------------------
# the algorithm on DeepSpeed's master partitions

class _NexusCore(BookViews):
    """Nexus state and logic for one DeepSpeed engine (one per rank)."""

    def __init__(self, layout: SourceLayout, cfg: NexusConfig, groups: NexusGroups, *, k: int, clip: float,
                 num_params: int):
        self.layout, self.cfg, self.groups = layout, cfg, groups
        self.k, self.clip, self.num_params = int(k), float(clip), int(num_params)
        self.K = layout.num_sources
        self.sp = layout.mode == "source-parallel"
        self.rank = dist.get_rank()
        if self.sp:
            S = layout.group_size
            self.my_source = self.rank // S
            self.designated = self.rank % S == 0
            self.cross_group = layout.cross_group
        else:
            self.my_source = None
            self.designated = self.rank == 0
            self.cross_group = None
        # bound to DeepSpeed's optimizer by bind()
        self.parts: list = []
        self.anchors: list = []
        self.d_sums: list = []
        """Per master partition: sum of the normalized directions of this outer step (fp32, exact displacement)."""
        self.index: dict = {}
        # per outer / micro step
        self.step_index = 0          # outer steps done (applied or skipped): the layout's step counter
        self.book = OuterBook(self.K, micro_steps=self.k, max_consecutive_skips=cfg.max_consecutive_skips, config=cfg)
        self.in_step = False
        self.exchanged = False
        self.seen: set = set()
        self.coef = 0.0
        self.last_info: Optional[dict] = None
        self.last = False
        self.loaded = False
        self._legacy_delta = False
        self.clip_scale = 1.0
        self.scale_before = 1.0
        self.param_gather = None
        """:class:`~.param_gather.DeferredParamGather` with ``nexus.overlap_param_gather`` (ZeRO-1/2), else None."""
        self.control: Optional[RandomDirectionControl] = None
        """``nexus.control=random_direction``: the random forward points (:meth:`_control_move`)."""
        self._d_sq = 0.0
        self.pre_outer_step = None
        """Called as ``fn(self)`` in the outer step, right before the AdamW update: ``d_sums`` hold the final sums
        (G = clip_scale * d_sum / k, :meth:`pseudo_grad`), the anchors theta_t, ``clip_scale`` the pseudo-gradient's
        clipping factor (critical sharpness, engines/deepspeed/sharpness.py); it must leave all of them as it
        found them."""

    # -- the bookkeeper's state (stats, inner_steps, poisoned, gamma_t: BookViews) and aliases --------
    @property
    def micro(self) -> int:
        return self.book.inner_steps

    @property
    def gamma(self) -> Optional[float]:
        return self.book.gamma_t

    def pseudo_grad(self, i: int, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """The clipped pseudo-gradient of master partition ``i`` (flat elements ``[lo, hi)``), a new tensor."""
        return pseudo_gradient_from_sum(self.d_sums[i].view(-1)[lo:hi], self.k, scale=self.clip_scale)

    # -- binding ---------------------------------------------------------------------------------
    def bind(self, ds_engine, client: NexusAdamW):
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        # parts: (master partition, index of its group in client.param_groups). The group dicts are looked up
        # at every micro-step: torch's load_state_dict replaces them, and schedulers write the current ones.
        opt = ds_engine.optimizer
        groups = list(client.param_groups)
        self.ds_opt = opt
        if opt is client:                                   # stage 0, fp32: the parameters themselves
            self.kind, self.split, self.partitioned = "stage0", False, False
            parts = [(p, gi) for gi, g in enumerate(groups) for p in g["params"]]
        elif isinstance(opt, FP16_UnfusedOptimizer):       # stage 0, bf16: fp32 copies of the parameters
            self.kind, self.split, self.partitioned = "stage0-bf16", False, False
            parts = [(p, gi) for gi, g in enumerate(groups) for p in g["params"]]
        elif isinstance(opt, BF16_Optimizer):              # ZeRO-1 + bf16 + fp32 grad accumulation
            self.kind, self.split, self.partitioned = "bf16-zero1", False, True
            parts = [(p, gi) for gi, g in enumerate(groups) for p in g["params"]]
        elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            self.kind, self.split, self.partitioned = "zero3", True, True
            parts = [(t, opt.sub_group_to_group_id[j]) for j, t in enumerate(opt.fp32_partitioned_groups_flat)]
        elif isinstance(opt, DeepSpeedZeroOptimizer):
            self.kind, self.split, self.partitioned = "zero12", True, True
            parts = [(t, i) for i, t in enumerate(opt.single_partition_of_fp32_groups)]
        else:
            raise NexusConfigError(f"DeepSpeed wrapped the Nexus client optimizer in {type(opt).__name__}, which the "
                                   "Nexus adapter does not support (supported: ZeRO stages 0-3, fp32 or bf16)")
        for p, _ in parts:
            if p.dtype != torch.float32:
                raise NexusConfigError(f"DeepSpeed master partition of dtype {p.dtype}: Nexus needs fp32 master weights")
        self.parts = parts
        self.index = {id(p): i for i, (p, _) in enumerate(parts)}
        self.anchors = [p.detach().clone() for p, _ in parts]
        self.d_sums = [torch.zeros_like(p, dtype=torch.float32) for p, _ in parts]
        for p, gi in parts:
            client.init_state(p, groups[gi])
        self.group_list = groups
        self.client = client
        self.device = parts[0][0].device
        client._nexus_core = self
        if self.cfg.control != "none":
            self.control = RandomDirectionControl(self.cfg.control_seed, self.num_params, [p for p, _ in parts],
                                                  self._fragments(ds_engine.module))
        if client._pending_nexus_state is not None:
            self.load_state_dict(client._pending_nexus_state)
            client._pending_nexus_state = None

    def _fragments(self, module) -> list:
        """Where the master partitions sit in the model's flat parameter vector (``module.parameters()`` in
        order): ``(partition, offset in it, lo, hi)`` for :class:`~nexus_megatron.outer.RandomDirectionControl`."""
        offsets, off = {}, 0
        for p in module.parameters():
            if p.requires_grad and id(p) not in offsets:
                offsets[id(p)] = off
                off += int(getattr(p, "ds_numel", p.numel()))
        opt, out = self.ds_opt, []
        if self.kind == "stage0":
            return [(i, 0, offsets[id(p)], offsets[id(p)] + p.numel()) for i, (p, _) in enumerate(self.parts)]
        if self.kind == "zero12":        # DeepSpeed's lp -> hp fragment map of each partition
            for i, group in enumerate(opt.bit16_groups):
                for lp in group:
                    m = getattr(lp, "_hp_mapping", None)
                    if m is not None and m.lp_fragment_address.numel:
                        lo = offsets[id(lp)] + m.lp_fragment_address.start
                        out.append((i, m.hp_fragment_address.start, lo, lo + m.lp_fragment_address.numel))
            return out
        if self.kind == "zero3":         # each parameter partitioned on its own: ds_tensor = [r*ps, (r+1)*ps)
            for j, sub in enumerate(opt.fp16_groups):
                r, pos = dist.get_rank(group=opt.sub_group_process_groups[j]), 0
                for p in sub:
                    ps = int(p.partition_numel())
                    n = max(0, min(ps, int(p.ds_numel) - r * ps))
                    if n:
                        out.append((j, pos, offsets[id(p)] + r * ps, offsets[id(p)] + r * ps + n))
                    pos += ps
            return out
        raise NexusConfigError(f"nexus.control={self.cfg.control} is not implemented on DeepSpeed's {self.kind} "
                               "optimizer (bf16 at stage 0, or ZeRO-1's BF16_Optimizer): use fp32, or bf16 with ZeRO "
                               "stage 1-3 and bf16 gradient accumulation, or set nexus.control=none")

    def _control_move(self, current: set):
        """The control's inner step, once every partition of the micro-step has its direction: R <- R - gamma r
        (r of the norm of the full d), M = A + R for every partition."""
        sq = torch.tensor(self._d_sq, dtype=torch.float64, device=self.device)
        self._d_sq = 0.0
        if self.partitioned and self.groups.dp_size > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.groups.dp_group)
        self.control.inner_step(self.step_index, self.micro + 1, math.sqrt(float(sq)), self.gamma)
        for i, ((p, _), a) in enumerate(zip(self.parts, self.anchors)):
            self.control.moved_point(i, a, out=p.data)
            if i not in current:
                self._lp_sync(i)               # DeepSpeed copied this partition earlier in this step()

    # -- low-precision copies of the master partitions --------------------------------------------
    def _lp_sync(self, i: int):
        """Copy master partition ``i`` into DeepSpeed's model partition (no communication); used for the
        groups DeepSpeed already copied earlier in the same step()."""
        opt = self.ds_opt
        if self.kind == "zero12":
            pid = dist.get_rank(group=opt.real_dp_process_group[i])
            opt.parallel_partitioned_bit16_groups[i][pid].data.copy_(opt.single_partition_of_fp32_groups[i].data)
        elif self.kind == "zero3":
            opt._reassign_or_swap_out_partitioned_parameters(i)

    def _sync_all(self):
        """Make the model (low-precision copies, all-gathered) match the master partitions (collective over
        DeepSpeed's data-parallel group). Used outside DeepSpeed's step: after a skipped step and a load."""
        opt = self.ds_opt
        if self.param_gather is not None:     # a deferred gather still reads the partitions written below
            self.param_gather.wait_all()
        if self.kind == "stage0-bf16":
            for f32, lp in zip(opt.fp32_groups, opt.fp16_groups):
                for a, b in zip(f32, lp):
                    b.data.copy_(a.data)
        elif self.kind in ("zero12", "bf16-zero1"):
            opt.update_lp_params()
        elif self.kind == "zero3":
            for j in range(len(self.parts)):
                opt._reassign_or_swap_out_partitioned_parameters(j)
            if len(opt.persistent_parameters) > 0:
                opt.persistent_parameters[0].all_gather(opt.persistent_parameters)

    # -- one micro-step --------------------------------------------------------------------------
    def current_lr(self) -> float:
        return float(self.client.param_groups[0]["lr"])

    def source_for(self, micro: Optional[int] = None) -> int:
        return self.layout.source_for(self.step_index, self.micro if micro is None else micro)

    def begin_micro(self):
        self.book.begin_micro(self.current_lr(), self.num_params, who="NexusDeepSpeedEngine.step")
        self.last = self.book.last_micro
        self.in_step, self.exchanged, self.seen = True, False, set()
        self._d_sq = 0.0
        self.group_list = list(self.client.param_groups)   # before DeepSpeed narrows it to one group per call
        if self.kind == "zero12":   # fp16: the loss scale of this micro-step's backward (see _local_sq)
            self.scale_before = float(self.ds_opt.loss_scale)

    def end_micro(self) -> Optional[dict]:
        """After DeepSpeed's step(): detect a skipped client step, finish an outer step."""
        self.in_step = False
        skipped_by_ds = not self.exchanged
        if skipped_by_ds:        # DeepSpeed did not call the client optimizer (overflow): poison, stay in sync
            self._exchange(None)
        elif not self.poisoned and len(self.seen) != len(self.parts):
            raise RuntimeError(f"DeepSpeed stepped {len(self.seen)} of {len(self.parts)} master partitions")
        book = self.book
        book.end_micro()
        if not self.last:
            return None
        if self.control is not None:
            self.control.reset()
        if self.poisoned:
            if skipped_by_ds:    # the client restored nothing: put the anchor back here
                for (p, _), a in zip(self.parts, self.anchors):
                    p.data.copy_(a)
                self._sync_all()
            for s in self.d_sums:
                s.zero_()
            info = book.outer_info()
        else:
            info = self.last_info
        book.end_outer(skipped=info["skipped"])
        self.last_info = None
        self.step_index += 1
        return info

    def _exchange(self, sq: Optional[torch.Tensor]):
        """The layout's norm exchange, one all-reduce over all ranks (DeepSpeed's norm is already the full one
        on every rank of a source: one designated rank per source contributes it; BF16_Optimizer's per-rank
        partial sums are all contributed)."""
        src = self.my_source if self.sp else self.source_for()
        red, coef = self.layout.exchange_norms(
            sq, src, groups=(self.groups.everyone,), contribute=self.designated or (self.partitioned and not self.split),
            nonfinite=sq is None, min_grad_norm=self.cfg.min_grad_norm, device=self.device)
        self.exchanged = True
        self.book.record(red.norms, red.present, red.active, red.nonfinite)
        self.coef = float(coef[src])

    def _local_sq(self, current) -> torch.Tensor:
        if self.split:   # DeepSpeed's global norm, computed before its group loop (see the module docstring)
            n = getattr(self.ds_opt, "_global_grad_norm", None)
            if n is None:
                raise RuntimeError("DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm)")
            n = float(n)
            if self.kind == "zero12":
                # fp16: DeepSpeed's ZeRO-1/2 divides the norm by the backward's loss scale but the gradients it
                # hands over by the scale it has just updated (x2 at a growth step): normalize what is handed
                n *= self.scale_before / float(self.ds_opt.loss_scale)
            return torch.tensor(n * n if (math.isfinite(n) and n >= 0) else float("nan"), dtype=torch.float64)
        return sum_sq([p.grad for p in current if p.grad is not None]).cpu()

    @torch.no_grad()
    def client_step(self, client: NexusAdamW):
        if not self.in_step:
            raise RuntimeError(
                "DeepSpeed stepped the Nexus client optimizer outside the Nexus engine's step(): call step() on the "
                "engine returned by nexus_megatron.engines.deepspeed.initialize(), not on DeepSpeed's own engine")
        current = [p for g in client.param_groups for p in g["params"]]
        try:
            idx = [self.index[id(p)] for p in current]
        except KeyError:
            raise RuntimeError("DeepSpeed handed the Nexus client optimizer a tensor it did not bind") from None
        if not self.exchanged:
            self._exchange(self._local_sq(current))
        for i in idx:
            self._inner(i)
        self.seen.update(idx)
        if self.control is not None and not (self.last or self.poisoned) and len(self.seen) == len(self.parts):
            self._control_move(set(idx))
        if self.last and not self.poisoned and len(self.seen) == len(self.parts):
            self._outer(set(idx))
        if self.param_gather is not None and len(self.seen) == len(self.parts):
            self.param_gather.armed = True    # DeepSpeed's gather that follows is the one to overlap

    def _inner(self, i: int):
        p, _ = self.parts[i]
        a = self.anchors[i]
        if self.poisoned:
            if self.last:
                p.data.copy_(a)
            return
        g = p.grad
        if g is None:
            g = p.grad = torch.zeros_like(p)
        g.mul_(self.coef)                                               # this source's w_i g_i / n_i
        if self.sp and self.K > 1:
            dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self.cross_group)  # d = sum over the sources
        accumulate_direction(self.d_sums[i], g)                         # S = S + d
        if self.control is not None:                                    # M = A + R once d is complete
            self._d_sq += float(sum_sq(g))
        elif not self.last:
            moved_point(a, self.d_sums[i], self.gamma, out=p.data)      # M = A - gamma S
        # at the k-th micro-step the outer step follows (_outer) once every partition has its final S

    def _outer(self, current: set):
        """The outer step, when the last partition of the k-th micro-step has its final sum S."""
        sq = sum_sq(self.d_sums).to(self.device)
        if self.partitioned and self.groups.dp_size > 1:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.groups.dp_group)
        gnorm = math.sqrt(float(sq)) / self.k
        scale = clip_factor(gnorm, self.clip)  # DeepSpeed's clipping rule, applied to the pseudo-gradient
        self.clip_scale = scale
        if self.pre_outer_step is not None:
            self.pre_outer_step(self)
        buf = None
        for i, ((p, gi), a, s) in enumerate(zip(self.parts, self.anchors, self.d_sums)):
            if i in current:
                G = p.grad
            else:
                if buf is None:
                    buf = torch.empty(max(q.numel() for q, _ in self.parts), dtype=torch.float32, device=self.device)
                G = buf[:p.numel()].view_as(p)
            pseudo_gradient_from_sum(s, self.k, out=G, scale=scale)
            p.data.copy_(a)                    # M <- A
            p.grad = G
            self.client._adamw_step(p, self.group_list[gi])  # theta_{t+1}
            p.grad = None
            a.copy_(p.data)                    # A <- M
            s.zero_()
            if i not in current:
                self._lp_sync(i)               # DeepSpeed copied this partition earlier in this step()
        self.last_info = self.book.outer_info(inner_steps=self.k, pseudo_grad_norm=gnorm, clip_scale=scale)

    # -- bookkeeping -----------------------------------------------------------------------------
    def step_stats(self) -> dict:
        return self.book.pop_step(self.layout.sources)

    def state_dict(self) -> dict:
        return {
            "anchors": list(self.anchors),
            "d_sums": list(self.d_sums),
            "part_numels": [p.numel() for p, _ in self.parts],
            "kind": self.kind,
            "step_index": self.step_index,
            "micro": self.micro,
            "poisoned": self.poisoned,
            "gamma": self.gamma,
            "k": self.k,
            "stats": self.stats.counters(),
            "layout": self.layout.describe(),
            "config": asdict(self.cfg),
            **({"control_deltas": list(self.control.deltas)} if self.control is not None else {}),
        }

    def load_state_dict(self, sd: dict):
        check_resume(sd["layout"], self.layout.describe(), what="nexus.layout, sources, weights and number of ranks",
                     gradient_accumulation_steps=(sd["k"], self.k))
        numels = [p.numel() for p, _ in self.parts]
        if sd["part_numels"] != numels:
            raise NexusConfigError(
                f"checkpoint's Nexus anchor shards {sd['part_numels']} do not match this run's DeepSpeed partitions "
                f"{numels}: resume with the same ZeRO stage, number of ranks and model")
        for a, s in zip(self.anchors, sd["anchors"]):
            a.copy_(s)
        for d, s in zip(self.d_sums, sd.get("d_sums") or [None] * len(self.d_sums)):
            d.zero_() if s is None else d.copy_(s)
        self._legacy_delta = "d_sums" not in sd and bool(sd["micro"]) and bool(sd["gamma"])
        if self.control is not None:   # the control's random path R: the forward points of the rest of the step
            saved = sd.get("control_deltas")
            if saved is not None and [t.numel() for t in saved] == [d.numel() for d in self.control.deltas]:
                for d, t in zip(self.control.deltas, saved):
                    d.copy_(t)
            elif sd["micro"]:
                raise NexusConfigError(
                    "checkpoint was written in the middle of an outer step without nexus.control's random path: "
                    "resume from a checkpoint written between outer steps, or set nexus.control as it was saved")
            else:
                self.control.reset()
        self.step_index = sd["step_index"]
        self.book.load_state({"inner_steps": sd["micro"], "poisoned": sd["poisoned"], "gamma_t": sd["gamma"],
                              "stats": sd["stats"]})
        self.loaded = True

    def after_load(self, restored: bool):
        """After DeepSpeed loaded a checkpoint: between outer steps the master weights are the anchor (this
        also repairs masters restored from bf16 when load_from_fp32_weights=false); a load without optimizer
        state starts a fresh outer step from the loaded weights."""
        if not restored:
            for (p, _), a, s in zip(self.parts, self.anchors, self.d_sums):
                a.copy_(p.data)
                s.zero_()
            self.book.inner_steps, self.book.poisoned = 0, False
        elif self._legacy_delta:   # a mid-step checkpoint written before d_sums: S = (M - A) / -gamma
            for (p, _), a, s in zip(self.parts, self.anchors, self.d_sums):
                torch.sub(p.data, a, out=s).div_(-self.gamma)
            self._legacy_delta = False
        elif self.micro == 0:
            for (p, _), a in zip(self.parts, self.anchors):
                p.data.copy_(a)
        self._sync_all()

    def shard_report(self) -> dict:
        """Per-rank element counts of DeepSpeed's fp32 master partitions, the Nexus anchor and AdamW's state."""
        st = self.client.state
        return {
            "kind": self.kind,
            "dp_size": self.groups.dp_size,
            "master_numel": sum(p.numel() for p, _ in self.parts),
            "anchor_numel": sum(a.numel() for a in self.anchors),
            "d_sum_numel": sum(s.numel() for s in self.d_sums),
            "exp_avg_numel": sum(st[p]["exp_avg"].numel() for p, _ in self.parts if "exp_avg" in st[p]),
            "exp_avg_sq_numel": sum(st[p]["exp_avg_sq"].numel() for p, _ in self.parts if "exp_avg_sq" in st[p]),
            "num_params": self.num_params,
        }


class _OuterStepScheduler:
    """Stands in for the lr scheduler inside DeepSpeed: DeepSpeed calls step() after every optimizer step
    (= every Nexus micro-step) and that call does nothing; the Nexus engine calls ``outer_step()`` once per
    applied outer step. Everything else (state_dict, load_state_dict, get_last_lr, ...) is the real one's."""

    def __init__(self, real):
        self.real = real

    def step(self, *args, **kwargs):
        return None

    def outer_step(self):
        self.real.step()

    def state_dict(self):
        return self.real.state_dict()

    def load_state_dict(self, sd):
        return self.real.load_state_dict(sd)

    def __getattr__(self, name):
        return getattr(self.__dict__["real"], name)


def _atomic_save(ds_engine, save_dir, tag, client_state, save_latest, step=None, run=None, full_state=None, **kw):
    """DeepSpeed's save_checkpoint, published atomically and durably. Every rank writes its files into
    ``save_dir/.tmp-<tag>/`` and fsyncs each one as soon as it is written; after a barrier (every rank's
    files exist) the publishing rank fsyncs the directory, renames it to ``save_dir/<tag>/`` and then
    replaces ``latest`` atomically. (DeepSpeed alone writes into ``<tag>/`` directly and writes ``latest``
    from rank 0 before the other ranks' optimizer files are known to be complete, so a job killed in between
    would leave a partial checkpoint under a loadable name.) ``step``: the outer step, for the fault hook;
    ``run``: the run's record, written to ``meta.json`` in the checkpoint (nexus_megatron/resume.py). A full disk
    is a one-line CheckpointError (checkpoint.disk_full_guard). ``full_state``: the run's state as full tensors
    (reshard.py): each rank writes its shard next to DeepSpeed's files, then the publisher the rest, so the
    checkpoint loads on other ranks."""
    ce = ds_engine.checkpoint_engine
    if ce.is_decoupled():
        raise NexusConfigError("the ds_config's checkpoint writer (checkpoint.writer.decoupled=true, or datastates) "
                               "writes files in the background after save_checkpoint returns, so the checkpoint cannot "
                               "be published atomically: remove it from the ds_config")
    tag = str(tag)
    tmp = os.path.join(save_dir, f".tmp-{tag}")
    # DeepSpeed's own choice of writer rank: the first rank of each node with node-local storage
    publisher = (ds_engine.local_rank if ds_engine.use_node_local_storage() else dist.get_rank()) == 0
    if publisher:
        shutil.rmtree(tmp, ignore_errors=True)   # a previous attempt killed mid-write
    dist.barrier()
    written = []
    real_save = ce.save

    def save_and_fsync(state_dict, path):
        real_save(state_dict, path)
        _ckpt.fsync_path(path)
        written.append(path)
        if step is not None and len(written) == 1:
            fault_point("checkpoint", step)

    ce.save = save_and_fsync
    need = sum(getattr(p, "ds_numel", p.numel()) * 4 for p in ds_engine.module.parameters()) * 4   # fp32 params + master + Adam
    final = os.path.join(save_dir, tag)
    try:
        with _ckpt.disk_full_guard(save_dir, final, need):
            ok = ds_engine.save_checkpoint(save_dir, tag=os.path.basename(tmp), client_state=client_state,
                                           save_latest=False, **kw)
        if full_state is not None:
            with _ckpt.disk_full_guard(save_dir, final, need):
                os.makedirs(tmp, exist_ok=True)
                write_full_state_shard(tmp, full_state)
    finally:
        del ce.save   # the engine's own method again
    dist.barrier()
    if publisher:   # the format marker: every file in it loads with weights_only=True (safe_load.py)
        with _ckpt.disk_full_guard(save_dir, final, need):
            _ckpt.atomic_write_text(os.path.join(tmp, MARKER_FILE), marker_text())
            if full_state is not None:
                write_full_state(tmp, full_state)
            _ckpt.write_meta(tmp, step if step is not None else -1, run)
            _ckpt.publish_dir(tmp, final)
            if save_latest:
                _ckpt.atomic_write_text(os.path.join(save_dir, "latest"), tag)
    dist.barrier()
    return ok


def _quiet_deepspeed_save_writers(ds_engine, sp: bool, my_source: Optional[int]):
    """Source-parallel: every source group holds the same state and has the same data-parallel ranks, so only
    source group 0 writes files (otherwise two ranks would write the same file name at once)."""
    if sp and my_source:
        ds_engine.save_non_zero_checkpoint = False
        ds_engine.save_zero_checkpoint = False


def _broadcast_model(model):
    """Start every rank from rank 0's weights (source groups are separate DeepSpeed data-parallel groups,
    so DeepSpeed's own broadcast would not make them agree)."""
    for t in model.parameters():
        if hasattr(t, "ds_id"):
            raise NexusConfigError("the model was built under deepspeed.zero.Init: build it normally (ZeRO-3 "
                                   "partitions it in initialize()), the Nexus adapter does not support zero.Init yet")
    if dist.get_world_size() == 1:
        return
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device == device or device.type == "cpu":
                dist.broadcast(t.data, src=0)
            else:   # NCCL cannot broadcast CPU tensors: go through the accelerator
                tmp = t.data.to(device)
                dist.broadcast(tmp, src=0)
                t.data.copy_(tmp)


# ---------------------------------------------------------------------------------------------------
# the engine a user drives

class NexusDeepSpeedEngine:
    """What :func:`initialize` returns: DeepSpeed's engine with Nexus's ``step()``.

    Use it exactly like a DeepSpeed engine::

        for batch in loader:                      # one micro-batch per call, of engine.source_for_micro_step()
            loss = engine(batch)
            engine.backward(loss)
            engine.step()                         # every k-th call is the outer step

    Everything not defined here (``module``, ``train()``, ``eval()``, ``get_lr()``, ``local_rank``,
    ``save_16bit_model()``, ...) is DeepSpeed's engine's. DeepSpeed's own counters (``global_steps``,
    ``global_samples``) count micro-steps; :attr:`outer_steps` counts outer steps.
    """

    def __init__(self, ds_engine, client: NexusAdamW, core: _NexusCore, prepared: PreparedConfig, scheduler):
        self.__dict__.update(_ds=ds_engine, client=client, _core=core, prepared=prepared, _sched=scheduler)
        self.last_outer_info: Optional[dict] = None

    def __getattr__(self, name):
        return getattr(self.__dict__["_ds"], name)

    def __call__(self, *args, **kwargs):
        return self._ds(*args, **kwargs)

    forward = __call__

    # -- what a DeepSpeed user calls ------------------------------------------------------------
    @property
    def ds_engine(self):
        """DeepSpeed's own engine."""
        return self._ds

    @property
    def nexus_config(self) -> NexusConfig:
        return self._core.cfg

    @property
    def layout(self) -> SourceLayout:
        return self._core.layout

    def backward(self, loss, **kwargs):
        return self._ds.backward(loss, **kwargs)

    def step(self, lr_kwargs=None) -> Optional[dict]:
        """One micro-step (DeepSpeed's step: reduce, then the Nexus inner step on the master partitions).
        Every k-th call is also the outer step; it returns the outer step's info
        (``skipped``, ``gamma``, ``pseudo_grad_norm``), the other calls return None."""
        core = self._core
        pg = core.param_gather
        if pg is not None:
            pg.wait_all()           # the previous micro-step's gather (its forward waited for what it used)
        core.begin_micro()
        try:
            with (pg.intercept() if pg is not None else contextlib.nullcontext()):
                self._ds.step(lr_kwargs=lr_kwargs)
        finally:
            core.in_step = False
        info = core.end_micro()
        if info is None:
            return None
        if not info["skipped"] and self._sched is not None:
            self._sched.outer_step()
        self.last_outer_info = info
        core.book.check_abort()
        return info

    def sync_model_params(self):
        """With ``nexus.overlap_param_gather``: finish the parameter all-gather of the last step() now. A
        forward pass does this by itself, bucket by bucket; call it before reading the module's parameters
        any other way between a step() and the next forward (saves and loads call it). Otherwise a no-op."""
        if self._core.param_gather is not None:
            self._core.param_gather.wait_all()

    def is_gradient_accumulation_boundary(self) -> bool:
        """True when the next step() is the outer step (the k-th micro-step)."""
        return self._core.micro == self._core.k - 1

    def gradient_accumulation_steps(self) -> int:
        return self._core.k

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.prepared.micro_batch

    def train_batch_size(self) -> int:
        return self.prepared.micro_batch * self._core.k * dist.get_world_size()

    def source_for_micro_step(self) -> int:
        """Index (into ``layout.sources``) of the source this rank reads for the next micro-step."""
        return self._core.source_for()

    def source_name(self) -> str:
        return self._core.layout.sources[self.source_for_micro_step()]

    def readers(self):
        """(this rank's position among the ranks reading the current source, their number): shard the
        source's micro-batch by it (sequential: all ranks; source-parallel: the source group)."""
        c = self._core
        return c.layout.readers(c.source_for(), c.step_index, c.micro)

    @property
    def micro_step(self) -> int:
        """Micro-steps done in the current outer step (0..k-1)."""
        return self._core.micro

    @property
    def outer_steps(self) -> int:
        """Outer steps done (applied or skipped)."""
        return self._core.step_index

    @property
    def poisoned(self) -> bool:
        return self._core.poisoned

    def get_nexus_lr(self) -> float:
        return self._core.current_lr()

    def counters(self) -> dict:
        s = self._core.stats
        return {"outer_steps": s.outer_steps, "skipped_steps": s.skipped_steps, "skipped_sources": s.skipped_sources}

    def step_stats(self) -> dict:
        return self._core.step_stats()

    def shard_report(self) -> dict:
        return self._core.shard_report()

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, run=None, portable=True,
                        **kwargs):
        """DeepSpeed's save_checkpoint (collective). The Nexus state (anchor shards, counters, layout) is in
        the client optimizer's state, which DeepSpeed writes per rank; ``latest`` is written atomically after
        every rank finished, so a job killed during the save leaves the previous checkpoint loadable.
        ``portable``: also write the whole state as full tensors (reshard.py; 20 bytes per parameter on disk,
        dealt over the data-parallel ranks, each of which writes its share), so the checkpoint loads on another
        number of ranks. Default tag: ``global_step<outer steps>``."""
        if tag is None:
            tag = f"global_step{self._core.step_index}"
        self.sync_model_params()
        client_state = dict(client_state or {})
        publisher = (self._ds.local_rank if self._ds.use_node_local_storage() else dist.get_rank()) == 0
        full = gather_full_state(self._core, self._ds, client_state, publisher) if portable else None
        return _atomic_save(self._ds, save_dir, tag, client_state, save_latest, step=self._core.step_index, run=run,
                            full_state=full, **kwargs)

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        """DeepSpeed's load_checkpoint (collective); returns (path, client_state) like DeepSpeed. Every file
        is read with ``torch.load(weights_only=True)`` (:func:`.safe_load.safe_ds_load`)."""
        core = self._core
        core.loaded = False
        self.sync_model_params()
        ckpt_dir = self.checkpoint_dir(load_dir, tag)
        if ckpt_dir is not None and needs_reshard(core, self._ds, ckpt_dir):
            # written on another number of ranks: its full state, cut for this run's partitions (reshard.py)
            client_state = load_full_state(core, self._ds, ckpt_dir)
            core.after_load(restored=True)
            return ckpt_dir, client_state
        path, client_state = safe_ds_load(self._ds, load_dir, tag=tag, **kwargs)   # runs no pickled code
        if path is None:
            return None, None
        core.after_load(restored=getattr(core, "loaded", False))
        return path, client_state

    @staticmethod
    def checkpoint_dir(load_dir, tag=None) -> Optional[str]:
        """The directory of checkpoint ``tag`` (default: the one ``latest`` names), None when there is none."""
        if tag is None:
            found = _ckpt.read_latest(load_dir)
            if found is None:
                return None
            tag = found[1]
        d = os.path.join(load_dir, str(tag))
        return d if os.path.isdir(d) else None

    def resharded(self, load_dir, tag=None) -> bool:
        """True when checkpoint ``tag`` was written on other ranks than this run's (a resume reshards it)."""
        d = self.checkpoint_dir(load_dir, tag)
        return d is not None and needs_reshard(self._core, self._ds, d)


# ---------------------------------------------------------------------------------------------------
# public entry points

def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _num_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += int(getattr(p, "ds_numel", p.numel()))
    return n


def initialize(model, ds_config, layout_config: Optional[LayoutConfig] = None,
               nexus_config: Optional[NexusConfig] = None, *, optimizer=None, model_parameters=None,
               lr_scheduler=None, micro_steps: Optional[int] = None, layout: Optional[SourceLayout] = None,
               _prepared: Optional[PreparedConfig] = None) -> NexusDeepSpeedEngine:
    """Nexus on DeepSpeed. Collective: every rank calls it.

    ``ds_config``: the user's ds_config (path, JSON string or dict), unchanged, with an optional
    ``"nexus": {...}`` section (see docs/deepspeed.md). ``layout_config`` / ``nexus_config``: the layout
    and the inner-loop settings, if not (or also, consistently) in the ``nexus`` section.
    ``optimizer``: the outer AdamW: a fresh ``torch.optim.AdamW`` (its param groups and settings are
    reused), a dict of AdamW settings (with ``model_parameters``, default all trainable parameters), or
    None. ``lr_scheduler``: a scheduler or ``callable(optimizer)`` as in ``deepspeed.initialize`` (or a
    ``scheduler`` section in the ds_config); it advances once per outer step. ``micro_steps``: k, if the
    ds_config has no ``gradient_accumulation_steps`` (they must agree when both are given).

    Every setting is checked before DeepSpeed is initialised; a bad one raises NexusConfigError naming it.
    """
    prepared = _prepared or prepare_ds_config(ds_config, world_size=_world_size(), micro_steps=micro_steps,
                                              layout=layout_config if layout is None else layout.cfg,
                                              nexus=nexus_config)
    if lr_scheduler is not None and "scheduler" in prepared.ds:
        raise NexusConfigError("ds_config 'scheduler' section and initialize(lr_scheduler=...) both given: DeepSpeed "
                               "would silently use the latter; keep one")
    if prepared.k == 1:
        log.warning("Nexus with gradient_accumulation_steps=1 (k=1) is AdamW on the normalized gradient: there "
                    "is no inner loop and no alignment term; use k >= 2")
    if prepared.optimizer is not None:     # the ds_config's Adam/AdamW section is the outer AdamW
        if optimizer is not None:
            raise NexusConfigError("ds_config 'optimizer' section and initialize(optimizer=...) both given: "
                                   "keep one (DeepSpeed would silently use the latter)")
        optimizer = prepared.optimizer
    client = client_optimizer_from(optimizer, model, model_parameters)
    deepspeed = prepare_deepspeed_runtime()
    if layout is None:
        layout = build_layout(prepared.layout)
    groups = NexusGroups(layout)
    _broadcast_model(model)
    num_params = _num_params(model)
    ds_engine, _, _, sched = deepspeed.initialize(model=model, optimizer=client, lr_scheduler=lr_scheduler,
                                                  config=copy.deepcopy(prepared.ds), mpu=NexusMPU(groups))
    wrapped = None
    if sched is not None:
        wrapped = _OuterStepScheduler(sched)
        ds_engine.lr_scheduler = wrapped
    core = _NexusCore(layout, prepared.nexus, groups, k=prepared.k, clip=prepared.clip, num_params=num_params)
    core.bind(ds_engine, client)
    if prepared.overlap_param_gather:
        from .param_gather import DeferredParamGather
        core.param_gather = DeferredParamGather(ds_engine.optimizer, ds_engine.module, prepared.param_gather_bucket_size)
        if core.param_gather.num_buckets == 0:
            log.warning("nexus.overlap_param_gather: DeepSpeed's data-parallel group has one rank (source-parallel "
                        "with one rank per source), so there is no parameter all-gather to overlap")
    _quiet_deepspeed_save_writers(ds_engine, core.sp, core.my_source)
    return NexusDeepSpeedEngine(ds_engine, client, core, prepared, wrapped)


# ---------------------------------------------------------------------------------------------------
# the trainer's Engine (nexus-megatron train --set train.engine=deepspeed)

def _tags(root):
    try:
        return sorted(d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d)))
    except FileNotFoundError:
        return []


def _latest_tag(ckpt_root) -> Optional[str]:
    found = _ckpt.read_latest(ckpt_root)
    if found is None:
        return None
    pointer, tag = found
    if not tag or not os.path.isdir(os.path.join(ckpt_root, tag)):
        raise CheckpointError(f"{pointer} names {tag!r} but {os.path.join(ckpt_root, tag)} does not exist: point "
                              "'latest' at an existing step_* directory, or start a new run_dir (train.resume=false "
                              "starts over)")
    return tag


def _check_rank_files(ckpt_root, tag, dp_world: int) -> None:
    """Every data-parallel rank's ``zero_pp_rank_<r>_*`` file is in checkpoint ``tag`` (a missing one would be a
    FileNotFoundError inside DeepSpeed on that rank only). ``dp_world``: DeepSpeed's data-parallel size, which
    names the files (source-parallel: the size of one source group, whose ranks write the same names)."""
    d = os.path.join(ckpt_root, tag)
    world = int(dp_world)
    by_kind: dict = {}
    for name in os.listdir(d):
        m = re.match(r"zero_pp_rank_(\d+)_(.+)$", name)
        if m:
            by_kind.setdefault(m.group(2), set()).add(int(m.group(1)))
    for kind, ranks in sorted(by_kind.items()):
        missing = sorted(set(range(world)) - ranks)
        if missing:
            raise CheckpointError(
                f"checkpoint {d} is incomplete: {os.path.join(d, f'zero_pp_rank_{missing[0]}_{kind}')} (rank "
                f"{missing[0]}'s file) is missing; delete {d} and point 'latest' at an earlier step_* directory, or "
                "start a new run_dir")


def _check_same_world(ckpt_root, tag, why: str) -> None:
    """A checkpoint that only DeepSpeed's per-rank files can restore must be resumed on the number of ranks that
    wrote it (the run's record in meta.json says how many): otherwise a one-line CheckpointError saying ``why``."""
    d = os.path.join(ckpt_root, tag)
    meta = _ckpt.read_meta(d) or {}
    saved = ((meta.get("run") or {}).get("world") or {}).get("size")
    now = _world_size()
    if saved is not None and int(saved) != now:
        raise CheckpointError(f"checkpoint {d} was written on {saved} ranks and cannot be loaded on {now}: {why}; "
                              f"resume it on {saved} ranks, or start a new train.run_dir")


def _outer_param_groups(cfg, model):
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    o = cfg.optim
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class DeepSpeedNexusEngine(Engine):
    """The trainer's Engine for optim.name=nexus on DeepSpeed."""

    name = "deepspeed"
    supports_probe = False

    def __init__(self, cfg, model, layout, lr_lambda, prepared: PreparedConfig):
        o = cfg.optim
        client = NexusAdamW(_outer_param_groups(cfg, model), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.nexus = initialize(model, None, optimizer=client,
                                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
                                layout=layout, _prepared=prepared)
        self.module = _OnDevice(self.nexus.ds_engine)
        self.layout = layout
        # the trainer's gradient probe needs full parameters on the module: ZeRO 0-2 (ZeRO-3 partitions them)
        self.supports_probe = prepared.zero_stage <= 2
        self.params = [p for p in self.nexus.ds_engine.module.parameters() if p.requires_grad]
        self.probe_module = self.nexus.ds_engine.module   # bypasses the engine's backward bookkeeping

    def backward(self, loss):
        self.nexus.backward(loss)

    def micro_step(self, source):
        want = self.nexus.source_for_micro_step()
        if source != want:
            raise RuntimeError(f"micro_step(source={source}) but the layout assigns source {want} to this rank")
        self.nexus.step()

    def outer_step(self):
        info = self.nexus.last_outer_info
        if info is None:
            raise RuntimeError("outer_step() before k micro_step() calls")
        self.nexus.last_outer_info = None
        return info

    def lr(self):
        return self.nexus.get_nexus_lr()

    def counters(self):
        c = self.nexus.counters()
        return {"skipped_steps": c["skipped_steps"], "skipped_sources": c["skipped_sources"]}

    def step_stats(self):
        return self.nexus.step_stats()

    def sharpness_seam(self):
        """Critical sharpness inside the outer step (engines/deepspeed/sharpness.py)."""
        from .sharpness import nexus_seam
        return nexus_seam(self)

    def save(self, ckpt_root, step, client_state):
        tag = f"step_{step:08d}"
        self.nexus.save_checkpoint(ckpt_root, tag=tag, client_state={_TRAINER_KEY: client_state},
                                   run=client_state.get("run"))
        _engine_save_prune(ckpt_root, tag)

    def load(self, ckpt_root):
        tag = _latest_tag(ckpt_root)
        if tag is None:
            return None
        if not self.nexus.resharded(ckpt_root, tag):   # the same ranks: DeepSpeed's per-rank files
            _check_same_world(ckpt_root, tag, "it was written before checkpoints carried the full state "
                              "(nexus_full_state.pt)")
            _check_rank_files(ckpt_root, tag, self.nexus.ds_engine.dp_world_size)
        _, client_state = self.nexus.load_checkpoint(ckpt_root, tag=tag)
        return client_state[_TRAINER_KEY]


class _OnDevice:
    """The trainer's ``engine.module``: DeepSpeed's engine, with tensor arguments moved to its device (the
    trainer builds its batches on the CPU)."""

    def __init__(self, ds_engine):
        self.__dict__["_eng"] = ds_engine

    def __call__(self, *args, **kwargs):
        dev = self._eng.device
        mv = (lambda v: v.to(dev) if torch.is_tensor(v) and v.device != dev else v)
        return self._eng(*[mv(a) for a in args], **{k: mv(v) for k, v in kwargs.items()})

    def __getattr__(self, name):
        return getattr(self.__dict__["_eng"], name)


# The trainer's client_state has keys DeepSpeed reserves in its checkpoint dict ("optimizer": at stage 0 it
# would overwrite the optimizer state), so the trainer engines store it under one key of their own.
_TRAINER_KEY = "nexus_megatron_trainer_state"


def _engine_save_prune(ckpt_root, tag, keep=2):
    if dist.get_rank() == 0:
        others = [t for t in _tags(ckpt_root) if t != tag]
        for old in others[:max(len(others) - (keep - 1), 0)]:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    dist.barrier()


class DeepSpeedAdamWEngine(Engine):
    """The trainer's Engine for the AdamW baseline on DeepSpeed: DeepSpeed's own gradient accumulation
    (gradient_accumulation_steps = k), clipping and scheduler, on exactly the data Nexus sees (in the
    source-parallel layout each rank's loss is scaled by w_i * K so that DeepSpeed's data-parallel mean is
    the weighted mixture, like the plain engine's MixtureAdamW)."""

    name = "deepspeed"
    supports_probe = False

    def __init__(self, cfg, model, layout, lr_lambda, prepared: PreparedConfig):
        deepspeed = prepare_deepspeed_runtime()
        o = cfg.optim
        opt = torch.optim.AdamW(_outer_param_groups(cfg, model), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        groups = NexusGroups()
        _broadcast_model(model)
        self.ds, self.opt, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, config=copy.deepcopy(prepared.ds), mpu=NexusMPU(groups),
            lr_scheduler=lambda op: torch.optim.lr_scheduler.LambdaLR(op, lr_lambda))
        self.module = _OnDevice(self.ds)
        self.supports_probe = prepared.zero_stage <= 2
        self.params = [p for p in self.ds.module.parameters() if p.requires_grad]
        self.probe_module = self.ds.module
        self.scale = 1.0
        if layout.mode == "source-parallel":
            self.scale = float(layout.weights[layout.my_source]) * layout.num_sources
        self.k = prepared.k
        self._micro = 0
        self._info = None

    def backward(self, loss):
        self.ds.backward(loss * self.scale if self.scale != 1.0 else loss)

    def micro_step(self, source):
        self.ds.step()
        self._micro += 1
        if self._micro == self.k:
            self._micro = 0
            info = {"skipped": not getattr(self.ds, "_step_applied", True)}
            n = self.ds.get_global_grad_norm()
            if n is not None:
                n = float(n)
                if math.isfinite(n):
                    info["grad_norm"] = n
            self._info = info

    def outer_step(self):
        info, self._info = self._info, None
        return info

    def lr(self):
        return float(self.ds.get_lr()[0])

    def counters(self):
        return {"skipped_steps": int(self.ds.skipped_steps), "skipped_sources": 0}

    def sharpness_seam(self):
        """Critical sharpness right before DeepSpeed's AdamW update (engines/deepspeed/sharpness.py)."""
        from .sharpness import adamw_seam
        return adamw_seam(self)

    def save(self, ckpt_root, step, client_state):
        tag = f"step_{step:08d}"
        _atomic_save(self.ds, ckpt_root, tag, {_TRAINER_KEY: client_state}, True, step=step, run=client_state.get("run"))
        _engine_save_prune(ckpt_root, tag)

    def load(self, ckpt_root):
        tag = _latest_tag(ckpt_root)
        if tag is None:
            return None
        _check_same_world(ckpt_root, tag, "the AdamW baseline on DeepSpeed resumes only from DeepSpeed's per-rank "
                          "files (the Nexus engine's checkpoints also carry the full state)")
        _check_rank_files(ckpt_root, tag, self.ds.dp_world_size)
        _, client_state = safe_ds_load(self.ds, ckpt_root, tag=tag)   # runs no pickled code
        return client_state[_TRAINER_KEY]


def build_deepspeed_engine(cfg, model, layout, lr_lambda) -> Engine:
    """The trainer's DeepSpeed engine (``train.engine: deepspeed``; ds_config from ``train.deepspeed_config``,
    default ZeRO-2 fp32). Collective."""
    world = dist.get_world_size() if (dist.is_available() and dist.is_initialized()) else 1
    prepared = check_run_config(cfg, world_size=world)
    if cfg.optim.name == "adamw":
        return DeepSpeedAdamWEngine(cfg, model, layout, lr_lambda, prepared)
    return DeepSpeedNexusEngine(cfg, model, layout, lr_lambda, prepared)


__all__ = ["initialize", "build_deepspeed_engine", "NexusAdamW", "NexusDeepSpeedEngine", "NexusMPU",
           "NexusGroups", "prepare_deepspeed_runtime", "client_optimizer_from", "load_ds_config"]
