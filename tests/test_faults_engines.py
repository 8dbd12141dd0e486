"""Process faults on the DeepSpeed and Megatron-core paths, as real 2-rank jobs under torchrun (gloo, CPU,
fp32): kill -9 one rank in the middle of an outer step, rerun the same command and kill -9 the checkpoint
writer in the middle of writing a checkpoint, rerun again. Every process exits promptly with a non-zero
status and torchrun's summary names the killed rank; the partial checkpoint is never published nor read;
each rerun resumes from the last complete checkpoint, and the last one ends bitwise equal to an
uninterrupted run (checkpoint tensors and every logged metric). The uninterrupted run also records every
fsync and rename (tests/record_publish.py): a checkpoint is published only once all its files exist and
are fsynced. The plain engine: tests/test_faults.py."""
import json
import os

import pytest
import torch

from tests.conftest import ROOT, write_synthetic_data
from tests.fault_runs import (assert_crashed, assert_tensors_equal, cli_train, jsonl, launch, recorded, tensors,
                              torchrun)
from tests.record_publish import check_publication
from tests.test_faults import CONFIG


# ---------------------------------------------------------------------------------------------------
# DeepSpeed: `nexus-megatron train --nproc 2 --set train.engine=deepspeed` (the trainer's default ds_config:
# ZeRO-2, fp32), Nexus; 6 outer steps, k=2, a checkpoint every 2 steps.

DS_FILES = ["mp_rank_00_model_states.pt", "nexus_checkpoint.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", "nexus_full_state.json", "nexus_full_state.pt",
            "nexus_full_state.00000-of-00002.pt", "nexus_full_state.00001-of-00002.pt"]
# DeepSpeed's own files (nexus_checkpoint.json: the format marker; nexus_full_state.*: the whole state as full
# tensors, one shard per rank, for a resume on another number of ranks, engines/deepspeed/reshard.py)
DS_PT = [f for f in DS_FILES if f.endswith(".pt") and not f.startswith("nexus_")]
FULL = "nexus_full_state.pt"
DS_SET = "train.engine=deepspeed"


def ds_config(tmp, data, run):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["data"]["path"] = str(data)
    cfg["train"]["run_dir"] = str(run)
    path = tmp / f"{run.name}.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def ds_files(run, step):
    d = run / "checkpoints" / f"step_{step:08d}"
    return {f: torch.load(d / f, map_location="cpu", weights_only=False) if f.endswith(".pt") else (d / f).read_text()
            for f in sorted(os.listdir(d)) if f != "meta.json"}   # meta.json: the run's record (tests/test_resume_safety.py)


def ds_latest(run):
    return (run / "checkpoints" / "latest").read_text()


@pytest.fixture(scope="module")
def ds_reference(tmp_path_factory):
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("ds_faults")
    data = write_synthetic_data(str(tmp / "data"))
    run = tmp / "reference"
    rc, out, _ = launch(torchrun(*recorded(tmp / "events", "module", "nexus_megatron.cli", "train", "--config",
                                           ds_config(tmp, data, run), "--set", DS_SET)))
    assert rc == 0, out[-3000:]
    return tmp, data, run


def test_deepspeed_checkpoint_published_after_every_file_is_fsynced(ds_reference):
    tmp, _, run = ds_reference
    root = run / "checkpoints"
    assert sorted(os.listdir(root / "step_00000006")) == sorted(DS_FILES + ["meta.json"])
    assert check_publication(tmp / "events", root, "step_", DS_FILES + ["meta.json"]) == ["step_00000002", "step_00000004",
                                                                          "step_00000006"]


