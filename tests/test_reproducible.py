"""The same command twice gives bitwise-identical results (docs/reliability.md#reproducible-installs): a
small 2-process training run through the CLI (torchrun, gloo), run twice in fresh processes, gives the same
metrics.jsonl (every number but the timings), the same summary and the same final parameters, bit for bit."""
import hashlib
import json
import os
import subprocess
import sys

import torch

from nexus_megatron.checkpoint import latest_checkpoint, load_checkpoint
from tests.conftest import ROOT, read_metrics, write_synthetic_data

SETTINGS = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "data.sources=[web, code, math]",
            "data.ood=[poetry]", "data.seq_len=16", "data.micro_batch_size=2", "train.micro_steps=2",
            "train.steps=4", "optim.warmup_steps=1", "train.eval_every=2", "train.probe_every=2",
            "train.eval_batches=2", "train.probe_batches=2", "train.progress=false"]


def _train(data, run_dir):
    argv = [sys.executable, "-m", "nexus_megatron.cli", "train", "--nproc", "2"]
    for s in SETTINGS + [f"data.path={data}", f"train.run_dir={run_dir}"]:
        argv += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):   # unset: the command's torchrun runs --standalone
        env.pop(k, None)
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def _params_sha(run_dir):
    state = load_checkpoint(latest_checkpoint(os.path.join(str(run_dir), "checkpoints")))
    h = hashlib.sha256()
    for name, t in sorted(state["model"].items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _numbers(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run_dir)]


def test_same_command_twice_is_bitwise_identical(tmp_path):
    data = write_synthetic_data(str(tmp_path / "data"))
    _train(data, tmp_path / "a")
    _train(data, tmp_path / "b")
    a, b = _numbers(tmp_path / "a"), _numbers(tmp_path / "b")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and "cos/mean" in a[1] and "eval/loss" in a[3]
    assert json.dumps(a) == json.dumps(b)                  # every float to the last bit (repr round-trips)
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert json.dumps(sa["final"]) == json.dumps(sb["final"])
    assert _params_sha(tmp_path / "a") == _params_sha(tmp_path / "b")
