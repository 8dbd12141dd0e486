"""The Nexus math (ALGORITHMS.md §1.1-§1.5) as small pure functions over flat fp32 tensors.

Every engine (plain PyTorch, DeepSpeed, Megatron) calls these; none has its own copy. Collectives live in
:mod:`nexus_megatron.layout`, the per-outer-step bookkeeping in :mod:`nexus_megatron.outer`.

The exact-displacement scheme (§1.5), the same on every engine: each rank keeps, next to the fp32 anchor
``theta_t`` of the elements it owns, an fp32 buffer ``d_sum = sum_m d_m`` of the normalized directions of
the micro-steps so far (sharded exactly like the master weights). Then

* the point the next forward pass sees is ``theta_t - gamma_t * d_sum`` (:func:`moved_point`),
* the pseudo-gradient is ``G = d_sum / k`` (:func:`pseudo_gradient_from_sum`): the algebraic value of
  ``-delta / (k gamma_t)`` with ``delta = -gamma_t * d_sum``, computed without dividing by ``gamma_t``.
  So G carries no error amplified by ``1 / (k gamma_t)`` (recovering delta as ``master - anchor`` does:
  up to ulp(theta)/2 per element and micro-step, times ``1 / (k gamma_t)``), and ``gamma_t = 0`` (lr 0 at
  the first step of a warmup) is the same formula: the inner steps do not move, ``G = (1/k) sum_m d_m``.

Memory: 4 bytes per parameter held by the rank for ``d_sum`` plus 4 for the anchor (ZeRO-1/2/3 and
Megatron's distributed optimizer: per *shard* element, i.e. 8/D bytes per parameter).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

SQ_CHUNK = 1024
"""Elements per fp32 partial sum in :func:`sum_sq`."""


# ---------------------------------------------------------------------------------------------------
# sums of squares and norm segments

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
    error, ~1e-9 typically, at fp32 speed. ``starts`` (optional, one per tensor) is where each tensor begins
    in the logical flat vector: the chunks are then aligned to it, so shards of one vector cut anywhere give
    the same partial sums except for the chunks a cut splits. If the result overflows (|x| above ~1e19, or x
    holds NaN/Inf) it is recomputed in fp64, so it is exactly as finite as the fp64 sum of squares."""
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


def segments_sq(x: torch.Tensor, segments, lo: int = 0) -> torch.Tensor:
    """Sum of squares (fp64, on x's device) of ``x``, which holds elements ``[lo, lo + len(x))`` of the flat
    vector, counting only the elements inside ``segments`` (list of ``[start, end)``; None = all)."""
    n = x.numel()
    if segments is None:
        return sum_sq(x, lo).to(x.device)
    parts, starts = [], []
    for s, e in segments:
        s, e = max(s - lo, 0), min(e - lo, n)
        if e > s:
            parts.append(x[s:e])
            starts.append(lo + s)
    return sum_sq(parts, starts).to(x.device)


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


# ---------------------------------------------------------------------------------------------------
# the inner loop

def inner_gamma(cfg, lr: float, num_params: int, k: int) -> float:
    """gamma_t, the inner step size of an outer step at learning rate ``lr`` (``cfg``: anything with
    ``gamma`` and ``gamma_mode``, e.g. a NexusConfig). ``update``: ``gamma * lr * sqrt(P) / k`` (0 when
    lr is 0, which the scheme above handles exactly); ``absolute``: ``gamma``."""
    if cfg.gamma_mode == "absolute":
        return float(cfg.gamma)
    return float(cfg.gamma) * float(lr) * math.sqrt(num_params) / max(int(k), 1)


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
    returns (d, norms, active). The layouts compute the same thing with collectives."""
    norms = torch.linalg.vector_norm(grads.double(), 2, dim=1)
    coef, active, _ = source_coefficients(norms, torch.ones_like(norms, dtype=torch.bool), weights, min_grad_norm)
    d = torch.zeros(grads.shape[1], dtype=grads.dtype)
    for i in torch.nonzero(active).flatten().tolist():
        d += coef[i].to(grads.dtype) * grads[i]
    return d, norms, active


def accumulate_direction(d_sum: torch.Tensor, d: torch.Tensor, coef: float = 1.0) -> None:
    """d_sum <- d_sum + coef * d (in place, fp32): one micro-step's normalized direction (``coef * d`` = the
    rank's piece of d when ``d`` still holds the unscaled gradient)."""
    d_sum.add_(d, alpha=coef)


