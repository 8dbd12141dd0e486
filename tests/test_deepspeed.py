"""Nexus on DeepSpeed (2 ranks, CPU, gloo, no JIT builds).

Each 2-rank job runs many configurations (one job per fixture): the parameter trajectory of every ZeRO
stage x layout equals the single-process reference (tests/ds_reference.py) on the same micro-batches; bf16
stays close; the Nexus state is sharded like DeepSpeed's fp32 master partitions; NaN/Inf poisons exactly
one outer step on every rank; a realistic ds_config runs unchanged with its scheduler advancing per outer
step; a resumed run (new processes, after a partial save) continues the same trajectory bit for bit; the
trainer on DeepSpeed matches the plain engine; the real ``deepspeed`` launcher runs the trainer end to end.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from nexus_megatron.config import load_config  # noqa: E402
from nexus_megatron.engines.deepspeed import initialize, prepare_ds_config  # noqa: E402
from nexus_megatron.errors import NexusConfigError  # noqa: E402
from nexus_megatron.layout import LayoutConfig  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.ds_reference import SOURCES, make_model, reference_run  # noqa: E402
from tests.ds_workers import (GAMMA, K, LR, STEPS, WARMUP, WD, ds_config, matrix_worker, num_sources,  # noqa: E402
                              realistic_ds_config, reshard_worker, resume_worker, trainer_worker)
from tests.conftest import config_with, read_metrics  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = sum(p.numel() for p in make_model().parameters())
LAYOUTS = ("sequential", "source-parallel")

FP32 = [{"name": f"fp32-{mode}-z{stage}", "mode": mode, "stage": stage} for stage in (0, 1, 2, 3) for mode in LAYOUTS]
FP32 += [{"name": "fp32-sequential-z3-subgroups", "mode": "sequential", "stage": 3,      # several sub-groups per group
          "extra": {"zero_optimization": {"stage": 3, "sub_group_size": 100, "stage3_param_persistence_threshold": 0}}},
         {"name": "fp32-source-parallel-z2-overlap", "mode": "source-parallel", "stage": 2,
          "extra": {"zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 64}}}]
BF16 = [{"name": "bf16-sequential-z0", "mode": "sequential", "stage": 0, "bf16": True},
        {"name": "bf16-sequential-z1", "mode": "sequential", "stage": 1, "bf16": True},
        {"name": "bf16-sequential-z1-fp32accum", "mode": "sequential", "stage": 1, "bf16": True,   # BF16_Optimizer
         "extra": {"data_types": {"grad_accum_dtype": "fp32"}}},
        {"name": "bf16-source-parallel-z2", "mode": "source-parallel", "stage": 2, "bf16": True},
        {"name": "bf16-sequential-z3", "mode": "sequential", "stage": 3, "bf16": True}]
# (outer step, micro-step, ranks whose loss is NaN); with one rank per source group a NaN on rank 1 is seen by
# one source group only, and "last" hits the path where DeepSpeed skips the client step on the k-th micro-step
NAN = [{"name": "nan-source-parallel-z2-last", "mode": "source-parallel", "stage": 2, "nan": (1, 1, [1])},
       {"name": "nan-source-parallel-z3-first", "mode": "source-parallel", "stage": 3, "nan": (1, 0, [1])},
       {"name": "nan-source-parallel-z3-last", "mode": "source-parallel", "stage": 3, "nan": (1, 1, [1])},
       {"name": "nan-sequential-z0", "mode": "sequential", "stage": 0, "nan": (1, 1, [0])},
       {"name": "nan-sequential-z0-bf16-last", "mode": "sequential", "stage": 0, "bf16": True, "nan": (1, 1, [1])},
       {"name": "nan-sequential-z1-fp32accum-last", "mode": "sequential", "stage": 1, "bf16": True,
        "extra": {"data_types": {"grad_accum_dtype": "fp32"}}, "nan": (1, 1, [0])}]
ABORT = {"name": "nan-abort", "mode": "source-parallel", "stage": 1, "nan": (1, 0, [0]),
         "config": {**ds_config("source-parallel", 1),
                    "nexus": {"layout": "source-parallel", "sources": list(SOURCES[:2]), "gamma": GAMMA,
                              "gamma_mode": "absolute", "max_consecutive_skips": 1}}}
REALISTIC = [{"name": "realistic-fp32", "mode": "sequential", "stage": 2, "config": realistic_ds_config(bf16=False)},
             {"name": "realistic-bf16", "mode": "sequential", "stage": 2, "bf16": True,
              "config": realistic_ds_config(bf16=True)}]
CKPT = [{"name": f"ckpt-{mode}-z{stage}{'-bf16' if bf16 else ''}", "mode": mode, "stage": stage, "bf16": bf16,
         "ckpt": True, "extra": {"scheduler": WARMUP, **(extra or {})}}
        for mode, stage, bf16, extra in [("sequential", 0, False, None), ("source-parallel", 1, False, None),
                                         ("sequential", 2, False, None), ("source-parallel", 3, False, None),
                                         ("sequential", 1, True, {"data_types": {"grad_accum_dtype": "fp32"}}),
                                         ("source-parallel", 0, True, None)]]
# nexus.overlap_param_gather (ZeRO-1/2): 64-element buckets, so the gather of this 707-parameter model is ~12
# buckets; each is compared bit for bit with its twin that gathers synchronously at the end of step()
PG_NEXUS = {"overlap_param_gather": True, "param_gather_bucket_size": 64}
PG = [{"name": "pg-sequential-z1", "twin": "fp32-sequential-z1", "mode": "sequential", "stage": 1},
      {"name": "pg-sequential-z2", "twin": "fp32-sequential-z2", "mode": "sequential", "stage": 2},
      # the gather moves data only when a hook (or the sync) waits: any bucket a module needs but does not wait
      # for would leave stale parameters in its forward (the bucket plan itself is under test)
      {"name": "pg-sequential-z2-lazy", "twin": "fp32-sequential-z2", "mode": "sequential", "stage": 2,
       "lazy_gather": True},
      {"name": "pg-sequential-z1-bf16", "twin": "bf16-sequential-z1", "mode": "sequential", "stage": 1, "bf16": True},
      {"name": "pg-sequential-z1-fp32accum", "twin": "bf16-sequential-z1-fp32accum", "mode": "sequential",   # BF16_Optimizer
       "stage": 1, "bf16": True, "extra": {"data_types": {"grad_accum_dtype": "fp32"}}},
      {"name": "pg-sequential-z2-overlap-comm", "mode": "sequential", "stage": 2,
       "extra": {"zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 64}}}]
for _s in PG:
    _s["nexus_extra"] = PG_NEXUS
CKPT.append({"name": "ckpt-sequential-z2-pg", "mode": "sequential", "stage": 2, "bf16": False, "ckpt": True,
             "extra": {"scheduler": WARMUP}, "nexus_extra": PG_NEXUS})
# the random-direction control: a mid-step checkpoint carries its random path R (resumed bitwise on the same
# ranks); k = 3, so the path after the saved micro-step is a forward point of the resumed run
CKPT.append({"name": "ckpt-sequential-z2-control", "mode": "sequential", "stage": 2, "bf16": False, "ckpt": True,
             "extra": {"scheduler": WARMUP, "gradient_accumulation_steps": 3}, "nexus_api": {"control": "random_direction"}})
ALL = FP32 + BF16 + NAN + [ABORT] + REALISTIC + CKPT + PG


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _reference(spec, **kw):
    return reference_run(spec["mode"], num_sources(spec["mode"]), 2, kw.pop("steps", STEPS), K, GAMMA, lr=LR, wd=WD,
                         clip=1.0, **kw)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ds_ckpt"))


@pytest.fixture(scope="module")
def matrix(ckpt_root):
    """One 2-rank job for all of ALL; returns [rank0 results, rank1 results]."""
    return run_distributed(matrix_worker, 2, ALL, ckpt_root, timeout=600)


# ---------------------------------------------------------------------------------------------------
# trajectories

@pytest.mark.parametrize("spec", FP32, ids=[s["name"] for s in FP32])
def test_fp32_trajectory_matches_reference(matrix, spec):
    ref = _reference(spec)
    for r in range(2):
        res = matrix[r][spec["name"]]
        assert res["err"] is None, res["err"]
        assert len(res["hist"]) == STEPS
        for t, (got, want) in enumerate(zip(res["hist"], ref)):
            assert _rel(got, want) <= 1e-5, f"rank {r} step {t}: relative error {_rel(got, want):.2e}"
        assert torch.equal(res["hist"][-1], matrix[0][spec["name"]]["hist"][-1])   # ranks agree bitwise
        assert res["counters"] == {"outer_steps": STEPS, "skipped_steps": 0, "skipped_sources": 0}
        assert all(0 < i["pseudo_grad_norm"] <= 1 + 1e-6 and not i["skipped"] for i in res["infos"])
    assert float((ref[-1] - ref[0]).norm()) > 1e-3                                # not vacuous


@pytest.mark.parametrize("spec", PG, ids=[s["name"] for s in PG])
def test_param_gather_overlap_is_the_synchronous_gather(matrix, spec):
    """nexus.overlap_param_gather: DeepSpeed's end-of-step all-gather is launched in buckets and waited for in
    the modules' forward pre-hooks. Same numbers, bit for bit, as the synchronous gather (fp32 and bf16; with
    overlap_comm against the reference), and the gather really is deferred: step() returns with it in flight,
    and the first layer's forward waits for only part of it."""
    for r in range(2):
        res = matrix[r][spec["name"]]
        assert res["err"] is None, res["err"]
        assert len(res["hist"]) == STEPS and res["counters"]["skipped_steps"] == 0
        if "twin" in spec:
            twin = matrix[r][spec["twin"]]["hist"]
            for t, (got, want) in enumerate(zip(res["hist"], twin)):
                assert torch.equal(got, want), f"rank {r} step {t}: max diff {float((got - want).abs().max())}"
        else:
            for got, want in zip(res["hist"], _reference(spec)):
                assert _rel(got, want) <= 1e-5
        pg = res["param_gather"]
        assert pg["launches"] == STEPS * K                     # every micro-step's gather was deferred
        assert pg["buckets"] >= 8
        # micro-step 1 of every outer step: its forward's hooks waited, the first layer for a part only
        assert pg["waited_in_forward"] >= STEPS * pg["buckets"] // 2
        assert len(pg["first_wait"]) >= STEPS and min(pg["first_wait"]) < pg["buckets"]
    for name in ("fp32-sequential-z1", "fp32-sequential-z2"):
        assert matrix[0][name]["param_gather"] is None           # off unless the ds_config asks for it


