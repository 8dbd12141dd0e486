"""Nexus as a Megatron optimizer (ALGORITHMS.md §1.1 on megatron-core's ``MegatronOptimizer`` seam).

:class:`NexusMegatronOptimizer` wraps the optimizer that ``get_megatron_optimizer`` builds for Adam
(``ChainedOptimizer`` of ``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params`` /
``DistributedOptimizer``); that optimizer becomes the *outer* optimizer and is left untouched.

Why a wrapper and not a subclass: the three Megatron classes (and their chaining) differ in where the
fp32 main parameters live (the model parameters themselves, fp32 copies, or fp32 shards of the grad
buffer's data-parallel range), but all of them expose the same two-phase interface,
``prepare_grads()`` (copy the reduced gradient into ``main_param.grad``) and
``step_with_ready_grads()`` (Adam on the main params, copy to the model params, param all-gather),
and they all keep their main params in ``optimizer.param_groups``. Nexus needs exactly those seams:
between the two phases it reads the reduced gradient, moves the main params (inner step) or replaces
the gradient with the pseudo-gradient (outer step). Wrapping keeps Megatron's construction logic
(param groups, weight-decay masks, lr multipliers, sharding ranges, checkpoint formats) as is, for all
three classes, and needs no change to megatron-core.

One micro-step (``inner_step``), after a forward/backward pass and Megatron's gradient reduction
(``finalize_model_grads``; the layout's groups decide which ranks are reduced together)::

    inner.prepare_grads()                       # reduced gradient -> main_param.grad (fp32, shard)
    n_i  = compat.full_grad_norm(inner)         # Megatron's filters: TP duplicates and shared
                                                # embeddings counted once, reduced over the grad-stats
                                                # group (= the ranks holding source i's gradient); every
                                                # parameter, also 0.17+'s separate (MTP) grad-norm group
    coef = layout.exchange_norms(n_i^2, ...)    # w_i / n_i, weights renormalized, drop n_i < min
    d    = sum_i coef_i g_i                     # source-parallel: scaled shard all-reduced across blocks
    S    <- S + d                               # functional.accumulate_direction (exact displacement)
    main <- anchor - gamma * S                  # = anchor + delta (functional.moved_point)
    main -> model params (+ param all-gather)   # what the next forward pass sees (not after the last
                                                # micro-step: step() publishes, so k gathers per outer step)
    zero DDP grad buffers

With ``--overlap-param-gather`` (distributed optimizer) the all-gather after each inner step is not run
in ``inner_step``: the buckets are marked as changed and the next forward pass's pre-hooks (Megatron's own)
dispatch each bucket's all-gather asynchronously and wait for it right before its first use, exactly as
after Megatron's AdamW step, so the gather overlaps the next micro-step's forward. What reads the full
params outside a training forward gathers first: the ``pre_outer_step`` seam (when due), the sharpness
probes, :func:`~.checkpoint.save_checkpoint`; elsewhere call :func:`sync_model_params` (or Megatron-LM's
``disable_forward_pre_hook``, which its ``train()`` does around evaluation and saves).

The outer step (``step``), after ``k`` micro-steps::

    main.grad <- G = S / k                              # the pseudo-gradient, exact for every gamma_t >= 0
    main      <- anchor ; S <- 0                        # restore theta_t
    clip G (OptimizerConfig.clip_grad, Megatron's clip; compat.clip_grads_like_megatron: 0.17+
            clips the MTP group by its own norm, like Megatron's ChainedOptimizer.step)
    pre_outer_step(self)                                # optional seam (critical sharpness), see below
    Adam step on G ; main -> model (+ all-gather)
    anchor    <- main

The seam ``pre_outer_step`` (``fn(optimizer)``, like :class:`nexus_megatron.nexus.Nexus`'s) runs with the
main params at theta_t (= the anchor), the clipped G in ``main.grad`` and the Adam state before the step;
when the callback is due (``fn.due(optimizer)``, if it has one) the model params are first set to theta_t
on every rank (main -> model + param all-gather), so model and main params agree, as in the plain adapter.
It must leave all of that as it found it. :func:`step_with_pre_update` gives a plain Megatron (AdamW)
optimizer the same seam. ``post_outer_step`` (``fn(optimizer)``) runs after every outer step, taken or
skipped, before a run of skips aborts; Megatron-LM's loop uses it to log :meth:`step_stats`.

Memory: the anchor and ``S`` (the sum of the normalized directions, the exact displacement of
functional.py) are fp32 buffers shaped like this rank's main params: with the distributed optimizer two
extra fp32 *shards* (8/d bytes per parameter), without it two fp32 copies (8 bytes per parameter). G is
``S / k``, never ``(main - anchor) / (k gamma)`` (which loses up to ulp(theta)/2 per element and micro-step
times ``1 / (k gamma)``, §1.5), and at ``gamma_t = 0`` (lr 0 in a warmup) the same formula is the limit.

NaN/Inf: a non-finite gradient norm in any micro-step (or ``found_inf`` from Megatron's grad scaler)
poisons the outer step; ``step()`` then restores the anchor and returns ``(False, None, None)``, the
value Megatron's ``train_step`` treats as a skipped iteration (the lr scheduler is not advanced and the
Adam state is untouched).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ...errors import NexusConfigError
from ...functional import accumulate_direction, moved_point, pseudo_gradient_from_sum, sum_sq
from ...nexus import NexusConfig
from ...outer import BookViews, OuterBook, RandomDirectionControl, check_resume
from .compat import (clip_grads_like_megatron, full_grad_norm, is_tensor_parallel_duplicate,
                     prepare_model_params_for_param_sync as compat_prepare_param_sync)
from .groups import NexusGroups
from .version import check_megatron_core_version

from megatron.core.optimizer import MegatronOptimizer  # noqa: E402  (after the version module)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: E402
from megatron.core.optimizer.optimizer import (  # noqa: E402
    ChainedOptimizer,
    FP32Optimizer,
    MixedPrecisionOptimizer,
)
from megatron.core.transformer.module import param_is_not_shared  # noqa: E402

NEXUS_STATE_KEY = "nexus"


from .params import main_params as _main_params, optimizer_children as _children  # noqa: E402


def _overlapped(chunk) -> bool:
    """Megatron DDP chunk whose parameter all-gather is overlapped with the next forward
    (``--overlap-param-gather`` with the distributed optimizer)."""
    ddp = getattr(chunk, "ddp_config", None)
    return bool(ddp is not None and ddp.use_distributed_optimizer and ddp.overlap_param_gather
                and not getattr(ddp, "use_megatron_fsdp", False))


def _hooks_on(chunk) -> bool:
    """The forward pre-hooks that finish (and dispatch) the overlapped all-gather are registered (Megatron-LM
    disables them for its first iteration, for evaluation and for checkpoint saves)."""
    return bool(getattr(chunk, "use_forward_hook", False) and getattr(chunk, "remove_forward_pre_hook_handles", None))


def _bucket_groups(chunk) -> list:
    return list(chunk.bucket_groups) + list(getattr(chunk, "expert_parallel_bucket_groups", []))


def _wait_gathers(chunk) -> None:
    """Finish any all-gather still in flight (it reads the local shard that is about to be written)."""
    for bg in _bucket_groups(chunk):
        if bg.param_gather_handle is not None:
            bg.param_gather_handle.wait()
            bg.param_gather_handle = None


def _gather_now(chunk) -> None:
    """A synchronous all-gather of every bucket of an overlapped chunk (what Megatron's
    ``disable_forward_pre_hook(param_sync=True)`` does)."""
    _wait_gathers(chunk)
    chunk.start_param_sync(force_sync=True)      # no handle outstanding: a synchronous gather per bucket group


def _gather_later(chunk) -> None:
    """Mark every bucket of an overlapped chunk as changed since its last gather: the next forward's pre-hooks
    dispatch the all-gathers asynchronously bucket by bucket and wait for each right before its first use
    (exactly what happens after Megatron's own ``step_with_ready_grads``, whose ``finish_grad_sync`` reset
    the same flag). Without the hooks (Megatron-LM's first iteration) the gather runs now."""
    if not _hooks_on(chunk):
        _gather_now(chunk)
        return
    for bg in _bucket_groups(chunk):
        bg.param_gather_dispatched = False


def _ddp_chunks(children) -> list:
    seen, out = set(), []
    for child in children:
        if isinstance(child, DistributedOptimizer):
            for mc in child.model_chunks:
                if id(mc) not in seen:
                    seen.add(id(mc))
                    out.append(mc)
    return out


@torch.no_grad()
def sync_model_params(model_chunks) -> None:
    """Complete the model params now (collective over each chunk's data-parallel group): with
    ``--overlap-param-gather``, wait for the all-gathers in flight and gather the buckets that changed since
    their last gather. Call it before anything that reads full model params outside a training forward pass
    (checkpoint save, your own evaluation code without the pre-hooks, logging of weights). A no-op for chunks
    without the overlap (their gather is synchronous)."""
    for mc in model_chunks:
        if not _overlapped(mc):
            continue
        _wait_gathers(mc)
        for bg in _bucket_groups(mc):
            if not bg.param_gather_dispatched:
                bg.start_param_sync(force_sync=True)


@torch.no_grad()
def publish_main_params(children, *, defer_gather: bool = False) -> None:
    """Main params -> model params, and the param all-gather of the distributed optimizer: what Megatron's
    ``step_with_ready_grads`` does after Adam (``children``: the non-chained Megatron optimizers).

    With ``--overlap-param-gather`` and ``defer_gather=True`` the all-gather is left to the next forward's
    pre-hooks (overlapped with it, as after Megatron's own step); with ``defer_gather=False`` it runs now, so
    the model params are complete on return (what a probe or a callback needs)."""
    chunks = _ddp_chunks(children)
    for mc in chunks:
        if _overlapped(mc):
            _wait_gathers(mc)
    for child in children:
        if isinstance(child, MixedPrecisionOptimizer) and not child.is_stub_optimizer:
            child._copy_main_params_to_model_params()
    for child in children:
        compat_prepare_param_sync(child)              # compat: 0.17+ staging before an explicit param sync
    for mc in chunks:
        if not _overlapped(mc):
            mc.start_param_sync()
        elif defer_gather:
            _gather_later(mc)
        else:
            _gather_now(mc)


def _after_inner_step_with_ready_grads(children) -> None:
    """After a Megatron ``step_with_ready_grads`` (main -> model copied; the gather done unless overlapped):
    the overlapped chunks gather in the next forward, even if a callback gathered them before the step."""
    for mc in _ddp_chunks(children):
        if _overlapped(mc):
            _gather_later(mc)


def step_with_pre_update(optimizer: MegatronOptimizer, fn=None):
    """``optimizer.step()`` of a Megatron optimizer (FP32Optimizer, Float16OptimizerWithFloat16Params,
    DistributedOptimizer, ChainedOptimizer) with ``fn(optimizer)`` called right before the Adam update:
    after ``prepare_grads`` (the reduced gradient in ``main_param.grad``), the clipping and the zero count,
    i.e. Megatron's own ``step()`` with the call injected in front of ``step_with_ready_grads``. Not called
    when the step is skipped (inf/NaN found by the grad scaler). Returns what ``step()`` returns."""
    if fn is None:
        return optimizer.step()
    if isinstance(optimizer, NexusMegatronOptimizer):
        raise TypeError("step_with_pre_update: NexusMegatronOptimizer has its own seam, set "
                        "optimizer.pre_outer_step instead")
    real = optimizer.step_with_ready_grads

    def with_seam():
        fn(optimizer)
        ok = real()
        # fn may have gathered the (pre-step) params: the overlapped chunks must gather again
        _after_inner_step_with_ready_grads(_children(optimizer))
        return ok
    optimizer.step_with_ready_grads = with_seam          # an instance attribute, for this call only
    try:
        return optimizer.step()
    finally:
        del optimizer.step_with_ready_grads


class NexusMegatronOptimizer(BookViews, MegatronOptimizer):
    """Nexus around a Megatron optimizer (the outer optimizer, usually Adam from ``get_megatron_optimizer``).

    Args:
        inner: the MegatronOptimizer built by ``get_megatron_optimizer`` (with the layout's
            ``pg_collection`` for the source-parallel layout, see :func:`get_nexus_megatron_optimizer`).
        model_chunks: the DDP-wrapped model chunks (their grad buffers are zeroed after each micro-step).
        groups: the layout and its process groups (:func:`~.groups.build_nexus_groups`).
        nexus_config: inner step size and degenerate-case thresholds.
        micro_steps: k, the number of inner steps (forward/backward passes) per outer step.
        exact_displacement: accepted for compatibility and ignored: the displacement is always kept exactly
            (the module docstring).

    Usage (one outer step; :func:`~.schedule.nexus_forward_backward` does the loop for Megatron's
    schedules)::

        for m in range(k):
            forward_backward_func(..., num_microbatches=M)   # one pass = one micro-step
            optimizer.inner_step()
        ok, grad_norm, _ = optimizer.step()
    """

    def __init__(self, inner: MegatronOptimizer, model_chunks, groups: NexusGroups,
                 nexus_config: NexusConfig = NexusConfig(), *, micro_steps: int, exact_displacement: bool = False):
        check_megatron_core_version()
        if not (isinstance(micro_steps, int) and micro_steps >= 1):
            raise NexusConfigError(f"nexus micro_steps={micro_steps!r}: the number of inner steps per outer step "
                                   "must be an integer >= 1")
        self.inner = inner
        self.optimizer = getattr(inner, "optimizer", None) if not isinstance(inner, ChainedOptimizer) else None
        self.config = inner.config
        self.init_state_fn = getattr(inner, "init_state_fn", lambda *a, **k: None)
        self.model_chunks = list(model_chunks)
        self.groups = groups
        self.layout = groups.layout
        self.nexus_config = nexus_config
        self.micro_steps = micro_steps
        self.exact_displacement = True   # always (the argument is accepted for compatibility)
        self.children = _children(inner)
        self.is_stub_optimizer = all(getattr(c, "is_stub_optimizer", False) for c in self.children)
        self._validate()
        if groups.source_parallel:
            # Each source block holds a full replica of the sharded optimizer state (like an instance of
            # Megatron's partial distributed optimizer); the instance id makes block 0 the main replica
            # in dist_checkpointing (replica ids of the distributed optimizer's sharded state).
            for child in self.children:
                if isinstance(child, DistributedOptimizer):
                    child.distributed_optimizer_instance_id = self.layout.my_source
        self.book = OuterBook(self.layout.num_sources, micro_steps=micro_steps,
                              max_consecutive_skips=nexus_config.max_consecutive_skips, config=nexus_config)
        self._build_buffers()
        self.num_norm_params = self._count_norm_params()
        self.control: Optional[RandomDirectionControl] = None
        """``nexus.control=random_direction``: the random forward points (outer.py)."""
        if nexus_config.control != "none":
            self.control = RandomDirectionControl(nexus_config.control_seed, *self._fragments())
        self.iteration = 0
        self.last_norms: Optional[torch.Tensor] = None
        self.pre_outer_step = None
        self.post_outer_step = None
        """``fn(self)`` right before the outer Adam update (see the module docstring), e.g. the
        critical-sharpness hook (:mod:`.sharpness`)."""

    # ------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------
    def _validate(self):
        c = self.config
        if getattr(c, "fp16", False):
            raise NexusConfigError("nexus on Megatron: --fp16 is not supported (the dynamic loss scale would be "
                                   "updated once per micro-step); use --bf16")
        if getattr(c, "use_precision_aware_optimizer", False):
            raise NexusConfigError("nexus on Megatron: --use-precision-aware-optimizer is not supported (the main "
                                   "params live inside the fused Adam); remove the flag")
        if getattr(c, "optimizer_cpu_offload", False):
            raise NexusConfigError("nexus on Megatron: --optimizer-cpu-offload is not supported; remove the flag")
        if getattr(c, "overlap_param_gather_with_optimizer_step", False):
            raise NexusConfigError("nexus on Megatron: --overlap-param-gather-with-optimizer-step is not supported (it "
                                   "dispatches the all-gather from inside Megatron's chained step, which the inner "
                                   "steps do not run); use --overlap-param-gather alone")
        if getattr(c, "optimizer", "adam") != "adam":
            raise NexusConfigError(f"nexus on Megatron: the outer optimizer must be adam, got {c.optimizer!r}")
        for mc in self.model_chunks:
            ddp = getattr(mc, "ddp_config", None)
            if ddp is None:
                raise NexusConfigError("nexus on Megatron: model chunks must be wrapped in megatron.core's "
                                       "DistributedDataParallel")
            if ddp.overlap_param_gather and getattr(ddp, "reuse_grad_buf_for_mxfp8_param_ag", False):
                raise NexusConfigError("nexus on Megatron: --overlap-param-gather with MXFP8 params that reuse the "
                                       "grad buffer for the all-gather is not supported (Nexus zeroes the grad "
                                       "buffers after every micro-step); remove one of the two")
            if getattr(ddp, "use_megatron_fsdp", False):
                raise NexusConfigError("nexus on Megatron: Megatron FSDP is not supported; use the distributed optimizer")
            if ddp.num_distributed_optimizer_instances != 1:
                raise NexusConfigError(
                    "nexus on Megatron: leave --num-distributed-optimizer-instances at 1; the source-parallel layout "
                    "builds the per-source blocks itself (DDP's inter-instance all-reduce would sum the sources "
                    "before Nexus can normalize them)")
        for child in self.children:
            if not isinstance(child, (FP32Optimizer, MixedPrecisionOptimizer)):
                raise NexusConfigError(f"nexus on Megatron: unsupported inner optimizer {type(child).__name__}")
            if getattr(child, "grad_scaler", None) is not None:
                raise NexusConfigError("nexus on Megatron: a loss scaler (--loss-scale / fp16) is not supported; use "
                                       "bf16 or fp32 without --loss-scale")
            for p in _main_params(child):
                if p.dtype != torch.float32:
                    raise NexusConfigError(f"nexus on Megatron: main params must be fp32, got {p.dtype}")

    def _build_buffers(self):
        mains = [p for c in self.children for p in _main_params(c)]
        self._mains = mains
        self.numel = sum(p.numel() for p in mains)
        if mains:
            device = mains[0].device
        elif torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        self._device = device   # small collectives (norms, counts) live here: NCCL needs device tensors
        self.anchor = torch.empty(self.numel, dtype=torch.float32, device=device)
        self._anchor_views = self._views(self.anchor)
        self.d_sum = torch.zeros(self.numel, dtype=torch.float32, device=device)
        """sum_m d_m of this outer step on this rank's main params (the exact displacement)."""
        self._dsum_views = self._views(self.d_sum)
        self._load_anchor_from_main()

    def _views(self, flat):
        out, off = [], 0
        for p in self._mains:
            n = p.numel()
            out.append(flat[off:off + n].view_as(p))
            off += n
        return out

    def _fragments(self) -> list:
        """Where this rank's main params sit in the model's flat parameter vector (the model chunks' parameters in
        order): ``(numel of that vector, buffers, [(main index, offset, lo, hi)])``, the arguments of
        :class:`~nexus_megatron.outer.RandomDirectionControl`. Data parallelism only (the full logical vector is one
        rank's model)."""
        from megatron.core import parallel_state as ps
        if ps.get_tensor_model_parallel_world_size() > 1 or ps.get_pipeline_model_parallel_world_size() > 1:
            raise NexusConfigError(f"nexus.control={self.nexus_config.control} on Megatron is implemented for data "
                                   "parallelism only (no tensor/pipeline model parallelism): set nexus.control=none")
        offsets, off = {}, 0
        for mc in self.model_chunks:
            for p in getattr(mc, "module", mc).parameters():
                if p.requires_grad and id(p) not in offsets:
                    offsets[id(p)] = off
                    off += p.numel()
        where = {}   # id(main param) -> (model param, start, end within it)
        for child in self.children:
            if isinstance(child, DistributedOptimizer):
                for models, shards in ((child.model_fp32_groups, child.shard_fp32_groups),
                                       (child.model_float16_groups, child.shard_fp32_from_float16_groups)):
                    for mg, sg in zip(models, shards):
                        for mp, sp in zip(mg, sg):
                            r = child._get_model_param_range_map(mp)["param"]
                            where[id(sp)] = (mp, r.start, r.end)
            elif isinstance(child, FP32Optimizer):
                for p in _main_params(child):
                    where[id(p)] = (p, 0, p.numel())
            else:    # Float16OptimizerWithFloat16Params: fp32 copies of the model params
                for mg, fg in zip(child.float16_groups, child.fp32_from_float16_groups):
                    for mp, fp in zip(mg, fg):
                        where[id(fp)] = (mp, 0, mp.numel())
                for fg in child.fp32_from_fp32_groups:
                    for p in fg:
                        where[id(p)] = (p, 0, p.numel())
        out = []
        for b, p in enumerate(self._mains):
            mp, start, end = where[id(p)]
            out.append((b, 0, offsets[id(mp)] + start, offsets[id(mp)] + end))
        return off, self._mains, out

    def _count_norm_params(self) -> int:
        """Number of logical parameters in the norm (TP duplicates and shared params once): the P of
        gamma_mode='update'."""
        total = 0
        for child in self.children:      # the dense and the expert optimizer (MoE) each over their own groups
            n = 0
            for p in _main_params(child):
                if param_is_not_shared(p) and not is_tensor_parallel_duplicate(p, child):
                    n += p.numel()
            t = torch.tensor([float(n)], dtype=torch.float64, device=self._device)
            group = child.get_grad_stats_parallel_group()
            if dist.is_initialized():
                dist.all_reduce(t, group=group)
            total += int(t.item())
        return total

    # ------------------------------------------------------------------------------------------
    # small helpers
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _load_anchor_from_main(self):
        if self._mains:
            torch._foreach_copy_(self._anchor_views, [p.detach() for p in self._mains])
        self.d_sum.zero_()

    @torch.no_grad()
    def _restore_anchor(self):
        if self._mains:
            torch._foreach_copy_([p.data for p in self._mains], self._anchor_views)
        self.d_sum.zero_()
        if getattr(self, "control", None) is not None:
            self.control.reset()

    def _publish(self, defer_gather: bool = True):
        """Main params -> model params, and the param all-gather of the distributed optimizer (what
        ``step_with_ready_grads`` does after Adam). With ``--overlap-param-gather`` and ``defer_gather`` the
        gather is overlapped with the next forward pass (its pre-hooks), as after Megatron's own step."""
        publish_main_params(self.children, defer_gather=defer_gather)

    def sync_model_params(self):
        """Complete the model params now (see :func:`sync_model_params`): needed with
        ``--overlap-param-gather`` before reading full model params outside a training forward pass."""
        sync_model_params(self.model_chunks)

    def _zero_grad_buffers(self):
        for mc in self.model_chunks:
            mc.zero_grad_buffer()

    def current_lr(self) -> float:
        for g in self.param_groups:
            if g.get("params"):
                return float(g["lr"])
        groups = self.param_groups
        return float(groups[0]["lr"]) if groups else 0.0

    def source_for(self, micro: int) -> int:
        """The source this rank reads in micro-step ``micro`` of the current outer step."""
        return self.layout.source_for(self.iteration, micro)

    def readers(self, micro: int) -> tuple:
        src = self.source_for(micro)
        return self.layout.readers(src, self.iteration, micro)

    # ------------------------------------------------------------------------------------------
    # the algorithm
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def inner_step(self, source: Optional[int] = None):
        """One micro-step, after a forward/backward pass whose gradients Megatron has reduced
        (``finalize_model_grads``). Moves the main and model params to ``anchor + delta`` and zeroes the
        DDP grad buffers. Collective over the whole job. Returns the per-source norms (fp64 [K])."""
        book = self.book
        k = self.micro_steps
        if book.inner_steps == 0 and not book.poisoned:
            # theta_t is whatever the main params hold when the outer step begins. Between outer steps they
            # equal the anchor, unless something outside the optimizer set them: Megatron-LM's checkpoint load
            # without the optimizer state (--finetune, --no-load-optim) writes the model params (= the fp32
            # main params, or their views) and tells no one. One copy per outer step keeps the anchor honest.
            self._load_anchor_from_main()
        gamma = book.begin_micro(self.current_lr(), self.num_norm_params, who="NexusMegatronOptimizer.inner_step")
        m = book.inner_steps
        if book.poisoned:   # the outer step is lost already (the same on every rank): no collectives
            book.end_micro()
            self.inner.zero_grad(set_to_none=True)
            self._zero_grad_buffers()
            return self.last_norms
        layout = self.layout
        sp = self.groups.source_parallel
        src = self.source_for(m) if source is None else int(source)
        if sp and src != layout.my_source:
            raise RuntimeError(f"source-parallel: this rank reads source {layout.my_source}, not {src}")
        found_inf = bool(self.inner.prepare_grads())
        norm = float(full_grad_norm(self.inner))      # compat: every parameter, also 0.17+'s MTP group
        # each rank of the cross group holds its source's full norm (Megatron reduced it over the grad-stats group)
        red, coef = layout.exchange_norms(norm * norm if math.isfinite(norm) else float("nan"), src,
                                          groups=(self.groups.cross_group,) if sp else (), nonfinite=found_inf,
                                          min_grad_norm=self.nexus_config.min_grad_norm, device=self._device)
        norms = red.norms
        self.last_norms = norms
        book.end_micro()
        if book.record(red.norms, red.present, red.active, red.nonfinite):
            self._move(float(coef[src]), sp)
            if gamma and m < k - 1:
                # After the last inner step no pass runs before step(), which reads the main params and
                # publishes theta_{t+1} (or theta_t for the pre_outer_step seam): no copy, no all-gather.
                self._publish()
        # The gradient is consumed: clear main_param.grad / param.grad (FP32Optimizer points param.grad at
        # the DDP buffer; autograd would accumulate into it on the next backward) and the DDP buffers.
        self.inner.zero_grad(set_to_none=True)
        self._zero_grad_buffers()
        return norms

    def _move(self, c: float, sp: bool):
        """main <- main - gamma * d, with d = sum_i coef_i g_i (this rank's shard)."""
        mains = self._mains
        if not mains:
            if sp and self.groups.cross_group is not None:   # still take part in the collective
                dist.all_reduce(torch.zeros(0, device=self._device), group=self.groups.cross_group)
            if self.control is not None and dist.is_initialized():
                dist.all_reduce(torch.zeros((), dtype=torch.float64, device=self._device),
                                group=self.children[0].get_grad_stats_parallel_group())
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in mains]
        if sp and self.groups.cross_group is not None:
            flat = _flatten_dense_tensors(grads)
            flat.mul_(c)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.groups.cross_group)
            d, c = _unflatten_dense_tensors(flat, grads), 1.0
        else:
            d = grads
        gamma = self.gamma_t
        for s, g in zip(self._dsum_views, d):
            accumulate_direction(s, g, c)                       # S <- S + d
        if self.control is not None:   # the control: main <- anchor + R, r_m of the norm of the full d
            sq = (sum_sq(d) * (c * c)).to(self._device)
            if dist.is_initialized():
                dist.all_reduce(sq, group=self.children[0].get_grad_stats_parallel_group())
            self.control.inner_step(self.iteration, self.book.inner_steps, math.sqrt(float(sq)), gamma)
            for i, (p, a) in enumerate(zip(mains, self._anchor_views)):
                self.control.moved_point(i, a, out=p.data)
        elif gamma:   # gamma_t = 0 (lr 0): the inner steps do not move; G = S / k is the limit
            for p, a, s in zip(mains, self._anchor_views, self._dsum_views):
                moved_point(a, s, gamma, out=p.data)           # main <- anchor - gamma S

    # -- MegatronOptimizer interface --------------------------------------------------------------
    @torch.no_grad()
    def prepare_grads(self) -> bool:
        """Outer step, first half: main.grad <- G, main <- anchor. Returns True if the step is poisoned
        (NaN/Inf in a micro-step); then the params are already back at the anchor."""
        k = self.micro_steps
        self.book.check_complete("NexusMegatronOptimizer.step")
        if self.poisoned:
            self._restore_anchor()
            self._publish()
            return True
        for i, p in enumerate(self._mains):
            if p.grad is None or p.grad.dtype != torch.float32 or p.grad.shape != p.shape:
                p.grad = torch.empty_like(p)
            pseudo_gradient_from_sum(self._dsum_views[i], k, out=p.grad)
        self._restore_anchor()
        return False

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        ok = self.inner.step_with_ready_grads()
        _after_inner_step_with_ready_grads(self.children)
        self._load_anchor_from_main()
        return ok

    @torch.no_grad()
    def step(self):
        """The outer step. Returns ``(update_successful, grad_norm, num_zeros_in_grad)`` like every
        MegatronOptimizer; ``grad_norm`` is the norm of the pseudo-gradient G before clipping."""
        poisoned = self.prepare_grads()
        if poisoned:
            self._end_step(skipped=True)
            return False, None, None
        grad_norm = self.inner.get_grad_norm()
        # compat: Megatron's own clipping on this version (0.17+: the MTP group by its own norm)
        clip_grads_like_megatron(self.inner, grad_norm)
        num_zeros = self.inner.count_zeros() if self.config.log_num_zeros_in_grad else None
        hook = self.pre_outer_step
        if hook is not None:
            due = getattr(hook, "due", None)
            if due is None or due(self):
                # The model params still hold the last inner point: give the callback theta_t everywhere.
                # (step_with_ready_grads overwrites them after Adam anyway, so this changes nothing else.)
                # The gather runs now, also with --overlap-param-gather: the callback reads the full params.
                self._publish(defer_gather=False)
            hook(self)
        ok = self.step_with_ready_grads()
        self._end_step(skipped=False)
        return ok, grad_norm, num_zeros

    def _end_step(self, skipped: bool):
        self.book.end_outer(skipped)
        self.iteration += 1
        if self.post_outer_step is not None:
            self.post_outer_step(self)
        self.book.check_abort()

    def step_stats(self) -> dict:
        """Per-source mean inner gradient norm of the last outer step, gamma, counters (then reset)."""
        out = self.book.pop_step(self.layout.sources)
        out["nexus/skipped_steps"] = self.stats.skipped_steps
        out["nexus/skipped_sources"] = self.stats.skipped_sources
        if self.gamma_t is not None:
            out["nexus/gamma"] = self.gamma_t
        return out

    # -- delegation ------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True):
        self.inner.zero_grad(set_to_none)

    def get_loss_scale(self):
        return self.inner.get_loss_scale()

    def get_grad_norm(self):
        return self.inner.get_grad_norm()

    def count_zeros(self):
        return self.inner.count_zeros()

    def get_parameters(self):
        return self.inner.get_parameters()

    # compat: 0.16 names it get_main_grads_for_grad_norm(), 0.17+ get_grads_for_grad_norm(grad_norm_group)
    def get_main_grads_for_grad_norm(self):
        return self.inner.get_main_grads_for_grad_norm()

    def get_grads_for_grad_norm(self, grad_norm_group=None):
        return self.inner.get_grads_for_grad_norm(grad_norm_group)

    def has_grad_norm_group(self, grad_norm_group):
        return self.inner.has_grad_norm_group(grad_norm_group)

    def prepare_model_params_for_param_sync(self):
        compat_prepare_param_sync(self.inner)

    def get_grad_stats_parallel_group(self):
        return self.inner.get_grad_stats_parallel_group()

    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner.param_groups = value

    @property
    def state(self):
        return self.inner.state

    @property
    def chained_optimizers(self):
        return self.children

    def reload_model_params(self, state_dict=None):
        self.inner.reload_model_params(state_dict)
        self._check_between_steps("reload_model_params")
        self._load_anchor_from_main()

    def offload_to_cpu(self):
        self.inner.offload_to_cpu()

    def restore_from_cpu(self):
        self.inner.restore_from_cpu()

    def save_parameter_state(self, filename: str):
        self._check_between_steps("save_parameter_state")
        self.inner.save_parameter_state(filename)

    def load_parameter_state(self, filename: str, *, update_legacy_format: bool = False):
        self.inner.load_parameter_state(filename, update_legacy_format=update_legacy_format)
        self._load_anchor_from_main()

    # -- checkpointing -----------------------------------------------------------------------------
    # Checkpoints are written between outer steps, where the anchor equals the main params exactly
    # (step() ends with anchor <- main). So the anchor is not stored: Megatron's own checkpoint of the
    # main params (every format: dist_checkpointing sharded, dp-zero, torch) is the anchor, and loading
    # re-reads it from the main params. The Nexus state proper is a few counters (common state).
    def _check_between_steps(self, what: str):
        if self.inner_steps != 0:
            raise RuntimeError(f"NexusMegatronOptimizer.{what}() in the middle of an outer step "
                               f"({self.inner_steps}/{self.micro_steps} inner steps done): checkpoint between "
                               "outer steps (after optimizer.step())")

    def nexus_state_dict(self) -> dict:
        stats = self.stats.counters()
        return {"iteration": self.iteration, "stats": stats, "gamma_t": self.gamma_t,
                "layout": self.layout.describe(), "micro_steps": self.micro_steps,
                "config": asdict(self.nexus_config)}

    def load_nexus_state_dict(self, sd: dict) -> None:
        check_resume(sd.get("layout"), self.layout.describe(),
                     what="--nexus-layout, sources, weights and data-parallel size")
        self.iteration = int(sd["iteration"])
        self.book.load_state({"gamma_t": sd.get("gamma_t"), "stats": sd.get("stats", {})})

    def state_dict(self):
        self._check_between_steps("state_dict")
        return {"inner": self.inner.state_dict(), NEXUS_STATE_KEY: self.nexus_state_dict()}

    @torch.no_grad()   # fp32 params + distributed optimizer: the main shards are views of the params
    def load_state_dict(self, state_dict):
        if isinstance(state_dict, dict) and NEXUS_STATE_KEY in state_dict:
            state_dict = dict(state_dict)
            nexus = state_dict.pop(NEXUS_STATE_KEY)
            inner = state_dict.pop("inner", state_dict)
            self.load_nexus_state_dict(nexus)
        else:
            inner = state_dict
        self.inner.load_state_dict(inner)
        self._sync_adam_steps()
        self.book.inner_steps, self.book.poisoned = 0, False
        self._load_anchor_from_main()

    def _sync_adam_steps(self):
        """DistributedOptimizer around torch's AdamW (no TE/Apex): its ``load_state_dict`` restores the
        Adam step count into one ``step`` tensor shared by every parameter's state, then the sharded
        param-state load copies the template's per-param ``step`` into it (megatron-core 0.16.1). Give every
        parameter its own tensor holding the checkpoint's step."""
        for child in self.children:
            if not isinstance(child, DistributedOptimizer) or child.is_stub_optimizer:
                continue
            steps = {float(g["step"]) for g in child.optimizer.param_groups if "step" in g and g["params"]}
            if len(steps) != 1:
                continue
            step = steps.pop()
            for st in child.optimizer.state.values():
                if "step" in st and torch.is_tensor(st["step"]):
                    # one tensor per parameter: a step tensor shared by all of them (what the load leaves
                    # behind) is incremented once per parameter by torch's foreach AdamW
                    st["step"] = torch.tensor(step, dtype=st["step"].dtype, device=st["step"].device)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
        """Megatron's sharded optimizer state plus the Nexus counters (common, non-sharded state)."""
        if not is_loading:
            self._check_between_steps("sharded_state_dict")
        else:
            # A DistributedOptimizer around torch's AdamW (no TE/Apex) cannot describe its state before the
            # first step (DistributedOptimizer.state_dict() reads the per-param 'step'); give it dummy
            # state with Megatron's own helper. The values are replaced by the checkpoint's.
            for child in self.children:
                if (isinstance(child, DistributedOptimizer) and not child.is_stub_optimizer
                        and len(child.optimizer.state) == 0):
                    child._init_optimizer_states_with_dummy_values()
        sd = self.inner.sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
        return {"inner": sd, NEXUS_STATE_KEY: self.nexus_state_dict()}

    def __getattr__(self, name):
        # Anything else Megatron's training code asks of its optimizer (e.g. save_parameter_state helpers,
        # data_parallel_group) is the wrapped optimizer's.
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self):
        return (f"NexusMegatronOptimizer(layout={self.layout.mode}, sources={list(self.layout.sources)}, "
                f"micro_steps={self.micro_steps}, inner={type(self.inner).__name__}"
                f"[{', '.join(type(c).__name__ for c in self.children)}])")


def get_nexus_megatron_optimizer(config, model_chunks, groups: NexusGroups, nexus_config: NexusConfig = NexusConfig(),
                                 *, micro_steps: int, config_overrides=None, exact_displacement: bool = False,
                                 **kwargs) -> NexusMegatronOptimizer:
    """``get_megatron_optimizer`` (Adam) with the layout's process groups, wrapped in Nexus.

    ``config`` is a megatron ``OptimizerConfig`` with ``optimizer='adam'`` (lr, betas, eps, weight decay,
    clip_grad, bf16, use_distributed_optimizer: the outer optimizer's settings)."""
    from megatron.core.optimizer import get_megatron_optimizer

    check_megatron_core_version()
    if groups.pg_collection is not None:
        kwargs.setdefault("pg_collection", groups.pg_collection)
        kwargs["use_gloo_process_groups"] = False
    inner = get_megatron_optimizer(config, list(model_chunks), config_overrides=config_overrides, **kwargs)
    return NexusMegatronOptimizer(inner, model_chunks, groups, nexus_config, micro_steps=micro_steps,
                                  exact_displacement=exact_displacement)
