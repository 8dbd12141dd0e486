"""Closeness of the per-source minima, measured directly (docs/results.md#closeness-of-minima).

From a pretrained point theta_0, a copy is fine-tuned on each source alone with the same procedure for
every model (fresh AdamW, constant lr, a fixed number of steps on fixed batches): theta_1 .. theta_K.
Reported:

* pairwise parameter distances ``||theta_i - theta_j||_2`` and relative to ``||theta_0||_2``;
* the spread of the minima ``mean_i ||theta_i - mean_j theta_j||^2`` (the sigma_B^2 of the paper's
  "variance of minima" theorem, ALGORITHMS.md / notes);
* the loss barrier on the linear path between each pair, on a fixed loss (here the mixture validation
  loss): ``max_alpha [ L((1-alpha) theta_i + alpha theta_j) - ((1-alpha) L(theta_i) + alpha L(theta_j)) ]``
  over an evenly spaced grid of alpha in [0, 1] (>= 0; 0 = the path is never above the chord), and the
  signed excess at the midpoint (negative = the path dips below the chord: a convex, basin-like path).

The math is in small functions over flat fp32 vectors (:func:`pairwise_distances`, :func:`spread`,
:func:`interpolation_barrier`); :func:`finetune_copy` and :func:`closeness_of_minima` apply them to a
model.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["flat_params", "set_flat_params", "pairwise_distances", "spread", "interpolation_barrier",
           "finetune_copy", "closeness_of_minima"]


def _trainable(model) -> List[torch.nn.Parameter]:
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def flat_params(model) -> torch.Tensor:
    """The trainable parameters (each shared tensor once) as one fp32 CPU vector."""
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in _trainable(model)])


@torch.no_grad()
def set_flat_params(model, flat: torch.Tensor) -> None:
    off = 0
    for p in _trainable(model):
        n = p.numel()
        p.copy_(flat[off:off + n].view_as(p).to(p.device, p.dtype))
        off += n
    if off != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} elements, the model {off}")


def pairwise_distances(points: Dict[str, torch.Tensor], ref: torch.Tensor) -> Dict[str, dict]:
    """{"a|b": {"l2": ||a - b||, "rel": ||a - b|| / ||ref||}} for every pair, in insertion order."""
    ref_norm = float(torch.linalg.vector_norm(ref.double()))
    out = {}
    for a, b in itertools.combinations(points, 2):
        d = float(torch.linalg.vector_norm(points[a].double() - points[b].double()))
        out[f"{a}|{b}"] = {"l2": d, "rel": d / ref_norm if ref_norm > 0 else math.inf}
    return out


def spread(points: Sequence[torch.Tensor]) -> float:
    """Mean squared distance of the points to their centroid."""
    x = torch.stack([p.double() for p in points])
    c = x.mean(0)
    return float(((x - c) ** 2).sum(1).mean())


def interpolation_barrier(loss_at: Callable[[float], float], points: int = 11) -> dict:
    """Evaluate ``loss_at(alpha)`` on ``points`` evenly spaced alphas in [0, 1]; return the alphas,
    losses, the excess over the chord at each alpha, and the barrier (the largest excess)."""
    if points < 3:
        raise ValueError("points must be >= 3 (the two ends and at least one inside)")
    alphas = [i / (points - 1) for i in range(points)]
    losses = [float(loss_at(a)) for a in alphas]
    excess = [l - ((1 - a) * losses[0] + a * losses[-1]) for a, l in zip(alphas, losses)]
    i = max(range(points), key=lambda j: excess[j])
    return {"alphas": alphas, "losses": losses, "excess": excess, "barrier": excess[i], "argmax": alphas[i]}


def _adamw(params, lr, weight_decay, betas):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def finetune_copy(model, batches: Sequence[torch.Tensor], loss_fn: Callable, *, lr: float, weight_decay: float = 0.0,
                  betas=(0.9, 0.95)):
    """A deep copy of ``model`` after one AdamW step (fresh state, constant ``lr``) per batch."""
    m = copy.deepcopy(model)
    m.train()
    opt = _adamw(_trainable(m), lr, weight_decay, betas)
    for batch in batches:
        loss = loss_fn(m, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return m


@torch.no_grad()
def _mean_loss(model, batches: Sequence[torch.Tensor], loss_fn: Callable) -> float:
    was = model.training
    model.eval()
    try:
        return sum(float(loss_fn(model, b)) for b in batches) / max(len(batches), 1)
    finally:
        model.train(was)


def closeness_of_minima(model, train_batches: Dict[str, Sequence[torch.Tensor]],
                        val_batches: Dict[str, Sequence[torch.Tensor]], loss_fn: Callable, *, lr: float,
                        weight_decay: float = 0.0, betas=(0.9, 0.95), points: int = 11) -> dict:
    """Fine-tune a copy of ``model`` on each source's ``train_batches``; distances, spread and the
    barrier of the mixture validation loss (mean over the sources of ``val_batches``) between each pair."""
    names = list(train_batches)
    theta0 = flat_params(model)
    work = copy.deepcopy(model)

    def mixture(m) -> float:
        return sum(_mean_loss(m, val_batches[n], loss_fn) for n in val_batches) / len(val_batches)

    minima, own = {}, {}
    for n in names:
        m = finetune_copy(model, train_batches[n], loss_fn, lr=lr, weight_decay=weight_decay, betas=betas)
        minima[n] = flat_params(m)
        own[n] = _mean_loss(m, val_batches[n], loss_fn) if n in val_batches else math.nan
        del m
    moved = {n: float(torch.linalg.vector_norm(minima[n].double() - theta0.double())) for n in names}
    dists = pairwise_distances(minima, theta0)
    end_loss = {}
    for n in names:
        set_flat_params(work, minima[n])
        end_loss[n] = mixture(work)
    barriers = {}
    for a, b in itertools.combinations(names, 2):
        ends = {0.0: end_loss[a], 1.0: end_loss[b]}

        def loss_at(alpha, a=a, b=b, ends=ends):
            if alpha in ends:
                return ends[alpha]
            set_flat_params(work, (1 - alpha) * minima[a] + alpha * minima[b])
            return mixture(work)
        barriers[f"{a}|{b}"] = interpolation_barrier(loss_at, points)
    set_flat_params(work, theta0)
    start = mixture(work)
    pairs = list(dists)
    return {
        "sources": names,
        "theta0_norm": float(torch.linalg.vector_norm(theta0.double())),
        "start_mixture_loss": start,
        "moved": moved,
        "own_source_val_loss": own,
        "mixture_val_loss_at_minimum": end_loss,
        "pairs": {k: {**dists[k], "barrier": barriers[k]["barrier"], "curve": barriers[k]["excess"]} for k in pairs},
        "mean_l2": sum(dists[k]["l2"] for k in pairs) / len(pairs) if pairs else math.nan,
        "mean_rel": sum(dists[k]["rel"] for k in pairs) / len(pairs) if pairs else math.nan,
        "mean_barrier": sum(barriers[k]["barrier"] for k in pairs) / len(pairs) if pairs else math.nan,
        "mean_mid_excess": (sum(barriers[k]["excess"][len(barriers[k]["excess"]) // 2] for k in pairs) / len(pairs)
                            if pairs else math.nan),
        "max_barrier": max(barriers[k]["barrier"] for k in pairs) if pairs else math.nan,
        "spread": spread([minima[n] for n in names]),
        "mean_moved": sum(moved.values()) / len(moved),
        "alphas": next(iter(barriers.values()))["alphas"] if barriers else [],
    }
