"""nexus-megatron bench end to end on 2 real processes (torchrun, gloo): it prints every column, and what it
counts equals the plan model: on the plain engine exactly (every collective's calls and payload, and every
category of the training state), on DeepSpeed up to DeepSpeed's scalar collectives and partition padding.
No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

from nexus_megatron.plan import comm_ops, state_bytes, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
        "--set", "model.vocab_size=64", "--set", "data.seq_len=16", "--set", "data.micro_batch_size=2",
        "--set", "train.micro_steps=2", "--steps", "1", "--warmup", "1", "--sources", "2"]
COLUMNS = ["optimizer", "layout", "overlap", "step s", "(min-max)", "tokens/s", "x AdamW", "CPU s/step", "state MB/rank", "extra B/param",
           "peak MB", "bus MB/step", "bus MB/micro-step", "x one grad all-reduce", "plan bus MB/step", "calls/step"]


def _bench(tmp_path, *extra, port):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "nexus_megatron.cli", "bench", "--nproc", "2", *TINY, "--out", str(out), *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out) as f:
        return r.stdout, json.load(f)


def _plan_for(row, data, buckets=1):
    from nexus_megatron.bench import plan_input_for
    import argparse
    args = argparse.Namespace(zero=data["zero"], bf16=data["bf16"], sources=2, ds_zero_set=[])
    return validate(plan_input_for(row, data["config"], args, data["world"], "cpu"))


def _by_op(ops):
    out = {}
    for o in ops:
        key = f"{o.op}@{o.group}"
        calls, pay = out.get(key, (0, 0.0))
        out[key] = (calls + o.calls, pay + o.payload)
    return out


def test_plain_bench_counts_equal_the_plan(tmp_path):
    from tests.distributed import free_port
    stdout, data = _bench(tmp_path, "--bucket-size", "600", port=free_port())
    header = next(line for line in stdout.splitlines() if line.startswith("| optimizer | layout | overlap"))
    for col in COLUMNS:
        assert col in header
    assert "critical-sharpness hook" in stdout and "forward passes" in stdout
    rows = [r for r in data["rows"] if not r["sharpness"]]
    assert {(r["optim"], r["layout"], r["overlap"]) for r in rows} == {
        (o, lay, ov) for o in ("adamw", "nexus") for lay in ("sequential", "source-parallel") for ov in (False, True)}
    P = rows[0]["params"]
    one_allreduce = 4 * P                                   # bus bytes of an fp32 all-reduce over 2 ranks
    for r in rows:
        p = _plan_for(r, data)
        ops = comm_ops(p, r["optim"], r["layout"], overlap=r["overlap"], buckets=r.get("buckets", 1))
        want = _by_op(ops)
        got = {key: (v["calls"], v["payload"]) for key, v in r["comm"]["ops"].items()}
        assert got == want, (r["optim"], r["layout"], r["overlap"], got, want)
        if r["overlap"]:
            assert r["buckets"] > 1
        # the target: bytes per micro-step <= 1.1 x one data-parallel all-reduce of the gradient
        if r["optim"] == "nexus":
            assert r["comm"]["bus_per_micro"] <= 1.1 * one_allreduce
            assert r["comm"]["bus_per_micro"] >= one_allreduce
        st = state_bytes(p, r["optim"], r["layout"], overlap=r["overlap"])
        for cat in ("params", "grads", "optimizer", "nexus"):
            assert r["state"].get(cat, 0) == st[cat], (r["optim"], r["layout"], cat, r["state"], st)
        assert r["state"].get("other", 0) < 0.02 * r["state"]["total"]    # AdamW's step counters, model buffers
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0
    sh = [r for r in data["rows"] if r["sharpness"]]
    assert len(sh) == 2 and all(r["sharpness_passes"] >= 3 and r["sharpness_s"] > 0 for r in sh)


def test_deepspeed_bench_counts_match_the_plan(tmp_path):
    pytest.importorskip("deepspeed")
    from tests.distributed import free_port
    stdout, data = _bench(tmp_path, "--engine", "deepspeed", "--zero", "2", "--overlap", "off", "--no-sharpness",
                          "--bucket-size", "5000", port=free_port())
    assert "DeepSpeed ZeRO-2" in stdout
    rows = data["rows"]
    assert len(rows) == 4
    for r in rows:
        p = _plan_for(r, data)
        want = sum(o.bus for o in comm_ops(p, r["optim"], r["layout"]))
        # DeepSpeed's own scalar collectives (norm, overflow check) are not in the plan
        assert abs(r["comm"]["bus_per_step"] - want) < 2048, (r["optim"], r["layout"], r["comm"], want)
        st = state_bytes(p, r["optim"], r["layout"])
        got_opt = r["state"].get("optimizer", 0) + r["state"].get("master", 0)
        assert got_opt == pytest.approx(st["optimizer"], rel=0.02)       # DeepSpeed pads its partitions
        assert r["state"].get("nexus", 0) == pytest.approx(st["nexus"], rel=0.02, abs=1)
