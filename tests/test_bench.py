"""nexus-megatron bench end to end on 2 real processes (torchrun, gloo): it prints every column, and what it
counts equals the plan model: on the plain engine exactly (every collective's calls and payload, and every
category of the training state), on DeepSpeed up to DeepSpeed's scalar collectives and partition padding.
No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

from nexus_megatron.tools.plan import comm_ops, state_bytes, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.hidden_size=32", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
        "--set", "model.vocab_size=64", "--set", "data.seq_len=16", "--set", "data.micro_batch_size=2",
        "--set", "train.micro_steps=2", "--steps", "1", "--warmup", "1", "--sources", "2"]
COLUMNS = ["optimizer", "layout", "overlap", "step s", "(min-max)", "tokens/s", "x AdamW", "CPU s/step", "state MB/rank", "extra B/param",
           "peak MB", "bus MB/step", "bus MB/micro-step", "x one grad all-reduce", "plan bus MB/step", "calls/step"]


def _bench(tmp_path, *extra, entry=("nexus_megatron.cli", "bench")):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)   # torchrun runs --standalone
    cmd = [sys.executable, "-m", *entry, "--nproc", "2", *TINY, "--out", str(out), *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(out) as f:
        return r.stdout, json.load(f)


def _plan_for(row, data, buckets=1):
    from nexus_megatron.tools.bench import plan_input_for
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
    stdout, data = _bench(tmp_path, "--bucket-size", "600")
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
    # one shared search: passes, no gathers (replicated parameters), probe tokens in the table
    assert "param gathers" in stdout and "probe tokens" in stdout
    assert all(r["sharpness_gathers"] == 0 and r["sharpness_probe_tokens"] > 0 for r in sh)
    # the interleaved pairs (default 6 on the plain engine): one row per layout and overlap, one ratio per pair,
    # printed next to the modelled bytes per parameter per micro-step
    assert "interleaved step-time ratio Nexus / AdamW" in stdout and "B/param/micro-step" in stdout
    assert {(p["layout"], p["overlap"]) for p in data["pairs"]} == {
        (lay, ov) for lay in ("sequential", "source-parallel") for ov in (False, True)}
    for p in data["pairs"]:
        assert len(p["ratios"]) == len(p["adamw_times"]) == len(p["nexus_times"]) == 6
        assert p["median_lo"] <= p["median"] <= p["median_hi"] and p["geomean_lo"] <= p["geomean"] <= p["geomean_hi"]
        # where the time goes: every phase of both optimizers timed, each a part of the step (a phase's slowest
        # rank takes at most the 2 ranks' step times together: a bound that holds whatever the load)
        for o in ("adamw", "nexus"):
            ph = p["phases"][o]
            assert set(ph) == {"forward + backward", "inner steps", "outer step"}
            assert all(v["wall"] > 0 and v["cpu"] >= 0 for v in ph.values())
            assert all(v["wall"] <= 2 * max(p[f"{o}_times"]) for v in ph.values())
    assert "where a step's time goes" in stdout
    assert len(data["loadavg"]) == 2


def test_ratio_summary_and_modelled_bytes():
    from nexus_megatron.tools.bench import check_bench_args, ratio_summary
    from nexus_megatron.tools.plan import bytes_per_micro_step, inner_step_passes, optimizer_bytes
    import argparse
    from nexus_megatron.errors import NexusConfigError
    from nexus_megatron.tools.bench import add_bench_arguments

    s = ratio_summary([1.1, 1.0, 1.2, 1.05, 0.95])
    assert s["median"] == 1.05 and 0.95 <= s["median_lo"] <= 1.05 <= s["median_hi"] <= 1.2
    assert s == ratio_summary([1.1, 1.0, 1.2, 1.05, 0.95])                 # seeded: the same interval
    const = ratio_summary([1.02] * 8)
    assert const["median_lo"] == const["median_hi"] == const["median"] == 1.02
    assert abs(const["geomean_lo"] - 1.02) < 1e-12 and abs(const["geomean_hi"] - 1.02) < 1e-12
    # the plain engine's passes, k = 4: Nexus reads+writes 41 bytes per parameter in each micro-step (backward's
    # accumulation into the view 12, norm 4, d_sum += scale g 12, parameter write 12 on 3 of 4, re-zero 4) and
    # 64 in the outer step (AdamW's own 28 included); AdamW 12 per micro-step + 36 per step
    n = bytes_per_micro_step(inner_step_passes("nexus", "sequential", 4), 4)
    a = bytes_per_micro_step(inner_step_passes("adamw", "sequential", 4), 4)
    sp = bytes_per_micro_step(inner_step_passes("nexus", "source-parallel", 4), 4)
    assert (n["inner"], n["step"] * 4, a["inner"], a["step"] * 4) == (41, 64, 12, 36)
    assert sp["inner"] == n["inner"] + 8                                   # the shard scaled before the cross sum
    p = argparse.Namespace(engine="plain", k=4, params=1000, tp=1, pp=1)
    assert optimizer_bytes(p, "nexus", "sequential") == (41 * 4 + 64) * 1000
    ap = argparse.ArgumentParser()
    add_bench_arguments(ap)
    with pytest.raises(NexusConfigError, match="--pairs"):
        check_bench_args(ap.parse_args(["--engine", "deepspeed", "--pairs", "3"]))
    with pytest.raises(NexusConfigError, match="--pairs"):
        check_bench_args(ap.parse_args(["--pairs", "-1"]))


def test_deepspeed_bench_counts_match_the_plan(tmp_path):
    pytest.importorskip("deepspeed")
    stdout, data = _bench(tmp_path, "--engine", "deepspeed", "--zero", "2", "--overlap", "off,on",
                          "--bucket-size", "5000")
    assert "DeepSpeed ZeRO-2" in stdout and "nexus.overlap_param_gather" in stdout
    # the critical-sharpness hook through DeepSpeed's seam (inside the last micro-step's step())
    assert "critical-sharpness hook" in stdout
    sh = [r for r in data["rows"] if r["sharpness"]]
    assert len(sh) == 2 and all(r["sharpness_passes"] >= 3 and r["sharpness_s"] > 0 for r in sh)
    # ZeRO-2: one all-gather of the partitions per probe (every move) and one to restore
    assert all(r["sharpness_gathers"] == r["sharpness_passes"] + 1 and r["sharpness_probe_tokens"] > 0 for r in sh)
    rows = [r for r in data["rows"] if not r["sharpness"]]
    assert len(rows) == 8
    for r in rows:
        # overlap on: Nexus's per-micro-step parameter all-gather is deferred into the next forward, in buckets
        # (sequential layout; source-parallel on 2 ranks has one rank per source group, so no gather)
        if r["optim"] == "nexus" and r["overlap"] and r["layout"] == "sequential":
            assert r["param_gather_buckets"] > 1 and r["param_gather_waited_in_forward"] > 0
        else:
            assert not r.get("param_gather_buckets")
        p = _plan_for(r, data)
        want = sum(o.bus for o in comm_ops(p, r["optim"], r["layout"]))
        # DeepSpeed's own scalar collectives (norm, overflow check) are not in the plan
        assert abs(r["comm"]["bus_per_step"] - want) < 2048, (r["optim"], r["layout"], r["comm"], want)
        st = state_bytes(p, r["optim"], r["layout"])
        got_opt = r["state"].get("optimizer", 0) + r["state"].get("master", 0)
        assert got_opt == pytest.approx(st["optimizer"], rel=0.02)       # DeepSpeed pads its partitions
        assert r["state"].get("nexus", 0) == pytest.approx(st["nexus"], rel=0.02, abs=1)


def test_megatron_bench_refuses_to_run_without_cuda_or_the_shim():
    pytest.importorskip("megatron.core")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "nexus_megatron.cli", "bench", "--engine", "megatron", "--nproc", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if "CUDA" not in r.stderr and r.returncode == 0:
        pytest.skip("a GPU is visible: the bench runs megatron-core for real")
    assert r.returncode != 0 and "tests.mcore_bench_cpu" in r.stderr and "CUDA" in r.stderr
    assert "bench: priming" not in r.stdout                         # refused before any process started


def test_megatron_bench_counts_equal_the_plan(tmp_path):
    """megatron-core under the tests' CPU shim (tests/mcore_bench_cpu.py), distributed optimizer, overlap off
    (one bucket) and on (overlap_grad_reduce + overlap_param_gather, several buckets): every collective over
    more than one rank (calls and payload) equals the plan model's, and the state is exactly Megatron's buffers,
    Adam's moments on the main shard and, for Nexus, the fp32 anchor and the fp32 exact displacement of that shard."""
    pytest.importorskip("megatron.core")
    stdout, data = _bench(tmp_path, "--bucket-size", "600", entry=("tests.mcore_bench_cpu",))
    assert "megatron-core distributed optimizer" in stdout and "CPU SHIM" in stdout
    # the critical-sharpness hook: Nexus's pre_outer_step, Megatron's own optimizer through step_with_pre_update
    sh = [r for r in data["rows"] if r["sharpness"]]
    assert {r["optim"] for r in sh} == {"adamw", "nexus"}
    assert all(r["sharpness_passes"] >= 3 and r["sharpness_s"] > 0 for r in sh)
    # the distributed optimizer: one param all-gather per probe (every move) and one to restore
    assert all(r["sharpness_gathers"] == r["sharpness_passes"] + 1 and r["sharpness_probe_tokens"] > 0 for r in sh)
    rows = [r for r in data["rows"] if not r["sharpness"]]
    assert {(r["optim"], r["layout"], r["overlap"]) for r in rows} == {
        (o, lay, ov) for o in ("adamw", "nexus") for lay in ("sequential", "source-parallel") for ov in (False, True)}
    k = data["config"]["train"]["micro_steps"]
    for r in rows:
        label = (r["optim"], r["layout"], r["overlap"])
        assert r["engine"] == "megatron" and r["overlap_param_gather"] == r["overlap_grad_reduce"] == r["overlap"]
        assert (r["buckets"] > 1) == r["overlap"], label
        p = _plan_for(r, data)
        ops = comm_ops(p, r["optim"], r["layout"], overlap=r["overlap"], buckets=r["buckets"])
        want = {key: v for key, v in _by_op(ops).items() if not key.endswith("@1")}
        got = {key: (v["calls"], v["payload"]) for key, v in r["comm"]["ops"].items() if not key.endswith("@1")}
        assert got == want, (label, got, want)
        buf, shard = r["grad_buffer_numel"], r["main_numel"]
        st = r["state"]
        assert st["params"] == st["grads"] == 4 * buf, label           # fp32 param buffer, fp32 grad buffer
        assert st["optimizer"] == 8 * shard, label                      # exp_avg, exp_avg_sq on the main shard
        assert st.get("master", 0) == 0                                  # fp32: the main shard views the params
        assert st.get("nexus", 0) == (8 * shard if r["optim"] == "nexus" else 0), label
        assert st["other"] < 0.01 * st["total"]
        plan_st = state_bytes(p, r["optim"], r["layout"])
        for cat in ("params", "grads", "optimizer", "nexus"):
            assert st.get(cat, 0) == pytest.approx(plan_st[cat], rel=0.02), (label, cat)
        if r["optim"] == "nexus" and r["layout"] == "sequential":
            # two fp32 shards (anchor, exact displacement), 8/d bytes per parameter (d = 2, up to bucket padding)
            assert st["nexus"] / r["params"] == pytest.approx(4.0, rel=0.03)
            # per micro-step: one reduce-scatter + one all-gather of the padded buffer = one all-reduce of it
            # (plus the 4-byte norm scalars)
            one_ar = 4 * buf                                             # fp32 all-reduce over 2 ranks, bus bytes
            assert one_ar <= r["comm"]["bus_per_micro"] <= one_ar + 4 * (k + 1)
    assert all(r["tokens_per_s"] > 0 and r["cpu_s"] > 0 for r in rows)


