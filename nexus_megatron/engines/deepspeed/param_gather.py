"""DeepSpeed ZeRO-1/2: the parameter all-gather of a Nexus micro-step overlapped with the next forward pass.

Under Nexus every micro-step moves the parameters (an inner step), so DeepSpeed ZeRO-1/2 all-gathers the
updated low-precision partitions after every micro-step, where AdamW with gradient accumulation gathers
once per optimizer step. DeepSpeed makes that gather synchronously at the end of ``step()``
(``all_gather_dp_groups``). With ``"nexus": {"overlap_param_gather": true}`` in the ds_config,
:class:`DeferredParamGather` takes that one call over:

* the gather is split into buckets (``param_gather_bucket_size`` elements of the gathered buffer each;
  bucket ``b`` of a parameter group is piece ``b`` of every rank's partition), launched asynchronously
  in the order in which the forward pass first needs them (modules in registration order), and
  ``step()`` returns at once;
* every module that owns parameters gets a forward pre-hook that waits for the buckets holding its own
  parameters, so the first layers compute while the later buckets are still in flight. This is
  Megatron's ``--overlap-param-gather`` design (per-bucket waits in forward pre-hooks).

Only the gather DeepSpeed makes after the client optimizer finished the micro-step is deferred: the
adapter arms it at the end of its client step, so the gathers of the critical-sharpness probes inside
the outer step, of a skipped step and of a load stay synchronous. Every deferred gather is finished
before DeepSpeed's next ``step()``, before a checkpoint is saved or loaded, and in
:meth:`DeferredParamGather.wait_all`, which ``NexusDeepSpeedEngine.sync_model_params()`` calls: call it
before reading the module's parameters other than through a forward pass (a forward waits by itself).
The numbers are those of the synchronous gather, bit for bit (tests/test_deepspeed.py).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ...errors import NexusConfigError

log = logging.getLogger("nexus_megatron.deepspeed")

#: elements of the gathered buffer per bucket when ``param_gather_bucket_size`` is not set (Megatron's
#: default DDP bucket size, 40M elements)
DEFAULT_BUCKET = 40_000_000


def _ds_buffers(ds_opt):
    """(flat low-precision buffers, their per-rank partitions, data-parallel groups) of a ZeRO-1/2 optimizer."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(ds_opt, BF16_Optimizer):
        return ds_opt.bf16_groups_flat, ds_opt.bf16_partitioned_groups, ds_opt.real_dp_process_group
    if isinstance(ds_opt, DeepSpeedZeroOptimizer):
        return ds_opt.bit16_groups_flat, ds_opt.parallel_partitioned_bit16_groups, ds_opt.real_dp_process_group
    raise NexusConfigError(
        f"ds_config nexus.overlap_param_gather=true needs ZeRO stage 1 or 2 (DeepSpeed built {type(ds_opt).__name__}): "
        "stage 0 gathers nothing and ZeRO-3 already prefetches parameters during the forward "
        "(stage3_prefetch_bucket_size); remove the setting")


