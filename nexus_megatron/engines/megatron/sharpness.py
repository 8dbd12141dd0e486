"""Critical sharpness (ALGORITHMS.md §2) on megatron-core: the host for :class:`~nexus_megatron.sharpness.SharpnessMeter`.

The line search, the probe sets, the warm starts and the metrics are those of :mod:`nexus_megatron.sharpness`;
this module supplies what is Megatron-specific:

* :class:`MegatronHost`: the four host methods on Megatron's fp32 main params, for every optimizer class
  ``get_megatron_optimizer`` builds (``FP32Optimizer``: the main params are the model params;
  ``Float16OptimizerWithFloat16Params``: fp32 copies; ``DistributedOptimizer``: fp32 shards of this rank's
  data-parallel range; and their ``ChainedOptimizer``), wrapped in Nexus or not:

  - ``direction()``: u from each child's Adam state and ``main_param.grad`` (the reduced, clipped gradient
    of the AdamW baseline, or Nexus's clipped pseudo-gradient G), on the tensors the optimizer owns: with the
    distributed optimizer a shard (TP- and DP-sharded), never the full model;
  - ``move(eta)``: ``main <- theta - eta u`` on those tensors, then main -> model params and the param
    all-gather (:func:`~.optimizer.publish_main_params`, what ``step_with_ready_grads`` does after Adam; with
    ``--overlap-param-gather`` too the gather runs synchronously here, and after the optimizer step the
    buckets are marked changed so that the next training forward gathers the stepped params again);
  - ``end()``: ``main <- theta`` (a copy: Nexus's fp32 anchor, or a saved copy of this rank's main params)
    and the same publication, so the model params are bitwise what they were (they were the cast of the
    main params, which the Nexus seam guarantees and Megatron's own step leaves behind);
  - ``all_reduce(t)``: sum over the data-parallel group only (the TP ranks compute the same loss together;
    it exists on the last pipeline stage), then broadcast from the last pipeline stage and from TP rank 0, so
    that every rank holds the very same bits and takes the same branch at every probe.

* :class:`MegatronProbeLoss`: the loss of a probe batch through Megatron's own schedule
  (``forward_only=True``; pipeline stages pass activations as in evaluation).
* :class:`MegatronSharpnessHook` (a :class:`~nexus_megatron.sharpness.SharpnessHook`): ``pre_outer_step`` of
  :class:`~.optimizer.NexusMegatronOptimizer`, or the ``fn`` of :func:`~.optimizer.step_with_pre_update`
  for Megatron's AdamW; :func:`build_megatron_sharpness_hook` builds it with per-source probe batches from
  the Megatron data routing (:mod:`.data`).

Extra memory on a rank during a measurement: u (4 bytes per main-param element this rank owns: ``4P/(t d)``
with the distributed optimizer, ``4P/t`` without) plus, for the AdamW baseline, the copy of the main params
to restore from (the same size again; Nexus restores from its anchor). See docs/sharpness.md.
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from ...errors import NexusConfigError
from ...sharpness import (STEP, ProbeSet, SharpnessConfig, SharpnessHook, SharpnessMeter, adamw_direction,
                          sharpness_metrics)
from .data import make_megatron_batch
from .optimizer import NexusMegatronOptimizer, publish_main_params
from .params import main_params, optimizer_children

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# the update direction from a Megatron child optimizer
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def fused_adam_direction(optimizer, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """u of a fused Adam that keeps the step count in its param groups (Transformer Engine's and Apex's
    ``FusedAdam``, Megatron's Adam on GPUs): ``adam_w_mode`` 1 = decoupled weight decay, 0 = L2;
    ``bias_correction`` per group; fp32 ``exp_avg`` / ``exp_avg_sq`` in the state. Same formula as
    :func:`~nexus_megatron.sharpness.adamw_direction`; reads, never writes."""
    decoupled = bool(getattr(optimizer, "adam_w_mode", 1))
    u_of = {}
    for group in optimizer.param_groups:
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, wd = float(group["eps"]), float(group.get("weight_decay", 0.0))
        step = float(group.get("step", 0)) + 1.0
        bc1 = 1 - beta1 ** step if group.get("bias_correction", True) else 1.0
        bc2_sqrt = (1 - beta2 ** step) ** 0.5 if group.get("bias_correction", True) else 1.0
        for p in group["params"]:
            g = p.grad
            if g is None:
                u_of[id(p)] = torch.zeros_like(p)
                continue
            if wd and not decoupled:
                g = g.add(p, alpha=wd)
            st = optimizer.state.get(p, {})
            m0, v0 = st.get("exp_avg"), st.get("exp_avg_sq")
            if m0 is None:
                m0 = v0 = torch.zeros_like(g)
            if m0.dtype != torch.float32 or v0.dtype != torch.float32:
                raise NexusConfigError("critical sharpness: Adam moments in reduced precision (precision-aware "
                                       "optimizer) are not supported; remove --use-precision-aware-optimizer")
            m = torch.lerp(m0, g, 1 - beta1)
            v = v0.mul(beta2).addcmul_(g, g, value=1 - beta2)
            u = m.div_((v.sqrt_() / bc2_sqrt).add_(eps)).mul_(1.0 / bc1)
            if wd and decoupled:
                u.add_(p, alpha=wd)
            u_of[id(p)] = u
    return [u_of[id(p)] for p in params]


def child_direction(child_optimizer, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """u of one Megatron child's Adam (torch Adam/AdamW on CPU or without TE/Apex, fused Adam otherwise)."""
    if isinstance(child_optimizer, torch.optim.Adam):
        return adamw_direction(child_optimizer, params, [p.grad for p in params])
    if hasattr(child_optimizer, "adam_w_mode") and all("betas" in g for g in child_optimizer.param_groups):
        return fused_adam_direction(child_optimizer, params)
    raise NexusConfigError(f"critical sharpness on Megatron needs Adam (--optimizer adam or nexus), got "
                           f"{type(child_optimizer).__name__}")


# ---------------------------------------------------------------------------------------------------
# the host
# ---------------------------------------------------------------------------------------------------

def _ps():
    from megatron.core import parallel_state as ps
    return ps if ps.model_parallel_is_initialized() else None


class MegatronHost:
    """Moves Megatron's fp32 main params along u and restores them (see the module docstring).

    Args:
        optimizer: a :class:`~.optimizer.NexusMegatronOptimizer` or a Megatron optimizer built by
            ``get_megatron_optimizer`` for Adam.
        dp_group: the group the probe batches are dealt over (default: Megatron's data-parallel group; with
            Nexus's source-parallel layout that is all data-parallel ranks, not one source block).
    """

    def __init__(self, optimizer, *, dp_group=None):
        self.optimizer = optimizer
        self.nexus = isinstance(optimizer, NexusMegatronOptimizer)
        children = optimizer.children if self.nexus else optimizer_children(optimizer)
        self._validate(optimizer, children)
        self.children = [c for c in children if main_params(c)]
        self.mains: List[torch.Tensor] = [p for c in children for p in main_params(c)]
        self.publish_children = children
        ps = _ps()
        if ps is not None and ps.get_context_parallel_world_size() > 1:
            raise NexusConfigError("critical sharpness on Megatron: context parallelism is not supported; "
                                   "set --sharpness-every 0 or --context-parallel-size 1")
        initialized = dist.is_available() and dist.is_initialized()
        self.dp_group = dp_group if dp_group is not None else (ps.get_data_parallel_group() if ps else None)
        self.dp_size = dist.get_world_size(self.dp_group) if initialized else 1
        self.dp_rank = dist.get_rank(self.dp_group) if initialized else 0
        self.tp_size = ps.get_tensor_model_parallel_world_size() if ps else 1
        self.pp_size = ps.get_pipeline_model_parallel_world_size() if ps else 1
        if self.tp_size > 1:
            self.tp_group, self.tp_src = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank()
        if self.pp_size > 1:
            self.pp_group, self.pp_last = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
        if self.mains:
            self.device = self.mains[0].device
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self._theta: Optional[List[torch.Tensor]] = None
        self._u: Optional[List[torch.Tensor]] = None
        self.gathers_per = "move" if any(isinstance(c, DistributedOptimizer) for c in children) else None
        """With the distributed optimizer every move (and ``end``) is one param all-gather."""

    @staticmethod
    def _validate(optimizer, children):
        c = optimizer.config
        for flag, attr in (("--use-precision-aware-optimizer", "use_precision_aware_optimizer"),
                           ("--optimizer-cpu-offload", "optimizer_cpu_offload")):
            if getattr(c, attr, False):
                raise NexusConfigError(f"critical sharpness on Megatron: {flag} is not supported (the main params "
                                       "live inside the optimizer); remove the flag or set --sharpness-every 0")
        for child in children:
            if isinstance(child, DistributedOptimizer):
                ddp = child.ddp_config
                if getattr(ddp, "use_megatron_fsdp", False):
                    raise NexusConfigError("critical sharpness on Megatron: Megatron FSDP is not supported (every "
                                           "probe needs the gathered parameters); use the distributed optimizer "
                                           "or set --sharpness-every 0")
            for p in main_params(child):
                if p.dtype != torch.float32:
                    raise NexusConfigError(f"critical sharpness on Megatron: main params must be fp32, got {p.dtype}")

    # -- what the optimizer is about to do ---------------------------------------------------------
    def direction(self) -> List[torch.Tensor]:
        """u, one tensor per main param (this rank's shards), from ``main_param.grad`` and the Adam state."""
        out = []
        for child in self.children:
            out += child_direction(child.optimizer, main_params(child))
        return out

    def hyper(self) -> tuple:
        """(lr, beta1, weight decay, max_lr) of the param group holding most elements on this rank (the
        threshold's; Megatron's schedule gives every group of a kind the same values on every rank)."""
        groups = [g for c in self.children for g in c.optimizer.param_groups if g["params"]]
        if not groups:
            groups = list(self.optimizer.param_groups)
        g = max(groups, key=lambda g: sum(p.numel() for p in g["params"]))
        return float(g["lr"]), float(g["betas"][0]), float(g.get("weight_decay", 0.0)), float(g.get("max_lr", 0.0))

    def master(self) -> Optional[List[torch.Tensor]]:
        """Nexus's anchor (theta_t, fp32, bitwise the main params at the seam): restore from it."""
        return list(self.optimizer._anchor_views) if self.nexus else None

    # -- the host interface ------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, u: Sequence[torch.Tensor], master: Optional[Sequence[torch.Tensor]] = None) -> None:
        if len(u) != len(self.mains):
            raise ValueError(f"{len(u)} direction tensors for {len(self.mains)} main params")
        self._u = list(u)
        self._theta = list(master) if master is not None else [p.detach().clone() for p in self.mains]

    @torch.no_grad()
    def move(self, eta: float) -> None:
        if self.mains:
            torch._foreach_copy_(self.mains, self._theta)
            if eta != 0.0:
                torch._foreach_add_(self.mains, self._u, alpha=-float(eta))
        publish_main_params(self.publish_children)

    @torch.no_grad()
    def end(self) -> None:
        if self._theta is not None:
            if self.mains:
                torch._foreach_copy_(self.mains, self._theta)
            publish_main_params(self.publish_children)
        self._theta = self._u = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return t
        buf = t.to(self.device) if self.device.type != "cpu" else t
        if self.dp_size > 1:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.dp_group)
        if self.pp_size > 1:          # the loss lives on the last stage
            dist.broadcast(buf, src=self.pp_last, group=self.pp_group)
        if self.tp_size > 1:          # the same value already; make it the same bits by construction
            dist.broadcast(buf, src=self.tp_src, group=self.tp_group)
        if buf is not t:
            t.copy_(buf)
        return t


