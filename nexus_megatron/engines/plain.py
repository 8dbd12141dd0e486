"""Plain PyTorch: the model on every rank, Nexus (or the AdamW baseline) owning the collectives."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..baseline import MixtureAdamW
from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..nexus import Nexus, NexusConfig
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
    n = cfg.nexus
    return NexusConfig(gamma=n.gamma, gamma_mode=n.gamma_mode, min_grad_norm=n.min_grad_norm,
                       max_consecutive_skips=n.max_consecutive_skips, control=n.control, control_seed=n.seed)


class PlainEngine(Engine):
    name = "plain"
    supports_probe = True

    def __init__(self, cfg, model, layout, lr_lambda):
        self.module = model
        self.params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        self.outer = build_outer_adamw(cfg, self.params)
        if cfg.optim.name == "adamw":
            self.opt = MixtureAdamW(self.params, self.outer, layout, micro_steps=cfg.train.micro_steps,
                                    clip_grad=cfg.optim.clip_grad)
        else:
            self.opt = Nexus(self.params, self.outer, layout, nexus_config(cfg), micro_steps=cfg.train.micro_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.outer, lr_lambda)

    def backward(self, loss):
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
                                              "scheduler": self.sched.state_dict(), "client_state": client_state})
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def load(self, ckpt_root):
        path = latest_checkpoint(ckpt_root)
        if path is None:
            return None
        state = load_checkpoint(path)
        self.module.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        return state["client_state"]