@pytest.mark.parametrize("spec", BF16, ids=[s["name"] for s in BF16])
def test_bf16_close_to_fp32(matrix, spec):
    ref = _reference(spec)
    start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    for r in range(2):
        res = matrix[r][spec["name"]]
        assert res["err"] is None, res["err"]
        assert len(res["hist"]) == STEPS and res["counters"]["skipped_steps"] == 0
        for got, want in zip(res["hist"], ref):
            assert _rel(got, want) <= 3e-2
        assert _rel(res["hist"][-1], start) > 1e-2                                   # it trained


def test_shard_sizes_match_deepspeed_partitions(matrix):
    """Under ZeRO >= 1 the anchor is one more shard of DeepSpeed's fp32 master partition (~P/d), like AdamW's
    exp_avg / exp_avg_sq; no rank holds an unsharded fp32 copy."""
    rows = ["config                          rank  dp  P    fp32-master  nexus-anchor  adam-exp_avg  adam-exp_avg_sq"]
    for spec in FP32:
        for r in range(2):
            rep = matrix[r][spec["name"]]["report"]
            rows.append(f"{spec['name']:31s} {r}    {rep['dp_size']}   {P}  "
                        f"{rep['master_numel']:11d}  {rep['anchor_numel']:12d}  {rep['exp_avg_numel']:12d}  "
                        f"{rep['exp_avg_sq_numel']:15d}")
            assert rep["anchor_numel"] == rep["master_numel"] == rep["exp_avg_numel"] == rep["exp_avg_sq_numel"]
            if spec["stage"] >= 1 and spec["mode"] == "sequential":
                assert rep["master_numel"] <= -(-P // 2) + 8                        # P/d plus alignment padding
                assert max(matrix[r][spec["name"]]["anchor_sizes"]) < P
    print("\n" + "\n".join(rows))


FOUR = [{"name": f"four-{mode}-z{stage}", "mode": mode, "stage": stage} for mode, stage in
        [("source-parallel", 1), ("source-parallel", 2), ("source-parallel", 3), ("sequential", 3)]]
FOUR.append({"name": "four-nan-source-parallel-z2", "mode": "source-parallel", "stage": 2, "nan": (1, 1, [3])})


def test_four_ranks_two_per_source_group(tmp_path):
    """4 ranks, 2 sources: ZeRO partitions inside each 2-rank source group, the normalized partitions are
    all-reduced across the cross groups {0, 2} and {1, 3}."""
    res = run_distributed(matrix_worker, 4, FOUR, str(tmp_path), timeout=600)
    for spec in FOUR:
        ref = reference_run(spec["mode"], num_sources(spec["mode"]), 4, STEPS, K, GAMMA, lr=LR, wd=WD, clip=1.0)
        for r in range(4):
            out = res[r][spec["name"]]
            assert out["err"] is None, out["err"]
            rep = out["report"]
            assert rep["anchor_numel"] == rep["master_numel"] <= -(-P // rep["dp_size"]) + 8
            assert rep["dp_size"] == (2 if spec["mode"] == "source-parallel" else 4)
            if "nan" in spec:
                assert [i["skipped"] for i in out["infos"]] == [False, True, False]
                assert torch.equal(out["hist"][1], out["hist"][0]) and torch.equal(out["hist"][2], res[0][spec["name"]]["hist"][2])
                continue
            for t, (got, want) in enumerate(zip(out["hist"], ref)):
                assert _rel(got, want) <= 1e-5, f"{spec['name']} rank {r} step {t}: {_rel(got, want):.2e}"


# ---------------------------------------------------------------------------------------------------
# NaN / Inf

@pytest.mark.parametrize("spec", NAN, ids=[s["name"] for s in NAN])
def test_nan_poisons_one_outer_step(matrix, spec):
    h0 = matrix[0][spec["name"]]["hist"]
    for r in range(2):
        res = matrix[r][spec["name"]]
        assert res["err"] is None, res["err"]
        assert [i["skipped"] for i in res["infos"]] == [False, True, False]
        assert res["counters"]["skipped_steps"] == 1 and res["counters"]["outer_steps"] == STEPS - 1
        h = res["hist"]
        assert torch.equal(h[1], h[0])                         # the poisoned step left theta exactly as it was
        assert not torch.equal(h[2], h[1]) and all(bool(torch.isfinite(x).all()) for x in h)
        assert all(torch.equal(a, b) for a, b in zip(h, h0))   # every rank agrees
    if not spec.get("bf16"):
        assert _rel(h0[0], _reference(spec, steps=1)[0]) <= 1e-5


def test_max_consecutive_skips_aborts(matrix):
    for r in range(2):
        res = matrix[r][ABORT["name"]]
        assert res["err"] and "NexusNonFiniteError" in res["err"] and "max_consecutive_skips=1" in res["err"]


# ---------------------------------------------------------------------------------------------------
# a realistic ds_config, unchanged; the scheduler advances once per outer step

def test_realistic_config_runs_and_scheduler_steps_per_outer_step(matrix):
    res = matrix[0]["realistic-fp32"]
    assert res["err"] is None, res["err"]
    lrs = res["lrs"]                                   # lr seen at every micro-step
    per_outer = lrs[::K]
    assert all(lrs[t * K + m] == per_outer[t] for t in range(STEPS) for m in range(K))
    # DeepSpeed's WarmupLR (linear, 3 steps, 0.002 -> 0.01), one scheduler step per outer step
    assert per_outer == pytest.approx([0.002, 0.002, 0.002 + (LR - 0.002) / 3])
    ref = reference_run("sequential", 3, 2, STEPS, K, GAMMA, lr=LR, wd=WD, clip=1.0, lrs=per_outer)
    for got, want in zip(res["hist"], ref):
        assert _rel(got, want) <= 1e-5
    bf = matrix[0]["realistic-bf16"]
    assert bf["err"] is None and all(_rel(g, w) <= 3e-2 for g, w in zip(bf["hist"], ref))


def test_realistic_config_is_accepted_and_translated():
    cfg = realistic_ds_config()
    p = prepare_ds_config(cfg, world_size=2)
    assert (p.k, p.micro_batch, p.clip, p.zero_stage, p.bf16, p.dp_size) == (K, 4, 1.0, 2, True, 2)
    assert p.layout == LayoutConfig(mode="sequential", sources=SOURCES, seed=0)
    assert p.nexus.gamma == GAMMA and p.nexus.gamma_mode == "absolute"
    ds = p.ds
    assert "nexus" not in ds and ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.0
    assert ds["train_batch_size"] == 4 * 2 and ds["zero_allow_untested_optimizer"] is True
    # ZeRO-1/2: Nexus reduces each partition to its owner unless the ds_config says otherwise (bytes target)
    assert ds["scheduler"] == WARMUP
    assert ds["zero_optimization"] == {**cfg["zero_optimization"], "use_multi_rank_bucket_allreduce": False}
    assert cfg == realistic_ds_config()                # the user's dict is not modified
    for stage, mine, want in ((1, None, False), (2, True, True), (3, None, None), (0, None, None)):
        z = {"stage": stage, **({} if mine is None else {"use_multi_rank_bucket_allreduce": mine})}
        got = prepare_ds_config({**cfg, "zero_optimization": z}, world_size=2).ds["zero_optimization"]
        assert got.get("use_multi_rank_bucket_allreduce") == want, stage
        base = prepare_ds_config({**cfg, "zero_optimization": z}, world_size=2, optim_name="adamw")
        assert base.ds["zero_optimization"].get("use_multi_rank_bucket_allreduce") == mine, stage  # DeepSpeed's own
    sp = prepare_ds_config({**cfg, "train_batch_size": 4 * K * 4,
                            "nexus": {**cfg["nexus"], "layout": "source-parallel", "sources": ["a", "b"]}}, world_size=4)
    assert sp.dp_size == 2 and sp.ds["train_batch_size"] == 4 * 2    # DeepSpeed's DP group = one source group
    examples = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.startswith("ds_config_"))
    assert examples
    for f in examples:                                 # trainer examples take the sources from the YAML
        with open(os.path.join(ROOT, "configs", f)) as fh:
            nx = json.load(fh).get("nexus", {})
        layout = None if "sources" in nx else LayoutConfig(mode=nx.get("layout", "sequential"), sources=("a", "b"))
        prepare_ds_config(os.path.join(ROOT, "configs", f), world_size=None, layout=layout)


def _set(cfg, path, value):
    node = cfg
    for k in path[:-1]:
        node = node.setdefault(k, {})
    node[path[-1]] = value


@pytest.mark.parametrize("path,value,needle", [
    (("optimizer",), {"type": "Lamb", "params": {"lr": 1e-3}}, "ds_config optimizer.type='Lamb'"),
    (("fp16", "enabled"), True, "bfloat16 and fp16 modes cannot be simultaneously enabled"),  # bf16 is on too
    (("gradient_accumulation_steps",), 3, "gradient_accumulation_steps=3 but micro_steps=2"),
    (("nexus", "gamam"), 1.0, "unknown setting 'nexus.gamam'; did you mean 'nexus.gamma'?"),
    (("nexus", "layout"), "source-parallel", "nexus.layout='source-parallel' conflicts with layout_config.mode"),
    (("train_batch_size",), 12, "train_batch_size=12"),
    (("zero_optimization", "offload_optimizer"), {"device": "cpu"}, "offload_optimizer.device='cpu'"),
    (("bf16", "enabled"), "auto", "'auto' values in bf16.enabled"),
    (("zero_optimization", "elastic_checkpoint"), True, "elastic_checkpoint"),
    (("checkpoint", "writer"), {"decoupled": True}, "checkpoint.writer.decoupled=true"),
    (("datastates_ckpt",), {"host_cache_size": 1}, "datastates_ckpt"),
    (("nexus", "overlap_param_gather"), "yes", "nexus.overlap_param_gather='yes': must be true or false"),
    (("nexus", "param_gather_bucket_size"), 0, "nexus.param_gather_bucket_size=0: must be an integer >= 1"),
    (("zero_optimization", "stage"), 3, "nexus.overlap_param_gather=true with zero_optimization.stage=3"),
], ids=["optimizer", "fp16", "gas", "unknown-nexus-key", "layout-conflict", "batch", "offload", "auto", "elastic",
        "decoupled-writer", "datastates", "pg-not-bool", "pg-bucket", "pg-zero3"])
def test_bad_ds_config_fails_before_deepspeed(monkeypatch, path, value, needle):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = realistic_ds_config()
    if path == ("zero_optimization", "stage"):
        cfg["nexus"]["overlap_param_gather"] = True
    _set(cfg, path, value)
    with pytest.raises(NexusConfigError, match=re.escape(needle)):
        initialize(make_model(), cfg, layout_config=LayoutConfig(mode="sequential", sources=SOURCES), micro_steps=K)
    assert not torch.distributed.is_initialized()      # nothing was started


def test_trainer_checks_ds_config_when_loading_the_yaml(tmp_path):
    base = {"data": {"sources": ["web", "code"], "micro_batch_size": 2},
            "train": {"engine": "deepspeed", "micro_steps": 2, "steps": 4}, "optim": {"warmup_steps": 1}}
    for bad, needle in [({"gradient_accumulation_steps": 3}, "train.micro_steps=2"),
                        ({"scheduler": WARMUP}, "'scheduler' section"),
                        ({"nexus": {"layout": "source-parallel"}}, "nexus.layout='source-parallel' conflicts"),
                        ({"fp16": {"enabled": True}}, "fp16.enabled")]:
        f = tmp_path / "ds.json"
        f.write_text(json.dumps(bad))
        with pytest.raises(NexusConfigError, match=re.escape(needle)):
            load_config(None, [f"train.deepspeed_config={f}"], base=json.loads(json.dumps(base)))
    load_config(None, [], base=base)                    # the ZeRO-2 default passes


# ---------------------------------------------------------------------------------------------------
# checkpoints: save, "kill" (the first job's processes are gone), resume in new processes

@pytest.fixture(scope="module")
def resumed(matrix, ckpt_root):
    for spec in CKPT:   # a save killed halfway: files of tag "b" exist, "latest" was not updated
        d = os.path.join(ckpt_root, spec["name"], "b")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"truncated")
    return run_distributed(resume_worker, 2, CKPT, ckpt_root, timeout=600)


