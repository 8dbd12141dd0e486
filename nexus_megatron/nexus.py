"""Nexus (ALGORITHMS.md §1.1): the whole algorithm, in one file.

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

The math lives in the small pure functions below (flat fp32 tensors in, flat tensors out); the
collectives live in :mod:`nexus_megatron.layout`; :class:`Nexus` is the thin plain-PyTorch adapter
(engines have their own adapters that call the same functions).

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

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch

from .errors import NexusConfigError, NexusNonFiniteError
from .settings import CONTROLS, GAMMA_MODES, NexusConfig, validate_nexus_config  # noqa: F401 (NexusConfig's home)

if TYPE_CHECKING:
    from .layout import Reduced, SourceLayout


# ---------------------------------------------------------------------------------------------------
# Pure functions over flat tensors
# ---------------------------------------------------------------------------------------------------

SQ_CHUNK = 1024
"""Elements per fp32 partial sum in :func:`sum_sq`."""


def _sq_chunked(x: torch.Tensor, start: int = 0) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.dtype == torch.float64:
        return torch.linalg.vector_norm(flat, 2).square()
    n = flat.numel()
    head = min((-start) % SQ_CHUNK, n)          # chunks sit at multiples of SQ_CHUNK of the logical vector
    m = head + (n - head) // SQ_CHUNK * SQ_CHUNK
    pieces = [torch.linalg.vector_norm(flat[:head], 2, dtype=torch.float32).reshape(1)] if head else []
    if m > head:
        pieces.append(torch.linalg.vector_norm(flat[head:m].view(-1, SQ_CHUNK), 2, dim=1, dtype=torch.float32))
    if n > m:
        pieces.append(torch.linalg.vector_norm(flat[m:], 2, dtype=torch.float32).reshape(1))
    parts = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return parts.double().square().sum()


def sum_sq(tensors, starts=None) -> torch.Tensor:
    """Sum of the squares of every element of ``tensors`` (a tensor or a list of them), an fp64 0-dim
    tensor on their device: the squared L2 norm behind every source norm.

    fp32 partial norms over chunks of :data:`SQ_CHUNK` elements, summed in fp64: at most ~1e-7 relative
    error, ~1e-9 typically (a single fp32 reduction over millions of elements is off by ~1e-4; the norm
    only scales a step, so either bound is far below what matters), and one pass over the
    data at fp32 speed (casting the whole vector to fp64 first is ~15x slower on the CPU and needs a
    transient fp64 copy). ``starts`` (optional, one per tensor) is where each tensor begins in the logical
    flat vector: the chunks are then aligned to it, so shards of one vector cut anywhere give the same
    partial sums except for the chunks a cut splits. If the result overflows (|x| above ~1e19, or x holds
    NaN/Inf) it is recomputed in fp64, so it is exactly as finite as the fp64 sum of squares."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
        starts = None if starts is None else [starts]
    starts = [0] * len(tensors) if starts is None else list(starts)
    keep = [(t, s) for t, s in zip(tensors, starts) if t.numel()]
    if not keep:
        return torch.zeros((), dtype=torch.float64)
    tensors = [t for t, _ in keep]
    total = _sq_chunked(*keep[0])
    for t, s in keep[1:]:
        total = total + _sq_chunked(t, s).to(total.device)
    if not bool(torch.isfinite(total)):
        total = sum(torch.linalg.vector_norm(t, 2, dtype=torch.float64).square().to(total.device) for t in tensors)
    return total


def inner_gamma(cfg: NexusConfig, lr: float, num_params: int, k: int) -> float:
    """The inner step size gamma_t for an outer step at learning rate ``lr``."""
    if cfg.gamma_mode == "absolute":
        return float(cfg.gamma)
    return float(cfg.gamma) * float(lr) * math.sqrt(num_params) / max(int(k), 1)


def inner_update(delta: torch.Tensor, d: torch.Tensor, gamma: float) -> None:
    """delta <- delta - gamma * d (in place, fp32)."""
    delta.add_(d, alpha=-gamma)