# ---------------------------------------------------------------------------------------------------
# probe losses through Megatron's schedule
# ---------------------------------------------------------------------------------------------------

class ChunkModes:
    """``eval()`` / ``train(mode)`` / ``training`` over the model chunks (what ``probe_mode`` needs)."""

    def __init__(self, chunks):
        self.chunks = list(chunks)

    @property
    def training(self) -> bool:
        return self.chunks[0].training

    def eval(self):
        for c in self.chunks:
            c.eval()
        return self

    def train(self, mode: bool = True):
        for c in self.chunks:
            c.train(mode)
        return self


def compact_batch(batch: dict):
    """A training micro-batch (Megatron's batch dict) as (tokens [b, s+1], loss mask or None, source)."""
    tokens = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)
    mask = batch.get("loss_mask")
    if mask is not None and bool((mask == 1).all()):
        mask = None
    src = int(batch["source_id"][0]) if "source_id" in batch else 0
    return tokens, mask, src


def _as_batch(b) -> dict:
    if isinstance(b, dict):
        return b
    if isinstance(b, torch.Tensor):
        return make_megatron_batch(b, 0)
    tokens, mask, src = b
    out = make_megatron_batch(tokens, src)
    if mask is not None:
        out["loss_mask"] = mask
    return out


class MegatronProbeLoss:
    """``loss_sum(model, batch) -> (sum of next-token losses, tokens)`` for :class:`SharpnessMeter`: one
    forward-only pass of Megatron's schedule over ``batch`` (a Megatron batch dict, a [b, s+1] token tensor
    or a :func:`compact_batch` tuple). The sum is fp64 on the last pipeline stage and 0 elsewhere (the host's
    ``all_reduce`` broadcasts it)."""

    def __init__(self, model_chunks, seq_length: int, forward_backward_func: Optional[Callable] = None):
        self.chunks = list(model_chunks)
        self.seq_length = int(seq_length)
        self.fb = forward_backward_func

    def __call__(self, _model, batch):
        if self.fb is None:
            from megatron.core.pipeline_parallel import get_forward_backward_func
            self.fb = get_forward_backward_func()
        b = _as_batch(batch)
        dev = next(self.chunks[0].parameters()).device

        def forward_step(data_iterator, model):
            x = {k: v.to(dev) for k, v in next(data_iterator).items()}
            out = model(x["tokens"], x["position_ids"], x["attention_mask"], labels=x["labels"])

            def loss_func(output):
                mask = x["loss_mask"].to(output.device)
                s = (output.double() * mask.double()).sum()
                return s.clone(), {"sum": s, "count": mask.sum().double()}
            return out, loss_func

        with torch.no_grad():
            res = self.fb(forward_step_func=forward_step, data_iterator=iter([b]), model=self.chunks,
                          num_microbatches=1, seq_length=int(b["tokens"].shape[1]),
                          micro_batch_size=int(b["tokens"].shape[0]), forward_only=True)
        if not res:
            return 0.0, 0
        return float(res[0]["sum"]), int(res[0]["count"])

    def many(self, _model, batches) -> list:
        """[(loss sum, tokens)] of each batch from ONE forward-only schedule call over all of them concatenated
        along the batch dimension (one micro-batch: one parameter all-gather, one pipeline pass), read from the
        per-sequence sums of the masked per-token losses. Batches of different lengths go in separate calls.
        On stages other than the last the sums are 0 (the host's ``all_reduce`` broadcasts them)."""
        if self.fb is None:
            from megatron.core.pipeline_parallel import get_forward_backward_func
            self.fb = get_forward_backward_func()
        dicts = [_as_batch(b) for b in batches]
        dev = next(self.chunks[0].parameters()).device
        out: list = [(0.0, 0)] * len(dicts)
        by_len: dict = {}
        for i, d in enumerate(dicts):
            by_len.setdefault(int(d["tokens"].shape[1]), []).append(i)
        for idx in by_len.values():
            keys = [k for k in dicts[idx[0]] if all(k in dicts[i] for i in idx)]
            big = {k: torch.cat([dicts[i][k] for i in idx]) for k in keys}

            def forward_step(data_iterator, model):
                x = {k: v.to(dev) for k, v in next(data_iterator).items()}
                res = model(x["tokens"], x["position_ids"], x["attention_mask"], labels=x["labels"])

                def loss_func(output):
                    mask = x["loss_mask"].to(output.device).double()
                    per_seq = (output.double() * mask).sum(dim=1)
                    return per_seq.sum().clone(), {"seq_sums": per_seq, "seq_counts": mask.sum(dim=1)}
                return res, loss_func

            with torch.no_grad():
                res = self.fb(forward_step_func=forward_step, data_iterator=iter([big]), model=self.chunks,
                              num_microbatches=1, seq_length=int(big["tokens"].shape[1]),
                              micro_batch_size=int(big["tokens"].shape[0]), forward_only=True)
            if not res:
                continue
            sums, counts = res[0]["seq_sums"].cpu(), res[0]["seq_counts"].cpu()
            s = 0
            for i in idx:
                n = int(dicts[i]["tokens"].shape[0])
                out[i] = (float(sums[s:s + n].sum()), int(counts[s:s + n].sum()))
                s += n
        return out


