"""The outer-step bookkeeper every engine uses (plain, DeepSpeed, Megatron, and the AdamW baseline).

:class:`OuterBook` owns what happens around the math of one outer step: the micro-step count, gamma_t
(taken at the first micro-step from the outer optimizer's lr), the NaN/Inf poison flag, the counters
(``outer_steps``, ``skipped_steps``, ``skipped_sources``, ``consecutive_skips``), the per-step statistics
logged as ``nexus/gnorm/<source>`` and ``nexus/step_skipped_sources``, the abort after
``max_consecutive_skips`` poisoned steps in a row, and the resume-compatibility check of a checkpoint.
The engines only move tensors.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .errors import NexusConfigError, NexusNonFiniteError
from .functional import hash_control_seed, inner_gamma, inner_update, random_direction_pieces


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

    def load_counters(self, counters: dict) -> None:
        for k, v in counters.items():
            setattr(self, k, v)


class OuterBook:
    """Bookkeeping of the outer steps of one optimizer (one per rank; every rank holds the same values).

    ``max_consecutive_skips``: abort (:class:`NexusNonFiniteError`) after this many poisoned outer steps in a
    row (0 = never). ``micro_steps``: k. Typical use by an engine::

        gamma = book.begin_micro(lr, num_params)      # gamma_t fixed at the first micro-step
        ...reduce, exchange norms...
        book.record(norms, present, active, nonfinite)  # poisons the step on NaN/Inf
        book.end_micro()
        ...after the k-th: outer update unless book.poisoned...
        book.end_outer(skipped=book.poisoned); book.check_abort()
    """

    def __init__(self, num_sources: int, *, micro_steps: int, max_consecutive_skips: int, config=None):
        self.num_sources = int(num_sources)
        self.micro_steps = int(micro_steps)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.config = config
        self.stats = NexusStats()
        self.stats.reset_step(self.num_sources)
        self.inner_steps = 0
        self.poisoned = False
        self.gamma_t: Optional[float] = None

    # -- micro-steps ---------------------------------------------------------------------------
    def begin_micro(self, lr: float, num_params: int, *, who: str = "inner_step") -> float:
        """Check the count and, at the first micro-step of an outer step, fix gamma_t from ``lr``."""
        if self.inner_steps >= self.micro_steps:
            raise RuntimeError(f"{who}() called {self.inner_steps + 1} times in one outer step but "
                               f"micro_steps={self.micro_steps}: run the outer step after every "
                               f"{self.micro_steps} inner steps")
        if self.inner_steps == 0:
            self.gamma_t = inner_gamma(self.config, lr, num_params, self.micro_steps)
        return self.gamma_t

    @property
    def last_micro(self) -> bool:
        """The micro-step in progress (between begin_micro and end_micro) is the k-th."""
        return self.inner_steps == self.micro_steps - 1

    def record(self, norms: torch.Tensor, present: torch.Tensor, active: torch.Tensor, nonfinite: bool) -> bool:
        """One micro-step's norms: poison the outer step on NaN/Inf, else count dropped sources and the norms.
        Returns True when the micro-step moves the parameters (not poisoned, some source active)."""
        if nonfinite:
            self.poisoned = True
        if self.poisoned:
            return False
        self.stats.record_micro_step(norms, present, active)
        return bool(active.any())

    def poison(self) -> None:
        self.poisoned = True

    def end_micro(self) -> None:
        self.inner_steps += 1

    def check_complete(self, who: str = "step") -> None:
        if self.inner_steps != self.micro_steps:
            raise RuntimeError(f"{who}() after {self.inner_steps} inner steps but micro_steps={self.micro_steps}: "
                               "call the inner step after each micro-step's backward")

    # -- outer steps ---------------------------------------------------------------------------
    def end_outer(self, skipped: bool) -> None:
        """Count the outer step just finished (applied or skipped) and start a new one."""
        if skipped:
            self.stats.skipped_steps += 1
            self.stats.consecutive_skips += 1
        else:
            self.stats.outer_steps += 1
            self.stats.consecutive_skips = 0
        self.inner_steps = 0
        self.poisoned = False

    def check_abort(self) -> None:
        """Raise :class:`NexusNonFiniteError` after ``max_consecutive_skips`` skipped steps in a row."""
        limit = self.max_consecutive_skips
        if limit and self.stats.consecutive_skips >= limit:
            raise NexusNonFiniteError(
                f"{self.stats.consecutive_skips} outer steps in a row had NaN/Inf gradients "
                f"(nexus.max_consecutive_skips={limit}); the last good parameters are intact. Lower the "
                "learning rate, check the data for corrupt tokens, or resume from the last checkpoint")

    def outer_info(self, **extra) -> dict:
        """The dict an outer step returns (``skipped``, ``gamma``, ``inner_steps``, plus ``extra``)."""
        return {"skipped": self.poisoned, "gamma": self.gamma_t, "inner_steps": self.inner_steps, **extra}

    def pop_step(self, sources) -> dict:
        return self.stats.pop_step(sources)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"inner_steps": self.inner_steps, "poisoned": self.poisoned, "gamma_t": self.gamma_t,
                "stats": self.stats.counters()}

    def load_state(self, sd: dict) -> None:
        self.inner_steps = int(sd.get("inner_steps", 0))
        self.poisoned = bool(sd.get("poisoned", False))
        self.gamma_t = sd.get("gamma_t")
        self.stats.load_counters(sd.get("stats", {}))


class BookViews:
    """The bookkeeper's state under the names the engines' callers use (``opt.stats``, ``opt.inner_steps``,
    ``opt.poisoned``, ``opt.gamma_t``), for a class that holds its :class:`OuterBook` as ``self.book``."""

    book: OuterBook

    @property
    def stats(self) -> NexusStats:
        return self.book.stats

    @property
    def inner_steps(self) -> int:
        return self.book.inner_steps

    @property
    def poisoned(self) -> bool:
        return self.book.poisoned

    @property
    def gamma_t(self) -> Optional[float]:
        return self.book.gamma_t


WORLD_KEYS = ("dp_size", "group_size")
"""The entries of a layout's description that only say how many ranks share the work. The optimizer state
itself does not depend on them: a resume on another number of ranks (``reshard=True``) ignores them once
the run-level check (nexus_megatron/resume.py) has found that the global batch and the data order stay the same."""


def without_world(layout: Optional[dict]) -> Optional[dict]:
    return None if layout is None else {k: v for k, v in layout.items() if k not in WORLD_KEYS}


def check_resume(saved_layout: Optional[dict], layout_now: dict, *, what: str = "nexus.layout, data.sources, "
                 "data.weights and number of ranks", reshard: bool = False, **pairs) -> None:
    """The one resume-compatibility check: the checkpoint's layout description must equal this run's, and
    every ``name=(saved, now)`` pair must agree; otherwise a :class:`NexusConfigError` naming the setting.
    ``reshard``: the number of ranks may differ (:data:`WORLD_KEYS` are not compared)."""
    if reshard:
        saved_layout, layout_now = without_world(saved_layout), without_world(layout_now)
    if saved_layout != layout_now:
        raise NexusConfigError(f"checkpoint was written with layout {saved_layout} but this run has {layout_now}: "
                               f"resume with the same {what}")
    for name, (saved, now) in pairs.items():
        if saved != now:
            raise NexusConfigError(f"checkpoint was written with {name}={saved} but this run has {now}: resume "
                                   f"with the same {name}")


class RandomDirectionControl:
    """The random-direction control (docs/nexus.md#controls, ``nexus.control=random_direction``) for any engine:
    the forward passes of an outer step are taken at ``theta_t + R`` with ``R = -gamma_t sum_m r_m``, where
    ``r_m`` is a seeded random vector of the norm of the micro-step's direction ``d_m``, while the pseudo-gradient
    still sums the ``d_m`` (the engine's ``d_sum`` is unchanged). One instance per rank.

    ``buffers``: the rank's fp32 tensors that hold parameters (the plain engine's flat vector, DeepSpeed's master
    partitions, Megatron's main params / shards); ``R`` (:attr:`deltas`) is shaped like each.
    ``fragments``: ``(buffer index, offset in the flattened buffer, lo, hi)``: the buffer's elements
    ``[offset, offset + hi - lo)`` are elements ``[lo, hi)`` of the logical flat vector of ``numel`` parameters
    (the model's parameters in order), the one every rank draws ``r_m`` over. The engine supplies the full
    norm of ``d_m`` (:meth:`inner_step`), so the random vectors are the same on every engine and layout.
    Memory: 4 bytes per element of the buffers for ``R``, plus a transient fp32 vector of ``numel`` elements on
    the CPU while a direction is drawn."""

    def __init__(self, seed: int, numel: int, buffers, fragments, segments=None):
        self.seed, self.numel, self.segments = int(seed), int(numel), segments
        self.deltas = [torch.zeros_like(b, dtype=torch.float32) for b in buffers]
        self.fragments = [tuple(int(x) for x in f) for f in fragments]
        for b, off, lo, hi in self.fragments:
            if not (0 <= lo <= hi <= self.numel and off + hi - lo <= self.deltas[b].numel()):
                raise ValueError(f"random-direction control: fragment {(b, off, lo, hi)} outside the vector")

    def inner_step(self, outer_step: int, micro_step: int, d_norm: float, gamma: float) -> None:
        """R <- R - gamma * r for micro-step ``micro_step`` (1-based) of outer step ``outer_step`` (0-based, applied
        and skipped steps counted), ``r`` scaled to ``d_norm`` = ||d_m|| over the whole logical vector."""
        seed = hash_control_seed(self.seed, outer_step, micro_step)
        dev = self.deltas[0].device if self.deltas else None
        pieces = random_direction_pieces([(lo, hi) for _, _, lo, hi in self.fragments], self.numel, seed, d_norm,
                                         self.segments, device=dev)
        for (b, off, lo, hi), r in zip(self.fragments, pieces):
            inner_update(self.deltas[b].view(-1)[off:off + hi - lo], r, gamma)

    def moved_point(self, b: int, anchor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out <- anchor + R of buffer ``b``: where the next forward pass is taken."""
        return torch.add(anchor, self.deltas[b].view_as(anchor), out=out)

    def reset(self) -> None:
        for d in self.deltas:
            d.zero_()
