"""Critical sharpness (ALGORITHMS.md §2, docs/sharpness.md) on DeepSpeed ZeRO 0-3, sharded.

Everything stays in DeepSpeed's own layout: the direction ``u`` is one fp32 tensor per fp32 master
partition of this rank (ZeRO-1/2: one flat partition per param group; ZeRO-3: one per sub-group), so no
rank ever holds an unsharded copy of u, and under ZeRO-3 none of the parameters either.

* :func:`adamw_update_into`: the AdamW update at unit lr of one flat partition, chunk by chunk (the formula
  of :func:`nexus_megatron.sharpness.adamw_direction`, read-only on the optimizer state).
* :class:`DeepSpeedHost`: the host of :class:`~nexus_megatron.sharpness.SharpnessMeter`. ``move(eta)``
  writes ``theta - eta u`` into DeepSpeed's low-precision partitions (the tensors its own step copies the
  fp32 master into) and propagates them the way DeepSpeed does after a step: ZeRO-1/2 all-gather the
  partitions into the replicated module parameters (``all_gather_dp_groups``, what ``update_lp_params``
  does); ZeRO-3 releases every gathered parameter so the next forward gathers the new partitions on demand.
  ``end()`` writes theta back and propagates again. The fp32 master partitions and the optimizer state are
  only read, except where DeepSpeed makes the partition the forward reads the master itself (ZeRO-0 in fp32;
  ZeRO-3 with an fp32 model on the master's device): then that partition is saved first and restored bitwise.
* The seams, right before the outer AdamW update:
  - Nexus (:class:`~nexus_megatron.engines.deepspeed.adapter._NexusCore`): the core calls
    ``pre_outer_step(core)`` in its outer step when every master partition holds its final delta; u is the
    outer AdamW update with the (clipped) pseudo-gradient ``G = -delta / (k gamma)``, theta_t = the anchor.
  - AdamW (:class:`AdamWSeam`): DeepSpeed steps its client AdamW one param group (ZeRO-1/2) or sub-group
    (ZeRO-3) at a time and hands a group's reduced, clipped gradient only when it reaches it, so in a
    measured step the seam defers the client's steps until the last group arrives, measures with every
    gradient and the untouched masters, then replays the deferred steps exactly as DeepSpeed issued them and
    re-copies the earlier groups' masters into their low-precision partitions (what DeepSpeed did right
    after each of them). Unmeasured steps go straight through.
"""
from __future__ import annotations

import copy
import os
import time
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from ...errors import NexusConfigError
from ...sharpness import SharpnessSeam, adam_hyper
from .runtime import init_adamw_state

CHUNK = 1 << 22   # elements per chunk of the direction's temporaries (16 MiB in fp32)


# ---------------------------------------------------------------------------------------------------
# the direction on one flat partition

@torch.no_grad()
def adamw_update_into(out: torch.Tensor, grad_of: Callable[[int, int], torch.Tensor], theta: torch.Tensor,
                      state: dict, group: dict, *, decoupled: bool = True, chunk: int = CHUNK) -> torch.Tensor:
    """``out[:] = u``, the update an AdamW/Adam step with this ``group`` and ``state`` would apply at unit lr
    to the flat partition ``theta`` with gradient ``grad_of(s, e)`` (elements s:e; may be a temporary):
    :func:`nexus_megatron.sharpness.adamw_direction`'s formula, computed chunk by chunk so the temporaries
    are at most 3 chunks. The state is not modified."""
    if group.get("amsgrad", False):
        raise NexusConfigError("critical sharpness: amsgrad AdamW is not supported")
    beta1, beta2 = (float(b) for b in group["betas"])
    eps, wd = float(group["eps"]), float(group.get("weight_decay", 0.0))
    step = float(state["step"]) + 1.0 if "step" in state else 1.0
    bc1 = 1 - beta1 ** step
    bc2_sqrt = (1 - beta2 ** step) ** 0.5
    m_all, v_all = state.get("exp_avg"), state.get("exp_avg_sq")
    n = out.numel()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        g = grad_of(s, e)
        if group.get("maximize", False):
            g = -g
        th = theta[s:e]
        if wd and not decoupled:
            g = g.add(th, alpha=wd)
        m = out[s:e]
        if m_all is not None:
            torch.lerp(m_all[s:e], g, 1 - beta1, out=m)
            v = v_all[s:e].mul(beta2).addcmul_(g, g, value=1 - beta2)
        else:   # the first step: zero moments
            torch.lerp(torch.zeros_like(g), g, 1 - beta1, out=m)
            v = torch.zeros_like(g).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt_() / bc2_sqrt).add_(eps)
        m.div_(denom).mul_(1.0 / bc1)
        if wd and decoupled:
            m.add_(th, alpha=wd)
    return out