def test_phase_clock_books_each_interval_to_its_phase(monkeypatch):
    """The pairs' phase table: each lap books the time since the last one to its phase (None: to none). On a
    GPU the wall times come from CUDA events read after the step (here a fake event; every clock is a fake
    one that the test advances, so nothing depends on this machine's timing)."""
    import types
    import torch
    from nexus_megatron.tools import bench

    now = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now["wall"],
                                                             process_time=lambda: now["cpu"]))

    def advance(wall, cpu):
        now["wall"] += wall
        now["cpu"] += cpu

    def run(device):
        clock = bench.PhaseClock(device)
        clock.lap(None)
        advance(3.0, 2.5)
        clock.lap("forward + backward")
        advance(1.0, 1.0)
        clock.lap(None)                  # not booked
        advance(2.0, 0.5)
        clock.lap("inner steps")
        advance(0.25, 0.25)
        clock.lap("outer step")
        advance(0.5, 0.5)                # after the last lap: not booked
        clock.finish()
        return clock

    def check(clock):
        assert clock.wall == {"forward + backward": 3.0, "inner steps": 2.0, "outer step": 0.25}
        assert clock.cpu == {"forward + backward": 2.5, "inner steps": 0.5, "outer step": 0.25}

    check(run(torch.device("cpu")))

    class FakeEvent:                      # the device's clock is the fake wall clock
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.t = now["wall"]

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3   # milliseconds, as CUDA events

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    clock = run(torch.device("cuda"))
    assert not clock._events              # read by finish()
    check(clock)
    off = bench.PhaseClock(torch.device("cuda"), enabled=False)   # single runs: no events, nothing booked
    advance(1.0, 1.0)
    off.lap("inner steps")
    off.finish()
    assert off.wall["inner steps"] == 0.0 and off.cpu["inner steps"] == 0.0