def pseudo_gradient(delta: torch.Tensor, k: int, gamma: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G = -delta / (k * gamma): the outer optimizer's gradient. ||G|| <= 1 because ||d|| <= 1."""
    scale = -1.0 / (k * gamma)
    if out is None:
        return delta * scale
    return torch.mul(delta, scale, out=out)


def source_coefficients(norms: torch.Tensor, present: torch.Tensor, weights: torch.Tensor, min_grad_norm: float):
    """The scale of each source's gradient in d = sum_i w_i g_i / n_i (§1.1, §1.4).

    ``norms`` fp64 [K] (the full logical norms), ``present`` bool [K] (sources with a gradient in this
    micro-step), ``weights`` [K]. Returns (coef fp64 [K], active bool [K], nonfinite bool): sources below
    ``min_grad_norm`` are dropped and the weights renormalized over the rest; any NaN/Inf norm makes the
    micro-step non-finite (coef all zero)."""
    norms = norms.double()
    nonfinite = not bool(torch.isfinite(norms[present]).all())
    active = present & (norms >= min_grad_norm) & torch.isfinite(norms)
    coef = torch.zeros_like(norms)
    if bool(active.any()) and not nonfinite:
        w = torch.where(active, weights.double(), torch.zeros_like(norms))
        w = w / w.sum()
        coef = torch.where(active, w / norms.clamp_min(1e-300), coef)
    return coef, active, nonfinite


def combine_normalized(grads: torch.Tensor, weights: torch.Tensor, min_grad_norm: float):
    """Single-process form of one micro-step: ``grads`` is [K, P] (one row per source present),
    returns (d, norms, active). Used by references and tests; the layouts compute the same thing
    with collectives and never materialize [K, P]."""
    norms = torch.linalg.vector_norm(grads.double(), 2, dim=1)
    coef, active, _ = source_coefficients(norms, torch.ones_like(norms, dtype=torch.bool), weights, min_grad_norm)
    d = torch.zeros(grads.shape[1], dtype=grads.dtype)
    for i in torch.nonzero(active).flatten().tolist():
        d += coef[i].to(grads.dtype) * grads[i]
    return d, norms, active


def random_direction(d: torch.Tensor, numel: int, seed: int, segments=None) -> torch.Tensor:
    """The random-direction control (docs/nexus.md#controls): a standard normal vector, drawn on the
    CPU from a generator seeded by ``seed`` (so identical on every rank), zero past ``numel`` (padding),
    scaled to the norm of ``d`` (both norms over ``segments``, like the source norms)."""
    from .layout import _segments_sq
    g = torch.Generator().manual_seed(int(seed))
    r = torch.zeros(d.numel(), dtype=torch.float32)
    r[:numel] = torch.randn(numel, generator=g, dtype=torch.float32)
    r = r.to(d.device)
    target = float(_segments_sq(d, segments).sqrt())
    have = float(_segments_sq(r, segments).sqrt())
    return r.mul_(target / have if have > 0 else 0.0)


def norm_segments(params, counts_in_norm: Optional[Callable] = None):
    """[start, end) ranges of the flat vector that count in the source norms (None = all of it).
    ``counts_in_norm(param) -> bool`` excludes tensor-parallel duplicates and shared parameters
    (Megatron: ``param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p)``)."""
    if counts_in_norm is None:
        return None
    segs, off = [], 0
    for p in params:
        n = p.numel()
        if counts_in_norm(p):
            if segs and segs[-1][1] == off:
                segs[-1][1] = off + n
            else:
                segs.append([off, off + n])
        off += n
    return [tuple(s) for s in segs]


def hash_control_seed(seed: int, outer_step: int, micro_step: int) -> int:
    """Seed of the random direction of micro-step ``micro_step`` of outer step ``outer_step``."""
    from .layout import hash_seed
    return hash_seed(seed, 0x52414E44, outer_step, micro_step)


# ---------------------------------------------------------------------------------------------------
# Plain-PyTorch adapter
# ---------------------------------------------------------------------------------------------------

@dataclass
class NexusStats:
    """Counters of the run (all ranks hold the same values), and the per-outer-step norm averages that
    every adapter logs as ``nexus/gnorm/<source>``."""

    outer_steps: int = 0
    skipped_steps: int = 0
    skipped_sources: int = 0
    consecutive_skips: int = 0
    # per outer step (reset by pop_step()):
    step_norm_sum: list = field(default_factory=list)
    step_norm_count: list = field(default_factory=list)
    step_skipped_sources: int = 0

    def reset_step(self, num_sources: int) -> None:
        self.step_norm_sum = [0.0] * num_sources
        self.step_norm_count = [0] * num_sources
        self.step_skipped_sources = 0

    def record_micro_step(self, norms: torch.Tensor, present: torch.Tensor, active: torch.Tensor) -> None:
        """Count the sources dropped in one (finite) micro-step and add the norms of those present."""
        skipped = int((present & ~active).sum())
        self.skipped_sources += skipped
        self.step_skipped_sources += skipped
        for i in torch.nonzero(present).flatten().tolist():
            self.step_norm_sum[i] += float(norms[i])
            self.step_norm_count[i] += 1

    def pop_step(self, sources) -> dict:
        """``nexus/gnorm/<source>`` (mean over the step's micro-steps) and ``nexus/step_skipped_sources``
        of the last outer step; resets them."""
        out = {f"nexus/gnorm/{name}": self.step_norm_sum[i] / c
               for i, name in enumerate(sources) if (c := self.step_norm_count[i])}
        out["nexus/step_skipped_sources"] = self.step_skipped_sources
        self.reset_step(len(sources))
        return out

    def counters(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("step_")}


class Nexus:
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
    an fp32 displacement and an fp32 gradient buffer (12 bytes per parameter).
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
        self.delta = torch.zeros(padded, dtype=torch.float32, device=dev)
        self.flat_grad = torch.zeros(padded, dtype=torch.float32, device=dev)
        self._views = lambda buf: [t.view_as(p) for t, p in zip(buf[: self.numel].split([p.numel() for p in ps]), ps)]
        self._anchor_views = self._views(self.anchor)
        self._grad_views = self._views(self.flat_grad)
        self._delta_views = self._views(self.delta)
        self._load_anchor_from_params()
        self.random_delta = None
        if config.control == "random_direction":
            if layout.norm_size > 1:
                raise NexusConfigError("nexus.control=random_direction is implemented for data parallelism only "
                                       "(no tensor/pipeline model parallelism): set nexus.control=none")
            # where the forward passes go under the control: the sum of the random steps
            self.random_delta = torch.zeros(padded, dtype=torch.float32, device=dev)
        self.inner_steps = 0
        self.poisoned = False
        self.update_pieces = 0
        """Pieces the last inner update was applied in (> 1: overlapped with the all-gathers of d)."""
        self.gamma_t: Optional[float] = None
        self.stats = NexusStats()
        self.stats.reset_step(layout.num_sources)
        self.pre_outer_step: Optional[Callable] = None
        """Called as ``fn(self)`` after the pseudo-gradient is in ``p.grad`` (params at theta_t) and before
        the outer optimizer steps; it must leave parameters, gradients and optimizer state as it found them."""

    # -- helpers -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _load_anchor_from_params(self):
        torch._foreach_copy_(self._anchor_views, [p.detach() for p in self.params])

    @torch.no_grad()
    def _write_params(self, flat: torch.Tensor):
        torch._foreach_copy_([p.data for p in self.params], self._views(flat))

    @torch.no_grad()
    def _write_params_sum(self, a: torch.Tensor, b: torch.Tensor):
        """params <- a + b in one pass (each parameter written directly, no flat temporary)."""
        va = self._anchor_views if a is self.anchor else self._views(a)
        vb = self._delta_views if b is self.delta else self._views(b)
        for p, x, y in zip(self.params, va, vb):
            torch.add(x, y, out=p.data)

    @torch.no_grad()
    def _gather_grads(self):
        for p, v in zip(self.params, self._grad_views):
            if p.grad is None:
                v.zero_()
            else:
                v.copy_(p.grad)
                p.grad = None

    def _reduce(self, source: int) -> Reduced:
        """This rank's gradient -> d in ``flat_grad`` (the layout's collectives). A seam: the plain engine's
        overlapped variant (engines/plain.py) has reduced the buckets during backward already."""
        self._gather_grads()
        return self.layout.reduce_normalized(self.flat_grad, source, min_grad_norm=self.config.min_grad_norm,
                                             segments=self.segments)

    def current_lr(self) -> float:
        return float(self.outer.param_groups[0]["lr"])

    # -- the algorithm -----------------------------------------------------------------------------
    @torch.no_grad()
    def inner_step(self, source: int) -> Reduced:
        """One micro-step: reduce this rank's gradient (in ``p.grad``, of source ``source``) with the
        layout, normalize, move the parameters to theta + delta. Clears ``p.grad``."""
        if self.inner_steps >= self.micro_steps:
            raise RuntimeError(f"Nexus.inner_step() called {self.inner_steps + 1} times in one outer step but "
                               f"micro_steps={self.micro_steps}: call step() after every {self.micro_steps} inner steps")
        if self.inner_steps == 0:
            self.gamma_t = inner_gamma(self.config, self.current_lr(), self.num_norm_params, self.micro_steps)
        red = self._reduce(source)
        self.inner_steps += 1
        if red.nonfinite:
            self.poisoned = True
        active = not self.poisoned and bool(red.active.any())
        if not active or self.random_delta is not None:   # nothing updates d bucket by bucket
            red.wait_gathers()
        if self.poisoned:
            return red
        self.stats.record_micro_step(red.norms, red.present, red.active)
        if active:
            # each bucket as soon as its all-gather of d is in, the later ones still in flight (elementwise:
            # the same numbers as one update of the whole vector, which is what a layout without gathers gives)
            self.update_pieces = 0
            for lo, hi in red.arrived(self.delta.numel()):
                inner_update(self.delta[lo:hi], self.flat_grad[lo:hi], self.gamma_t)
                self.update_pieces += 1
            moved = self.delta
            if self.random_delta is not None:   # the control: same step length, random direction
                seed = hash_control_seed(self.config.control_seed, self.stats.outer_steps + self.stats.skipped_steps,
                                         self.inner_steps)
                inner_update(self.random_delta, random_direction(self.flat_grad, self.numel, seed, self.segments),
                             self.gamma_t)
                moved = self.random_delta
            self._write_params_sum(self.anchor, moved)   # params = theta + delta
        return red

    @torch.no_grad()
    def step(self, closure=None) -> dict:
        """The outer step. Returns a dict of what happened (``skipped``, ``gamma``, ``pseudo_grad_norm``)."""
        if closure is not None:
            raise NexusConfigError("Nexus.step() takes no closure: call inner_step() after each backward")
        if self.inner_steps != self.micro_steps:
            raise RuntimeError(f"Nexus.step() after {self.inner_steps} inner steps but micro_steps={self.micro_steps}: "
                               "call inner_step() after each micro-step's backward")
        info = {"gamma": self.gamma_t, "inner_steps": self.inner_steps, "skipped": False}
        self._write_params(self.anchor)
        if self.poisoned:
            self.stats.skipped_steps += 1
            self.stats.consecutive_skips += 1
            info["skipped"] = True
            limit = self.config.max_consecutive_skips
            self._end_step()
            if limit and self.stats.consecutive_skips >= limit:
                raise NexusNonFiniteError(
                    f"{self.stats.consecutive_skips} outer steps in a row had NaN/Inf gradients "
                    f"(nexus.max_consecutive_skips={limit}); the last good parameters are intact. Lower the "
                    "learning rate, check the data for corrupt tokens, or resume from the last checkpoint")
            return info
        G = pseudo_gradient(self.delta, self.inner_steps, self.gamma_t, out=self.flat_grad)
        info["pseudo_grad_norm"] = float(torch.linalg.vector_norm(G[: self.numel]))
        for p, g in zip(self.params, self._grad_views):
            p.grad = g
        if self.pre_outer_step is not None:   # e.g. the critical-sharpness probe: sees theta_t and G, changes nothing
            self.pre_outer_step(self)
        self.outer.step()
        for p in self.params:
            p.grad = None
        self._load_anchor_from_params()
        self.stats.consecutive_skips = 0
        self.stats.outer_steps += 1
        self._end_step()
        return info

    def _end_step(self):
        self.delta.zero_()
        if self.random_delta is not None:
            self.random_delta.zero_()
        self.inner_steps = 0
        self.poisoned = False

    def step_stats(self) -> dict:
        """Per-source mean inner gradient norm and skipped-source count of the last outer step."""
        return self.stats.pop_step(self.layout.sources)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.params:
            p.grad = None

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "outer": self.outer.state_dict(),
            "anchor": self.anchor.clone(),
            "delta": self.delta.clone(),
            **({"random_delta": self.random_delta.clone()} if self.random_delta is not None else {}),
            "inner_steps": self.inner_steps,
            "poisoned": self.poisoned,
            "gamma_t": self.gamma_t,
            "stats": self.stats.counters(),
            "layout": self.layout.describe(),
            "config": asdict(self.config),
        }

    def load_state_dict(self, sd: dict) -> None:
        mine = self.layout.describe()
        if sd["layout"] != mine:
            raise NexusConfigError(
                f"checkpoint was written with layout {sd['layout']} but this run has {mine}: resume with the "
                "same nexus.layout, data.sources, data.weights and number of ranks")
        if sd["anchor"].numel() != self.anchor.numel():
            raise NexusConfigError("checkpoint's Nexus state does not match this model's size")
        self.outer.load_state_dict(sd["outer"])
        self.anchor.copy_(sd["anchor"])
        self.delta.copy_(sd["delta"])
        self.inner_steps = sd["inner_steps"]
        self.poisoned = sd["poisoned"]
        self.gamma_t = sd["gamma_t"]
        for k, v in sd["stats"].items():
            setattr(self.stats, k, v)
        moved = self.delta
        if self.random_delta is not None:
            self.random_delta.copy_(sd.get("random_delta", torch.zeros_like(self.random_delta)))
            moved = self.random_delta
        self._write_params_sum(self.anchor, moved)
