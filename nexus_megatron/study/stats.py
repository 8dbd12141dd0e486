"""The study's statistics and mechanism estimators as small pure functions (docs/results.md, issue 19).

* Student-t quantiles for integer degrees of freedom (exact closed forms, no scipy): :func:`t_cdf`,
  :func:`t_quantile`;
* the pre-registered primary endpoint: the OOD loss of the reference interpolated on its own ID -> OOD
  curve at a target ID loss (:func:`value_at_first_crossing`), the paired t-interval and the minimum
  detectable effect at a given power (:func:`paired_summary`, :func:`minimum_detectable_effect`,
  :func:`seeds_needed`);
* the lr selection rule (:func:`select_by_mean`);
* mechanism measures: the noise-corrected split-half cross-source gradient cosine
  (:func:`split_half_cosine`), the interference matrix (:func:`interference_matrix`) and the signed
  barrier over the chord between two endpoints (:func:`excess_over_chord`).

Nothing here imports torch except :func:`split_half_cosine`, which takes tensors.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["t_cdf", "t_quantile", "minimum_detectable_effect", "seeds_needed", "paired_summary",
           "value_at_first_crossing", "select_by_mean", "split_half_cosine", "interference_matrix",
           "excess_over_chord"]


# ---------------------------------------------------------------------------------------------------
# Student's t

def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer number of degrees of freedom ``df`` >= 1
    (Abramowitz & Stegun 26.7.3-4: finite sums in theta = atan(t / sqrt(df)))."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"df={df!r}: an integer >= 1")
    if t == 0:
        return 0.5
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = 1.0
            for k in range(1, (df - 3) // 2 + 1):    # terms (2*4*...*(2k)) / (1*3*...*(2k+1)) cos^(2k)
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            a = 2.0 / math.pi * (theta + s * c * total)
        else:
            a = 2.0 / math.pi * theta
    else:
        total, term = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):        # terms (1*3*...*(2k-1)) / (2*4*...*(2k)) cos^(2k)
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    p = 0.5 + 0.5 * a                                # a = P(|T| < |t|)
    return p if t > 0 else 1.0 - p


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`, to 1e-10)."""
    if not (0 < p < 1):
        raise ValueError(f"p={p!r} must be in (0, 1)")
    if p == 0.5:
        return 0.0
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


