"""The cross-engine conformance table (tests/test_conformance.py): one list of scenarios, one single-process
reference written from ALGORITHMS.md §1.1-§1.5 (fp64 displacement, G = -delta / (k gamma), the gamma -> 0
limit G = (1/k) sum_m d_m, sources below min_grad_norm dropped with the weights renormalized, a step with
NaN/Inf skipped), and one worker per engine that runs every scenario inside ONE multi-rank job.

The model, data and outer AdamW (two param groups) are tests/ds_reference.py's; a scenario's data differ only
by a loss scale per source (0: the source's gradient vanishes) and a NaN injected into one rank's loss."""
import math
import time

import torch

from tests.ds_reference import SOURCES, batch, flat_params, loss_fn, make_model, param_groups
from tests.nexus_reference import set_flat

K, LR, WD, STEPS = 2, 1e-2, 0.1, 3
WARMUP_STEPS = 3
MIN_NORM = 1e-8


def _scn(name, mode="sequential", nsrc=None, **kw):
    nsrc = nsrc or (3 if mode == "sequential" else 2)
    return {"name": name, "mode": mode, "nsrc": nsrc, "weights": None, "gamma": 0.05, "gamma_mode": "absolute",
            "vanish": None, "nan": None, "warmup": False, "control": "none", **kw}


SCENARIOS = (
    [_scn(f"gamma-{g:g}", gamma=g) for g in (1e-8, 1e-6, 1e-4, 1e-2, 1.0)]
    + [_scn("sp-weighted", mode="source-parallel", weights=(0.7, 0.3)),
       _scn("seq-weighted-g1e-6", weights=(0.5, 0.3, 0.2), gamma=1e-6),
       _scn("sp-vanishing-source", mode="source-parallel", vanish=1),
       _scn("seq-vanishing-source", vanish=0),
       _scn("seq-nan-rank1", nan=(1, 0, 1)),             # (outer step, micro-step, rank)
       _scn("sp-nan-rank1-last", mode="source-parallel", nan=(0, 1, 1)),
       # gamma_mode=update with the engine's own warmup from lr = 0: gamma_t = 0 at the first outer step
       _scn("warmup-from-lr0", gamma=0.25, gamma_mode="update", warmup=True),
       _scn("sp-warmup-from-lr0", mode="source-parallel", gamma=0.25, gamma_mode="update", warmup=True),
       _scn("random-direction-control", control="random_direction")])

NOT_SUPPORTED = {
    # engine: {scenario: reason}
    "deepspeed": {},
}


BF16_SCENARIOS = ("gamma-0.01", "sp-weighted", "warmup-from-lr0", "random-direction-control")
"""The scenarios of the DeepSpeed bf16 rows (ZeRO 1-3 with ``bf16.enabled``, fp32 master weights).

What "conforms" means in bf16: the engine's fp32 master trajectory equals the reference's to 1e-5 relative when
the reference applies the same bf16 roundings as the engine (:class:`BF16ToyProblem`): the initial weights are
rounded to bf16 (DeepSpeed casts the model and builds the fp32 master from it), every forward/backward runs on a
bf16 copy of the fp32 point (round to nearest, as DeepSpeed copies master -> model), and the readers' bf16
gradients are averaged in bf16 (DeepSpeed's data-parallel reduction of bf16 gradients: with two ranks
``bf16(a + b) / 2``, one correctly rounded result however it is ordered; measured: without this rounding the
sequential rows differ by ~1e-4, with it by ~1e-8). Everything Nexus does (norms, d_sum, G, the anchor, AdamW)
is fp32 on both sides. So the tolerance stays 1e-5: the bf16 rounding is part of the computation being compared,
not an error allowed for. Against the *fp32* reference the same runs differ by ~1e-3 (bf16's 2^-9 relative
rounding of the weights moves every gradient): a 1e-5 check cannot hold there, and a looser one would hide real
bugs. The test keeps that gap as a sanity check (a bf16 row must differ from the fp32 reference by more than
1e-4, else it did not run in bf16)."""


def sources(spec):
    return SOURCES[:spec["nsrc"]]


