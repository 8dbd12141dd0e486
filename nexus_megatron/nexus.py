"""Nexus (ALGORITHMS.md §1.1): the settings and the plain-PyTorch optimizer.

One outer step ``t`` with anchor ``theta_t`` (fp32), sources with weights ``w_i``, inner step ``gamma``
and ``k`` micro-steps::

    delta <- 0
    for m in 1..k:
        params <- theta_t + delta                      # what the forward pass sees
        g_i    <- source i's gradient on micro-batch m  (the layout decides who computes which)
        n_i    <- ||g_i||_2 over the whole logical parameter vector
        d      <- sum_i w_i g_i / n_i                   (weights renormalized over the active sources)
        delta  <- delta - gamma * d
    G <- -delta / (k * gamma)                           # pseudo-gradient, ||G|| <= 1
    theta_{t+1} <- outer_optimizer.step(theta_t, grad=G)

The math lives in :mod:`nexus_megatron.functional` (pure functions over flat fp32 tensors, re-exported
here), the bookkeeping of an outer step in :mod:`nexus_megatron.outer`, the collectives in
:mod:`nexus_megatron.layout`; :class:`Nexus` is the thin plain-PyTorch adapter (the DeepSpeed and Megatron
engines are adapters over the same three). The displacement is kept exactly as ``d_sum = sum_m d_m``
(``delta = -gamma_t d_sum``, ``G = d_sum / k``; §1.5), so any gamma_t >= 0 is exact, lr = 0 included.

Degenerate cases (§1.4):

* a source whose gradient norm is below ``min_grad_norm`` is dropped from that micro-step, the
  remaining weights are renormalized (no division by ~0) and ``skipped_sources`` is incremented;
  if every source of a micro-step vanished, that micro-step moves nothing;
* NaN or Inf anywhere in a micro-step's gradients poisons the outer step: the parameters go back to
  the anchor, the displacement is dropped and the outer optimizer is not stepped (its state, the lr
  schedule's position and theta stay exactly as they were); ``skipped_steps`` is incremented, and
  after ``max_consecutive_skips`` poisoned steps in a row :class:`NexusNonFiniteError` is raised.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch

from .errors import NexusConfigError
from .settings import CONTROLS, GAMMA_MODES, NexusConfig, validate_nexus_config  # noqa: F401 (NexusConfig's home)

if TYPE_CHECKING:
    from .layout import Reduced, SourceLayout


# The pure functions live in functional.py, the bookkeeping in outer.py; their names stay importable from here.
from .functional import (SQ_CHUNK, accumulate_direction, combine_normalized, hash_control_seed,  # noqa: E402,F401
                         inner_gamma, inner_update, moved_point, norm_segments, pseudo_gradient,
                         pseudo_gradient_from_sum, random_direction, segments_sq, source_coefficients, sum_sq)
from .outer import BookViews, NexusStats, OuterBook, RandomDirectionControl, check_resume  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------------
# Plain-PyTorch adapter
# ---------------------------------------------------------------------------------------------------

class Nexus(BookViews):
    """Nexus around any torch optimizer (the outer optimizer; AdamW by default in the trainer).

    Usage in a bare training loop (each rank reads the source the layout assigns it)::

        outer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        opt = Nexus(model.parameters(), outer, build_layout(LayoutConfig(sources=...)), NexusConfig(),
                    micro_steps=k)
        for step in range(steps):
            for m in range(k):
                src = opt.layout.source_for(step, m)
                model(batch_from(src)).loss.backward()
                opt.inner_step(src)              # reduce, normalize, move to theta + delta
            opt.step()                           # outer step on the pseudo-gradient
            scheduler.step()                     # schedules act on `outer` as usual

    Parameters must be fp32 (use ``torch.autocast`` for bf16 compute). Extra memory: an fp32 anchor,
    the fp32 sum of the normalized directions ``d_sum`` (the exact displacement, functional.py) and an fp32
    gradient buffer (12 bytes per parameter).

    Gradients accumulate straight into the gradient buffer (as DDP's ``gradient_as_bucket_view``): each
    parameter's ``.grad`` is a view into ``flat_grad``, zero before every backward, so backward's own
    accumulation writes the micro-step's gradient where the collectives and the norm read it, and no
    per-parameter gradient tensor outlives its backward. The views stay attached between micro-steps and
    outer steps (``p.grad`` holds zeros there, the pseudo-gradient during the outer step). Anything that
    replaces them (``model.zero_grad()``, the outer optimizer's ``zero_grad()``, an assignment to ``p.grad``)
    is detected at the next :meth:`inner_step`: such a gradient is copied into the buffer and the view put
    back (``grad_copies`` counts those tensors); a parameter whose ``.grad`` was set to None counts as a zero
    gradient. :meth:`zero_grad` re-zeroes the buffer and keeps the views, whatever ``set_to_none`` says.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], outer: torch.optim.Optimizer,
                 layout: SourceLayout, config: NexusConfig = NexusConfig(), *, micro_steps: int,
                 counts_in_norm: Optional[Callable] = None):
        if not (isinstance(micro_steps, int) and micro_steps >= 1):
            raise NexusConfigError(f"Nexus micro_steps={micro_steps!r}: the number of inner steps per outer step "
                                   "(gradient-accumulation micro-batches) must be an integer >= 1")
        self.micro_steps = micro_steps
        seen, ps = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                ps.append(p)
        if not ps:
            raise NexusConfigError("Nexus got no trainable parameters")
        for p in ps:
            if p.dtype != torch.float32:
                raise NexusConfigError(
                    f"Nexus (plain PyTorch) needs fp32 parameters, got {p.dtype}: keep the model in fp32 and "
                    "use torch.autocast(dtype=torch.bfloat16) for bf16 compute, or use the DeepSpeed/Megatron adapters")
        if len({p.device for p in ps}) > 1:
            raise NexusConfigError("Nexus (plain PyTorch) needs every parameter on one device (one flat gradient "
                                   "buffer): move the model with model.to(device) before building the optimizer")
        outer_ids = {id(p) for g in outer.param_groups for p in g["params"]}
        if outer_ids != seen:
            raise NexusConfigError(
                "the outer optimizer must own exactly the parameters given to Nexus "
                f"({len(outer_ids)} vs {len(seen)} tensors): build it from the same model.parameters()")
        self.params = ps
        self.outer = outer
        self.layout = layout
        self.config = config
        self.numel = sum(p.numel() for p in ps)
        self.segments = norm_segments(ps, counts_in_norm)
        self.num_norm_params = self.numel if self.segments is None else sum(e - s for s, e in self.segments)
        if layout.norm_size > 1:  # the logical vector spans the model-parallel shards
            t = torch.tensor([self.num_norm_params], dtype=torch.float64, device=ps[0].device)
            torch.distributed.all_reduce(t, group=layout.norm_group)
            self.num_norm_params = int(t.item())
        padded = layout.padded_numel(self.numel)
        dev = ps[0].device
        self.anchor = torch.zeros(padded, dtype=torch.float32, device=dev)
        self.d_sum = torch.zeros(padded, dtype=torch.float32, device=dev)
        """sum_m d_m of this outer step (the exact displacement: delta = -gamma_t * d_sum, G = d_sum / k)."""
        self.flat_grad = torch.zeros(padded, dtype=torch.float32, device=dev)
        self._views = lambda buf: [t.view_as(p) for t, p in zip(buf[: self.numel].split([p.numel() for p in ps]), ps)]
        self._anchor_views = self._views(self.anchor)
        self._grad_views = self._views(self.flat_grad)
        self._dsum_views = self._views(self.d_sum)
        self.grad_copies = 0
        """Gradient tensors of the last micro-step that were not the buffer's views (copied in, views re-attached)."""
        self._collect_grads()   # a gradient already there (a backward before the optimizer was built) is kept
        self.grad_copies = 0
        self._load_anchor_from_params()
        self.random_delta = None
        self.control: Optional[RandomDirectionControl] = None
        if config.control == "random_direction":
            if layout.norm_size > 1:
                raise NexusConfigError("nexus.control=random_direction is implemented for data parallelism only "
                                       "(no tensor/pipeline model parallelism): set nexus.control=none")
            # where the forward passes go under the control: the sum of the random steps (outer.py)
            self.control = RandomDirectionControl(config.control_seed, self.numel, [self.anchor],
                                                  [(0, 0, 0, self.numel)], self.segments)
            self.random_delta = self.control.deltas[0]
        self.update_pieces = 0
        """Pieces the last inner update was applied in (> 1: overlapped with the all-gathers of d)."""
        self.book = OuterBook(layout.num_sources, micro_steps=micro_steps,
                              max_consecutive_skips=config.max_consecutive_skips, config=config)
        self.pre_outer_step: Optional[Callable] = None
        """Called as ``fn(self)`` after the pseudo-gradient is in ``p.grad`` (params at theta_t) and before
        the outer optimizer steps; it must leave parameters, gradients and optimizer state as it found them."""

    # -- the bookkeeper's state (stats, inner_steps, poisoned, gamma_t: BookViews) and aliases --------
    @property
    def delta(self) -> torch.Tensor:
        """The displacement theta - theta_t of the current outer step, -gamma_t * d_sum (a new tensor)."""
        return self.d_sum * -(self.book.gamma_t or 0.0)

    # -- helpers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _load_anchor_from_params(self):
        torch._foreach_copy_(self._anchor_views, [p.detach() for p in self.params])

    @torch.no_grad()
    def _write_params(self, flat: torch.Tensor):
        torch._foreach_copy_([p.data for p in self.params], self._views(flat))

    @torch.no_grad()
    def _write_moved(self):
        """params <- the point of the next forward pass (each parameter written directly, no flat temporary):
        theta_t - gamma_t * d_sum, or theta_t + random_delta under the control."""
        if self.random_delta is not None:
            for p, a, r in zip(self.params, self._anchor_views, self._views(self.random_delta)):
                torch.add(a, r, out=p.data)
            return
        for p, a, s in zip(self.params, self._anchor_views, self._dsum_views):
            moved_point(a, s, self.book.gamma_t, out=p.data)

    def _attach_grads(self) -> None:
        """p.grad <- its view into ``flat_grad`` (backward accumulates there)."""
        for p, v in zip(self.params, self._grad_views):
            p.grad = v

    @torch.no_grad()
    def _collect_grads(self) -> None:
        """Make ``flat_grad`` hold this micro-step's gradient. With the views attached (the usual case)
        backward has put it there already: nothing moves. A ``.grad`` that is not its view (replaced by
        a ``zero_grad(set_to_none=True)`` or an assignment) is copied in and the view re-attached; a None
        ``.grad`` is a zero gradient."""
        copies = 0
        for p, v in zip(self.params, self._grad_views):
            g = p.grad
            if g is v:
                continue
            if g is None:
                v.zero_()
            elif g.data_ptr() != v.data_ptr() or g.stride() != v.stride():
                v.copy_(g)
                copies += 1
            p.grad = v
        self.grad_copies = copies

    def _reduce(self, source: int) -> Reduced:
        """This rank's gradient -> d in ``flat_grad`` (the layout's collectives), or d / ``scale`` where the
        layout leaves the scale to the update (``Reduced.scale``). A seam: the plain engine's overlapped
        variant (engines/plain.py) has reduced the buckets during backward already."""
        self._collect_grads()
        return self.layout.reduce_normalized(self.flat_grad, source, min_grad_norm=self.config.min_grad_norm,
                                             segments=self.segments, defer_scale=self.random_delta is None)

    def current_lr(self) -> float:
        return float(self.outer.param_groups[0]["lr"])

    # -- the algorithm -----------------------------------------------------------------------------
    @torch.no_grad()
    def inner_step(self, source: int) -> Reduced:
        """One micro-step: reduce this rank's gradient (in ``p.grad``, of source ``source``) with the
        layout, normalize, move the parameters to theta + delta. Leaves ``p.grad`` zero (the views).

        The passes over the flat vector (modelled in :func:`nexus_megatron.tools.plan.inner_step_passes`): the norm
        (one read); ``d_sum += scale * g`` with the source's scale w_i / n_i folded in (sequential layout;
        the source-parallel layout scales its shard before the cross-group sum); the parameters written as
        ``anchor - gamma_t * d_sum``, except after the k-th micro-step, where :meth:`step` writes the anchor
        over them anyway; the buffer re-zeroed for the next backward."""
        book = self.book
        gamma = book.begin_micro(self.current_lr(), self.num_norm_params, who="Nexus.inner_step")
        red = self._reduce(source)
        book.end_micro()
        moves = book.record(red.norms, red.present, red.active, red.nonfinite)
        if not moves or self.random_delta is not None:   # nothing updates d bucket by bucket
            red.wait_gathers()
        if moves:
            self._update(red, gamma)
        self.flat_grad.zero_()   # the views hold zeros again: the next backward accumulates its gradient there
        return red

    def _update(self, red: Reduced, gamma: float) -> None:
        book = self.book
        # each bucket as soon as its all-gather of d is in, the later ones still in flight (elementwise:
        # the same numbers as one update of the whole vector, which is what a layout without gathers gives)
        self.update_pieces = 0
        for lo, hi in red.arrived(self.d_sum.numel()):
            accumulate_direction(self.d_sum[lo:hi], self.flat_grad[lo:hi], red.scale)
            self.update_pieces += 1
        if self.random_delta is not None:   # the control: same step length, random direction
            d_norm = float(segments_sq(self.flat_grad, self.segments).sqrt())
            self.control.inner_step(self.stats.outer_steps + self.stats.skipped_steps, book.inner_steps, d_norm, gamma)
        if gamma and book.inner_steps < self.micro_steps:
            self._write_moved()   # params = theta + delta (after the k-th micro-step step() writes theta_t)

    @torch.no_grad()
    def step(self, closure=None) -> dict:
        """The outer step. Returns a dict of what happened (``skipped``, ``gamma``, ``pseudo_grad_norm``)."""
        if closure is not None:
            raise NexusConfigError("Nexus.step() takes no closure: call inner_step() after each backward")
        book = self.book
        book.check_complete("Nexus.step")
        info = book.outer_info()
        self._write_params(self.anchor)
        if book.poisoned:
            self._end_step(skipped=True)
            book.check_abort()
            return info
        G = pseudo_gradient_from_sum(self.d_sum, book.inner_steps, out=self.flat_grad)
        info["pseudo_grad_norm"] = float(torch.linalg.vector_norm(G[: self.numel]))
        self._attach_grads()                  # p.grad = G (the views; put back if something replaced them)
        if self.pre_outer_step is not None:   # e.g. the critical-sharpness probe: sees theta_t and G, changes nothing
            self.pre_outer_step(self)
        self.outer.step()
        self._load_anchor_from_params()
        self._end_step(skipped=False)
        return info

    def _end_step(self, skipped: bool):
        self.d_sum.zero_()
        self.flat_grad.zero_()   # (G, or zeros already): the views stay attached, zero for the next backward
        if self.random_delta is not None:
            self.random_delta.zero_()
        self.book.end_outer(skipped)

    def step_stats(self) -> dict:
        """Per-source mean inner gradient norm and skipped-source count of the last outer step."""
        return self.book.pop_step(self.layout.sources)

    def zero_grad(self, set_to_none: bool = True):
        """Zero the gradient buffer and keep ``p.grad`` its views (``set_to_none`` is accepted for torch's
        signature; a None ``.grad`` and a zero one mean the same to :meth:`inner_step`)."""
        self.flat_grad.zero_()
        self._attach_grads()

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "outer": self.outer.state_dict(),
            "anchor": self.anchor.clone(),
            "d_sum": self.d_sum.clone(),
            "delta": self.delta,          # for readers of older checkpoints' layout; d_sum is what is loaded
            **({"random_delta": self.random_delta.clone()} if self.random_delta is not None else {}),
            **self.book.state(),
            "layout": self.layout.describe(),
            "config": asdict(self.config),
        }

    def load_state_dict(self, sd: dict, *, reshard: bool = False) -> None:
        """``reshard``: the checkpoint may come from another number of ranks (the source-parallel layout pads
        the flat buffers to a multiple of the source group's size; only the first ``numel`` elements are state).
        The caller has checked that the global batch and the data order are the same (nexus_megatron/resume.py)."""
        check_resume(sd["layout"], self.layout.describe(), reshard=reshard)
        n = self.numel
        if sd["anchor"].numel() < n or (not reshard and sd["anchor"].numel() != self.anchor.numel()):
            raise NexusConfigError("checkpoint's Nexus state does not match this model's size")

        def put(dst, src):   # the state, then zeros in this layout's padding
            dst.zero_()
            dst[:n].copy_(src.reshape(-1)[:n])

        self.outer.load_state_dict(sd["outer"])
        put(self.anchor, sd["anchor"])
        self.book.load_state(sd)
        if "d_sum" in sd:
            put(self.d_sum, sd["d_sum"])
        elif sd.get("gamma_t"):          # a checkpoint written before d_sum: the displacement
            put(self.d_sum, sd["delta"])
            self.d_sum.div_(-float(sd["gamma_t"]))
        else:
            self.d_sum.zero_()
        if self.random_delta is not None:
            put(self.random_delta, sd.get("random_delta", torch.zeros_like(self.random_delta)))
        if self.book.gamma_t or self.random_delta is not None:
            self._write_moved()
        else:
            self._write_params(self.anchor)
