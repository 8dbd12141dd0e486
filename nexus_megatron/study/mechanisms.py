"""Mechanism measures of one final checkpoint (docs/results.md, "Mechanism measures"; issue 19), each built on a pure
estimator of :mod:`.stats`:

* **noise-corrected cross-source gradient cosine**: each source's validation sequences split into two
  disjoint halves, a gradient per half, :func:`~.stats.split_half_cosine` (cross inner products of
  independent halves over the geometric mean of the within-source split-half agreements);
* **interference matrix** ``L_j(theta_i) - L_j(theta_0)``: a copy fine-tuned on source i alone (fresh AdamW,
  constant lr, training sequences no run read), evaluated on every source j and the OOD sources
  (:func:`~.stats.interference_matrix`);
* **barriers** between the fine-tuned endpoints: the mixture validation loss on the straight path minus the
  straight line between the endpoint losses, largest over the interior points (signed, :func:`~.stats.excess_over_chord`);
* **relative critical sharpness** ``lambda_c(i -> j) = 2 / eta_c`` along the unit gradient of source i (its
  split-half mean), for every loss j, with the shared line search (:func:`nexus_megatron.sharpness.shared_critical_steps`):
  one search per direction, every probe evaluating all the losses whose brackets it falls in. A search that hits
  its cap is a bound, reported apart and never averaged with values.

:func:`measure_mechanisms` takes a model, a loss function and plain batches, so it is testable without a run.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import torch

from ..sharpness import shared_critical_steps
from .minima import finetune_copy, flat_params, set_flat_params
from .stats import excess_over_chord, interference_matrix, pairs_of, split_half_cosine

__all__ = ["half_gradients", "measure_mechanisms"]


def _params(model):
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def half_gradients(model, batch: torch.Tensor, loss_fn: Callable):
    """(g_a, g_b): flat fp32 gradients of the mean loss over the first and the second half of ``batch``."""
    n = batch.shape[0] // 2
    if n < 1:
        raise ValueError("the split-half cosine needs at least 2 sequences per source")
    params = _params(model)
    out = []
    for part in (batch[:n], batch[n:2 * n]):
        gs = torch.autograd.grad(loss_fn(model, part), params, allow_unused=True)
        out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1).cpu()
                              for g, p in zip(gs, params)]))
    return out[0], out[1]


@torch.no_grad()
def _loss(model, batch, loss_fn) -> float:
    return float(loss_fn(model, batch))


def measure_mechanisms(model, loss_fn: Callable, *, half_batches: Dict[str, torch.Tensor],
                       eval_batches: Dict[str, torch.Tensor], finetune_batches: Dict[str, Sequence[torch.Tensor]],
                       finetune_lr: float, betas=(0.9, 0.95), points: int = 5, sharpness_start: float = 0.01,
                       sharpness_eps: float = 2.0 ** -4, max_doublings: int = 12) -> dict:
    """``half_batches[i]``: 2h validation sequences of training source i (split into halves);
    ``eval_batches[j]``: validation sequences of every source j, training sources first, then OOD sources;
    ``finetune_batches[i]``: the fine-tuning batches of source i. Returns a JSON-ready dict."""
    names = list(half_batches)
    model.eval()
    theta0 = flat_params(model)
    out: dict = {"sources": names, "eval": list(eval_batches)}

    # 1. split-half cosine (gradients in eval mode: the models have no dropout; deterministic)
    halves = {n: half_gradients(model, half_batches[n], loss_fn) for n in names}
    cos = split_half_cosine(halves)
    out["cosine"] = cos

    # 2. relative sharpness along each source's unit gradient, all losses in one shared search
    def losses_at(direction):
        def f(eta, keys):
            set_flat_params(model, theta0 - eta * direction)
            return {k: _loss(model, eval_batches[k], loss_fn) for k in keys}
        return f
    base = {k: _loss(model, eval_batches[k], loss_fn) for k in eval_batches}
    sharp = {}
    for n in names:
        g = 0.5 * (halves[n][0] + halves[n][1])
        u = g / max(float(torch.linalg.vector_norm(g)), 1e-30)
        res, search = shared_critical_steps(losses_at(u), {k: sharpness_start for k in eval_batches}, loss0=base,
                                            eps=sharpness_eps, max_doublings=max_doublings)
        sharp[n] = {k: {"lambda_c": r.lambda_c, "eta_c": r.eta_c, "capped": bool(r.cap_hit), "bound": r.bound,
                        "log10": math.log10(r.lambda_c) if r.lambda_c > 0 and math.isfinite(r.lambda_c) else None}
                    for k, r in res.items()}
        sharp[n]["_forward_passes"] = len(search.etas)
    set_flat_params(model, theta0)
    out["relative_sharpness"] = sharp

    # 3. interference matrix and 4. barriers between the fine-tuned endpoints
    ends, after = {}, {}
    for n in names:
        m = finetune_copy(model, finetune_batches[n], loss_fn, lr=finetune_lr, betas=betas)
        m.eval()
        after[n] = {k: _loss(m, eval_batches[k], loss_fn) for k in eval_batches}
        ends[n] = flat_params(m)
        del m
    out["interference"] = interference_matrix(base, after)
    out["moved"] = {n: float(torch.linalg.vector_norm(ends[n].double() - theta0.double())) for n in names}

    def mixture(flat) -> float:
        set_flat_params(model, flat)
        return sum(_loss(model, eval_batches[n], loss_fn) for n in names) / len(names)
    alphas = [i / (points - 1) for i in range(points)]
    end_mix = {n: sum(after[n][j] for j in names) / len(names) for n in names}
    barriers = {}
    for a, b in pairs_of(names):
        losses = [end_mix[a]] + [mixture((1 - t) * ends[a] + t * ends[b]) for t in alphas[1:-1]] + [end_mix[b]]
        r = excess_over_chord(alphas, losses)
        barriers[f"{a}|{b}"] = {"barrier": r["barrier"], "mid": r["mid"], "excess": r["excess"], "losses": losses}
    set_flat_params(model, theta0)
    vals = [v["barrier"] for v in barriers.values()]
    out["barriers"] = {"pairs": barriers, "alphas": alphas, "mean": sum(vals) / len(vals) if vals else math.nan,
                       "max": max(vals) if vals else math.nan}
    return out