def loss_scale(spec, src):
    return 0.0 if spec["vanish"] == src else 1.0


def poisoned(spec, t, m, rank):
    return spec["nan"] is not None and tuple(spec["nan"]) == (t, m, rank)


# ---------------------------------------------------------------------------------------------------
# the reference (one process, from the spec)

class ToyProblem:
    """tests/ds_reference.py's MLP and data (the plain and DeepSpeed engines)."""

    def __init__(self):
        self.model = make_model()
        self.params = list(self.model.parameters())

    def groups(self):
        return param_groups(self.params, WD)

    def betas(self):
        return (0.9, 0.999), 1e-8

    def grad(self, spec, i, t, m, readers):
        """Source i's gradient: the mean of its readers' gradients (summed in their dtype, as the engine reduces)."""
        total = None
        for r in range(readers):
            g = self.reader_grad(spec, i, t, m, r)
            total = g if total is None else total + g
        return (total / readers).float()

    def reader_grad(self, spec, i, t, m, r):
        x, y = batch(i, t, m, r)
        gs = torch.autograd.grad(loss_fn(self.model, x, y) * loss_scale(spec, i), self.params)
        return torch.cat([q.reshape(-1) for q in gs])

    def snapshot(self):
        return flat_params(self.model)


def bf16_loss(model, x, y):
    """The toy loss on a bf16 model: bf16 inputs, the bf16 output widened to fp32 by the subtraction."""
    return ((model(x.bfloat16()) - y) ** 2).mean()


class BF16ToyProblem(ToyProblem):
    """The toy problem computed as DeepSpeed's bf16 engine computes it: forward/backward on a bf16 copy of the
    fp32 parameters, the readers' bf16 gradients averaged in bf16, then widened (see BF16_SCENARIOS). The forward
    point is the engines' fp32 ``anchor - gamma_t * S`` (a 1-ulp fp32 difference in it can flip a bf16 rounding)."""

    fp32_point = True

    def __init__(self):
        super().__init__()
        import copy
        with torch.no_grad():   # DeepSpeed's bf16 engine casts the model to bf16 and builds the fp32 master from it
            for p in self.params:
                p.copy_(p.bfloat16().float())
        self.bf = copy.deepcopy(self.model).bfloat16()
        self.bf_params = list(self.bf.parameters())

    def grad(self, spec, i, t, m, readers):
        with torch.no_grad():
            for b, p in zip(self.bf_params, self.params):
                b.copy_(p)                       # fp32 -> bf16, round to nearest even
        return super().grad(spec, i, t, m, readers)   # the readers' bf16 gradients averaged in bf16

    def reader_grad(self, spec, i, t, m, r):
        x, y = batch(i, t, m, r)
        gs = torch.autograd.grad(bf16_loss(self.bf, x, y) * loss_scale(spec, i), self.bf_params)
        return torch.cat([q.reshape(-1) for q in gs])


def _set(params, flat):
    off = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()


