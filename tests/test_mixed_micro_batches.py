"""data.mixed_micro_batches (the study's control for the cross-source term, docs/results.md): every micro-batch
holds micro_batch_size / K sequences of every source, in source order and in each source's own data order; the
inner path is Nexus's (one normalized gradient per micro-step), only the batches change."""
import json

import pytest
import torch

import nexus_megatron.train as train_mod
from nexus_megatron.errors import NexusConfigError
from nexus_megatron.layout import LayoutConfig, build_layout
from nexus_megatron.data.shards import open_sources
from tests.conftest import config_with, read_metrics

TINY = {
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"sources": ["web", "code", "math"], "ood": ["poetry"], "seq_len": 16, "micro_batch_size": 6,
             "mixed_micro_batches": True},
    "optim": {"name": "nexus", "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
    "train": {"steps": 3, "micro_steps": 2, "eval_every": 3, "probe_every": 0, "eval_batches": 1,
              "probe_batches": 1, "progress": False, "threads": 1},
}


def test_every_micro_batch_holds_every_source_in_data_order(synthetic_data, tmp_path, monkeypatch):
    cfg = config_with(TINY, synthetic_data, tmp_path / "run")
    seen = []
    orig = train_mod.lm_loss

    def spy(model, batch, *a, **kw):
        if model.training:
            seen.append(batch.clone())
        return orig(model, batch, *a, **kw)
    monkeypatch.setattr(train_mod, "lm_loss", spy)
    summary = train_mod.train(cfg)
    names = ["web", "code", "math"]
    _, sources = open_sources(synthetic_data, names, [], 16, cfg.train.seed)
    assert len(seen) == 3 * 2
    for i, batch in enumerate(seen):            # micro-step i: sequences 2i, 2i+1 of each source, in order
        want = torch.cat([sources[n].train.batch(2 * i, 2) for n in names])
        assert torch.equal(batch, want)
    assert summary["steps"] == 3
    # the data budget counts B / K sequences of each source per micro-step (sample_counts, mixed)
    layout = build_layout(LayoutConfig(sources=tuple(names)))
    assert train_mod.sample_counts(layout, 3, 2, 6, mixed=True) == [12, 12, 12]
    assert sum(train_mod.sample_counts(layout, 3, 2, 6)) == 36     # per source: whole micro-batches of 6
    m = read_metrics(tmp_path / "run")
    assert "loss" in m[-1] and not any(k.startswith("loss/") for k in m[-1])   # no per-source training loss


@pytest.mark.parametrize("over,msg", [({"nexus.layout": "source-parallel"}, "nexus.layout=sequential"),
                                      ({"data.micro_batch_size": 4}, "multiple of the number of sources")])
def test_bad_settings_are_refused(synthetic_data, tmp_path, over, msg):
    with pytest.raises(NexusConfigError, match=msg):
        config_with(TINY, synthetic_data, tmp_path / "run", **over)


def test_mixed_and_per_source_runs_differ_only_in_the_batches(synthetic_data, tmp_path):
    """Same seed, same tokens: the per-source run reads whole micro-batches of one source, the mixed run
    reads every source in every micro-batch; both finish, and their results differ."""
    a = train_mod.train(config_with(TINY, synthetic_data, tmp_path / "mixed"))
    b = train_mod.train(config_with(TINY, synthetic_data, tmp_path / "seq", **{"data.mixed_micro_batches": "false"}))
    assert a["tokens"] == b["tokens"]
    assert a["final"]["eval/loss"] != b["final"]["eval/loss"]
    assert json.load(open(tmp_path / "mixed" / "config.json"))["data"]["mixed_micro_batches"] is True