RESHARD = [s for s in CKPT if s["mode"] == "sequential"   # source-parallel needs a rank per source
           and "nexus_api" not in s]   # the control's mid-step R: same ranks only


@pytest.fixture(scope="module")
def resharded(matrix, ckpt_root):
    return run_distributed(reshard_worker, 1, RESHARD, ckpt_root, timeout=600)


@pytest.mark.parametrize("spec", RESHARD, ids=[s["name"] for s in RESHARD])
def test_resume_on_one_rank_of_a_two_rank_checkpoint(matrix, resharded, spec):
    """Saved on 2 ranks (between outer steps and mid-step), resumed on 1 rank with the same global batch: the
    full state is cut for 1 rank (stage 0, ZeRO-2, ZeRO-2 with the overlapped gather, bf16 ZeRO-1
    BF16_Optimizer) and the run continues the 2-rank trajectory: 1e-5 relative in fp32, 3e-2 in bf16 (the
    forward runs on a batch of 8 instead of 2 x 4)."""
    tol = 3e-2 if spec["bf16"] else 1e-5
    full = matrix[0][spec["name"]]
    for tag in ("a", "m"):
        res = resharded[0][spec["name"]][tag]
        assert res["resharded"] and f"{os.sep}{tag}" in res["path"]
        assert len(res["hist"]) == 2
        for got, want in zip(res["hist"], full["hist"][2:]):
            assert _rel(got, want) <= tol, f"{spec['name']} tag {tag}: relative error {_rel(got, want):.2e}"
        assert res["counters"] == full["counters"]
    assert resharded[0][spec["name"]]["a"]["client_state"]["note"] == "a"