def reference(spec, world, lrs, problem=None):
    """Parameters after each outer step (``problem.snapshot()``; default :class:`ToyProblem`). ``lrs``: the lr
    of each outer step (what the engine's scheduler gave; the warmup scenarios check that it starts at 0)."""
    from nexus_megatron.layout import LayoutConfig, SequentialLayout, hash_seed

    pb = problem or ToyProblem()
    params = pb.params
    betas, eps = pb.betas()
    outer = torch.optim.AdamW(pb.groups(), lr=LR, betas=betas, eps=eps)
    P = sum(p.numel() for p in params)
    K_ = spec["nsrc"]
    w = torch.tensor(spec["weights"] or [1.0] * K_, dtype=torch.float64)
    w = w / w.sum()
    seq = SequentialLayout(LayoutConfig(mode="sequential", sources=sources(spec), weights=spec["weights"]))
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in params])  # noqa: E731
    hist = []
    for t in range(STEPS):
        lr = lrs[t]
        gamma = spec["gamma"] if spec["gamma_mode"] == "absolute" else spec["gamma"] * lr * math.sqrt(P) / K
        theta = flat()
        delta = torch.zeros_like(theta, dtype=torch.float64)
        rdelta = torch.zeros_like(theta)
        dsum = torch.zeros_like(theta, dtype=torch.float64)
        bad = False
        for m in range(K):
            if spec["control"] != "none":
                point = theta + rdelta
            elif getattr(pb, "fp32_point", False):   # the engines' fp32 moved point, anchor - gamma * S (§1.5)
                point = torch.add(theta, dsum.float(), alpha=-gamma)
            else:
                point = (theta.double() + delta).float()
            _set(params, point)
            present = [seq.source_for(t, m)] if spec["mode"] == "sequential" else list(range(K_))
            readers = world if spec["mode"] == "sequential" else world // K_
            d = torch.zeros_like(theta)
            norms, grads = {}, {}
            for i in present:
                grads[i] = pb.grad(spec, i, t, m, readers)
                norms[i] = float(grads[i].double().norm())
            if spec["nan"] is not None and tuple(spec["nan"][:2]) == (t, m):
                bad = True
            active = [i for i in present if norms[i] >= MIN_NORM]
            if active:
                wsum = sum(float(w[i]) for i in active)
                for i in active:
                    d += float(w[i] / wsum / norms[i]) * grads[i]
            delta -= gamma * d.double()
            dsum += d.double()
            if spec["control"] != "none":
                g = torch.Generator().manual_seed(hash_seed(0, 0x52414E44, t, m + 1))
                r = torch.randn(theta.numel(), generator=g, dtype=torch.float32)
                r *= float(d.double().norm()) / float(r.double().norm())
                rdelta = rdelta - gamma * r
        _set(params, theta)
        if bad:
            hist.append(pb.snapshot())
            continue
        G = (dsum / K) if gamma == 0 else (-delta / (K * gamma))   # the gamma -> 0 limit, §1.4
        off = 0
        for p in params:
            p.grad = G[off:off + p.numel()].view_as(p).float().clone()
            off += p.numel()
        for grp in outer.param_groups:
            grp["lr"] = lr
        outer.step()
        for p in params:
            p.grad = None
        hist.append(pb.snapshot())
    return hist


def rel_err(a, b):
    if isinstance(a, dict):   # {parameter name: tensor}
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        a, b = (torch.cat([x[n].double().reshape(-1) for n in sorted(b)]) for x in (a, b))
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------------
# engines

def _nexus_config(spec):
    from nexus_megatron.nexus import NexusConfig
    return NexusConfig(gamma=spec["gamma"], gamma_mode=spec["gamma_mode"], min_grad_norm=MIN_NORM,
                       control=spec["control"])


def _layout_config(spec):
    from nexus_megatron.layout import LayoutConfig
    return LayoutConfig(mode=spec["mode"], sources=sources(spec), weights=spec["weights"])


def _loss(model_or_engine, spec, src, t, m, reader, rank, bf16=False):
    x, y = batch(src, t, m, reader)
    loss = (bf16_loss if bf16 else loss_fn)(model_or_engine, x, y) * loss_scale(spec, src)
    if poisoned(spec, t, m, rank):
        loss = loss * float("nan")
    return loss


def plain_worker(rank, world, specs):
    """Nexus (nexus_megatron.nexus.Nexus) with torch's AdamW and LambdaLR, every scenario."""
    from nexus_megatron.layout import build_layout
    from nexus_megatron.nexus import Nexus

    out = {}
    for spec in specs:
        t0 = time.time()
        model = make_model()
        outer = torch.optim.AdamW(param_groups(model.parameters(), WD), lr=LR)
        layout = build_layout(_layout_config(spec))
        opt = Nexus(model.parameters(), outer, layout, _nexus_config(spec), micro_steps=K)
        sched = torch.optim.lr_scheduler.LambdaLR(
            outer, (lambda s: min(1.0, s / WARMUP_STEPS)) if spec["warmup"] else (lambda s: 1.0))
        hist, lrs, skipped = [], [], []
        for t in range(STEPS):
            lrs.append(opt.current_lr())
            for m in range(K):
                src = layout.source_for(t, m)
                _loss(model, spec, src, t, m, layout.readers(src, t, m)[0], rank).backward()
                opt.inner_step(src)
            info = opt.step()
            skipped.append(info["skipped"])
            if not info["skipped"]:
                sched.step()
            hist.append(flat_params(model))
        out[spec["name"]] = {"hist": hist, "lrs": lrs, "skipped": skipped, "seconds": time.time() - t0}
    return out


