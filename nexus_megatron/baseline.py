"""The AdamW baseline on exactly the data Nexus sees: gradients of the k micro-steps are accumulated
locally (like DDP's no_sync) and reduced once per step over the mixture (source weights applied the
same way as for Nexus, without normalization), clipped, and handed to AdamW. Skips, counters and the abort
after ``max_consecutive_skips`` non-finite steps are Nexus's (:class:`~nexus_megatron.outer.OuterBook`)."""
from __future__ import annotations

import math

import torch

from .functional import sum_sq
from .layout import SourceLayout
from .outer import BookViews, OuterBook, check_resume


class MixtureAdamW(BookViews):
    """Same interface as :class:`nexus_megatron.nexus.Nexus` (inner_step / step / state_dict)."""

    def __init__(self, params, outer: torch.optim.Optimizer, layout: SourceLayout, *, micro_steps: int,
                 clip_grad=None, max_consecutive_skips: int = 10):
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
        self.book = OuterBook(layout.num_sources, micro_steps=micro_steps,
                              max_consecutive_skips=max_consecutive_skips)
        self.pre_outer_step = None
        """Called as ``fn(self)`` with the reduced, clipped gradient in ``p.grad``, before AdamW steps."""

    @torch.no_grad()
    def inner_step(self, source: int):
        for p, v in zip(self.params, self._views):
            if p.grad is not None:
                v.add_(p.grad, alpha=1.0 / self.micro_steps)
                p.grad = None
        self.book.end_micro()

    @torch.no_grad()
    def step(self) -> dict:
        self.book.check_complete("MixtureAdamW.step")
        self.layout.reduce_mean(self.acc)
        norm = math.sqrt(float(sum_sq(self.acc)))
        info = {"grad_norm": norm, "skipped": False}
        if not math.isfinite(norm):
            self.book.poison()
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
        self.acc.zero_()
        self.book.end_outer(skipped=info["skipped"])
        self.book.check_abort()
        return info

    def step_stats(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"outer": self.outer.state_dict(), "stats": self.stats.counters(), "layout": self.layout.describe()}

    def load_state_dict(self, sd: dict, *, reshard: bool = False) -> None:
        if "layout" in sd:
            check_resume(sd["layout"], self.layout.describe(), reshard=reshard)
        self.outer.load_state_dict(sd["outer"])
        self.stats.load_counters(sd["stats"])