def test_deepspeed_kill9_mid_step_then_mid_checkpoint_then_resume(ds_reference):
    tmp, data, ref = ds_reference
    run = tmp / "faults"
    config = ds_config(tmp, data, run)
    ckpts = run / "checkpoints"
    want = jsonl(ref / "metrics.jsonl")

    # 1. kill -9 rank 1 after the first micro-step of outer step 3
    rc, out, exit_s = launch(cli_train(config, DS_SET), "kill_rank=1,step=3,phase=step")
    assert_crashed(rc, out, exit_s, 1, config, "deepspeed: kill -9 rank 1 mid-step 3")
    assert ds_latest(run) == "step_00000002" and not os.path.exists(ckpts / "step_00000004")
    assert jsonl(run / "metrics.jsonl") == want[:2]

    # 2. the same command resumes from step 2; kill -9 rank 0 while it writes checkpoint 4: its model states
    # are written and fsynced into the temporary directory, its optimizer shard is not
    rc, out, exit_s = launch(cli_train(config, DS_SET), "kill_rank=0,step=4,phase=checkpoint")
    assert_crashed(rc, out, exit_s, 0, config, "deepspeed: kill -9 rank 0 while writing checkpoint 4")
    partial = os.listdir(ckpts / ".tmp-step_00000004")
    assert "mp_rank_00_model_states.pt" in partial and "zero_pp_rank_0_mp_rank_00_optim_states.pt" not in partial
    assert ds_latest(run) == "step_00000002" and not os.path.exists(ckpts / "step_00000004")
    assert jsonl(run / "metrics.jsonl") == want[:4]     # steps 3-4 after the resume: the same trajectory

    # 3. the same command resumes from step 2 again (not from the partial checkpoint) and finishes
    rc, out, _ = launch(cli_train(config, DS_SET))
    assert rc == 0, out[-3000:]
    assert jsonl(run / "metrics.jsonl") == want
    assert ds_latest(run) == "step_00000006"
    assert not [d for d in os.listdir(ckpts) if d.startswith(".tmp-")]
    got, ref_files = ds_files(run, 6), ds_files(ref, 6)
    assert sorted(got) == sorted(DS_FILES)
    # numpy/python RNG states became tensors with checkpoint format 2; like before (ndarrays/tuples), not compared
    plain_rng = lambda x: {k: v for k, v in tensors(x) if "/rng/numpy/" not in k and "/rng/python/" not in k}
    for name in DS_PT:   # model, fp32 master partitions, AdamW moments, Nexus anchors, torch RNG state
        assert assert_tensors_equal(plain_rng(got[name]), plain_rng(ref_files[name]), name) >= 10
    key = "nexus_megatron_trainer_state"
    a, b = got[DS_PT[0]][key], ref_files[DS_PT[0]][key]
    assert (a["step"], a["tokens"], a["consumed"]) == (b["step"], b["tokens"], b["consumed"]) and a["step"] == 6
    for name in DS_PT[1:]:
        na = got[name]["optimizer_state_dict"]["base_optimizer_state"]["nexus"]
        nb = ref_files[name]["optimizer_state_dict"]["base_optimizer_state"]["nexus"]
        bitwise = ("anchors", "d_sums")   # compared bitwise above (assert_tensors_equal over the whole file)
        assert {k: v for k, v in na.items() if k not in bitwise} == {k: v for k, v in nb.items() if k not in bitwise}
    # the full state: every parameter's master weights, anchor, displacement and AdamW moments (dealt over the
    # two ranks' shard files), bitwise; the rest (client state, counters, scheduler) in nexus_full_state.pt
    shards = [f for f in DS_FILES if f.startswith("nexus_full_state.0")]
    full_params = lambda files: {n: v for f in shards for n, v in files[f].items()}
    assert {n for f in shards for n in got[f]} == set(got[FULL]["shards"])
    assert all(got[f] for f in shards)   # both ranks hold a share
    assert assert_tensors_equal(plain_rng(full_params(got)), plain_rng(full_params(ref_files)), FULL) >= 10
    assert assert_tensors_equal(plain_rng(got[FULL]), plain_rng(ref_files[FULL]), FULL) >= 1


def test_latest_naming_a_missing_or_partial_checkpoint_is_an_error(tmp_path):
    """A `latest` that names no complete checkpoint (someone deleted it) is an error, not a silent restart
    from step 0 (docs/reliability.md, "checkpoints that cannot be resumed from"; the plain engine: test_bad_inputs.py)."""
    pytest.importorskip("megatron.core")
    from nexus_megatron.engines.deepspeed.adapter import _latest_tag
    from nexus_megatron.engines.megatron.checkpoint import latest_checkpoint
    from nexus_megatron.errors import CheckpointError

    (tmp_path / "latest").write_text("step_00000004")
    with pytest.raises(CheckpointError, match=r"latest names 'step_00000004' but .*step_00000004 does not exist"):
        _latest_tag(str(tmp_path))
    (tmp_path / "latest").write_text("iter_0000004")
    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "iter_0000004" / "common.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"latest names 'iter_0000004' but .* is not a complete checkpoint"):
        latest_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------------
# Megatron-core: launch/pretrain_gpt_nexus.py --cpu-test-shim under torchrun, 2 data-parallel ranks, the
# distributed optimizer, fp32, Nexus (2 sources, K=2 inner steps per iteration), dropout 0.1 (so the RNG
# states must be restored too), dist_checkpointing (torch_dist) every 2 of 6 iterations.

def mcore_args(data, save, log):
    return ["--cpu-test-shim", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6",
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
            "--data-path", "0.6", os.path.join(data, "web"), "0.4", os.path.join(data, "code"),
            "--split", "969,30,1", "--tokenizer-type", "NullTokenizer", "--use-distributed-optimizer",
            "--optimizer", "nexus", "--nexus-gamma", "1.0", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
            "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "2",
            "--save", str(save), "--load", str(save), "--save-interval", "2", "--nexus-log-file", str(log)]