class DeferredParamGather:
    """Launches DeepSpeed's end-of-step parameter all-gather in buckets and waits for each in the forward."""

    def __init__(self, ds_opt, module: torch.nn.Module, bucket_numel: int = DEFAULT_BUCKET):
        """``bucket_numel``: ``nexus.param_gather_bucket_size``, validated with the ds_config (config.py)."""
        self.flats, self.parts, self.pgs = _ds_buffers(ds_opt)
        self.module = module
        self.bucket_numel = bucket_numel
        self.armed = False
        self.handles: list = []
        self.done = 0
        self.stats = {"launches": 0, "waited_in_forward": 0, "waited_at_sync": 0, "first_wait": []}
        self._first_pending = False
        self._hooks: list = []
        self._all_gather = dist.all_gather     # tests substitute a gather that only moves data when waited on
        self._plan()

    # -- the bucket plan -------------------------------------------------------------------------
    def _plan(self):
        for h in self._hooks:
            h.remove()
        self._ptrs = [f.data_ptr() for f in self.flats]
        self.chunk: List[int] = []      # elements per rank per bucket, by group
        self.rank_in: List[int] = []
        buckets: List[Tuple[int, int]] = []
        for i, (flat, parts, pg) in enumerate(zip(self.flats, self.parts, self.pgs)):
            d = dist.get_world_size(group=pg)
            P = parts[0].numel()
            c = max(1, math.ceil(self.bucket_numel / d))
            if c >= 256:
                c -= c % 128                   # aligned bucket starts (NCCL)
            c = min(c, max(P, 1))
            self.chunk.append(c)
            self.rank_in.append(dist.get_rank(group=pg))
            if d > 1 and P > 0:
                buckets += [(i, b) for b in range(math.ceil(P / c))]
        modules = [m for _, m in self.module.named_modules()]
        owners: Dict[int, List[int]] = {}
        for mi, m in enumerate(modules):
            for p in m.parameters(recurse=False):
                owners.setdefault(id(p), []).append(mi)
        needs: Dict[int, set] = {}
        first: Dict[Tuple[int, int], int] = {}
        seen = set()
        for p in self.module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            loc = self._locate(p)
            if loc is None:
                continue
            i, o = loc
            P, c, n = self.parts[i][0].numel(), self.chunk[i], p.numel()
            if dist.get_world_size(group=self.pgs[i]) == 1 or n == 0:
                continue
            need = set()
            for r in range(o // P, (o + n - 1) // P + 1):
                lo, hi = max(o, r * P) - r * P, min(o + n, (r + 1) * P) - r * P
                need.update((i, b) for b in range(lo // c, (hi - 1) // c + 1))
            needs[id(p)] = need
            mi = min(owners.get(id(p), [len(modules)]))
            for ib in need:
                first[ib] = min(first.get(ib, len(modules)), mi)
        self.order = sorted(buckets, key=lambda ib: (first.get(ib, len(modules)), ib))
        pos = {ib: j for j, ib in enumerate(self.order)}
        self._hooks = []
        for mi, m in enumerate(modules):
            js = [pos[ib] for p in m.parameters(recurse=False) for ib in needs.get(id(p), ())]
            if js:
                self._hooks.append(m.register_forward_pre_hook(self._hook(max(js))))

    def _locate(self, p) -> Optional[Tuple[int, int]]:
        """(group, element offset) of parameter ``p`` in DeepSpeed's flat buffers, or None (not trained)."""
        ptr = p.data.data_ptr()
        for i, flat in enumerate(self.flats):
            es = flat.element_size()
            if p.dtype == flat.dtype and flat.data_ptr() <= ptr < flat.data_ptr() + flat.numel() * es:
                return i, (ptr - flat.data_ptr()) // es
        return None

    def _hook(self, j: int):
        def hook(module, args):
            self.wait_upto(j)
        return hook

    @property
    def num_buckets(self) -> int:
        return len(self.order)

    # -- launching and waiting -------------------------------------------------------------------
    def launch(self):
        """The deferred all_gather_dp_groups: every bucket, asynchronously, in first-use order."""
        self.wait_all()
        if [f.data_ptr() for f in self.flats] != self._ptrs:
            self._plan()
        handles = []
        for i, b in self.order:
            parts, c = self.parts[i], self.chunk[i]
            start = b * c
            n = min(c, parts[0].numel() - start)
            views = [t.narrow(0, start, n).detach() for t in parts]
            handles.append(self._all_gather(views, views[self.rank_in[i]], group=self.pgs[i], async_op=True))
        self.handles, self.done = handles, 0
        self.stats["launches"] += 1
        self._first_pending = True

    def wait_upto(self, j: int):
        """Wait for the buckets at positions 0..j (a module's forward pre-hook)."""
        if self.done > j or self.done >= len(self.handles):
            return
        while self.done <= j and self.done < len(self.handles):
            self.handles[self.done].wait()
            self.done += 1
            self.stats["waited_in_forward"] += 1
        if self._first_pending:     # how much of the gather the first layer waited for (tests)
            self.stats["first_wait"].append(self.done)
            self._first_pending = False

    def wait_all(self):
        """Finish every deferred bucket (before a step, a save, a load, a direct read of the parameters)."""
        while self.done < len(self.handles):
            self.handles[self.done].wait()
            self.done += 1
            self.stats["waited_at_sync"] += 1
        self.handles, self.done = [], 0
        self._first_pending = False

    @contextlib.contextmanager
    def intercept(self):
        """While DeepSpeed's step() runs: its all_gather_dp_groups call, once :attr:`armed`, is deferred."""
        import deepspeed.runtime.bf16_optimizer as bf16_mod
        import deepspeed.runtime.zero.stage_1_and_2 as zero_mod

        mods = [zero_mod, bf16_mod]
        originals = [m.all_gather_dp_groups for m in mods]

        def make(original):
            def all_gather_dp_groups(*args, **kwargs):
                if self.armed and not args and kwargs.get("groups_flat") is self.flats:
                    self.armed = False
                    return self.launch()
                return original(*args, **kwargs)
            return all_gather_dp_groups

        for m, o in zip(mods, originals):
            m.all_gather_dp_groups = make(o)
        try:
            yield
        finally:
            self.armed = False
            for m, o in zip(mods, originals):
                m.all_gather_dp_groups = o

    def remove(self):
        self.wait_all()
        for h in self._hooks:
            h.remove()
        self._hooks = []


__all__ = ["DeferredParamGather", "DEFAULT_BUCKET"]