@pytest.mark.parametrize("spec", CKPT, ids=[s["name"] for s in CKPT])
def test_resume_continues_the_same_trajectory(matrix, resumed, ckpt_root, spec):
    with open(os.path.join(ckpt_root, spec["name"], "latest")) as f:
        assert f.read() == "a"
    for r in range(2):
        full = matrix[r][spec["name"]]
        assert full["err"] is None, full["err"]
        for tag in ("None", "m"):                      # "latest" (= a, between outer steps) and mid-step "m"
            res = resumed[r][spec["name"]][tag]
            assert f"{os.sep}{'a' if tag == 'None' else 'm'}{os.sep}" in res["path"]
            assert len(res["hist"]) == 2
            for got, want in zip(res["hist"], full["hist"][2:]):
                assert torch.equal(got, want), f"rank {r} tag {tag}: max diff {float((got - want).abs().max())}"
            assert res["counters"] == full["counters"]
        assert resumed[r][spec["name"]]["None"]["client_state"]["note"] == "a"


# ---------------------------------------------------------------------------------------------------
# the trainer (train.engine=deepspeed) and the deepspeed launcher

TINY = {
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"sources": ["web", "code", "math"], "ood": ["poetry"], "seq_len": 16, "micro_batch_size": 2},
    "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
    "train": {"steps": 4, "micro_steps": 2, "eval_every": 2, "probe_every": 0, "eval_batches": 2,
              "probe_batches": 2, "progress": False},
}


