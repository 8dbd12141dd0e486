"""Critical sharpness (ALGORITHMS.md §2): curvature along the optimizer's update from forward passes only.

Kalra et al., "A Scalable Measure of Loss Landscape Curvature for Analyzing the Training Dynamics of
LLMs" (arXiv 2601.16979). With ``u`` the update the optimizer is about to apply at unit learning rate::

    eta_c    = min { eta > 0 : L(theta - eta u) > L(theta) }       critical learning rate
    lambda_c = 2 / eta_c                                           critical sharpness
    lambda_c(1->2): the same with u from loss 1 and L = loss 2       relative critical sharpness

On a quadratic ``lambda_c`` is the directional sharpness ``u^T H u / g^T u`` (the tests' oracle).

The whole algorithm is in this file:

* small pure functions: :func:`adamw_direction` (u from an AdamW/Adam optimizer and the current
  gradient, without touching its state), :func:`update_adam_moments` (commit only the moment update:
  what the standalone command does on a pretrained checkpoint), :func:`critical_step` (the forward-only
  line search of §2.2), the stability thresholds, and :func:`directional_sharpness` (the Hessian-vector
  product oracle for small models);
* a *host* (:class:`PlainHost`): the small interface that moves the parameters to ``theta - eta u``,
  restores them bitwise and reduces losses over the data-parallel ranks. Plain PyTorch / DDP keeps the
  whole model on every rank; a sharded host (DeepSpeed: :mod:`nexus_megatron.engines.deepspeed.sharpness`)
  moves the fp32 master shard and re-gathers, with the same four methods;
* :class:`ProbeSet` (fixed probe batches per source) and :class:`SharpnessMeter` (mixture, per-source
  and OOD line searches with warm starts);
* :class:`SharpnessHook`, the ``pre_outer_step`` callback of :class:`~nexus_megatron.nexus.Nexus` and
  :class:`~nexus_megatron.baseline.MixtureAdamW`, and :func:`build_sharpness_hook` that installs it
  on the plain engine, or through an engine's ``sharpness_seam()`` (:class:`SharpnessSeam`: its host, its
  direction at the seam, its probe module).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .errors import NexusConfigError

SPLITS = ("step", "val", "train")
STEP = "__step__"   # the probe-set key of the outer step's own training micro-batches


# ---------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SharpnessConfig:
    """The ``sharpness:`` section of a run config."""

    enabled: bool = False
    every: int = 25
    """Measure in every ``every``-th outer step (counted by the optimizer's completed outer steps + 1)."""
    eps: float = 0.0625
    """Relative tolerance of the bisection, (eta_hi - eta_lo) / eta_lo <= eps (2**-4: 4 bisection steps)."""
    max_doublings: int = 12
    """Cap on the doublings (or halvings) of the exponential phase; reported as ``cap_hit``."""
    batches: int = 1
    """Probe batches of ``data.micro_batch_size`` sequences per source (split over the ranks)."""
    split: str = "step"
    """The batches of the mixture loss L: ``step`` (default: the outer step's own training micro-batches,
    the batch that produced u, as in the paper; the trainer passes them with ``hook.begin_step``),
    ``val`` (fixed validation sequences of every source, weighted by the source weights) or ``train``
    (fixed: the first sequences of each source's training order). The relative (per-source, OOD) losses
    always use fixed sequences: validation ones, or training ones with ``train``. See docs/sharpness.md
    for the measured difference (``val`` is noisier and can hit the cap when u does not descend the
    held-out batch)."""
    relative: bool = True
    """Also measure lambda_c(mixture -> source) for every training source and the OOD set."""

    def __post_init__(self):
        validate_sharpness_config(self)


def validate_sharpness_config(cfg: SharpnessConfig, where: str = "sharpness") -> None:
    if not isinstance(cfg.enabled, bool):
        raise NexusConfigError(f"{where}.enabled={cfg.enabled!r}: must be true or false")
    for name in ("every", "batches", "max_doublings"):
        v = getattr(cfg, name)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise NexusConfigError(f"{where}.{name}={v!r}: must be an integer >= 1")
    if isinstance(cfg.eps, bool) or not isinstance(cfg.eps, (int, float)) or not (0 < cfg.eps < 1):
        raise NexusConfigError(f"{where}.eps={cfg.eps!r}: the relative bisection tolerance must be in (0, 1), "
                               "e.g. 0.0625 (= 2**-4)")
    if cfg.split not in SPLITS:
        raise NexusConfigError(f"{where}.split={cfg.split!r}: use one of {', '.join(SPLITS)}")
    if not isinstance(cfg.relative, bool):
        raise NexusConfigError(f"{where}.relative={cfg.relative!r}: must be true or false")


# ---------------------------------------------------------------------------------------------------
# the update direction
# ---------------------------------------------------------------------------------------------------

def adam_hyper(optimizer, group) -> tuple:
    """(beta1, beta2, eps, weight decay, decoupled) of an Adam/AdamW param group."""
    beta1, beta2 = (float(b) for b in group["betas"])
    decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
    return beta1, beta2, float(group["eps"]), float(group.get("weight_decay", 0.0)), decoupled


def _check_adam(optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Adam):   # AdamW is a subclass of Adam
        raise NexusConfigError(f"critical sharpness needs an Adam/AdamW optimizer to compute the update "
                               f"direction, got {type(optimizer).__name__}")


def _param_grad_pairs(optimizer, params, grads):
    """[(group, param, grad)] in param-group order; grads default to ``p.grad``."""
    if params is not None and grads is not None and len(params) != len(grads):
        raise ValueError(f"{len(params)} params but {len(grads)} grads")
    by_id = {}
    if params is not None:
        by_id = {id(p): (grads[i] if grads is not None else p.grad) for i, p in enumerate(params)}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = by_id[id(p)] if params is not None else p.grad
            out.append((group, p, g))
    return out


@torch.no_grad()
def adamw_direction(optimizer: torch.optim.Optimizer, params: Optional[Sequence[torch.Tensor]] = None,
                    grads: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
    """The update ``u`` that ``optimizer.step()`` is about to apply at unit learning rate.

    ``theta_next = theta - lr * u`` with, for AdamW (decoupled weight decay)::

        m' = beta1 m + (1 - beta1) g            v' = beta2 v + (1 - beta2) g^2        t' = t + 1
        u  = (m' / (1 - beta1^t')) / (sqrt(v') / sqrt(1 - beta2^t') + eps) + wd * theta

    (Adam with L2 weight decay: ``g <- g + wd * theta`` before the moments, no ``wd * theta`` term.)
    Everything is read from the optimizer's state and param groups; the state is not modified. Returns
    one tensor per parameter, in the order of ``params`` (default: the optimizer's param-group order).
    A parameter without gradient gets the update AdamW would give it: none (u = 0); torch's AdamW skips
    such parameters entirely, weight decay included.
    """
    _check_adam(optimizer)
    pairs = _param_grad_pairs(optimizer, params, grads)
    u_of = {}
    for group, p, g in pairs:
        if g is None:
            u_of[id(p)] = torch.zeros_like(p)
            continue
        if group.get("amsgrad", False):
            raise NexusConfigError("critical sharpness: amsgrad AdamW is not supported")
        beta1, beta2, eps, wd, decoupled = adam_hyper(optimizer, group)
        if group.get("maximize", False):
            g = -g
        if wd and not decoupled:
            g = g.add(p, alpha=wd)
        st = optimizer.state.get(p, {})
        step = float(st["step"]) + 1.0 if "step" in st else 1.0
        if "exp_avg" in st:
            m = torch.lerp(st["exp_avg"], g, 1 - beta1)
            v = st["exp_avg_sq"].mul(beta2).addcmul_(g, g, value=1 - beta2)
        else:   # the first step: zero moments
            m = torch.lerp(torch.zeros_like(g), g, 1 - beta1)
            v = torch.zeros_like(g).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1 ** step
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (v.sqrt_() / bc2_sqrt).add_(eps)
        u = m.div_(denom).mul_(1.0 / bc1)
        if wd and decoupled:
            u.add_(p, alpha=wd)
        u_of[id(p)] = u
    order = params if params is not None else [p for _, p, _ in pairs]
    return [u_of[id(p)] for p in order]


@torch.no_grad()
def update_adam_moments(optimizer: torch.optim.Optimizer, params: Optional[Sequence[torch.Tensor]] = None,
                        grads: Optional[Sequence[Optional[torch.Tensor]]] = None) -> None:
    """Commit AdamW's moment update for ``grads`` (step += 1, exp_avg, exp_avg_sq) in torch's state
    format, without moving the parameters: the 'accumulate Adam moments on a pretrained checkpoint'
    step of the paper's OLMo-2 measurements (the original optimizer state is unavailable)."""
    _check_adam(optimizer)
    for group, p, g in _param_grad_pairs(optimizer, params, grads):
        if g is None:
            continue
        beta1, beta2, _, wd, decoupled = adam_hyper(optimizer, group)
        if group.get("maximize", False):
            g = -g
        if wd and not decoupled:
            g = g.add(p, alpha=wd)
        st = optimizer.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        st["exp_avg"].lerp_(g, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)


def gd_threshold(lr: float, weight_decay: float = 0.0) -> float:
    """Edge of stability of gradient descent with decoupled weight decay: 2/lr - wd."""
    return 2.0 / lr - weight_decay


def adam_threshold(lr: float, beta1: float, weight_decay: float = 0.0) -> float:
    """Edge of stability of (momentum) Adam on the preconditioned Hessian:
    (2 + 2 beta1) / ((1 - beta1) lr) - wd (1 + beta1) / (1 - beta1)   (38/lr for beta1 = 0.9, wd = 0)."""
    return (2 + 2 * beta1) / ((1 - beta1) * lr) - weight_decay * (1 + beta1) / (1 - beta1)


# ---------------------------------------------------------------------------------------------------
# the line search
# ---------------------------------------------------------------------------------------------------

@dataclass
class CriticalStep:
    """Result of one line search. When ``cap_hit`` is true ``eta_c`` is a bound, not an estimate:
    the last step tried (a lower bound on eta_c if the loss never rose, an upper bound if it rose at
    every step tried, i.e. u is not a descent direction of this loss at the resolution of the search)."""

    eta_c: float
    lambda_c: float
    forward_passes: int
    cap_hit: bool
    eta_lo: float
    eta_hi: float
    loss0: float
    trace: list = field(default_factory=list)
    """[(eta, loss)] of every evaluation, in order (eta = 0 for L0 when it was evaluated here)."""
    bound: Optional[str] = None
    """When ``cap_hit``: ``"lower"`` (the loss never rose up to the cap: eta_c >= ``eta_c``, lambda_c <=
    ``lambda_c``) or ``"upper"`` (it rose at every step down to the cap: eta_c <= ``eta_c``)."""


def _rises(loss: float, loss0: float) -> bool:
    return not (loss <= loss0)   # NaN / Inf count as a rise


def critical_step(loss_at: Callable[[float], float], eta0: float, *, loss0: Optional[float] = None,
                  eps: float = 2.0 ** -4, max_doublings: int = 12) -> CriticalStep:
    """Forward-only line search for eta_c = min{eta > 0: L(theta - eta u) > L0} (ALGORITHMS.md §2.2).

    ``loss_at(eta)`` returns L(theta - eta u) as a float (the caller moves and restores the
    parameters, and must give every rank the same value). ``loss0`` is L(theta) if already known (then
    it is not evaluated and not counted). Exponential phase from ``eta0``: double while the loss does
    not rise, otherwise halve until it does not (at most ``max_doublings`` times); then bisect until
    (hi - lo)/lo <= eps and return the midpoint. Forward passes: 1 (L0, if evaluated) + 1 + the
    doublings/halvings + ceil(log2(1/eps)) bisections; 7 for a warm start within a factor 2 at eps=2^-4.
    """
    if not (eta0 > 0 and math.isfinite(eta0)):
        raise ValueError(f"critical_step: eta0={eta0!r} must be a finite number > 0")
    if not (0 < eps < 1):
        raise ValueError(f"critical_step: eps={eps!r} must be in (0, 1)")
    trace = []

    def f(eta: float) -> float:
        val = float(loss_at(eta))
        trace.append((eta, val))
        return val

    if loss0 is None:
        loss0 = f(0.0)
    loss0 = float(loss0)
    if not math.isfinite(loss0):
        return CriticalStep(math.nan, math.nan, len(trace), False, math.nan, math.nan, loss0, trace)

    eta = float(eta0)
    cap_hit = False
    if not _rises(f(eta), loss0):        # descent at eta0: double until the loss rises
        lo, hi = eta, None
        for _ in range(max_doublings):
            eta *= 2.0
            if _rises(f(eta), loss0):
                hi = eta
                break
            lo = eta
        if hi is None:
            cap_hit = True
            return CriticalStep(lo, 2.0 / lo, len(trace), True, lo, math.inf, loss0, trace, bound="lower")
    else:                                # the loss rises at eta0: halve until it does not
        lo, hi = None, eta
        for _ in range(max_doublings):
            eta *= 0.5
            if not _rises(f(eta), loss0):
                lo = eta
                break
            hi = eta
        if lo is None:
            cap_hit = True
            return CriticalStep(hi, 2.0 / hi, len(trace), True, 0.0, hi, loss0, trace, bound="upper")
    while hi - lo > eps * lo * (1 + 1e-12):      # (slack: a bracket of exactly eps*lo may round up)
        mid = 0.5 * (lo + hi)
        if _rises(f(mid), loss0):
            hi = mid
        else:
            lo = mid
    eta_c = 0.5 * (lo + hi)
    return CriticalStep(eta_c, 2.0 / eta_c, len(trace), cap_hit, lo, hi, loss0, trace)


# ---------------------------------------------------------------------------------------------------
# one shared line search for every loss along u
# ---------------------------------------------------------------------------------------------------

MISSES_BEFORE_BISECT = 2
"""A loss's bracket is bisected after this many of its own predicted probes in a row did not halve it."""


def grid_steps(eps: float) -> int:
    """m such that the search grid ``anchor * 2**(j/m)`` has cells of relative width 2**(1/m) - 1 <= eps
    (12 for eps = 2**-4: cells of 5.95%)."""
    if not (0 < eps < 1):
        raise ValueError(f"eps={eps!r} must be in (0, 1)")
    return max(1, math.ceil(math.log(2.0) / math.log1p(eps) - 1e-9))


def _quadratic_root(x1: float, f1: float, x2: float, f2: float):
    """(root, slope at 0) of f(x) = a x + b x^2 through (x1, f1), (x2, f2) (and the origin: f(0) = 0 is
    L(theta) - L0): the root -a/b when b > 0 and a < 0, else None."""
    if not (x1 > 0 and x2 > 0 and x1 != x2 and math.isfinite(f1) and math.isfinite(f2)):
        return None, None
    b = (f2 / x2 - f1 / x1) / (x2 - x1)
    a = f1 / x1 - b * x1
    if a < 0 < b:
        return -a / b, a
    return None, a


def _one_point_root(x1: float, f1: float, slope: Optional[float]):
    """The root -a/b of f(x) = a x + b x^2 through (x1, f1) with the slope a at 0 given (a prior: the slope
    of this loss along the previous measurement's u), when a < 0 < b; else None."""
    if slope is None or not (slope < 0 and x1 > 0 and math.isfinite(f1)):
        return None
    b = (f1 / x1 - slope) / x1
    return -slope / b if b > 0 else None


def _local_root(x0: float, f0: float, x1: float, f1: float, x2: float, f2: float):
    """The root inside (x0, x1) of the parabola through three points (x0 < x1 the bracket ends, x2 the probe
    nearest the bracket outside it, or the origin), or None when there is not exactly one there."""
    if len({x0, x1, x2}) < 3 or not all(math.isfinite(v) for v in (f0, f1, f2)):
        return None
    d01 = (f1 - f0) / (x1 - x0)
    c = ((f2 - f1) / (x2 - x1) - d01) / (x2 - x0)
    bb = d01 - c * (x0 + x1)                      # f(x) = c x^2 + bb x + cc
    cc = f0 - d01 * x0 + c * x0 * x1
    if c == 0:
        roots = [-cc / bb] if bb != 0 else []
    else:
        disc = bb * bb - 4 * c * cc
        if disc < 0:
            return None
        sq = math.sqrt(disc)
        roots = [(-bb - sq) / (2 * c), (-bb + sq) / (2 * c)]
    inside = [r for r in roots if x0 < r < x1]
    return inside[0] if len(inside) == 1 else None


def fitted_slope(res: CriticalStep) -> Optional[float]:
    """The slope at eta = 0 of the quadratic through L0 and the two probes that bracket a measured eta_c
    (None for a capped or failed search, or when the quadratic does not descend then rise): the prior
    :func:`shared_critical_steps` takes as ``slopes`` in the next measurement."""
    if res.cap_hit or not math.isfinite(res.eta_c):
        return None
    seen = {eta: v - res.loss0 for eta, v in res.trace if eta > 0}
    if res.eta_lo not in seen or res.eta_hi not in seen:
        return None
    root, slope = _quadratic_root(res.eta_lo, seen[res.eta_lo], res.eta_hi, seen[res.eta_hi])
    return slope if root is not None else None


class _LossSearch:
    """The bracket of one loss on the shared grid: probed indices -> L - L0 (NaN/Inf: a rise)."""

    def __init__(self, key: str, start: int, loss0: float, m: int, max_doublings: int,
                 slope: Optional[float] = None):
        self.key, self.start, self.loss0 = key, start, float(loss0)
        self.slope = slope
        """The prior slope at 0 (the previous measurement's, :func:`fitted_slope`): a crossing predicted from
        one probe (the quadratic through L0 and that probe with this slope at 0)."""
        self.used_prior_down = False
        self.f: Dict[int, float] = {}
        self.cap_up, self.cap_down = start + m * max_doublings, start - m * max_doublings
        self.m = m
        self.bisect_next = False
        self.misses = 0
        """Consecutive own predicted probes that did not halve the bracket: at ``MISSES_BEFORE_BISECT`` the
        next probe bisects it (the safeguard against a prediction that keeps landing on one side)."""
        self.creep = 0
        """Consecutive own probes that left the loss unbracketed on the same side: the next step is at least
        2**creep grid cells (a prediction that keeps falling short cannot creep one cell at a time)."""
        self.wanted: Optional[int] = None
        self.trace: list = []

    def bracket(self):
        """(lo, hi): lo the largest non-rising index below hi (None: eta = 0, i.e. L0), hi the smallest
        rising index (None: no rise seen)."""
        rising = [j for j, v in self.f.items() if _rises(v, 0.0)]
        hi = min(rising) if rising else None
        below = [j for j, v in self.f.items() if not _rises(v, 0.0) and (hi is None or j < hi)]
        return (max(below) if below else None), hi

    def state(self):
        """'nan', 'done', 'cap_up' (never rose up to the cap), 'cap_down' (rose at every index down to the
        cap) or 'open'."""
        if not math.isfinite(self.loss0):
            return "nan"
        lo, hi = self.bracket()
        if lo is not None and hi is not None and hi - lo <= 1:
            return "done"
        if hi is None and lo is not None and lo >= self.cap_up:
            return "cap_up"
        if lo is None and hi is not None and hi <= self.cap_down:
            return "cap_down"
        return "open"

    def explore_step(self) -> int:
        """Grid cells to step outward from an unbracketed side without a prediction: a quarter of a doubling
        (a warm start is usually off by less than that), doubling with every own probe that leaves the loss
        unbracketed on the same side."""
        return max(1, self.m // 4) * 2 ** min(self.creep, 8)

    def _near_start(self) -> bool:
        """Whether a probe lies within a doubling (m cells) of the warm start. Until one does, an unbracketed
        loss whose warm start lies on its unexplored side probes the start: the probes so far were placed for
        other losses, and a crossing extrapolated from probes a doubling or more away is worse than the warm
        start (on the mixture loss of configs/tiny.yaml, 2.5 doublings above the relative losses, it cost
        3-4 passes per measurement)."""
        return any(abs(j - self.start) <= self.m for j in self.f)

    def _nearest_outside(self, lo: int, hi: int) -> Optional[int]:
        """The finite probe nearest the bracket [lo, hi] outside it (None: the origin, when no probe lies
        below lo and none above hi is nearer)."""
        above = [j for j, v in self.f.items() if j > hi and math.isfinite(v)]
        below = [j for j, v in self.f.items() if j < lo and math.isfinite(v)]
        up = min(above) if above else None
        down = max(below) if below else None
        if up is not None and (down is None or up - hi <= lo - down):
            return up
        return down

    def informed_by(self, j: int) -> bool:
        lo, hi = self.bracket()
        return (lo is None or j > lo) and (hi is None or j < hi)

    def want(self, eta_of: Callable[[float], float], index_of: Callable[[float], float]) -> int:
        """The index this loss would probe next: its start first; then the crossing predicted by
        the quadratic through the origin and the two probes nearest it (a guess, never trusted: the
        bracket decides), the nearer grid point of it first; without a prediction a step outward of
        :meth:`explore_step` cells, or the bisection of a bracket (and the bisection of a wide bracket that
        ``MISSES_BEFORE_BISECT`` of its predicted probes in a row did not halve)."""
        lo, hi = self.bracket()
        m = self.m
        if not self.f:
            return self.start
        pts = sorted((j, v) for j, v in self.f.items() if math.isfinite(v))
        if hi is None:                                  # no rise yet: go up
            below = [(j, v) for j, v in pts if j <= lo][-2:]
            c = None
            if self.start > lo and not self._near_start():   # the warm start before a far extrapolation
                return int(min(self.start, self.cap_up))
            if len(below) == 2:
                root, _ = _quadratic_root(eta_of(below[0][0]), below[0][1], eta_of(below[1][0]), below[1][1])
                if root is not None:
                    c = math.ceil(index_of(root))
            if c is None and below:                     # one probe (or no 2-probe fit): the prior slope
                root = _one_point_root(eta_of(below[-1][0]), below[-1][1], self.slope)
                if root is not None:
                    c = math.ceil(index_of(root))
            if c is None:
                c = self.start if self.start > lo else lo + self.explore_step()
            return int(min(max(c, lo + 2 ** max(0, min(self.creep - 1, 8))), lo + 4 * m, self.cap_up))
        if lo is None:                                  # rises at every probe: go down
            above = [(j, v) for j, v in pts if j >= hi][:2]
            c = None
            if self.start < hi and not self._near_start():
                return int(max(self.start, self.cap_down))
            prior = _one_point_root(eta_of(above[0][0]), above[0][1], self.slope) if above else None
            if len(above) == 2:
                root, slope = _quadratic_root(eta_of(above[0][0]), above[0][1], eta_of(above[1][0]), above[1][1])
                if root is not None:
                    c = math.floor(index_of(root))
                elif slope is not None and slope >= 0:
                    # the two probes say u ascends this loss at 0 (or the loss is steeper than a parabola beyond
                    # the crossing): trust the prior slope once, then check the cap at once
                    if prior is not None and not self.used_prior_down:
                        c = math.floor(index_of(prior))
                        self.used_prior_down = True
                    else:
                        c = self.cap_down if hi <= self.start else hi - m
            elif prior is not None:
                c = math.floor(index_of(prior))
            if c is None:
                c = self.start if self.start < hi else hi - m
            elif c != self.cap_down:
                c = max(min(c, hi - 2 ** max(0, min(self.creep - 1, 8))), hi - 4 * m)
            return int(max(c, self.cap_down))
        if hi - lo > 2 and self.bisect_next:
            return (lo + hi) // 2
        x_lo, x_hi = eta_of(lo), eta_of(hi)
        f_lo, f_hi = self.f.get(lo, 0.0), self.f[hi]
        if not math.isfinite(f_hi):
            return (lo + hi) // 2
        near = self._nearest_outside(lo, hi)
        x_near, f_near = (eta_of(near), self.f[near]) if near is not None else (0.0, 0.0)
        root = _local_root(x_lo, f_lo, x_hi, f_hi, x_near, f_near)
        if root is None and lo in self.f:
            root, _ = _quadratic_root(x_lo, f_lo, x_hi, f_hi)
        if root is None or not (x_lo < root < x_hi):
            root = x_lo + (x_hi - x_lo) * (-f_lo) / (f_hi - f_lo) if f_hi > f_lo else 0.5 * (x_lo + x_hi)
        x = min(max(index_of(root), lo + 1e-9), hi - 1e-9)
        a, b = math.floor(x), math.ceil(x)
        near = a if x - a <= b - x else b
        for c in (near, a if near == b else b):
            if lo < c < hi:
                return int(c)
        return (lo + hi) // 2


@dataclass
class SharedSearch:
    """What :func:`shared_critical_steps` did: ``etas`` the probes in order (0.0 for L0),
    ``evaluated`` the losses evaluated at each."""

    etas: list = field(default_factory=list)
    evaluated: list = field(default_factory=list)

    @property
    def passes(self) -> int:
        return len(self.etas)


def shared_critical_steps(losses_at: Callable[[float, Sequence[str]], Dict[str, float]],
                          starts: Dict[str, float], *, anchor: Optional[float] = None,
                          loss0: Optional[Dict[str, float]] = None, eps: float = 2.0 ** -4,
                          max_doublings: int = 12, slopes: Optional[Dict[str, float]] = None):
    """The line searches of several losses along one direction u, sharing every probe (ALGORITHMS.md §2.2).

    ``losses_at(eta, keys)`` returns ``{key: L_key(theta - eta u)}`` for the named losses from ONE
    forward pass (the caller concatenates their probe batches; every rank must get the same values).
    ``starts[key]`` is each loss's first guess of its eta_c (its previous eta_c: a warm start).
    ``loss0``: the losses at eta = 0 if already known, else they are evaluated first (one pass).
    ``slopes[key]``: a prior for the slope of L_key(theta - eta u) at eta = 0 (:func:`fitted_slope` of the
    previous measurement), which predicts a crossing from a single probe; it only chooses where to look.

    The probes lie on one geometric grid ``anchor * 2**(j/m)`` (``anchor``: default the first start;
    ``m = grid_steps(eps)``, cells of relative width <= eps), so a probe at eta informs every loss whose
    open bracket contains it, and neighbouring losses share bracket ends. Each loss keeps its own
    bracket [lo, hi] = [the largest non-rising probe below hi, the smallest rising probe] (lo = 0 before
    any non-rising probe; NaN/Inf rise) and is done when it is one cell ((hi - lo)/lo <= eps, as
    :func:`critical_step`; eta_c the midpoint) or when it hits the cap of its exponential phase
    (no rise up to ``start * 2**max_doublings``: eta_c >= that; a rise at every probe down to
    ``start / 2**max_doublings``: eta_c <= that). The first probe after L0 is the median start (it informs
    every loss); then the next probe is the index wanted by the most open losses (ties: the widest bracket,
    unbounded first), evaluated for every loss whose open bracket
    contains it. Returns ({key: CriticalStep}, :class:`SharedSearch`); ``CriticalStep.forward_passes``
    counts the passes that evaluated that loss (its L0 included)."""
    if not (0 < eps < 1):
        raise ValueError(f"eps={eps!r} must be in (0, 1)")
    for k, s in starts.items():
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"start of {k!r}: {s!r} must be a finite number > 0")
    keys = list(starts)
    m = grid_steps(eps)
    anchor = float(anchor if anchor is not None else starts[keys[0]])
    if not (anchor > 0 and math.isfinite(anchor)):
        raise ValueError(f"anchor={anchor!r} must be a finite number > 0")
    log_anchor = math.log2(anchor)

    def eta_of(j) -> float:
        return anchor * 2.0 ** (j / m)

    def index_of(eta: float) -> float:
        return (math.log2(eta) - log_anchor) * m

    record = SharedSearch()
    if loss0 is None:
        base = losses_at(0.0, keys)
        record.etas.append(0.0)
        record.evaluated.append(tuple(keys))
        loss0 = {k: float(base[k]) for k in keys}
        counted0 = True
    else:
        counted0 = False
    slopes = slopes or {}
    searches = {k: _LossSearch(k, int(round(index_of(starts[k]))), loss0[k], m, max_doublings, slopes.get(k))
                for k in keys}
    for k in keys:
        searches[k].trace.append((0.0, float(loss0[k])))
    for _ in range(100000):
        open_ = [s for s in searches.values() if s.state() == "open"]
        if not open_:
            break
        wants = {}
        if not any(s.f for s in open_):    # the first probe informs every loss: the median warm start
            first = sorted(s.start for s in open_)[(len(open_) - 1) // 2]
            for s in open_:
                s.wanted = first
            wants[first] = list(open_)
        else:
            for s in open_:
                s.wanted = s.want(eta_of, index_of)
                wants.setdefault(s.wanted, []).append(s)

        def width(s):
            lo, hi = s.bracket()
            return math.inf if lo is None or hi is None else hi - lo

        j = max(wants, key=lambda c: (len(wants[c]), max(width(s) for s in wants[c]), -c))
        told = [s for s in open_ if s.informed_by(j)]
        eta = eta_of(j)
        vals = losses_at(eta, [s.key for s in told])
        record.etas.append(eta)
        record.evaluated.append(tuple(s.key for s in told))
        for s in told:
            lo, hi = s.bracket()
            before = None if lo is None or hi is None else hi - lo
            side_before = (hi is None, lo is None)
            v = float(vals[s.key])
            s.f[j] = v - s.loss0 if math.isfinite(v) else math.nan
            s.trace.append((eta, v))
            lo, hi = s.bracket()
            after = None if lo is None or hi is None else hi - lo
            # safeguard: a wide bracket that MISSES_BEFORE_BISECT predicted probes in a row did not halve is
            # bisected next
            if j == s.wanted and before is not None and after is not None:
                missed = not s.bisect_next and after > 2 and 2 * after > before
                s.misses = s.misses + 1 if missed else 0
            s.bisect_next = s.misses >= MISSES_BEFORE_BISECT
            side = (hi is None, lo is None)
            s.creep = s.creep + 1 if (j == s.wanted and side == side_before and any(side)) else 0
    else:
        raise RuntimeError("shared_critical_steps: no convergence (a bug)")
    out = {}
    for k, s in searches.items():
        passes = len(s.trace) - (0 if counted0 else 1)
        st = s.state()
        lo, hi = s.bracket()
        if st == "nan":
            out[k] = CriticalStep(math.nan, math.nan, passes, False, math.nan, math.nan, s.loss0, s.trace)
        elif st == "cap_up":
            x = eta_of(lo)
            out[k] = CriticalStep(x, 2.0 / x, passes, True, x, math.inf, s.loss0, s.trace, bound="lower")
        elif st == "cap_down":
            x = eta_of(hi)
            out[k] = CriticalStep(x, 2.0 / x, passes, True, 0.0, x, s.loss0, s.trace, bound="upper")
        else:
            x_lo, x_hi = eta_of(lo), eta_of(hi)
            eta_c = 0.5 * (x_lo + x_hi)
            out[k] = CriticalStep(eta_c, 2.0 / eta_c, passes, False, x_lo, x_hi, s.loss0, s.trace)
    return out, record


# ---------------------------------------------------------------------------------------------------
# the quadratic oracle (small models only: Hessian-vector products need double backward)
# ---------------------------------------------------------------------------------------------------

def directional_sharpness(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                          u: Sequence[torch.Tensor]) -> dict:
    """lambda_dir = u^T H u / g^T u at the current parameters, with one Hessian-vector product
    (double backward). Returns {"lambda_dir", "gTu", "uHu"}. For tests and small models; the line
    search exists because this does not scale (and does not work with fused attention kernels)."""
    loss = loss_fn()
    g = torch.autograd.grad(loss, list(params), create_graph=True)
    gu = sum((gi * ui).sum() for gi, ui in zip(g, u))
    hu = torch.autograd.grad(gu, list(params))
    uhu = float(sum((hi * ui).sum() for hi, ui in zip(hu, u)))
    gtu = float(gu.detach())
    return {"lambda_dir": uhu / gtu if gtu != 0 else math.nan, "gTu": gtu, "uHu": uhu}


# ---------------------------------------------------------------------------------------------------
# hosts: moving, restoring, reducing
# ---------------------------------------------------------------------------------------------------

class PlainHost:
    """Parameters replicated on every rank (plain PyTorch; DDP). The four methods are the whole
    interface a sharded host (DeepSpeed ZeRO, Megatron's distributed optimizer) has to provide:

    * ``begin(u)``: remember the direction (shard-sized under sharding) and the point theta to return to;
    * ``move(eta)``: parameters <- theta - eta * u, computed from the saved theta (never incrementally);
    * ``end()``: parameters <- theta, bitwise (a copy, never a subtraction);
    * ``all_reduce(t)``: sum ``t`` over the data-parallel ranks (identical result on every rank).

    ``begin(u, master)``: ``master`` are tensors equal to the parameters at ``begin`` (e.g. Nexus's fp32
    anchor), used instead of a saved copy: then the only extra buffer is ``u``.
    """

    def __init__(self, params: Sequence[torch.Tensor], group=None):
        self.params = list(params)
        self.group = group
        self._theta: Optional[List[torch.Tensor]] = None
        self._u: Optional[List[torch.Tensor]] = None

    @torch.no_grad()
    def begin(self, u: Sequence[torch.Tensor], master: Optional[Sequence[torch.Tensor]] = None) -> None:
        self._u = [x.to(p.dtype) for x, p in zip(u, self.params)]
        self._theta = list(master) if master is not None else [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def move(self, eta: float) -> None:
        ps = [p.data for p in self.params]
        torch._foreach_copy_(ps, self._theta)
        if eta != 0.0:
            torch._foreach_add_(ps, self._u, alpha=-float(eta))

    @torch.no_grad()
    def end(self) -> None:
        if self._theta is not None:
            torch._foreach_copy_([p.data for p in self.params], self._theta)
        self._theta = self._u = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel group, in place; ``t`` may live on the CPU (NCCL reduces a copy on
        the parameters' device)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dev = self.params[0].device if self.params else t.device
            if dev.type != "cpu" and t.device != dev:
                buf = t.to(dev)
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
                t.copy_(buf)
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


# ---------------------------------------------------------------------------------------------------
# probe batches and losses
# ---------------------------------------------------------------------------------------------------

def lm_loss_sum(model, batch: torch.Tensor):
    """(sum of next-token cross-entropies, number of tokens) of a [B, L+1] batch (fp64 sum)."""
    from .models import lm_loss
    return float(lm_loss(model, batch, reduction="sum").double()), batch[:, 1:].numel()


def lm_loss_sums(model, batches: Sequence[torch.Tensor], loss_fn: Optional[Callable] = None) -> list:
    """[(sum of next-token cross-entropies (fp64), tokens)] of each [b, L+1] batch, from one forward over
    all batches of a length concatenated (one forward per distinct length): the per-sequence sums of the
    per-token losses. ``loss_fn(model, x) -> per-token losses [B*L]`` (default ``models.lm_loss`` with
    ``reduction='none'``)."""
    if loss_fn is None:
        from .models import lm_loss

        def loss_fn(model, x):
            return lm_loss(model, x, reduction="none")
    out: list = [None] * len(batches)
    by_len: Dict[int, List[int]] = {}
    for i, b in enumerate(batches):
        by_len.setdefault(int(b.shape[1]), []).append(i)
    for idx in by_len.values():
        x = torch.cat([batches[i] for i in idx]) if len(idx) > 1 else batches[idx[0]]
        per_seq = loss_fn(model, x).reshape(x.shape[0], -1).double().sum(1).cpu()
        s = 0
        for i in idx:
            n = int(batches[i].shape[0])
            out[i] = (float(per_seq[s:s + n].sum()), batches[i][:, 1:].numel())
            s += n
    return out


@dataclass
class ProbeSet:
    """Probe batches: ``batches[name]`` is this rank's share (a list of LongTensors [b, L+1]) of the
    sequences of loss ``name`` (mean per-token loss over all ranks' sequences). ``mixture`` maps probe
    sets to weights: the mixture loss is sum w_name L_name (the training sources with their weights, or
    ``{STEP: 1}`` for the outer step's own batches). ``sources`` are the training sources measured
    relatively (default: the mixture's names) and ``ood`` the held-out ones (their mean loss is the OOD
    loss)."""

    batches: Dict[str, List[torch.Tensor]]
    mixture: Dict[str, float]
    ood: List[str] = field(default_factory=list)
    sources: Optional[List[str]] = None

    def __post_init__(self):
        if self.sources is None:
            self.sources = [n for n in self.mixture if n != STEP]

    @classmethod
    def from_sources(cls, sources: dict, names: Sequence[str], ood: Sequence[str], weights: Sequence[float],
                     *, split: str, batches: int, micro_batch_size: int, rank: int = 0, world: int = 1):
        """Sequences 0 .. batches*micro_batch_size-1 of each source (``split='val'``: the validation
        windows in file order; ``'train'``: the first samples of the training order), dealt
        round-robin over the ranks like ``train.evaluate``."""
        out = {}
        for name in list(names) + list(ood):
            sampler = sources[name].val if (split == "val" or name in ood) else sources[name].train
            n = min(batches * micro_batch_size, sampler.windows)
            mine = list(range(rank, n, world))
            out[name] = [torch.stack([sampler.batch(j, 1)[0] for j in mine[s:s + micro_batch_size]])
                         for s in range(0, len(mine), micro_batch_size)]
        tot = float(sum(weights))
        return cls(out, {n: float(w) / tot for n, w in zip(names, weights)}, list(ood), list(names))


@contextlib.contextmanager
def probe_mode(model):
    """Eval mode (no dropout), no autograd graph, and the RNG streams untouched."""
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)


class SharpnessMeter:
    """lambda_c of the mixture loss and lambda_c(mixture -> each loss) along one direction u, with
    warm starts from the previous measurement, from ONE shared line search
    (:func:`shared_critical_steps`): every probe eta is one forward pass over the concatenated probe
    batches of the losses it informs, each loss read from its own sequences' summed token losses. Every
    probe reduces [loss sum, tokens] per probe set over the data-parallel ranks (fp64) before comparing,
    so all ranks take the same branch at every step.

    ``loss_sums(model, batches) -> [(loss sum, tokens)]`` evaluates a list of batches in one forward
    (default :func:`lm_loss_sums`); a per-batch ``loss_sum(model, batch)`` is still accepted (then one
    forward per batch)."""

    def __init__(self, model, probe: ProbeSet, host, *, eps: float = 2.0 ** -4, max_doublings: int = 12,
                 relative: bool = True, loss_sum: Optional[Callable] = None, loss_sums: Optional[Callable] = None):
        self.model, self.probe, self.host = model, probe, host
        self.eps, self.max_doublings, self.relative = eps, max_doublings, relative
        if loss_sums is None and loss_sum is None:
            loss_sums = lm_loss_sums
        self.loss_sum, self.loss_sums = loss_sum, loss_sums
        self.prev: Dict[str, float] = {}
        """Each loss's last measured eta_c: its warm start."""
        self.slopes: Dict[str, float] = {}
        """Each loss's slope at 0 along the last u (:func:`fitted_slope`): the search's one-probe prior."""
        self.measurements = 0
        self.last_cost: Dict[str, float] = {}
        """Of the last measurement: ``passes`` (probe etas, L0 included), ``forward_calls`` (model
        invocations on this rank), ``gathers`` (parameter gathers of a sharded host: one per move on
        ZeRO-1/2 and Megatron's distributed optimizer, one per forward call on ZeRO-3; 0 replicated),
        ``probe_tokens`` (tokens evaluated, all ranks)."""
        self._calls = self._tokens = 0

    # -- losses ------------------------------------------------------------------------------------
    def losses(self, names: Sequence[str]) -> Dict[str, float]:
        """Mean per-token loss of each named probe set at the current parameters: one forward over all
        their batches, one all-reduce."""
        t = torch.zeros(len(names), 2, dtype=torch.float64)
        owner, batches = [], []
        for i, n in enumerate(names):
            for b in self.probe.batches[n]:
                owner.append(i)
                batches.append(b)
        if batches:
            if self.loss_sums is not None:
                sums = self.loss_sums(self.model, batches)
                self._calls += 1
            else:
                sums = [self.loss_sum(self.model, b) for b in batches]
                self._calls += len(batches)
            for i, (s, c) in zip(owner, sums):
                t[i, 0] += s
                t[i, 1] += c
        self.host.all_reduce(t)
        self._tokens += int(t[:, 1].sum())
        return {n: float(t[i, 0] / t[i, 1]) if t[i, 1] > 0 else math.nan for i, n in enumerate(names)}

    def _mixture(self, per: Dict[str, float]) -> float:
        return sum(w * per[n] for n, w in self.probe.mixture.items())

    def targets(self) -> Dict[str, List[str]]:
        """{loss key: the probe sets it reads}: "mixture", every training source, "ood" (mean of the OOD sets)."""
        probe = self.probe
        out = {"mixture": list(probe.mixture)}
        if self.relative:
            out.update({n: [n] for n in probe.sources})
            if probe.ood:
                out["ood"] = list(probe.ood)
        return out

    def _value(self, key: str, sets: List[str], per: Dict[str, float]) -> float:
        if key == "mixture":
            return self._mixture(per)
        return sum(per[n] for n in sets) / len(sets)

    # -- one measurement ---------------------------------------------------------------------------
    def measure(self, u: Sequence[torch.Tensor], eta0: float, master=None) -> dict:
        """The shared search along ``u`` (first time from ``eta0``, e.g. the current lr; afterwards every
        loss from its previous eta_c, a loss without one from the mixture's). Parameters are bitwise
        restored on return. Returns {"mixture": CriticalStep, "<source>": CriticalStep, ..., "ood": ...}."""
        host = self.host
        targets = self.targets()
        moves = [0]
        self._calls = self._tokens = 0

        def losses_at(eta: float, keys: Sequence[str]) -> Dict[str, float]:
            host.move(eta)
            moves[0] += 1
            sets = list(dict.fromkeys(n for k in keys for n in targets[k]))
            per = self.losses(sets)
            return {k: self._value(k, targets[k], per) for k in keys}

        start_mix = self._start("mixture", eta0)
        starts = {k: self._start(k, start_mix) for k in targets}
        with probe_mode(self.model):
            host.begin(u, master)
            try:
                results, search = shared_critical_steps(losses_at, starts, anchor=start_mix, eps=self.eps,
                                                        max_doublings=self.max_doublings, slopes=self.slopes)
            finally:
                host.end()
        per = getattr(host, "gathers_per", None)
        self.last_cost = {"passes": search.passes, "forward_calls": self._calls, "probe_tokens": self._tokens,
                          "gathers": (moves[0] + 1 if per == "move" else self._calls if per == "forward" else 0)}
        for key, res in results.items():
            slope = fitted_slope(res)
            if slope is not None:
                self.slopes[key] = slope
            else:
                self.slopes.pop(key, None)
            if not res.cap_hit and math.isfinite(res.eta_c):
                self.prev[key] = res.eta_c
            else:                       # a capped search is a bound: do not warm-start from it
                self.prev.pop(key, None)
        self.measurements += 1
        return results

    def _start(self, key: str, default: float) -> float:
        return self.prev.get(key, default)


def bound_key(res: CriticalStep) -> str:
    """The metric name of a capped value: ``lambda_c_at_most`` (the loss never rose up to the cap: eta_c >=
    the cap, lambda_c <= 2/cap) or ``lambda_c_at_least`` (it rose at every step down to the cap)."""
    return "lambda_c_at_most" if res.bound == "lower" else "lambda_c_at_least"


def sharpness_metrics(results: dict, *, lr: float, beta1: float, weight_decay: float,
                      cost: Optional[dict] = None) -> dict:
    """The metrics of one measurement (see docs/sharpness.md). A capped search is a bound, never logged as a
    measurement: ``sharpness/lambda_c[/<key>]`` only when measured, else ``sharpness/lambda_c_at_most[/<key>]``
    or ``sharpness/lambda_c_at_least[/<key>]``; ``sharpness/cap_hits`` counts them."""
    r = results["mixture"]
    out = {"sharpness/cap_hit": int(r.cap_hit), "sharpness/threshold": adam_threshold(lr, beta1, weight_decay)}
    if r.cap_hit:
        out[f"sharpness/{bound_key(r)}"] = r.lambda_c
    else:
        out.update({"sharpness/lambda_c": r.lambda_c, "sharpness/eta_c": r.eta_c,
                    "sharpness/lr_over_eta_c": lr / r.eta_c if r.eta_c else math.inf})
    capped = 0
    for key, res in results.items():
        if key == "mixture":
            continue
        if res.cap_hit:
            out[f"sharpness/{bound_key(res)}/{key}"] = res.lambda_c
            capped += 1
        else:
            out[f"sharpness/lambda_c/{key}"] = res.lambda_c
    cost = cost or {}
    passes = cost.get("passes", max(x.forward_passes for x in results.values()))
    out["sharpness/forward_passes"] = passes
    out["sharpness/forward_passes_total"] = passes
    for name, metric in (("probe_tokens", "probe_tokens"), ("gathers", "param_gathers")):
        if name in cost:
            out[f"sharpness/{metric}"] = cost[name]
    out["sharpness/relative_cap_hits"] = capped
    out["sharpness/cap_hits"] = capped + int(r.cap_hit)
    return out


# ---------------------------------------------------------------------------------------------------
# the training hook
# ---------------------------------------------------------------------------------------------------

def _main_group(optimizer) -> dict:
    """The param group whose hyperparameters define the threshold: the one holding most parameters."""
    return max(optimizer.param_groups, key=lambda g: sum(p.numel() for p in g["params"]))


class SharpnessHook:
    """``pre_outer_step`` callback (:class:`~nexus_megatron.nexus.Nexus`: the pseudo-gradient G is in
    ``p.grad``, parameters at theta_t; :class:`~nexus_megatron.baseline.MixtureAdamW`: the reduced,
    clipped gradient). Every ``every`` outer steps it computes u from the outer AdamW with that
    gradient, measures, restores everything bitwise and keeps the metrics for :meth:`pop_metrics`.

    Extra memory during a measurement: ``u`` (one fp32 copy of the parameters) and, unless the
    optimizer has an fp32 anchor at theta_t (Nexus does), one copy of the parameters to restore from.
    """

    def __init__(self, meter: SharpnessMeter, every: int = 1, direction: Optional[Callable] = None):
        self.meter = meter
        self.every = int(every)
        self.direction = direction if direction is not None else optimizer_direction
        """``direction(opt) -> (u, master, lr, beta1, weight_decay)`` at the seam (default: the plain engines')."""
        self.step: Optional[int] = None
        """The trainer's 1-based number of the outer step about to be applied (set it before
        ``engine.outer_step()``); if None, the optimizer's completed outer steps + 1 are used (these do not
        count steps skipped for NaN/Inf)."""
        self._pending: dict = {}
        self.last: dict = {}
        self.history: list = []      # (outer step, metrics) of this process's measurements

    def begin_step(self, step: int, batches: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Called by the trainer before ``engine.outer_step()``: the 1-based step number and (for
        ``sharpness.split=step``) this rank's training micro-batches of the step."""
        self.step = int(step)
        if self.meter.probe.mixture.keys() == {STEP}:
            self.meter.probe.batches[STEP] = list(batches) if batches is not None else []

    def _step_number(self, opt) -> int:
        return int(self.step) if self.step is not None else int(opt.stats.outer_steps) + 1

    def due(self, opt) -> bool:
        return self._step_number(opt) % self.every == 0

    def __call__(self, opt) -> None:
        probe = self.meter.probe
        step_mode = probe.mixture.keys() == {STEP}
        try:
            if self.due(opt):
                if step_mode and not probe.batches.get(STEP):
                    raise NexusConfigError("sharpness.split=step needs the step's training batches: the trainer "
                                           "must call hook.begin_step(step, batches) before engine.outer_step()")
                self._measure(opt)
        finally:
            if step_mode:
                probe.batches[STEP] = []        # never reuse a stale step's batches

    def _measure(self, opt) -> None:
        t0 = time.perf_counter()
        u, master, lr, beta1, weight_decay = self.direction(opt)
        results = self.meter.measure(u, eta0=lr, master=master)
        del u, master
        m = sharpness_metrics(results, lr=lr, beta1=beta1, weight_decay=weight_decay, cost=self.meter.last_cost)
        m["sharpness/time_s"] = time.perf_counter() - t0
        self._pending = m
        self.last = m
        self.history.append((self._step_number(opt), m))

    def pop_metrics(self) -> dict:
        """The metrics of the measurement made in the last outer step ({} if none)."""
        out, self._pending = self._pending, {}
        return out

    def state_dict(self) -> dict:
        """The warm starts (for exact resume: the next measurement starts where it would have)."""
        return {"prev": dict(self.meter.prev), "slopes": dict(self.meter.slopes),
                "measurements": self.meter.measurements}

    def load_state_dict(self, sd: dict) -> None:
        self.meter.prev = dict(sd.get("prev", {}))
        self.meter.slopes = dict(sd.get("slopes", {}))
        self.meter.measurements = int(sd.get("measurements", 0))


def optimizer_direction(opt) -> tuple:
    """The plain engines' seam (:class:`~nexus_megatron.nexus.Nexus`, :class:`~nexus_megatron.baseline.MixtureAdamW`):
    (u from ``opt.outer`` with ``p.grad``, the fp32 anchor to restore from or None, and the lr, beta1 and
    weight decay of the param group holding most parameters)."""
    outer = opt.outer
    u = adamw_direction(outer, opt.params, [p.grad for p in opt.params])
    group = _main_group(outer)
    return (u, _anchor_views(opt), float(group["lr"]), float(group["betas"][0]),
            float(group.get("weight_decay", 0.0)))


@dataclass
class SharpnessSeam:
    """What an engine with its own parameter layout hands :func:`build_sharpness_hook` from its
    ``sharpness_seam()`` method (DeepSpeed: ``engines/deepspeed/sharpness.py``)."""

    host: object
    """begin / move / end / all_reduce on the engine's (sharded) parameters, like :class:`PlainHost`."""
    direction: Callable
    """``direction(ctx) -> (u, master, lr, beta1, weight_decay)``: u and theta in the host's layout."""
    model: object
    """The module the probe forward passes call (``lm_loss(model, batch)``)."""
    install: Callable
    """``install(hook)``: the engine calls ``hook(ctx)`` right before its outer AdamW update; ``ctx`` has
    ``stats.outer_steps`` (completed outer steps) and is what ``direction`` reads."""


def _anchor_views(opt) -> Optional[List[torch.Tensor]]:
    """Nexus keeps theta_t as an fp32 flat anchor and the parameters equal it bitwise when
    ``pre_outer_step`` runs: restore from it instead of saving a copy."""
    anchor = getattr(opt, "anchor", None)
    if not isinstance(anchor, torch.Tensor):
        return None
    ps = opt.params
    if any(p.dtype != anchor.dtype for p in ps):
        return None
    sizes = [p.numel() for p in ps]
    views = [t.view_as(p) for t, p in zip(anchor[: sum(sizes)].split(sizes), ps)]
    return views


def build_sharpness_hook(scfg: SharpnessConfig, engine, sources: dict, names: Sequence[str],
                         ood: Sequence[str], weights: Sequence[float], *, micro_batch_size: int,
                         rank: int = 0, world: int = 1) -> Optional[SharpnessHook]:
    """Build the hook and install it: on the plain engine as ``engine.opt.pre_outer_step``; on an engine with
    a ``sharpness_seam()`` method (DeepSpeed) through its :class:`SharpnessSeam` (returns None when
    ``sharpness.enabled`` is false)."""
    if not scfg.enabled:
        return None
    seam_of = getattr(engine, "sharpness_seam", None)
    if seam_of is None and (not hasattr(engine, "opt") or not hasattr(engine.opt, "pre_outer_step")):
        raise NexusConfigError(f"sharpness.enabled=true is supported on train.engine=plain and deepspeed "
                               f"(got {getattr(engine, 'name', type(engine).__name__)}); set sharpness.enabled=false")
    probe = ProbeSet.from_sources(sources, names, ood, weights, split="train" if scfg.split == "train" else "val",
                                  batches=scfg.batches, micro_batch_size=micro_batch_size, rank=rank, world=world)
    if scfg.split == "step":
        probe.mixture = {STEP: 1.0}
        probe.batches[STEP] = []
    if seam_of is not None:
        seam = seam_of()
        meter = SharpnessMeter(seam.model, probe, seam.host, eps=scfg.eps, max_doublings=scfg.max_doublings,
                               relative=scfg.relative)
        hook = SharpnessHook(meter, every=scfg.every, direction=seam.direction)
        seam.install(hook)
        return hook
    host = PlainHost(engine.params)
    meter = SharpnessMeter(engine.module, probe, host, eps=scfg.eps, max_doublings=scfg.max_doublings,
                           relative=scfg.relative)
    hook = SharpnessHook(meter, every=scfg.every)
    engine.opt.pre_outer_step = hook
    return hook
