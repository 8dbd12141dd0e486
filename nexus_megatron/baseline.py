"""The AdamW baseline on exactly the data Nexus sees: gradients of the k micro-steps are accumulated
locally (like DDP's no_sync) and reduced once per step over the mixture (source weights applied the
same way as for Nexus, without normalization), clipped, and handed to AdamW."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .layout import SourceLayout
from .nexus import sum_sq


@dataclass
class BaselineStats:
    outer_steps: int = 0
    skipped_steps: int = 0
    skipped_sources: int = 0
    consecutive_skips: int = 0


class MixtureAdamW:
    """Same interface as :class:`nexus_megatron.nexus.Nexus` (inner_step / step / state_dict)."""

    def __init__(self, params, outer: torch.optim.Optimizer, layout: SourceLayout, *, micro_steps: int,
                 clip_grad=None):
        seen, ps = set(), []
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                ps.append(p)
        self.params, self.outer, self.layout = ps, outer, layout
        self.micro_steps, self.clip_grad = micro_steps, clip_grad
        self.numel = sum(p.numel() for p in ps)
        self.acc = torch.zeros(self.numel, dtype=torch.float32, device=ps[0].device)
        self._views = [t.view_as(p) for t, p in zip(self.acc.split([p.numel() for p in ps]), ps)]
        self.inner_steps = 0
        self.stats = BaselineStats()
        self.pre_outer_step = None
        """Called as ``fn(self)`` with the reduced, clipped gradient in ``p.grad``, before AdamW steps."""

    @torch.no_grad()
    def inner_step(self, source: int):
        for p, v in zip(self.params, self._views):
            if p.grad is not None:
                v.add_(p.grad, alpha=1.0 / self.micro_steps)
                p.grad = None
        self.inner_steps += 1

    @torch.no_grad()
    def step(self) -> dict:
        if self.inner_steps != self.micro_steps:
            raise RuntimeError(f"step() after {self.inner_steps} inner steps but micro_steps={self.micro_steps}")
        self.layout.reduce_mean(self.acc)
        norm = math.sqrt(float(sum_sq(self.acc)))
        info = {"grad_norm": norm, "skipped": False}
        if not math.isfinite(norm):
            self.stats.skipped_steps += 1
            self.stats.consecutive_skips += 1
            info["skipped"] = True
        else:
            if self.clip_grad is not None and norm > self.clip_grad:
                self.acc.mul_(self.clip_grad / (norm + 1e-6))
            for p, v in zip(self.params, self._views):
                p.grad = v
            if self.pre_outer_step is not None:
                self.pre_outer_step(self)
            self.outer.step()
            for p in self.params:
                p.grad = None
            self.stats.outer_steps += 1
            self.stats.consecutive_skips = 0
        self.acc.zero_()
        self.inner_steps = 0
        return info

    def step_stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"outer": self.outer.state_dict(), "stats": asdict(self.stats), "layout": self.layout.describe()}

    def load_state_dict(self, sd: dict) -> None:
        self.outer.load_state_dict(sd["outer"])
        for k, v in sd["stats"].items():
            setattr(self.stats, k, v)