def moved_point(anchor: torch.Tensor, d_sum: torch.Tensor, gamma: float, out: torch.Tensor) -> torch.Tensor:
    """out <- anchor - gamma * d_sum = theta_t + delta: where the next forward pass is taken."""
    return torch.add(anchor, d_sum, alpha=-gamma, out=out)


def pseudo_gradient_from_sum(d_sum: torch.Tensor, k: int, out: Optional[torch.Tensor] = None,
                             scale: float = 1.0) -> torch.Tensor:
    """G = scale * d_sum / k: the pseudo-gradient -delta / (k gamma_t) computed exactly, for every gamma_t
    including 0 (§1.4, §1.5). ``scale``: a clipping factor. ||G|| <= 1 because ||d_m|| <= 1."""
    s = float(scale) / int(k)
    if out is None:
        return d_sum * s
    return torch.mul(d_sum, s, out=out)


def inner_update(delta: torch.Tensor, d: torch.Tensor, gamma: float) -> None:
    """delta <- delta - gamma * d (in place): the displacement form of one inner step (the random-direction
    control's moved point, and the single-process references)."""
    delta.add_(d, alpha=-gamma)


def pseudo_gradient(delta: torch.Tensor, k: int, gamma: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """G = -delta / (k * gamma), the displacement form (gamma > 0). The engines use
    :func:`pseudo_gradient_from_sum`, which is exact and defined at gamma = 0."""
    if not gamma:
        raise ValueError("pseudo_gradient(delta, k, gamma=0): at gamma_t = 0 the displacement is zero and G is "
                         "(1/k) sum_m d_m; use pseudo_gradient_from_sum(d_sum, k)")
    scale = -1.0 / (k * gamma)
    if out is None:
        return delta * scale
    return torch.mul(delta, scale, out=out)


def clip_factor(norm: float, clip: float) -> float:
    """DeepSpeed's gradient-clipping rule applied to the pseudo-gradient: ``1 / ((norm + 1e-6) / clip)`` when
    that is below 1, else 1 (``clip <= 0``: no clipping)."""
    if clip > 0:
        c = (norm + 1e-6) / clip
        if c > 1:
            return 1.0 / c
    return 1.0


# ---------------------------------------------------------------------------------------------------
# seeds and the random-direction control

def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (Python's hash() of ints is not mixed enough)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def hash_control_seed(seed: int, outer_step: int, micro_step: int) -> int:
    """Seed of the random direction of micro-step ``micro_step`` of outer step ``outer_step``."""
    return hash_seed(seed, 0x52414E44, outer_step, micro_step)


def random_direction_pieces(pieces, numel: int, seed: int, d_norm: float, segments=None, device=None) -> list:
    """The random-direction control (docs/nexus.md#controls) on a rank that holds only ``pieces`` (list of
    ``[lo, hi)`` ranges) of the logical flat vector of ``numel`` elements (a ZeRO partition, a distributed
    optimizer's shard): the pieces ``r[lo:hi]`` of the one random vector every rank agrees on. ``r`` is a
    standard normal vector of ``numel`` elements drawn on the CPU from a generator seeded by ``seed``, scaled to
    the norm ``d_norm`` of the micro-step's full direction d (its norm over ``segments``, like the source norms).
    Every rank draws the whole vector (a transient fp32 vector of ``numel`` elements on the CPU per micro-step)
    and keeps its pieces, so the pieces are bitwise those of :func:`random_direction` on one process."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn(numel, generator=g, dtype=torch.float32)
    have = float(segments_sq(r, segments).sqrt())
    scale = float(d_norm) / have if have > 0 else 0.0
    return [r[lo:hi].mul(scale).to(device) for lo, hi in pieces]


def random_direction(d: torch.Tensor, numel: int, seed: int, segments=None) -> torch.Tensor:
    """The random-direction control on a rank that holds the whole direction ``d`` (the plain engine): the
    random vector of :func:`random_direction_pieces`, zero past ``numel`` (padding), scaled to the norm of
    ``d`` (both norms over ``segments``, like the source norms)."""
    r = torch.zeros(d.numel(), dtype=torch.float32, device=d.device)
    target = float(segments_sq(d, segments).sqrt())
    r[:numel] = random_direction_pieces([(0, numel)], numel, seed, target, segments, device=d.device)[0]
    return r