def _cfg(data, run_dir, **over):
    return config_with(TINY, data, run_dir, **over)


_metrics = read_metrics


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    from tests.conftest import write_synthetic_data

    tmp = tmp_path_factory.mktemp("ds_trainer")
    data = write_synthetic_data(str(tmp / "data"))
    z3 = tmp / "z3.json"
    z3.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                              "gradient_accumulation_steps": 2,
                              "train_micro_batch_size_per_gpu": 2, "nexus": {"layout": "source-parallel"}}))
    sp = {"nexus.layout": "source-parallel", "data.sources": '["web","code"]'}
    const = {"optim.schedule": "constant", "optim.warmup_steps": 0, "train.checkpoint_every": 2}
    runs = [
        ("plain-nexus", _cfg(data, tmp / "plain-nexus")),
        ("ds-nexus", _cfg(data, tmp / "ds-nexus", **{"train.engine": "deepspeed"})),
        ("plain-adamw-sp", _cfg(data, tmp / "plain-adamw-sp", **{"optim.name": "adamw", **sp})),
        ("ds-adamw-sp", _cfg(data, tmp / "ds-adamw-sp", **{"optim.name": "adamw", "train.engine": "deepspeed", **sp})),
        ("z3-full", _cfg(data, tmp / "z3-full", **{"train.engine": "deepspeed", "train.deepspeed_config": str(z3),
                                                    **sp, **const})),
        ("z3-first-half", _cfg(data, tmp / "z3-resumed", **{"train.engine": "deepspeed", "train.steps": 2,
                                                             "train.deepspeed_config": str(z3), **sp, **const})),
        ("z3-resumed", _cfg(data, tmp / "z3-resumed", **{"train.engine": "deepspeed",
                                                          "train.deepspeed_config": str(z3), **sp, **const})),
    ]
    return tmp, run_distributed(trainer_worker, 2, runs, timeout=600)


