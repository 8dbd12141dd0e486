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
    "deepspeed": {"random-direction-control": "the random-direction control is implemented on the plain engine "
                                              "only (NexusConfig.control; the study runs it there)"},
}


def sources(spec):
    return SOURCES[:spec["nsrc"]]


def loss_scale(spec, src):
    return 0.0 if spec["vanish"] == src else 1.0


def poisoned(spec, t, m, rank):
    return spec["nan"] is not None and tuple(spec["nan"]) == (t, m, rank)


# ---------------------------------------------------------------------------------------------------
# the reference (one process, from the spec)

def reference(spec, world, lrs):
    """Flat parameters after each outer step. ``lrs``: the lr of each outer step (what the engine's scheduler
    gave; the warmup scenarios check separately that it starts at 0)."""
    from nexus_megatron.layout import LayoutConfig, SequentialLayout, hash_seed

    model = make_model()
    params = list(model.parameters())
    outer = torch.optim.AdamW(param_groups(params, WD), lr=LR)
    P = sum(p.numel() for p in params)
    K_ = spec["nsrc"]
    w = torch.tensor(spec["weights"] or [1.0] * K_, dtype=torch.float64)
    w = w / w.sum()
    seq = SequentialLayout(LayoutConfig(mode="sequential", sources=sources(spec), weights=spec["weights"]))
    hist, applied = [], 0
    for t in range(STEPS):
        lr = lrs[t]
        gamma = spec["gamma"] if spec["gamma_mode"] == "absolute" else spec["gamma"] * lr * math.sqrt(P) / K
        theta = flat_params(model)
        delta = torch.zeros_like(theta, dtype=torch.float64)
        rdelta = torch.zeros_like(theta)
        dsum = torch.zeros_like(theta, dtype=torch.float64)
        bad = False
        for m in range(K):
            set_flat(model, (theta + rdelta) if spec["control"] != "none" else (theta.double() + delta).float())
            present = [seq.source_for(t, m)] if spec["mode"] == "sequential" else list(range(K_))
            readers = world if spec["mode"] == "sequential" else world // K_
            d = torch.zeros_like(theta)
            norms, grads = {}, {}
            for i in present:
                total = None
                for r in range(readers):
                    x, y = batch(i, t, m, r)
                    gs = torch.autograd.grad(loss_fn(model, x, y) * loss_scale(spec, i), params)
                    g = torch.cat([q.reshape(-1) for q in gs])
                    total = g if total is None else total + g
                grads[i] = total / readers
                norms[i] = float(grads[i].double().norm())
            if spec["nan"] is not None and spec["nan"][:2] == (t, m):
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
        set_flat(model, theta)
        if bad:
            hist.append(flat_params(model))
            continue
        G = (dsum / K) if gamma == 0 else (-delta / (K * gamma))   # the gamma -> 0 limit, §1.4
        off = 0
        for p in params:
            p.grad = G[off:off + p.numel()].view_as(p).float().clone()
            off += p.numel()
        for grp in outer.param_groups:
            grp["lr"] = lr
        outer.step()
        applied += 1
        hist.append(flat_params(model))
    return hist


def rel_err(a, b):
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


def _loss(model_or_engine, spec, src, t, m, reader, rank):
    x, y = batch(src, t, m, reader)
    loss = loss_fn(model_or_engine, x, y) * loss_scale(spec, src)
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


def deepspeed_worker(rank, world, stages, specs):
    """Nexus on DeepSpeed (fp32), every ZeRO stage x scenario; the warmup scenarios use DeepSpeed's WarmupLR
    with warmup_min_lr 0 from the ds_config."""
    from nexus_megatron.engines.deepspeed import initialize

    out = {}
    for stage in stages:
        for spec in specs:
            if spec["name"] in NOT_SUPPORTED["deepspeed"]:
                continue
            t0 = time.time()
            cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": K,
                   "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
                   "nexus": {"layout": spec["mode"], "sources": list(sources(spec)), "gamma": spec["gamma"],
                             "gamma_mode": spec["gamma_mode"], "min_grad_norm": MIN_NORM}}
            if spec["weights"]:
                cfg["nexus"]["weights"] = list(spec["weights"])
            if spec["warmup"]:
                cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                                    "warmup_num_steps": WARMUP_STEPS,
                                                                    "warmup_type": "linear"}}
            model = make_model()
            eng = initialize(model, cfg, optimizer=torch.optim.AdamW(param_groups(model.parameters(), WD), lr=LR))
            hist, lrs, skipped = [], [], []
            while eng.outer_steps < STEPS:
                t, m = eng.outer_steps, eng.micro_step
                if m == 0:
                    lrs.append(eng.get_nexus_lr())
                src = eng.source_for_micro_step()
                eng.backward(_loss(eng, spec, src, t, m, eng.readers()[0], rank))
                info = eng.step()
                if info is not None:
                    skipped.append(info["skipped"])
                    hist.append(_ds_full_params(eng))
            out[f"z{stage}/{spec['name']}"] = {"hist": hist, "lrs": lrs, "skipped": skipped,
                                              "seconds": time.time() - t0}
    return out


def _ds_full_params(engine):
    mod = engine.module
    if engine.prepared.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(mod.parameters())):
            return flat_params(mod)
    return flat_params(mod)