def deepspeed_worker(rank, world, stages, specs, bf16_stages=()):
    """Nexus on DeepSpeed, every ZeRO stage x scenario in fp32, and ``bf16_stages`` x :data:`BF16_SCENARIOS` with
    bf16 (keys ``bf16-z<stage>/<scenario>``); the warmup scenarios use DeepSpeed's WarmupLR with warmup_min_lr 0
    from the ds_config."""
    from nexus_megatron.engines.deepspeed import initialize

    out = {}
    runs = [(st, spec, False) for st in stages for spec in specs]
    runs += [(st, spec, True) for st in bf16_stages for spec in specs if spec["name"] in BF16_SCENARIOS]
    for stage, spec, bf16 in runs:
        if spec["name"] in NOT_SUPPORTED["deepspeed"]:
            continue
        t0 = time.time()
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": K,
               "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
               "nexus": {"layout": spec["mode"], "sources": list(sources(spec)), "gamma": spec["gamma"],
                         "gamma_mode": spec["gamma_mode"], "min_grad_norm": MIN_NORM}}
        if spec["weights"]:
            cfg["nexus"]["weights"] = list(spec["weights"])
        if bf16:   # bf16 model and gradients, fp32 master weights
            cfg["bf16"] = {"enabled": True}
        if spec["warmup"]:
            cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                                "warmup_num_steps": WARMUP_STEPS,
                                                                "warmup_type": "linear"}}
        model = make_model()
        # the control is not a ds_config key (NexusConfig.control: the API's nexus_config)
        nexus = _nexus_config(spec) if spec["control"] != "none" else None
        eng = initialize(model, cfg, nexus_config=nexus,
                         optimizer=torch.optim.AdamW(param_groups(model.parameters(), WD), lr=LR))
        hist, lrs, skipped = [], [], []
        while eng.outer_steps < STEPS:
            t, m = eng.outer_steps, eng.micro_step
            if m == 0:
                lrs.append(eng.get_nexus_lr())
            src = eng.source_for_micro_step()
            eng.backward(_loss(eng, spec, src, t, m, eng.readers()[0], rank, bf16))
            info = eng.step()
            if info is not None:
                skipped.append(info["skipped"])
                hist.append(_ds_master_params(eng) if bf16 else _ds_full_params(eng))
        out[f"{'bf16-' if bf16 else ''}z{stage}/{spec['name']}"] = {"hist": hist, "lrs": lrs, "skipped": skipped,
                                                                   "seconds": time.time() - t0}
    if bf16_stages:   # the control where it is refused: bf16 at stage 0 (DeepSpeed's FP16_UnfusedOptimizer)
        from nexus_megatron.errors import NexusConfigError
        spec = next(s for s in SCENARIOS if s["control"] != "none")
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": K, "bf16": {"enabled": True},
               "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9,
               "nexus": {"layout": spec["mode"], "sources": list(sources(spec))}}
        model = make_model()
        try:
            initialize(model, cfg, nexus_config=_nexus_config(spec), optimizer={"lr": LR})
            out["refused/bf16-z0/" + spec["name"]] = None
        except NexusConfigError as e:
            out["refused/bf16-z0/" + spec["name"]] = str(e)
    return out