class RecordingIterator:
    """A pass-through data iterator that keeps (compactly) the micro-batches read since the last
    :meth:`take`: the step's own batches for ``--sharpness-split step``. Everything else (``set_micro_step``,
    ``begin_iteration``, ``state_dict``...) goes to the wrapped iterator."""

    def __init__(self, iterable):
        self.iterable = iterable
        self.batches: list = []

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.iterable)
        self.batches.append(compact_batch(b))
        return b

    def set_micro_step(self, *a, **k):
        return self.iterable.set_micro_step(*a, **k)

    def set_pass_micro_batches(self, n):
        if hasattr(self.iterable, "set_pass_micro_batches"):
            self.iterable.set_pass_micro_batches(n)

    def take(self) -> list:
        out, self.batches = self.batches, []
        return out

    def __getattr__(self, name):
        it = self.__dict__.get("iterable")
        if it is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(it, name)


# ---------------------------------------------------------------------------------------------------
# the hook
# ---------------------------------------------------------------------------------------------------

class MegatronSharpnessHook(SharpnessHook):
    """:class:`~nexus_megatron.sharpness.SharpnessHook` on a :class:`MegatronHost`: the seam callback of
    :class:`~.optimizer.NexusMegatronOptimizer` (``pre_outer_step``) or of :func:`~.optimizer.step_with_pre_update`.
    ``sink(step, metrics)``, if given, receives every measurement (e.g. a W&B / TensorBoard writer)."""

    def __init__(self, meter: SharpnessMeter, every: int = 1, sink: Optional[Callable] = None):
        super().__init__(meter, every)
        self.sink = sink

    def _step_number(self, opt) -> int:
        if self.step is not None:
            return int(self.step)
        stats = getattr(opt, "stats", None)
        if stats is None:
            raise NexusConfigError("critical sharpness with Megatron's own optimizer: call hook.begin_step(iteration) "
                                   "before every optimizer step")
        return int(stats.outer_steps) + 1

    def _measure(self, opt) -> None:
        t0 = time.perf_counter()
        host: MegatronHost = self.meter.host
        lr, beta1, wd, max_lr = host.hyper()
        u = host.direction()
        # lr = 0 (the first step of a warmup from 0): start the search at the peak lr; no threshold.
        eta0 = lr if lr > 0 else (max_lr if max_lr > 0 else 1e-3)
        results = self.meter.measure(u, eta0=eta0, master=host.master())
        del u
        m = sharpness_metrics(results, lr=eta0, beta1=beta1, weight_decay=wd, cost=self.meter.last_cost)
        if lr <= 0:
            m["sharpness/threshold"] = math.inf
            if "sharpness/lr_over_eta_c" in m:
                m["sharpness/lr_over_eta_c"] = 0.0
        m["sharpness/time_s"] = time.perf_counter() - t0
        step = self._step_number(opt)
        self._pending = m
        self.last = m
        self.history.append((step, m))
        if self.sink is not None:
            self.sink(step, m)


