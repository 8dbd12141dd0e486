"""nexus.overlap_grad_reduce: the gradient reduction started bucket by bucket during backward gives the
numbers of the non-overlapped path (2 and 4 real processes, gloo) and of the single-process reference,
for both layouts, for Nexus and for the AdamW baseline; and the buckets really start before backward
returns."""
import json

import pytest
import torch

from nexus_megatron.config import load_config
from nexus_megatron.engines.plain import OverlappedNexus, PlainEngine
from nexus_megatron.errors import NexusConfigError
from nexus_megatron.layout import LayoutConfig, build_layout
from nexus_megatron.nexus import Nexus, NexusConfig
from tests.distributed import run_distributed
from tests.nexus_reference import SOURCES, batch, flat_params, loss_fn, make_model, reference_run

STEPS, K, GAMMA, LR = 3, 3, 0.05, 1e-2
P = sum(p.numel() for p in make_model().parameters())   # 123: buckets of 16 give 8 buckets


class WithUnused(torch.nn.Module):
    """The reference MLP plus a parameter that never gets a gradient (its bucket must still be reduced)."""

    def __init__(self):
        super().__init__()
        self.net = make_model()
        self.unused = torch.nn.Parameter(torch.ones(5))

    def forward(self, x):
        return self.net(x)


def _nexus_run(layout, model, overlap, bucket, probe):
    outer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    cfg = NexusConfig(gamma=GAMMA, gamma_mode="absolute")
    opt = (OverlappedNexus(model.parameters(), outer, layout, cfg, micro_steps=K, bucket_size=bucket) if overlap
           else Nexus(model.parameters(), outer, layout, cfg, micro_steps=K))
    hist, norms = [], []
    early, pieces = [], []
    if overlap and probe is not None:   # buckets started when backward reaches the first layer's weight
        first = next(model.parameters())
        h = first.register_hook(lambda g: early.append(opt.buckets.red.launched))
    for t in range(STEPS):
        for m in range(K):
            src = layout.source_for(t, m)
            reader, _ = layout.readers(src, t, m)
            x, y = batch(src, t, m, reader)
            if overlap:
                opt.before_backward()
            loss_fn(model, x, y).backward()
            if overlap and probe is not None:   # buckets started: at the first layer, and when backward returned
                probe.append((early[-1], opt.buckets.red.launched, len(opt.buckets.ranges)))
            red = opt.inner_step(src)
            if probe is not None:
                pieces.append(opt.update_pieces)
            norms.append(red.norms.clone())
        opt.step()
        hist.append(flat_params(model))
    if overlap:
        opt.buckets.remove()
        if probe is not None:
            h.remove()
            probe.append(("update pieces", pieces))
    return hist, torch.stack(norms)


def _engine_run(layout, optim, overlap, bucket):
    """The plain engine (as the trainer drives it), AdamW baseline or Nexus."""
    base = {"optim": {"name": optim, "lr": LR, "warmup_steps": 0, "schedule": "constant"},
            "nexus": {"layout": layout.mode, "gamma": GAMMA, "gamma_mode": "absolute",
                      "overlap_grad_reduce": overlap, "bucket_size": bucket},
            "train": {"micro_steps": K, "steps": STEPS}}
    cfg = load_config(None, [], base=json.loads(json.dumps(base)))
    model = make_model()
    eng = PlainEngine(cfg, model, layout, lambda s: 1.0)
    hist = []
    for t in range(STEPS):
        for m in range(K):
            src = layout.source_for(t, m)
            reader, _ = layout.readers(src, t, m)
            x, y = batch(src, t, m, reader)
            eng.backward(loss_fn(model, x, y))
            eng.micro_step(src)
        eng.outer_step()
        hist.append(flat_params(model))
    return hist


def _worker(rank, world, cases):
    out = {}
    for name, mode, nsrc in cases:
        layout = build_layout(LayoutConfig(mode=mode, sources=SOURCES[:nsrc]))
        res = {}
        res["plain"] = _nexus_run(layout, make_model(), False, 0, None)
        probe = []
        res["overlap16"] = _nexus_run(layout, make_model(), True, 16, probe)
        res["probe"] = probe
        res["overlap1bucket"] = _nexus_run(layout, make_model(), True, 10 ** 9, None)
        res["unused_plain"] = _nexus_run(layout, WithUnused(), False, 0, None)
        res["unused_overlap"] = _nexus_run(layout, WithUnused(), True, 8, None)
        for optim in ("adamw", "nexus"):
            res[f"engine_{optim}_off"] = _engine_run(layout, optim, False, 16)
            res[f"engine_{optim}_on"] = _engine_run(layout, optim, True, 16)
        out[name] = res
    return out