def _ds_master_params(engine):
    """The fp32 master weights of every parameter, in the module's order (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param
    return torch.cat([safe_get_full_fp32_param(p).detach().float().reshape(-1) for p in engine.module.parameters()])


def _ds_full_params(engine):
    mod = engine.module
    if engine.prepared.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(mod.parameters())):
            return flat_params(mod)
    return flat_params(mod)


# ---------------------------------------------------------------------------------------------------
# Megatron (tests/mcore_helpers.py's GPTModel; every function runs in a worker that applied the CPU shim)

MEGATRON_ADAM_EPS = 1e-6
"""Adam's eps on the GPT problem. Some gradient entries are zero in exact arithmetic (the attention key bias:
softmax is shift invariant) and Adam's first step maps their rounding noise n to lr * n / (|n| + eps): with
eps = 1e-8 that is O(lr) for noise that differs between any two correct implementations (a moved point rounded
differently), 7e-5 relative at gamma_t = 1; with 1e-6 it is below 1e-6. Every other entry is >> eps."""

MEGATRON_VARIANTS = {   # name: (tp, pp, distributed optimizer)
    "ddp": (1, 1, False), "distopt": (1, 1, True), "tp2": (2, 1, True), "pp2": (1, 2, True)}
NOT_SUPPORTED["megatron"] = {
    f"{v}/random-direction-control": "the control is defined for data parallelism only (NexusConfigError on TP/PP, "
                                     "tests/test_conformance.py::test_control_refused_under_model_parallelism)"
    for v in ("tp2", "pp2")}
MP_SOURCE_PARALLEL = {}
"""The source-parallel rows under TP=2 / PP=2: not in the 2-rank job (it has one data-parallel rank), run by a
4-rank job of their own (tests/test_conformance.py::test_megatron_model_parallel_source_parallel_conforms)."""
for _v in ("tp2", "pp2"):
    for _s in SCENARIOS:
        if _s["mode"] == "source-parallel":
            MP_SOURCE_PARALLEL[f"{_v}/{_s['name']}"] = "in the 4-rank job (a 2-rank job has DP=1 under TP=2 or PP=2)"


def megatron_skip(variant, spec, world=2):
    ns = NOT_SUPPORTED["megatron"]
    key = f"{variant}/{spec['name']}"
    if world == 4:   # the 4-rank job runs only the source-parallel rows under model parallelism
        return key not in MP_SOURCE_PARALLEL
    return spec["name"] in ns or key in ns or key in MP_SOURCE_PARALLEL


class GPTProblem:
    """The unsharded GPTModel of tests/mcore_helpers.py; a source's gradient is the mean of the per-micro-batch
    gradients of its readers (the ranks' batch shapes, as the existing Megatron reference)."""

    def __init__(self):
        from tests import mcore_helpers as H
        self.H = H
        self.model = H.build_model()[0]
        self.named = list(self.model.named_parameters())
        self.params = [p for _, p in self.named]

    def groups(self):
        decay = [p for n, p in self.named if p.ndim >= 2 and not n.endswith(".bias")]
        rest = [p for n, p in self.named if not (p.ndim >= 2 and not n.endswith(".bias"))]
        return [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]

    def betas(self):
        return (0.9, 0.95), MEGATRON_ADAM_EPS

    def grad(self, spec, i, t, m, readers):
        H = self.H
        parts = []
        for r in range(readers):
            b = H.make_batch(H.tokens_for(i, t, m, r, 0), i)
            out = self.model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
            gs = torch.autograd.grad(out.float().mean() * loss_scale(spec, i), self.params)
            parts.append(torch.cat([g.reshape(-1) for g in gs]))
        return torch.stack(parts).mean(0)

    def snapshot(self):
        return {n: p.detach().clone() for n, p in self.named}


def megatron_reference_worker(rank, world, jobs):
    """``jobs``: [(key, spec, dp, lrs)]; returns {key: history}."""
    from tests import mcore_helpers as H
    H.init_megatron()
    return {key: reference(spec, dp, lrs, GPTProblem()) for key, spec, dp, lrs in jobs}


def _megatron_refusal(spec, tp, pp, distopt):
    """The NexusConfigError of building the Nexus optimizer for ``spec`` (the control under TP/PP), or None."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from nexus_megatron.engines.megatron import build_nexus_groups, get_nexus_megatron_optimizer
    from nexus_megatron.errors import NexusConfigError
    from tests import mcore_helpers as H

    model, cfg = H.build_model(tp=tp, pp=pp)
    groups = build_nexus_groups(_layout_config(spec))
    ddp = DistributedDataParallel(config=cfg, module=model, pg_collection=groups.pg_collection,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distopt))
    ocfg = OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WD, clip_grad=0.0, use_distributed_optimizer=distopt)
    try:
        get_nexus_megatron_optimizer(ocfg, [ddp], groups, _nexus_config(spec), micro_steps=K)
    except NexusConfigError as e:
        return str(e)
    return None


def megatron_worker(rank, world, variants, specs):
    """Nexus on Megatron (NexusMegatronOptimizer around get_megatron_optimizer's Adam, fp32), every variant x
    scenario; the warmup scenarios use Megatron's OptimizerParamScheduler from init_lr 0."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from nexus_megatron.engines.megatron import (build_nexus_groups, get_nexus_megatron_optimizer,
                                                 nexus_finalize_model_grads, nexus_forward_backward)
    from tests import mcore_helpers as H

    out = {}
    for variant in variants:
        tp, pp, distopt = MEGATRON_VARIANTS[variant]
        H.init_megatron(tp=tp, pp=pp)
        for spec in specs:
            if megatron_skip(variant, spec, world):
                if spec["control"] != "none" and world == 2:   # refused before any compute, with the setting named
                    out[f"refused/{variant}/{spec['name']}"] = _megatron_refusal(spec, tp, pp, distopt)
                continue
            t0 = time.time()
            model, cfg = H.build_model(tp=tp, pp=pp)
            groups = build_nexus_groups(_layout_config(spec))
            ddp = DistributedDataParallel(config=cfg, module=model, pg_collection=groups.pg_collection,
                                          ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distopt,
                                                                                   grad_reduce_in_fp32=True))
            cfg.finalize_model_grads_func = nexus_finalize_model_grads(groups)
            ocfg = OptimizerConfig(optimizer="adam", lr=LR, min_lr=0.0, weight_decay=WD, adam_beta1=0.9,
                                   adam_beta2=0.95, adam_eps=MEGATRON_ADAM_EPS, clip_grad=0.0, use_distributed_optimizer=distopt)
            opt = get_nexus_megatron_optimizer(ocfg, [ddp], groups, _nexus_config(spec), micro_steps=K)
            sched = OptimizerParamScheduler(
                opt, init_lr=0.0 if spec["warmup"] else LR, max_lr=LR, min_lr=LR,
                lr_warmup_steps=WARMUP_STEPS if spec["warmup"] else 0, lr_decay_steps=1000,
                lr_decay_style="constant", start_wd=WD, end_wd=WD, wd_incr_steps=1000, wd_incr_style="constant")
            it = H.TestIterator(groups.layout)
            fb = nexus_forward_backward(opt, get_forward_backward_func())

            def fwd(data_iterator, model_, spec=spec, opt=opt):
                b = next(data_iterator)
                o = model_(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
                src = int(b["source_id"][0])
                scale = loss_scale(spec, src)
                if poisoned(spec, opt.iteration, opt.inner_steps, rank):
                    o = o * float("nan")   # the output of any pipeline stage: the NaN reaches this pass's loss

                def loss_func(output):
                    loss = (output.float() * b["loss_mask"]).sum() / b["loss_mask"].sum() * scale
                    return loss, {"lm loss": loss.detach().clone()}
                return o, loss_func
            hist, lrs, skipped = [], [], []
            for _ in range(STEPS):
                lrs.append(opt.current_lr())
                ddp.zero_grad_buffer()
                opt.zero_grad()
                fb(forward_step_func=fwd, data_iterator=it, model=[ddp], num_microbatches=K, seq_length=H.SEQ,
                   micro_batch_size=H.MBS, forward_only=False)
                ok, _, _ = opt.step()
                skipped.append(not ok)
                if ok:
                    sched.step(1)
                hist.append(H.gather_full_params(ddp.module))
            out[f"{variant}/{spec['name']}"] = {"hist": hist, "lrs": lrs, "skipped": skipped,
                                               "seconds": time.time() - t0}
    return out
