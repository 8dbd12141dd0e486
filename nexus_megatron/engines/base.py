"""The interface the trainer drives. One outer step of the trainer is::

    for m in range(k):
        loss = lm_loss(engine.module, batch_of(engine, step, m))
        engine.backward(loss)
        engine.micro_step(source)     # Nexus: reduce + normalize + inner update; AdamW: accumulate
    info = engine.outer_step()        # Nexus: outer AdamW on the pseudo-gradient; AdamW: the step

and ``engine.save(...)`` / ``engine.load(...)`` at checkpoint boundaries (always between outer steps).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence


class Engine:
    name = "base"
    module = None          # the torch.nn.Module whose forward computes the loss
    supports_probe = False  # can the trainer run the per-source gradient probe on it?
    params: Sequence = ()
    """The trainable parameters, each once, in a fixed order (the gradient probe and critical sharpness read
    them)."""
    probe_module = None
    """The module the per-source gradient probe runs on, when it is not :attr:`module` (DeepSpeed: the wrapped
    module, bypassing the engine's backward bookkeeping)."""
    sharpness_seam: Optional[Callable[[], object]] = None
    """None, or a method returning the engine's ``SharpnessSeam`` (:mod:`nexus_megatron.sharpness`): where critical
    sharpness is measured inside the outer step. Without one (plain engine), the hook is the optimizer's
    ``opt.pre_outer_step``."""

    def backward(self, loss) -> None:
        raise NotImplementedError

    def micro_step(self, source: int) -> None:
        raise NotImplementedError

    def outer_step(self) -> dict:
        """Returns e.g. {"skipped": bool, "gamma": ..., "pseudo_grad_norm": ...} or {"grad_norm": ...}."""
        raise NotImplementedError

    @property
    def poisoned(self) -> bool:
        """True once a NaN/Inf was seen in the current outer step (the rest of it can skip compute)."""
        return False

    def lr(self) -> float:
        raise NotImplementedError

    def counters(self) -> dict:
        """{"skipped_steps": int, "skipped_sources": int} over the whole run."""
        raise NotImplementedError

    def step_stats(self) -> dict:
        """Per-outer-step extras (e.g. nexus/gnorm/<source>); reset after each call."""
        return {}

    def save(self, ckpt_root: str, step: int, client_state: dict) -> None:
        """Collective. Write a checkpoint for ``step`` atomically (the previous one stays loadable)."""
        raise NotImplementedError

    def load(self, ckpt_root: str) -> Optional[dict]:
        """Collective. Load the latest checkpoint if any and return its client_state (else None)."""
        raise NotImplementedError
