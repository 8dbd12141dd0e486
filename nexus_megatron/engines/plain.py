"""Plain PyTorch: the model on every rank, Nexus (or the AdamW baseline) owning the collectives.

With ``nexus.overlap_grad_reduce`` the reduction runs during backward (:class:`OverlappedNexus`,
:class:`OverlappedMixtureAdamW`; the buckets and hooks are :class:`nexus_megatron.layout.GradBuckets`):

* Nexus, every micro-step: each bucket's bulk collective (sequential: the data-parallel all-reduce;
  source-parallel: the reduce-scatter inside the source group) starts as soon as backward has produced
  the bucket's gradients; after backward only the norm exchange, the scaling, the cross-group all-reduce
  of the shard and the all-gather (source-parallel) remain.
* AdamW baseline: gradients accumulate into its buffer as backward produces them; the one reduction of
  the outer step starts bucket by bucket during the last micro-step's backward (DDP's ``no_sync`` on the
  first k-1 micro-steps).

Both give the same numbers as the non-overlapped path (tests/test_overlap.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..baseline import MixtureAdamW
from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..layout import GradBuckets, Reduced
from ..nexus import Nexus, NexusConfig
from ..settings import nexus_config_of_section
from .base import Engine


def build_outer_adamw(cfg, params):
    """AdamW with the usual split: no weight decay on vectors (norms, biases)."""
    o = cfg.optim
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)


def nexus_config(cfg) -> NexusConfig:
    return nexus_config_of_section(cfg.nexus)   # one mapping for every surface (nexus_megatron.settings)


class OverlappedNexus(Nexus):
    """:class:`~nexus_megatron.nexus.Nexus` whose per-micro-step reduction starts during backward. Call
    :meth:`before_backward` before each micro-step's backward (the plain engine does)."""

    def __init__(self, *args, bucket_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets = GradBuckets(self.params, self.flat_grad, self.layout, bucket_numel=bucket_size,
                                   grads_are_views=True, views=self._grad_views)

    def before_backward(self) -> None:
        self.buckets.arm()

    def _reduce(self, source: int) -> Reduced:
        red = self.buckets.finish()          # gradients complete, every bucket started (most during backward)
        self.grad_copies = self.buckets.last_copies
        # source-parallel with S > 1: the all-gathers of d come back in flight; inner_step updates bucket b
        # while the later buckets are still being gathered
        return self.layout.finish_normalized(red, source, min_grad_norm=self.config.min_grad_norm,
                                             segments=self.segments, defer_gather=True,
                                             defer_scale=self.random_delta is None)


class _StartedMean:
    """The layout as :class:`~nexus_megatron.baseline.MixtureAdamW.step` sees it under the overlap: its
    ``reduce_mean`` waits for the reduction the buckets started during the last backward."""

    def __init__(self, layout, opt: "OverlappedMixtureAdamW"):
        self.layout, self.opt = layout, opt

    def reduce_mean(self, flat, source=None):
        red, self.opt.pending = self.opt.pending, None
        if red is None:                      # no micro-step launched it (cannot happen through the engine)
            red = self.opt.buckets.finish()
        red.wait()

    def describe(self):
        return self.layout.describe()


class OverlappedMixtureAdamW(MixtureAdamW):
    """The AdamW baseline with its reduction overlapped with the last micro-step's backward."""

    def __init__(self, params, outer, layout, *, micro_steps: int, clip_grad=None, bucket_size: int,
                 max_consecutive_skips: int = 10):
        super().__init__(params, outer, layout, micro_steps=micro_steps, clip_grad=clip_grad,
                         max_consecutive_skips=max_consecutive_skips)
        self.buckets = GradBuckets(self.params, self.acc, layout, bucket_numel=bucket_size,
                                   accumulate=1.0 / micro_steps)
        self.pending = None
        self.layout = _StartedMean(layout, self)

    def _last(self) -> bool:
        return self.inner_steps == self.micro_steps - 1

    def before_backward(self) -> None:
        self.buckets.arm(launch=self._last())

    @torch.no_grad()
    def inner_step(self, source: int):
        self.pending = self.buckets.finish(launch=self._last())
        self.book.end_micro()


class PlainEngine(Engine):
    name = "plain"
    supports_probe = True

    def __init__(self, cfg, model, layout, lr_lambda):
        self.module = model
        self.params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        self.outer = build_outer_adamw(cfg, self.params)
        k, overlap, bucket = cfg.train.micro_steps, cfg.nexus.overlap_grad_reduce, cfg.nexus.bucket_size
        if cfg.optim.name == "adamw":
            kw = dict(micro_steps=k, clip_grad=cfg.optim.clip_grad,
                      max_consecutive_skips=cfg.nexus.max_consecutive_skips)
            if overlap:
                self.opt = OverlappedMixtureAdamW(self.params, self.outer, layout, bucket_size=bucket, **kw)
            else:
                self.opt = MixtureAdamW(self.params, self.outer, layout, **kw)
        elif overlap:
            self.opt = OverlappedNexus(self.params, self.outer, layout, nexus_config(cfg), micro_steps=k,
                                       bucket_size=bucket)
        else:
            self.opt = Nexus(self.params, self.outer, layout, nexus_config(cfg), micro_steps=k)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.outer, lr_lambda)

    def backward(self, loss):
        arm = getattr(self.opt, "before_backward", None)
        if arm is not None:
            arm()
        loss.backward()

    def micro_step(self, source):
        self.opt.inner_step(source)

    def outer_step(self):
        info = self.opt.step()
        if not info.get("skipped"):   # like Megatron and DeepSpeed: a skipped step does not advance the schedule
            self.sched.step()
        return info

    @property
    def poisoned(self):
        return bool(getattr(self.opt, "poisoned", False))

    def lr(self):
        return float(self.outer.param_groups[0]["lr"])

    def counters(self):
        return {"skipped_steps": self.opt.stats.skipped_steps, "skipped_sources": self.opt.stats.skipped_sources}

    def step_stats(self):
        return self.opt.step_stats()

    def save(self, ckpt_root, step, client_state):
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:   # every rank holds the same full state
            save_checkpoint(ckpt_root, step, {"model": self.module.state_dict(), "optimizer": self.opt.state_dict(),
                                              "scheduler": self.sched.state_dict(), "client_state": client_state},
                            run=client_state.get("run"))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def load(self, ckpt_root):
        path = latest_checkpoint(ckpt_root)
        if path is None:
            return None
        state = load_checkpoint(path)
        self.module.load_state_dict(state["model"])
        # every rank holds the same full state, so a checkpoint of another number of ranks loads as it is
        # (the trainer's resume check has found that the global batch and the data order stay the same)
        self.opt.load_state_dict(state["optimizer"], reshard=True)
        self.sched.load_state_dict(state["scheduler"])
        return state["client_state"]