def megatron_probe_set(train_samplers: Sequence, val_samplers: Sequence, names: Sequence[str],
                       weights: Sequence[float], *, split: str, batches: int, micro_batch_size: int,
                       ood_samplers: Optional[dict] = None, rank: int = 0, world: int = 1, eod=None,
                       mask_eod: bool = False) -> ProbeSet:
    """Fixed probe batches per source (and per OOD set), dealt over the data-parallel ranks exactly like
    :meth:`ProbeSet.from_sources`, as Megatron batch dicts. ``split``: 'step' (the mixture is the step's
    own batches, handed over with ``hook.begin_step``; the sources use validation windows), 'val' or 'train'."""
    ood_samplers = dict(ood_samplers or {})
    sources = {}
    for i, name in enumerate(names):
        val = val_samplers[i] if val_samplers is not None else None
        if split != "train" and (val is None or val.windows == 0):
            raise NexusConfigError(
                f"critical sharpness: source {name!r} has no validation windows for the probe batches: give --split "
                "a validation share (e.g. 969,30,1) or use --sharpness-split train")
        sources[name] = SimpleNamespace(train=train_samplers[i], val=val)
    for name, sampler in ood_samplers.items():
        if sampler is None or sampler.windows == 0:
            raise NexusConfigError(f"critical sharpness: the OOD set {name!r} has no windows of the sequence length")
        sources[name] = SimpleNamespace(train=sampler, val=sampler)
    probe = ProbeSet.from_sources(sources, list(names), list(ood_samplers), list(weights),
                                  split="train" if split == "train" else "val", batches=batches,
                                  micro_batch_size=micro_batch_size, rank=rank, world=world)
    index = {n: i for i, n in enumerate(names)}
    for name, bs in probe.batches.items():
        probe.batches[name] = [make_megatron_batch(b, index.get(name, 0), eod, mask_eod) for b in bs]
    if split == "step":
        probe.mixture = {STEP: 1.0}
        probe.batches[STEP] = []
    return probe


