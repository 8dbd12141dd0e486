"""Nexus on real processes (gloo) equals the single-process reference on the same micro-batches."""
import pytest
import torch

from nexus_megatron.layout import LayoutConfig, build_layout
from nexus_megatron.nexus import Nexus, NexusConfig
from tests.distributed import run_distributed
from tests.nexus_reference import SOURCES, batch, flat_params, loss_fn, make_model, reference_run

STEPS, K, GAMMA, LR = 4, 3, 0.05, 1e-2


def _nexus_worker(rank, world, mode, num_sources, weights):
    layout = build_layout(LayoutConfig(mode=mode, sources=SOURCES[:num_sources], weights=weights))
    model = make_model()
    outer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    opt = Nexus(model.parameters(), outer, layout, NexusConfig(gamma=GAMMA, gamma_mode="absolute"), micro_steps=K)
    history = []
    for t in range(STEPS):
        for m in range(K):
            src = layout.source_for(t, m)
            reader, _ = layout.readers(src, t, m)
            x, y = batch(src, t, m, reader)
            loss_fn(model, x, y).backward()
            opt.inner_step(src)
        opt.step()
        history.append(flat_params(model))
    return history


@pytest.mark.parametrize("mode,world,num_sources,weights", [
    ("sequential", 2, 3, None),
    ("sequential", 2, 3, (0.5, 0.3, 0.2)),
    ("source-parallel", 2, 2, None),
    ("source-parallel", 2, 2, (0.7, 0.3)),
    ("source-parallel", 4, 2, (0.6, 0.4)),   # 2 ranks per source group: reduce-scatter / all-gather path
])
def test_distributed_matches_reference(mode, world, num_sources, weights):
    ranks = run_distributed(_nexus_worker, world, mode, num_sources, weights)
    ref, _ = reference_run(mode, num_sources, world, STEPS, K, GAMMA, lr=LR, weights=list(weights) if weights else None)
    for r, hist in enumerate(ranks):
        for t, (got, want) in enumerate(zip(hist, ref)):
            rel = float((got - want).norm() / want.norm())
            assert rel <= 1e-5, f"rank {r} step {t}: relative error {rel:.2e}"
    # the parameters moved (the test is not vacuous)
    assert float((ref[-1] - flat_params(make_model())).norm()) > 1e-3
