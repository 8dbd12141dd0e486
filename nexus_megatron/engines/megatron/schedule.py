"""Megatron's forward/backward schedules with a Nexus inner step after every pass.

Megatron runs one training iteration as a single call of ``forward_backward_func(...,
num_microbatches=N)`` (gradient accumulation, pipelining) followed by ``optimizer.step()``.
:func:`nexus_forward_backward` splits that call into ``k = optimizer.micro_steps`` passes of
``N / k`` micro-batches each: every pass is a complete schedule (with pipeline parallelism: fill,
steady state and drain), ends with Megatron's gradient reduction (``finalize_model_grads``) and is
followed by ``optimizer.inner_step()``, so the next pass runs at the moved point ``theta + delta``.
``optimizer.step()`` (called by the training loop as usual) is the outer step.

Cost with pipeline parallelism: each pass drains the pipeline, so an iteration has k pipeline bubbles
instead of one, i.e. the bubble fraction grows from ``(p-1)/(N+p-1)`` to ``(p-1)/(N/k+p-1)`` with p
stages. Use at least p micro-batches per pass (``N/k >= p``) to keep it bounded by ~1/2.
"""
from __future__ import annotations

from typing import Callable, Optional

from ...errors import NexusConfigError


def _set_source(data_iterator, source: int, step: int, micro: int, per_pass: int):
    its = data_iterator if isinstance(data_iterator, (list, tuple)) else [data_iterator]
    for it in its:
        for _ in range(8):   # look through wrappers such as Megatron-LM's RerunDataIterator(.iterable)
            if it is None or hasattr(it, "set_micro_step"):
                break
            it = getattr(it, "iterable", None)
        if it is not None and hasattr(it, "set_micro_step"):
            if hasattr(it, "set_pass_micro_batches"):
                it.set_pass_micro_batches(per_pass)
            it.set_micro_step(source, step, micro)


def nexus_forward_backward(optimizer, forward_backward_func: Optional[Callable] = None) -> Callable:
    """A drop-in for ``get_forward_backward_func()``'s result (same keyword arguments).

    Training calls (``forward_only=False``) run ``optimizer.micro_steps`` passes with an inner step after
    each; evaluation calls (``forward_only=True``) are passed through unchanged. A data iterator with a
    ``set_micro_step(source, step, micro)`` method (:class:`~.data.SourceRoutedIterator`) is told which
    source to read before each pass. Returns the concatenated per-micro-batch loss dicts, like Megatron's
    schedules."""
    if forward_backward_func is None:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        forward_backward_func = get_forward_backward_func()

    def run(*args, **kwargs):
        if args:
            raise TypeError("nexus_forward_backward: pass the schedule's arguments by keyword (as Megatron does)")
        if kwargs.get("forward_only", False):
            return forward_backward_func(**kwargs)
        k = optimizer.micro_steps
        n = int(kwargs["num_microbatches"])
        if n % k:
            raise NexusConfigError(
                f"nexus: {n} micro-batches per iteration (global batch / (micro batch x data-parallel size)) is not "
                f"a multiple of --nexus-micro-steps={k}: choose a micro-step count that divides it")
        per = n // k
        losses = []
        for m in range(k):
            _set_source(kwargs["data_iterator"], optimizer.source_for(m), optimizer.iteration, m, per)
            if getattr(optimizer, "poisoned", False):
                # NaN/Inf earlier in this outer step, on some rank: the step will be skipped whatever the
                # remaining passes compute, so spare them (the data positions still advance).
                optimizer.inner_step()
                continue
            out = forward_backward_func(**dict(kwargs, num_microbatches=per))
            optimizer.inner_step()
            if out:
                losses.extend(out)
        return losses

    run.nexus = True
    return run