def build_megatron_sharpness_hook(scfg: SharpnessConfig, optimizer, model_chunks, *, train_samplers: Sequence,
                                  val_samplers: Sequence, names: Sequence[str], weights: Sequence[float],
                                  micro_batch_size: int, seq_length: int, ood_samplers: Optional[dict] = None,
                                  eod=None, mask_eod: bool = False, forward_backward_func: Optional[Callable] = None,
                                  sink: Optional[Callable] = None, dp_group=None) -> Optional[MegatronSharpnessHook]:
    """The hook for a Megatron run (None when ``scfg.enabled`` is false). On a
    :class:`~.optimizer.NexusMegatronOptimizer` it is installed as ``optimizer.pre_outer_step``; with
    Megatron's own optimizer step with ``step_with_pre_update(optimizer, hook)`` and call
    ``hook.begin_step(iteration, batches)`` before every step."""
    if not scfg.enabled:
        return None
    host = MegatronHost(optimizer, dp_group=dp_group)
    probe = megatron_probe_set(train_samplers, val_samplers, names, weights, split=scfg.split, batches=scfg.batches,
                               micro_batch_size=micro_batch_size, ood_samplers=ood_samplers, rank=host.dp_rank,
                               world=host.dp_size, eod=eod, mask_eod=mask_eod)
    meter = SharpnessMeter(ChunkModes(model_chunks), probe, host, eps=scfg.eps, max_doublings=scfg.max_doublings,
                           relative=scfg.relative,
                           loss_sums=MegatronProbeLoss(model_chunks, seq_length, forward_backward_func).many)
    hook = MegatronSharpnessHook(meter, every=scfg.every, sink=sink)
    if isinstance(optimizer, NexusMegatronOptimizer):
        optimizer.pre_outer_step = hook
    return hook