def _check(ranks, cases, world):
    for name, mode, nsrc in cases:
        ref, _ = reference_run(mode, nsrc, world, STEPS, K, GAMMA, lr=LR)
        for r, out in enumerate(ranks):
            res = out[name]
            plain_hist, plain_norms = res["plain"]
            for key in ("overlap16", "overlap1bucket"):
                hist, norms = res[key]
                for t, (got, base, want) in enumerate(zip(hist, plain_hist, ref)):
                    assert float((got - base).abs().max() / base.abs().max()) <= 1e-6, (name, key, r, t)
                    assert float((got - want).norm() / want.norm()) <= 1e-5, (name, key, r, t)
                # fp32 partial sums over 1024-element chunks (nexus.sum_sq); 16-element buckets cut the shards
                # elsewhere than one bucket does, so the partials round differently: ~1e-8 relative
                assert torch.allclose(norms, plain_norms, rtol=1e-7, atol=0), (name, key)
            # a parameter without gradient: zero in its bucket, the rest as without overlap
            for a, b in zip(res["unused_overlap"][0], res["unused_plain"][0]):
                assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), (name, "unused")
            for optim in ("adamw", "nexus"):
                for a, b in zip(res[f"engine_{optim}_on"], res[f"engine_{optim}_off"]):
                    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), (name, optim)
            # the reduction really runs during backward: of the 8 buckets, the two holding only the last
            # layer's gradients had started before backward reached the first layer, and all 8 had started
            # before backward returned
            *buckets, (_, pieces) = res["probe"]
            for early, launched, nb in buckets:
                assert nb == 8 and early >= 2 and launched == nb, (name, early, launched, nb)
            # source-parallel with 2 ranks per source group: the inner update ran bucket by bucket, each bucket
            # as soon as its all-gather of d was in (the later ones still in flight); otherwise in one piece
            want = 8 if (mode == "source-parallel" and world > nsrc) else 1
            assert pieces == [want] * (STEPS * K), (name, pieces)
        assert float((ref[-1] - flat_params(make_model())).norm()) > 1e-3   # the parameters moved


CASES2 = [("seq", "sequential", 3), ("sp", "source-parallel", 2)]


def test_overlap_matches_plain_and_reference_two_ranks():
    ranks = run_distributed(_worker, 2, CASES2, timeout=240)
    _check(ranks, CASES2, 2)
    # 2 ranks: every reduction is the sum of two numbers, so the overlapped path is bitwise the same
    for out in ranks:
        for name, _, _ in CASES2:
            assert torch.equal(out[name]["overlap16"][0][-1], out[name]["plain"][0][-1]), name
            assert torch.equal(out[name]["engine_nexus_on"][-1], out[name]["engine_nexus_off"][-1]), name
            assert torch.equal(out[name]["engine_adamw_on"][-1], out[name]["engine_adamw_off"][-1]), name


CASES4 = [("sp4", "source-parallel", 2)]   # 2 ranks per source group: per-bucket reduce-scatter / all-gather


def test_overlap_source_parallel_four_ranks():
    ranks = run_distributed(_worker, 4, CASES4, timeout=300)
    _check(ranks, CASES4, 4)


def test_overlap_settings_are_checked():
    with pytest.raises(NexusConfigError, match="nexus.bucket_size"):
        load_config(None, ["nexus.overlap_grad_reduce=true", "nexus.bucket_size=0"])
    with pytest.raises(NexusConfigError, match="overlap_comm"):
        load_config(None, ["nexus.overlap_grad_reduce=true", "train.engine=deepspeed"])
    with pytest.raises(NexusConfigError, match="true or false"):
        load_config(None, ["nexus.overlap_grad_reduce=3"])


def test_bucket_ranges_cover_the_buffer_from_its_end():
    layout = build_layout(LayoutConfig(mode="sequential", sources=("a",)))
    assert layout.bucket_ranges(10, 4) == [(6, 10), (2, 6), (0, 2)]
    assert layout.bucket_ranges(10, 100) == [(0, 10)]