# ---------------------------------------------------------------------------------------------------
# DeepSpeed's partitions

class Partitions:
    """This rank's fp32 master partitions (``masters``), the low-precision tensors DeepSpeed copies them into
    after a step (``lps``, same shapes), the client param-group index of each, and ``gather()``: what
    DeepSpeed does after that copy to make the module see it."""

    def __init__(self, ds_opt, client):
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.ds_opt, self.client = ds_opt, client
        groups = list(client.param_groups)
        if ds_opt is client:                                    # ZeRO-0, fp32: the parameters themselves
            self.kind = "stage0"
            pairs = [(p, p, gi) for gi, g in enumerate(groups) for p in g["params"]]
        elif isinstance(ds_opt, FP16_UnfusedOptimizer):         # ZeRO-0, bf16
            self.kind = "stage0-bf16"
            pairs = [(lp, hp, gi) for gi, (lps, hps) in enumerate(zip(ds_opt.fp16_groups, ds_opt.fp32_groups))
                     for lp, hp in zip(lps, hps)]
        elif isinstance(ds_opt, BF16_Optimizer):                # ZeRO-1 + bf16 + fp32 gradient accumulation
            self.kind = "bf16-zero1"
            pairs = [(ds_opt.bf16_partitioned_groups[i][dist.get_rank(group=ds_opt.real_dp_process_group[i])], hp, i)
                     for i, hp in enumerate(ds_opt.fp32_groups_flat_partition)]
        elif isinstance(ds_opt, DeepSpeedZeroOptimizer_Stage3):
            self.kind = "zero3"
            if getattr(ds_opt, "offload_optimizer", False) or getattr(ds_opt, "offload_param", False) or \
                    any(t is None for t in ds_opt.fp16_partitioned_groups_flat):
                raise NexusConfigError("critical sharpness on DeepSpeed does not support ZeRO-Offload; remove "
                                       "zero_optimization.offload_optimizer / offload_param")
            pairs = [(lp, hp, ds_opt.sub_group_to_group_id[j]) for j, (lp, hp) in
                     enumerate(zip(ds_opt.fp16_partitioned_groups_flat, ds_opt.fp32_partitioned_groups_flat))]
        elif isinstance(ds_opt, DeepSpeedZeroOptimizer):
            self.kind = "zero12"
            if getattr(ds_opt, "cpu_offload", False):
                raise NexusConfigError("critical sharpness on DeepSpeed does not support ZeRO-Offload; remove "
                                       "zero_optimization.offload_optimizer")
            pairs = [(ds_opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=ds_opt.real_dp_process_group[i])],
                      hp, i) for i, hp in enumerate(ds_opt.single_partition_of_fp32_groups)]
        else:
            raise NexusConfigError(f"critical sharpness: DeepSpeed wrapped the optimizer in {type(ds_opt).__name__}, "
                                   "which is not supported (ZeRO stages 0-3, fp32 or bf16)")
        self.lps = [lp for lp, _, _ in pairs]
        self.masters = [hp for _, hp, _ in pairs]
        self.group_index = [gi for _, _, gi in pairs]
        for lp, hp in zip(self.lps, self.masters):
            if hp.dtype != torch.float32 or lp.numel() != hp.numel():
                raise NexusConfigError(f"critical sharpness: DeepSpeed master partition of dtype {hp.dtype} / "
                                       f"{hp.numel()} elements for a {lp.numel()}-element partition; fp32 masters needed")

    @torch.no_grad()
    def gather(self) -> None:
        """Propagate the low-precision partitions to the module (collective over DeepSpeed's DP groups)."""
        opt = self.ds_opt
        if self.kind in ("zero12", "bf16-zero1"):
            from deepspeed.runtime.utils import all_gather_dp_groups
            flat, parts = ((opt.bit16_groups_flat, opt.parallel_partitioned_bit16_groups) if self.kind == "zero12"
                           else (opt.bf16_groups_flat, opt.bf16_partitioned_groups))
            all_gather_dp_groups(groups_flat=flat, partitioned_param_groups=parts,
                                 dp_process_group=opt.real_dp_process_group,
                                 start_alignment_factor=opt.nccl_start_alignment_factor,
                                 allgather_bucket_size=opt.allgather_bucket_size)
        elif self.kind == "zero3":
            # the forward gathers every parameter from its new partition (ds_tensor) on demand
            opt._partition_all_parameters()

    def persistent_available(self) -> bool:
        """ZeRO-3: are the persistent (small, always-gathered) parameters gathered right now (between steps:
        yes; inside DeepSpeed's step: no, its ``_post_step`` gathers them)."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        ps = getattr(self.ds_opt, "persistent_parameters", None) or []
        return bool(ps) and all(p.ds_status == ZeroParamStatus.AVAILABLE for p in ps)

    def gather_persistent(self) -> None:
        ps = self.ds_opt.persistent_parameters
        if ps:
            ps[0].all_gather(ps)

    def main_group(self) -> dict:
        """The client param group holding most of this rank's master elements (the threshold's lr, beta1, wd)."""
        sizes = {}
        for hp, gi in zip(self.masters, self.group_index):
            sizes[gi] = sizes.get(gi, 0) + hp.numel()
        return self.client.param_groups[max(sizes, key=sizes.get)]


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# ---------------------------------------------------------------------------------------------------
# the host

class DeepSpeedHost:
    """:class:`~nexus_megatron.sharpness.PlainHost`'s interface on DeepSpeed's partitions.

    ``begin(u, master)``: ``u`` and ``master`` (theta; default DeepSpeed's fp32 master partitions) are one
    tensor per partition of :class:`Partitions`. ``all_reduce`` sums over ``group`` (default: all ranks, the
    ranks the probe batches are dealt over)."""

    def __init__(self, parts: Partitions, group=None, protect: Optional[Sequence[torch.Tensor]] = None):
        self.parts = parts
        self.group = group
        self.protect = list(protect) if protect is not None else [None] * len(parts.lps)
        """One tensor per partition that must stay bitwise as it is besides DeepSpeed's master (Nexus's anchor)."""
        self.device = parts.masters[0].device if parts.masters else torch.device("cpu")
        self.gathers_per = {"zero12": "move", "bf16-zero1": "move", "zero3": "forward"}.get(parts.kind)
        """How the probes gather parameters (``SharpnessMeter.last_cost['gathers']``): ZeRO-1/2 all-gather the
        partitions at every move (and at ``end``); ZeRO-3 gathers every layer in each forward call."""
        self._theta = self._u = self._saved = None
        self._persistent = False
        self.last_buffers: dict = {}
        """Element counts of the last measurement's buffers on this rank: ``u``, ``saved`` (partitions saved
        because they alias a master), ``partition`` (this rank's master elements)."""

    @torch.no_grad()
    def begin(self, u: Sequence[torch.Tensor], master: Optional[Sequence[torch.Tensor]] = None) -> None:
        p = self.parts
        theta = list(master) if master is not None else list(p.masters)
        if len(u) != len(p.lps) or len(theta) != len(p.lps):
            raise ValueError(f"{len(u)} direction / {len(theta)} theta tensors for {len(p.lps)} DeepSpeed partitions")
        saved = [lp.detach().clone() if any(t is not None and _overlaps(lp, t) for t in (hp, th, pr)) else None
                 for lp, hp, th, pr in zip(p.lps, p.masters, theta, self.protect)]
        # where the partition the forward reads is theta itself, theta is the saved copy
        self._theta = [s if (s is not None and _overlaps(lp, t)) else t for lp, t, s in zip(p.lps, theta, saved)]
        self._u, self._saved = list(u), saved
        self._persistent = p.kind == "zero3" and p.persistent_available()
        self.last_buffers = {"u": sum(x.numel() for x in u), "saved": sum(s.numel() for s in saved if s is not None),
                             "partition": sum(hp.numel() for hp in p.masters)}

    @torch.no_grad()
    def move(self, eta: float) -> None:
        for lp, th, u in zip(self.parts.lps, self._theta, self._u):
            if eta == 0.0:
                lp.copy_(th)
            else:
                torch.add(th, u, alpha=-float(eta), out=lp)
        self.parts.gather()

    @torch.no_grad()
    def end(self) -> None:
        if self._theta is None:
            return
        for lp, th, s in zip(self.parts.lps, self._theta, self._saved):
            lp.copy_(s if s is not None else th)
        self.parts.gather()
        if self._persistent:
            self.parts.gather_persistent()
        self._theta = self._u = self._saved = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            if self.device.type != "cpu" and t.device != self.device:
                buf = t.to(self.device)
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
                t.copy_(buf)
            else:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


# ---------------------------------------------------------------------------------------------------
# the directions

def _hyper(group: dict) -> tuple:
    return float(group["lr"]), float(group["betas"][0]), float(group.get("weight_decay", 0.0))


@torch.no_grad()
def nexus_direction(core):
    """At the Nexus core's seam: u of the outer AdamW with the clipped pseudo-gradient, theta_t = anchor."""
    client = core.client
    us = []
    for i, ((p, gi), a) in enumerate(zip(core.parts, core.anchors)):
        def grad_of(s, e, i=i):
            return core.pseudo_grad(i, s, e)
        u = torch.empty_like(a)
        adamw_update_into(u.view(-1), grad_of, a.view(-1), client.state.get(p, {}), core.group_list[gi],
                          decoupled=adam_hyper(client, core.group_list[gi])[4])
        us.append(u)
    sizes = {}
    for (p, gi) in core.parts:
        sizes[gi] = sizes.get(gi, 0) + p.numel()
    return us, list(core.anchors), *_hyper(core.group_list[max(sizes, key=sizes.get)])


class AdamWSeam:
    """The seam of the AdamW baseline on DeepSpeed (see the module docstring). Installed by replacing the
    client AdamW's ``step`` (an instance attribute: DeepSpeed and the lr scheduler keep seeing a
    ``torch.optim.AdamW``). ``pre_outer_step(seam)`` is called with every group's gradient in
    :attr:`pending` and the masters untouched."""

    def __init__(self, parts: Partitions):
        self.parts = parts
        self.opt = parts.client
        if not isinstance(self.opt, torch.optim.Adam):
            raise NexusConfigError(f"critical sharpness needs an Adam/AdamW client optimizer, got {type(self.opt).__name__}")
        self.expected = {id(m) for m in parts.masters}
        self.pre_outer_step = None
        self.stats = SimpleNamespace(outer_steps=0)
        self._orig_step = self.opt.step
        self._calls: list = []          # [(groups as handed by DeepSpeed [(dict, [params])], {id: grad})]
        self._seen: set = set()
        self._measuring = False
        self.pending: dict = {}         # id(master) -> (grad, group dict)
        for m, gi in zip(parts.masters, parts.group_index):     # the state exists before DeepSpeed links it
            init_adamw_state(self.opt, m, self.opt.param_groups[gi])

        def step(closure=None):
            return self._step(closure)
        if hasattr(self._orig_step, "_wrapped_by_lr_sched"):    # the lr scheduler's step-order check
            step._wrapped_by_lr_sched = True
        self.opt.step = step

    def _step(self, closure=None):
        if closure is not None:
            return self._orig_step(closure)
        current = [(g, list(g["params"])) for g in self.opt.param_groups if g["params"]]
        ids = {id(p) for _, ps in current for p in ps}
        if not self._seen:      # the first call of a DeepSpeed step
            hook = self.pre_outer_step
            self._measuring = hook is not None and hook.due(self)
        self._seen |= ids
        done = self._seen >= self.expected
        if not self._measuring:
            out = self._orig_step()
        else:
            self._calls.append(([(dict(g), ps) for g, ps in current], {id(p): p.grad for _, ps in current for p in ps}))
            for g, ps in current:
                for p in ps:
                    self.pending[id(p)] = (p.grad, g)
            out = None
            if done:
                try:
                    self.pre_outer_step(self)
                finally:
                    self.pending = {}
                    self._replay()
        if done:
            self._seen, self._calls, self._measuring = set(), [], False
            self.stats.outer_steps += 1
        return out

    @torch.no_grad()
    def _replay(self):
        """The deferred AdamW steps, as DeepSpeed issued them; then the low-precision copies of the groups
        DeepSpeed already copied (the last call's partitions are copied by DeepSpeed after this returns)."""
        opt, saved_groups = self.opt, self.opt.param_groups
        earlier = set()
        for n, (groups, grads) in enumerate(self._calls):
            params = [p for _, ps in groups for p in ps]
            now = [p.grad for p in params]
            for p in params:
                p.grad = grads[id(p)]
            opt.param_groups = [{**g, "params": ps} for g, ps in groups]
            try:
                self._orig_step()
            finally:
                opt.param_groups = saved_groups
                for p, g in zip(params, now):
                    p.grad = g
            if n < len(self._calls) - 1:
                earlier |= {id(p) for p in params}
        P = self.parts
        for i, m in enumerate(P.masters):
            if id(m) in earlier:
                if P.kind == "zero12" or P.kind == "bf16-zero1":
                    P.lps[i].copy_(m)
                elif P.kind == "zero3":
                    P.ds_opt._reassign_or_swap_out_partitioned_parameters(i)


@torch.no_grad()
def adamw_seam_direction(seam: AdamWSeam):
    """At the AdamW seam: u of the client AdamW with each group's reduced, clipped gradient; theta = masters."""
    P, opt = seam.parts, seam.opt
    us = []
    for m in P.masters:
        grad, group = seam.pending[id(m)]
        u = torch.empty_like(m)
        if grad is None:
            u.zero_()
        else:
            g = grad.view(-1)
            adamw_update_into(u.view(-1), lambda s, e, g=g: g[s:e], m.view(-1), opt.state.get(m, {}), group,
                              decoupled=adam_hyper(opt, group)[4])
        us.append(u)
    return us, list(P.masters), *_hyper(P.main_group())


# ---------------------------------------------------------------------------------------------------
# what the trainer's engines hand build_sharpness_hook

def nexus_seam(engine) -> SharpnessSeam:
    """The seam of :class:`~nexus_megatron.engines.deepspeed.adapter.DeepSpeedNexusEngine`."""
    core = engine.nexus._core
    parts = Partitions(core.ds_opt, core.client)
    if [id(m) for m in parts.masters] != [id(p) for p, _ in core.parts]:
        raise RuntimeError("critical sharpness: DeepSpeed's master partitions are not the Nexus core's")
    host = DeepSpeedHost(parts, protect=core.anchors)

    def install(hook):
        core.pre_outer_step = hook
    return SharpnessSeam(host=host, direction=nexus_direction, model=engine.probe_module, install=install)


def adamw_seam(engine) -> SharpnessSeam:
    """The seam of :class:`~nexus_megatron.engines.deepspeed.adapter.DeepSpeedAdamWEngine`."""
    ds = engine.ds
    client = getattr(ds.optimizer, "optimizer", ds.optimizer)
    parts = Partitions(ds.optimizer, client)
    seam = AdamWSeam(parts)

    def install(hook):
        seam.pre_outer_step = hook
    return SharpnessSeam(host=DeepSpeedHost(parts), direction=adamw_seam_direction, model=engine.probe_module,
                         install=install)


# ---------------------------------------------------------------------------------------------------
# `nexus-megatron sharpness --zero-stage N / --deepspeed-config F`

# DeepSpeed sizes these buffers by element counts, not by the model: at its defaults (reduce bucket 5e8
# elements, ZeRO-3 reuse distance 1e9) every rank of a model below those sizes holds a full-size gradient in
# the reduce bucket and keeps every layer gathered from its forward to its backward, i.e. 8P bytes per rank
# in fp32 on top of the sharded state (measured at 77.6M parameters, docs/sharpness.md). The command runs a
# handful of steps, so it takes the lean settings unless the ds_config gives its own (either spelling):
# a 5e7-element reduce bucket (as configs/ds_config_zero3_bf16.json), every parameter released right after
# the module that used it (the backward gathers each layer again) and no prefetching: DeepSpeed does not release
# a parameter that its prefetcher fetched for a later use in the recorded trace (the backward), so with
# prefetching the whole model stays gathered from the second micro-step on, in the probe forwards too
# (measured at 77.6M parameters: all of them gathered when the final norm starts, even at reuse distance 0).
COMMAND_ZERO_DEFAULTS = (("reduce_bucket_size", ("reduce_bucket_size",), 50_000_000),
                         ("stage3_max_reuse_distance", ("stage3_max_reuse_distance", "max_reuse_distance"), 0),
                         ("stage3_prefetch_bucket_size", ("stage3_prefetch_bucket_size", "prefetch_bucket_size"), 0))


def command_ds_config(args, world: int, sources: int) -> dict:
    """The ds_config of the command: the user's ``zero_optimization`` and ``bf16`` sections (or ``--zero-stage``),
    one micro-batch per source (``gradient_accumulation_steps`` = number of sources), no clipping; the
    :data:`COMMAND_ZERO_DEFAULTS` where the ``zero_optimization`` section does not set them."""
    from .config import load_ds_config
    if args.deepspeed_config:
        user = load_ds_config(args.deepspeed_config)
        zero = copy.deepcopy(user.get("zero_optimization") or {})
        bf16 = copy.deepcopy(user.get("bf16") or user.get("bfloat16") or {"enabled": False})
        if (user.get("fp16") or {}).get("enabled"):
            raise NexusConfigError(f"--deepspeed-config {args.deepspeed_config}: fp16 is not supported (loss scaling); "
                                   "use bf16 or fp32")
        where = f"--deepspeed-config {args.deepspeed_config}"
    else:
        zero, bf16, where = {"stage": int(args.zero_stage)}, {"enabled": False}, f"--zero-stage {args.zero_stage}"
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise NexusConfigError(f"{where}: zero_optimization.stage={stage!r}; the sharded command needs ZeRO 1, 2 or 3 "
                               "(without DeepSpeed, leave --zero-stage / --deepspeed-config out)")
    for off in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(off), dict) and zero[off].get("device", "none") not in (None, "none"):
            raise NexusConfigError(f"{where}: zero_optimization.{off} (ZeRO-Offload) is not supported by the "
                                   "sharpness command; remove it")
    if (zero.get("mics_shard_size") or -1) > 0 or (zero.get("zero_hpz_partition_size") or 1) > 1:
        raise NexusConfigError(f"{where}: MiCS / ZeRO++ hpZ partitioning is not supported; remove them")
    for key, spellings, value in COMMAND_ZERO_DEFAULTS:
        if not any(k in zero for k in spellings):
            zero[key] = value
    mb = args.batch_size // world
    return {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": sources,
            "train_batch_size": mb * sources * world, "gradient_clipping": 0.0, "zero_optimization": zero,
            "bf16": bf16, "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False}


class ZeroCommand:
    """The sharded backend of :func:`nexus_megatron.tools.sharpness_cli.run_sharpness` (same methods as its
    ``LocalCommand``). DeepSpeed reduces and partitions the gradients; its step calls the client AdamW, whose
    ``step`` is replaced by the moment update (u computed first when a measurement needs it), so neither the
    fp32 masters nor the parameters ever move."""

    def __init__(self, args, sources: int):
        from .runtime import prepare_deepspeed_runtime
        self.args = args
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.ds_config = command_ds_config(args, world, sources)      # every setting checked before DeepSpeed starts
        self.stage = int(self.ds_config["zero_optimization"]["stage"])
        if self.stage == 3 and (args.model.endswith(".gguf") or args.model == "smollm2"):
            raise NexusConfigError("--model with a GGUF file and ZeRO-3: transformers dequantizes a GGUF file whole on "
                                   "every rank; save it as a transformers directory first (save_pretrained)")
        self.deepspeed = prepare_deepspeed_runtime()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._direction = False
        self._us: Dict[int, torch.Tensor] = {}
        self._t_u = 0.0

    def load(self):
        from ...tools.pretrained import build_adamw, load_model_and_tokenizer
        hf = None
        if self.stage == 3:   # transformers builds the model under deepspeed.zero.Init and loads it partition-wise
            from transformers.integrations.deepspeed import HfDeepSpeedConfig
            hf = HfDeepSpeedConfig(self.ds_config)
        try:
            model, tok = load_model_and_tokenizer(self.args.model, device=None)
        finally:
            del hf
        params = [p for p in model.parameters() if p.requires_grad]
        self._numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
        opt = build_adamw(params, self.args)
        self.engine, _, _, _ = self.deepspeed.initialize(model=model, optimizer=opt, config=self.ds_config)
        self.engine.eval()                                    # no dropout in the gradients either
        self.parts = Partitions(self.engine.optimizer, opt)
        self.opt = opt
        opt.step = self._client_step
        self.host = DeepSpeedHost(self.parts)
        self.model = self.engine.module
        return self.model, tok

    def num_params(self) -> int:
        return self._numel

    def vocab(self) -> int:
        w = self.model.get_input_embeddings().weight
        return int(getattr(w, "ds_shape", w.shape)[0])

    def share(self, batch):
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    @torch.no_grad()
    def _client_step(self, closure=None):
        """DeepSpeed's call of the client AdamW (one group / sub-group at a time under ZeRO): u of these
        partitions from the state before this gradient (if measuring), then only the moment update."""
        from ...sharpness import update_adam_moments
        t = time.perf_counter()
        if self._direction:
            for g in self.opt.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        u = torch.empty_like(p)
                        grad = p.grad.view(-1)
                        adamw_update_into(u.view(-1), lambda s, e, grad=grad: grad[s:e], p.view(-1),
                                          self.opt.state.get(p, {}), g, decoupled=adam_hyper(self.opt, g)[4])
                        self._us[id(p)] = u
        self._t_u += time.perf_counter() - t
        update_adam_moments(self.opt)

    def gradient(self, batches: dict, weights: Dict[str, float], direction: bool):
        import torch.nn.functional as F
        self._direction, self._us, self._t_u = direction, {}, 0.0
        total = torch.zeros(1, dtype=torch.float64)
        dev = self.engine.device
        for name, w in weights.items():                       # one micro-step per source; DeepSpeed steps after all
            b = batches[name].to(dev)
            logits = self.engine(input_ids=b[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1))
            self.engine.backward(w * loss, scale_wrt_gas=False)
            self.engine.step()
            total += w * float(loss.detach())
        total /= self.world
        self.host.all_reduce(total)
        self._direction = False
        u = None
        if direction:
            u = [self._us.pop(id(m), None) for m in self.parts.masters]
            u = [x if x is not None else torch.zeros_like(m) for x, m in zip(u, self.parts.masters)]
        return float(total), u, self._t_u

    def close(self):
        del self.opt.step, self.engine, self.model, self.host, self.parts
