"""Process faults on the real CLI (`nexus-megatron train --nproc 2`, i.e. torchrun, gloo on CPU):
kill -9 one rank in the middle of an outer step and the checkpoint writer in the middle of a checkpoint
write, and hang one rank. Every process exits promptly with a non-zero status and a message
naming the failed rank; the restart resumes from the last good checkpoint and ends with the parameters
and metrics of an uninterrupted run. Faults are injected with NEXUS_FAULT_INJECT
(nexus_megatron/faults.py). The same on DeepSpeed and Megatron-core: tests/test_faults_engines.py."""
import json
import os
import re

import pytest
import torch

from nexus_megatron.checkpoint import latest_checkpoint, load_checkpoint
from tests.conftest import write_synthetic_data
from tests.fault_runs import (EXIT_BOUND_S, cli_train, failed_rank_named, launch, recorded, stray_workers,
                              torchrun)
from tests.record_publish import check_publication

CONFIG = {
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"sources": ["web", "code", "math"], "ood": ["poetry"], "seq_len": 16, "micro_batch_size": 2},
    "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
    "train": {"steps": 6, "micro_steps": 2, "eval_every": 3, "probe_every": 3, "eval_batches": 2,
              "probe_batches": 2, "checkpoint_every": 2, "progress": False, "threads": 1},
}


def write_config(tmp, data, run_dir, **train):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"]["path"] = str(data)
    cfg["train"].update(run_dir=str(run_dir), **train)
    path = os.path.join(str(tmp), f"{os.path.basename(str(run_dir))}.yaml")
    with open(path, "w") as f:
        json.dump(cfg, f)   # JSON is YAML
    return path


def final_state(run_dir):
    return load_checkpoint(latest_checkpoint(os.path.join(str(run_dir), "checkpoints")))


def metrics(run_dir):
    with open(os.path.join(str(run_dir), "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every restart must reproduce."""
    tmp = tmp_path_factory.mktemp("faults")
    data = write_synthetic_data(str(tmp / "data"))
    run = tmp / "reference"
    # what `--nproc 2` runs, with the checkpoint fsyncs and renames recorded (tests/record_publish.py)
    rc, out, _ = launch(torchrun(*recorded(tmp / "events", "module", "nexus_megatron.cli", "train", "--config",
                                           write_config(tmp, data, run))))
    assert rc == 0, out[-3000:]
    return tmp, data, final_state(run), metrics(run)


def test_checkpoint_files_fsynced_before_publication(reference):
    """Every checkpoint is renamed into place only when all its files exist and are fsynced, as is its
    directory; the parent directory is fsynced after the rename and `latest` replaced after that."""
    tmp = reference[0]
    root = tmp / "reference" / "checkpoints"
    published = check_publication(tmp / "events", root, "step_", ["state.pt", "meta.json"])
    assert published == ["step_00000002", "step_00000004", "step_00000006"]


def assert_resumed_equal(tmp, data, run, reference, resumed_from):
    _, _, ref_state, ref_metrics = reference
    rc, out, _ = launch(cli_train(write_config(tmp, data, run)))
    assert rc == 0, out[-3000:]
    state = final_state(run)
    assert state["client_state"]["step"] == 6
    for k, v in ref_state["model"].items():
        assert torch.equal(v, state["model"][k]), k
    assert state["client_state"]["consumed"] == ref_state["client_state"]["consumed"]
    assert metrics(run) == ref_metrics
    return state


def kill9_run(reference, name, rank, fault, what):
    """Run the CLI with ``fault`` injected; assert every rank exited promptly, non-zero, with the killed
    rank named and no worker left. Returns the run directory."""
    tmp, data, _, _ = reference
    run = tmp / name
    config = write_config(tmp, data, run)
    rc, out, exit_s = launch(cli_train(config), fault)
    print(f"kill -9 rank {rank} {what}: all ranks exited {exit_s:.1f}s later, rc={rc}")
    assert rc != 0 and exit_s is not None and exit_s < EXIT_BOUND_S
    assert failed_rank_named(out, rank, -9), out[-3000:]
    assert not stray_workers(config)
    return run


def test_kill9_rank_mid_outer_step_then_resume(reference):
    tmp, data, _, _ = reference
    run = kill9_run(reference, "kill_step", 1, "kill_rank=1,step=3,phase=step", "mid-step 3")
    assert os.path.basename(latest_checkpoint(str(run / "checkpoints"))) == "step_00000002"
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert_resumed_equal(tmp, data, run, reference, 2)


def test_kill9_writer_mid_checkpoint_then_resume(reference):
    tmp, data, _, _ = reference
    run = kill9_run(reference, "kill_ckpt", 0, "kill_rank=0,step=4,phase=checkpoint", "while writing checkpoint 4")
    root = run / "checkpoints"
    assert any(d.startswith(".tmp-step_00000004") for d in os.listdir(root))   # the write was cut short ...
    assert os.path.basename(latest_checkpoint(str(root))) == "step_00000002"  # ... and latest still the old one
    assert load_checkpoint(latest_checkpoint(str(root)))["client_state"]["step"] == 2
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]      # logged, but resume truncates to step 2
    assert_resumed_equal(tmp, data, run, reference, 2)


def test_hung_rank_hits_collective_timeout(reference):
    """A rank that hangs (blocked for good, alive: here it sleeps) is noticed through train.collective_timeout_s:
    the waiting rank fails, torchrun takes the hung one down with SIGTERM, the command exits non-zero.
    (A rank frozen by SIGSTOP ignores SIGTERM and costs torchrun's fixed 30 s more, docs/reliability.md.)"""
    tmp, data, _, _ = reference
    run = tmp / "hang"
    config = write_config(tmp, data, run, collective_timeout_s=5)
    rc, out, exit_s = launch(cli_train(config), "kill_rank=1,step=2,phase=step,action=hang")
    print(f"rank 1 hangs mid-step 2 (collective_timeout_s=5): all ranks exited {exit_s:.1f}s later, rc={rc}")
    assert rc != 0 and exit_s is not None and exit_s < EXIT_BOUND_S
    root = out.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*0 \(local_rank: 0\)\s*\n\s*exitcode\s*:\s*1\b", root), out[-3000:]
    assert "Timed out waiting 5000ms" in out, out[-3000:]
    assert not stray_workers(config)