@pytest.mark.parametrize("plain,ds", [("plain-nexus", "ds-nexus"), ("plain-adamw-sp", "ds-adamw-sp")])
def test_trainer_on_deepspeed_matches_plain_engine(trainer_runs, plain, ds):
    tmp, res = trainer_runs
    a, b = _metrics(tmp / plain), _metrics(tmp / ds)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-12)
        for key in ("nexus/pseudo_grad_norm", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4)
    assert res[0][ds]["summary"]["engine"] == "deepspeed"
    assert res[0][ds]["summary"]["final"]["eval/loss"] == pytest.approx(res[0][plain]["summary"]["final"]["eval/loss"],
                                                                        rel=1e-5)


def test_trainer_resume_on_deepspeed(trainer_runs):
    tmp, res = trainer_runs
    full, resumed = _metrics(tmp / "z3-full"), _metrics(tmp / "z3-resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for x, y in zip(full, resumed):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
    ck = tmp / "z3-resumed" / "checkpoints"
    assert (ck / "latest").read_text() == "step_00000004"
    assert sorted(d for d in os.listdir(ck) if d.startswith("step_")) == ["step_00000002", "step_00000004"]


def test_deepspeed_launcher_end_to_end(tmp_path):
    """`deepspeed --num_gpus 2 launch/train_deepspeed.py ...` on CPU: ZeRO-3, bf16, source-parallel."""
    from tests.conftest import write_synthetic_data

    data = write_synthetic_data(str(tmp_path / "data"))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
                              "gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 2,
                              "nexus": {"layout": "source-parallel"}}))
    run_dir = tmp_path / "run"
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    from tests.distributed import free_port
    cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "launch", "train_deepspeed.py"),
           "--set", f"data.path={data}", "--set", f"train.run_dir={run_dir}", "--set", f"train.deepspeed_config={ds}",
           "--set", "model.hidden_size=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
           "--set", 'data.sources=["web","code"]', "--set", 'data.ood=["poetry"]', "--set", "data.seq_len=16",
           "--set", "data.micro_batch_size=2", "--set", "nexus.layout=source-parallel", "--set", "train.steps=3",
           "--set", "train.micro_steps=2", "--set", "optim.warmup_steps=1", "--set", "train.eval_every=3",
           "--set", "train.eval_batches=2", "--set", "train.progress=false"]
    p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    m = _metrics(run_dir)
    assert [r["step"] for r in m] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in m)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 2 and summary["skipped_steps"] == 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