LAUNCHER = os.path.join(ROOT, "launch", "pretrain_gpt_nexus.py")


def mcore_final(tmp, save, name):
    """The model tensors and every rank's RNG states of checkpoint 6, read without processes (the
    distributed optimizer's flat buffers are left out: their alignment padding is uninitialised memory)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp / f"{name}.pt"
    dcp_to_torch_save(str(save / "iter_0000006"), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if not k.startswith("optimizer.") and "_extra_state" not in k}


def by_iteration(log):
    """The launcher appends to its log; a rerun logs again from the resumed iteration: keep the last record."""
    return {r["iteration"]: r for r in jsonl(log)}


@pytest.fixture(scope="module")
def mcore_reference(tmp_path_factory):
    pytest.importorskip("megatron.core")
    tmp = tmp_path_factory.mktemp("mcore_faults")
    data = write_synthetic_data(str(tmp / "data"))
    save, log = tmp / "reference", tmp / "reference.jsonl"
    rc, out, _ = launch(torchrun(*recorded(tmp / "events", "script", LAUNCHER, *mcore_args(data, save, log))))
    assert rc == 0, out[-3000:]
    return tmp, data, save, log


def test_megatron_checkpoint_published_after_every_file_is_fsynced(mcore_reference):
    tmp, _, save, _ = mcore_reference
    files = sorted(os.listdir(save / "iter_0000006"))
    assert {"common.pt", "metadata.json", ".metadata"} <= set(files)
    assert any(f.startswith("__0_") for f in files) and any(f.startswith("__1_") for f in files)  # both ranks' shards
    assert check_publication(tmp / "events", save, "iter_", files) == ["iter_0000002", "iter_0000004", "iter_0000006"]


def test_megatron_kill9_mid_step_then_mid_checkpoint_then_resume(mcore_reference):
    tmp, data, ref_save, ref_log = mcore_reference
    save, log = tmp / "faults", tmp / "faults.jsonl"
    cmd = torchrun(LAUNCHER, *mcore_args(data, save, log))
    want = jsonl(ref_log)
    assert [r["iteration"] for r in want] == [1, 2, 3, 4, 5, 6]

    # 1. kill -9 rank 1 after the first Nexus inner step of iteration 3
    rc, out, exit_s = launch(cmd, "kill_rank=1,step=3,phase=step")
    assert_crashed(rc, out, exit_s, 1, save, "megatron: kill -9 rank 1 mid-iteration 3")
    assert (save / "latest").read_text() == "iter_0000002" and not os.path.exists(save / "iter_0000004")
    assert jsonl(log) == want[:2]

    # 2. the same command resumes from iteration 2; kill -9 rank 0 while it writes checkpoint 4: its
    # common.pt is written, no rank's tensor shards, no metadata
    rc, out, exit_s = launch(cmd, "kill_rank=0,step=4,phase=checkpoint")
    assert "resumed from " + str(save / "iter_0000002") in out, out[-3000:]
    assert_crashed(rc, out, exit_s, 0, save, "megatron: kill -9 rank 0 while writing checkpoint 4")
    partial = os.listdir(save / ".tmp-iter_0000004")
    assert "common.pt" in partial and "metadata.json" not in partial and not any(f.startswith("__0_") for f in partial)
    assert (save / "latest").read_text() == "iter_0000002" and not os.path.exists(save / "iter_0000004")
    assert jsonl(log)[2:] == want[2:3]     # iteration 3 after the resume: the same trajectory

    # 3. the same command resumes from iteration 2 again and finishes
    rc, out, _ = launch(cmd)
    assert rc == 0 and "resumed from " + str(save / "iter_0000002") in out, out[-3000:]
    assert by_iteration(log) == {r["iteration"]: r for r in want}
    assert (save / "latest").read_text() == "iter_0000006"
    assert not [d for d in os.listdir(save) if d.startswith(".tmp-")]
    got, ref = mcore_final(tmp, save, "faults"), mcore_final(tmp, ref_save, "reference")
    compared = dict(tensors(ref))
    assert sum(k.startswith("/embedding.") or k.startswith("/decoder.") for k in compared) >= 10   # the model
    assert {f"/rng_state/shard_{r}_2/0/torch" for r in (0, 1)} <= compared.keys()                # every rank's RNG
    unseeded = lambda k: "/rng_state/" in k and ("/numpy/" in k or "/random/" in k)   # the launcher does not seed
    got, ref = ({k: v for k, v in tensors(x) if not unseeded(k)} for x in (got, ref))   # numpy/random
    assert_tensors_equal(got, ref, "checkpoint 6")
