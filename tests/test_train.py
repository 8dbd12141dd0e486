"""The trainer end to end on real processes: metrics, summary, same data order for AdamW and Nexus,
exact resume, and errors before compute."""
import json
import os

import pytest
import torch

from nexus_megatron.errors import DataError
from tests.distributed import run_distributed
from tests.conftest import config_with, read_metrics  # noqa: E402

TINY = {
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"sources": ["web", "code", "math"], "ood": ["poetry"], "seq_len": 16, "micro_batch_size": 2},
    "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
    "train": {"steps": 4, "micro_steps": 2, "eval_every": 2, "probe_every": 2, "eval_batches": 2,
              "probe_batches": 2, "progress": False},
}


def tiny_config(data, run_dir, **over):
    return config_with(TINY, data, run_dir, **over)


def _train_worker(rank, world, cfg):
    from nexus_megatron.train import train
    summary = train(cfg)
    return summary


@pytest.mark.parametrize("optim,layout", [("nexus", "sequential"), ("adamw", "sequential"),
                                          ("nexus", "source-parallel")])
def test_two_rank_run_writes_metrics(synthetic_data, tmp_path, optim, layout):
    sources = ["web", "code"] if layout == "source-parallel" else ["web", "code", "math"]
    cfg = tiny_config(synthetic_data, tmp_path / "run", **{"optim.name": optim, "nexus.layout": layout,
                                                           "data.sources": json.dumps(sources)})
    s0, s1 = run_distributed(_train_worker, 2, cfg)
    assert s0["final"] == s1["final"]            # every rank agrees on eval and probe numbers
    m = read_metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert m[-1]["tokens"] == 4 * 2 * 2 * 2 * 16
    for key in ["lr", "loss", "skipped_sources", "skipped_steps", "time/step_s"]:
        assert key in m[0]
    probe = m[1]
    for a in sources:
        assert f"gnorm/{a}" in probe and f"eval/loss/{a}" in probe
    assert f"cos/{sources[0]}|{sources[1]}" in probe and -1 <= probe["cos/mean"] <= 1
    assert "eval/ood_loss" in probe and "eval/loss/poetry" in probe
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["optimizer"] == optim and summary["layout"]["mode"] == layout
    if optim == "nexus":
        assert m[0]["nexus/gamma"] > 0 and m[0]["nexus/pseudo_grad_norm"] <= 1 + 1e-5


def test_loss_decreases(synthetic_data, tmp_path):
    from nexus_megatron.train import train
    cfg = tiny_config(synthetic_data, tmp_path / "run", **{"train.steps": 30, "train.eval_every": 0,
                                                           "train.probe_every": 0, "model.hidden_size": 32})
    train(cfg)
    m = read_metrics(tmp_path / "run")
    first = sum(r["loss"] for r in m[:3]) / 3
    last = sum(r["loss"] for r in m[-3:]) / 3
    assert last < first - 0.5, (first, last)


def test_resume_continues_bitwise(synthetic_data, tmp_path, crash_after_checkpoint):
    """6 steps straight == 3 steps, stop, resume to 6 (parameters, optimizer state, metrics)."""
    from nexus_megatron.checkpoint import latest_checkpoint, load_checkpoint
    from nexus_megatron.train import train
    full = tiny_config(synthetic_data, tmp_path / "a", **{"train.steps": 6, "train.eval_every": 3})
    train(full)
    part = tiny_config(synthetic_data, tmp_path / "b", **{"train.steps": 6, "train.eval_every": 3,
                                                          "train.checkpoint_every": 3})
    crash_after_checkpoint(3)   # the run dies right after writing its step-3 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(part)
    train(part)   # resumes from step 3
    a = load_checkpoint(latest_checkpoint(str(tmp_path / "a" / "checkpoints")))
    b = load_checkpoint(latest_checkpoint(str(tmp_path / "b" / "checkpoints")))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["client_state"]["consumed"] == b["client_state"]["consumed"]
    ma, mb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}
    assert [strip(r) for r in ma] == [strip(r) for r in mb]


def test_adamw_and_nexus_see_the_same_data(synthetic_data, tmp_path):
    """Same data order: both optimizers read the same sources in the same micro-steps and consume the
    same samples; with k=1 the first step's loss (at the same initial parameters) is identical."""
    from nexus_megatron.checkpoint import latest_checkpoint, load_checkpoint
    from nexus_megatron.train import train
    out, consumed = {}, {}
    for k in (1, 2):
        for name in ("adamw", "nexus"):
            run = tmp_path / f"{name}{k}"
            train(tiny_config(synthetic_data, run, **{"optim.name": name, "train.steps": 3, "train.micro_steps": k}))
            out[name, k] = read_metrics(run)
            consumed[name, k] = load_checkpoint(latest_checkpoint(str(run / "checkpoints")))["client_state"]["consumed"]
        assert consumed["adamw", k] == consumed["nexus", k]
        keys = lambda m: [sorted(x for x in r if x.startswith("loss/")) for r in m]
        assert keys(out["adamw", k]) == keys(out["nexus", k])
    assert out["adamw", 1][0]["loss"] == out["nexus", 1][0]["loss"]


def test_data_budget_error_before_compute(synthetic_data, tmp_path):
    from nexus_megatron.train import train
    cfg = tiny_config(synthetic_data, tmp_path / "run", **{"train.steps": 5000})
    with pytest.raises(DataError, match=r"data.max_epochs"):
        train(cfg)
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_missing_source_and_data_dir(synthetic_data, tmp_path):
    from nexus_megatron.train import train
    with pytest.raises(DataError, match="not in .*manifest.json"):
        train(tiny_config(synthetic_data, tmp_path / "r", **{"data.sources": "[web, nope]"}))
    with pytest.raises(DataError, match="prepare-data"):
        train(tiny_config(tmp_path / "nowhere", tmp_path / "r"))
    os.remove(os.path.join(synthetic_data, "code", "train.bin"))
    open(os.path.join(synthetic_data, "code", "train.bin"), "wb").close()
    with pytest.raises(DataError, match="empty"):
        train(tiny_config(synthetic_data, tmp_path / "r"))


def test_wandb_offline_run(synthetic_data, tmp_path, monkeypatch):
    """train.wandb.mode=offline writes a local W&B run (no network) with the same metric names."""
    from nexus_megatron.train import train
    import wandb
    logged = []
    orig_init = wandb.init

    def spy_init(*a, **kw):
        run = orig_init(*a, **kw)
        orig_log = run.log
        run.log = lambda rec, step=None, **k: (logged.append(rec), orig_log(rec, step=step, **k))[1]
        return run
    monkeypatch.setattr(wandb, "init", spy_init)
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_config(synthetic_data, tmp_path / "run", **{"train.wandb.mode": "offline", "train.steps": 2}))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run directory"
    assert [r["step"] for r in logged] == [1, 2] and "eval/ood_loss" in logged[-1]