def minimum_detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired t-test at level ``alpha`` detects with
    probability ``power`` over ``n`` pairs whose differences have standard deviation ``sd``:
    ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)`` (the usual approximation that ignores the
    non-centrality of the t distribution; slightly optimistic for very small n)."""
    if n < 2:
        return math.nan
    df = n - 1
    return (t_quantile(1 - alpha / 2, df) + t_quantile(power, df)) * sd / math.sqrt(n)


def seeds_needed(sd: float, effect: float, *, alpha: float = 0.05, power: float = 0.8, max_n: int = 10000) -> int:
    """The smallest n >= 2 with :func:`minimum_detectable_effect` (sd, n) <= |effect|."""
    if effect == 0 or not math.isfinite(sd):
        return max_n
    for n in range(2, max_n + 1):
        if minimum_detectable_effect(sd, n, alpha=alpha, power=power) <= abs(effect):
            return n
    return max_n


def paired_summary(diffs: Sequence[float], *, alpha: float = 0.05, power: float = 0.8,
                   reference_effect: Optional[float] = None) -> dict:
    """Mean, standard deviation, the (1 - alpha) t-interval, the minimum detectable effect at ``power`` from
    the observed spread, and (when ``reference_effect`` is given) the seeds that effect would need."""
    v = [float(x) for x in diffs if x is not None and math.isfinite(float(x))]
    n = len(v)
    out = {"n": n, "mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan, "half_width": math.nan,
           "mde": math.nan, "lower": sum(1 for x in v if x < 0)}
    if n == 0:
        return out
    mean = sum(v) / n
    out["mean"] = mean
    if n < 2:
        return out
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = t_quantile(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    out.update(sd=sd, lo=mean - half, hi=mean + half, half_width=half,
               mde=minimum_detectable_effect(sd, n, alpha=alpha, power=power))
    if reference_effect is not None:
        out["seeds_for_reference_effect"] = seeds_needed(sd, reference_effect, alpha=alpha, power=power)
    return out


# ---------------------------------------------------------------------------------------------------
# the primary endpoint: a value interpolated at a matched loss

def value_at_first_crossing(curve: Sequence[Tuple[float, float, float]], target: float) -> Optional[dict]:
    """``curve``: [(step, loss, value)] in step order (e.g. AdamW's evaluations: step, ID loss, OOD loss).
    At the first pair of consecutive points with ``loss_a > target >= loss_b``, interpolate linearly in the
    loss: ``f = (loss_a - target) / (loss_a - loss_b)``; returns ``{"step", "value", "f", "index"}`` with
    step and value at that fraction between the two points. A first point already at or below the target
    returns that point (f = 0). None when the curve never reaches the target (the caller reports it as
    not matched, never as a value)."""
    pts = list(curve)
    if not pts:
        return None
    s0, l0, v0 = pts[0]
    if l0 <= target:
        return {"step": float(s0), "value": float(v0), "f": 0.0, "index": 0}
    for i in range(1, len(pts)):
        sa, la, va = pts[i - 1]
        sb, lb, vb = pts[i]
        if la > target >= lb:
            f = (la - target) / (la - lb)
            return {"step": sa + f * (sb - sa), "value": va + f * (vb - va), "f": f, "index": i}
    return None


def select_by_mean(results: Dict[float, Sequence[float]]) -> dict:
    """The pre-registered lr choice: the value with the lowest mean (over seeds) final ID loss; ties go to the
    smaller value. Returns ``{"selected", "means", "at_edge"}`` (``at_edge``: the best is the smallest or
    largest value tried, so the sweep did not bracket the optimum)."""
    means = {}
    for k, xs in results.items():
        v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
        if not v:
            raise ValueError(f"no finite result for {k!r}")
        means[k] = sum(v) / len(v)
    best = min(sorted(means), key=lambda k: means[k])
    keys = sorted(means)
    return {"selected": best, "means": means, "at_edge": len(keys) > 2 and best in (keys[0], keys[-1])}


# ---------------------------------------------------------------------------------------------------
# mechanism measures

def split_half_cosine(halves: Dict[str, Tuple["object", "object"]]) -> dict:
    """Noise-corrected cross-source gradient cosine from two independent half-sample gradient estimates per
    source: ``halves[name] = (g_a, g_b)`` (flat tensors, each the mean gradient over a disjoint half of the
    source's sequences).

    A mini-batch gradient is ``g + noise``; the cosine of two noisy estimates is shrunk toward 0 by the
    noise. Inner products of *independent* estimates are unbiased: E<g_i^a, g_j^b> = <g_i, g_j> for i != j
    (any halves) and E<g_i^a, g_i^b> = ||g_i||^2 (the split-half agreement). So

        cos_corr(i, j) = mean_{h, h'} <g_i^h, g_j^h'> / sqrt(<g_i^a, g_i^b> <g_j^a, g_j^b>)

    estimates the cosine of the true gradients (a ratio of unbiased estimates: consistent, and
    undefined, NaN, when a source's split-half agreement is <= 0, i.e. its gradient is below the noise).
    Also returned: the naive cosine of the full-sample means ``(g^a + g^b) / 2`` and each source's
    split-half cosine ``cos(g_i^a, g_i^b)`` (its reliability)."""
    import torch

    names = list(halves)
    H = {n: (halves[n][0].double(), halves[n][1].double()) for n in names}
    full = {n: 0.5 * (H[n][0] + H[n][1]) for n in names}
    self_dot = {n: float(torch.dot(H[n][0], H[n][1])) for n in names}
    reliability = {n: self_dot[n] / max(float(torch.linalg.vector_norm(H[n][0]) * torch.linalg.vector_norm(H[n][1])),
                                        1e-300) for n in names}
    corrected, naive = {}, {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            cross = sum(float(torch.dot(x, y)) for x in H[a] for y in H[b]) / 4.0
            den = self_dot[a] * self_dot[b]
            corrected[f"{a}|{b}"] = cross / math.sqrt(den) if self_dot[a] > 0 and self_dot[b] > 0 else math.nan
            naive[f"{a}|{b}"] = float(torch.dot(full[a], full[b])) / max(
                float(torch.linalg.vector_norm(full[a]) * torch.linalg.vector_norm(full[b])), 1e-300)
    fin = [v for v in corrected.values() if math.isfinite(v)]
    return {"corrected": corrected, "naive": naive, "reliability": reliability,
            "mean_corrected": sum(fin) / len(fin) if fin else math.nan,
            "mean_naive": sum(naive.values()) / len(naive) if naive else math.nan}


def interference_matrix(before: Dict[str, float], after: Dict[str, Dict[str, float]]) -> dict:
    """``before[j] = L_j(theta_0)``; ``after[i][j] = L_j(theta_i)`` after fine-tuning on source i.
    Returns ``{"matrix": {i: {j: L_j(theta_i) - L_j(theta_0)}}, "self": mean of the diagonal,
    "cross": mean off the diagonal}`` (negative = fine-tuning on i helped j; positive = interference)."""
    mat = {i: {j: float(after[i][j]) - float(before[j]) for j in before if j in after[i]} for i in after}
    diag = [mat[i][i] for i in mat if i in mat[i]]
    off = [mat[i][j] for i in mat for j in mat[i] if j != i and j in after]   # among the fine-tuned sources only
    return {"matrix": mat, "self": sum(diag) / len(diag) if diag else math.nan,
            "cross": sum(off) / len(off) if off else math.nan}


def excess_over_chord(alphas: Sequence[float], losses: Sequence[float]) -> dict:
    """The loss along a straight path between two endpoints (``alphas`` from 0 to 1, ``losses`` at each)
    minus the straight line between the endpoint losses. The barrier is the largest excess over the
    INTERIOR points only, so it is negative when the whole path dips below the chord (the endpoints, where the
    excess is 0 by definition, are not candidates). Returns ``{"excess", "barrier", "argmax", "mid"}``
    (``mid``: the excess at the interior point closest to alpha = 1/2)."""
    a, l = [float(x) for x in alphas], [float(x) for x in losses]
    if len(a) != len(l) or len(a) < 3:
        raise ValueError("need >= 3 points (both ends and at least one inside), as many losses as alphas")
    if a[0] != 0.0 or a[-1] != 1.0:
        raise ValueError("alphas must start at 0 and end at 1")
    excess = [li - ((1 - ai) * l[0] + ai * l[-1]) for ai, li in zip(a, l)]
    inner = range(1, len(a) - 1)
    i = max(inner, key=lambda j: excess[j])
    m = min(inner, key=lambda j: abs(a[j] - 0.5))
    return {"excess": excess, "barrier": excess[i], "argmax": a[i], "mid": excess[m]}


def pairs_of(names: Sequence[str]) -> List[Tuple[str, str]]:
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
