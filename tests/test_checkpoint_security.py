"""Resuming from a checkpoint runs no code from it (issue 20).

A payload object whose ``__reduce__`` would create a file is planted in a checkpoint: the resume refuses it
with a one-line error naming the file, and the file is never created, on the plain engine, in the Nexus
state we add to DeepSpeed checkpoints and in the files of Megatron ``dist_checkpointing`` checkpoints. A
checkpoint written the old way (pickled numpy RNG state, no format marker) is refused, converted by the
explicit step (``nexus-megatron convert-checkpoint``), then resumes and continues bitwise like an
uninterrupted run. 3.5-4.5 min on 2 shared CPU cores (one DeepSpeed and one Megatron spawn of 2 ranks)."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

from nexus_megatron.checkpoint import latest_checkpoint, load_checkpoint
from nexus_megatron.errors import CheckpointError
from nexus_megatron.safe_load import UnsafeCheckpointError
from tests.conftest import config_with, read_metrics

TINY = {
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"sources": ["web", "code", "math"], "ood": ["poetry"], "seq_len": 16, "micro_batch_size": 2},
    "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
    "train": {"steps": 4, "micro_steps": 2, "eval_every": 2, "probe_every": 0, "eval_batches": 2,
              "probe_batches": 2, "progress": False},
}


class Payload:
    """Unpickling this calls ``open(path, "w")``: the file appears iff the checkpoint's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_line(e) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def old_way(state):
    """The pre-format-2 layout of the trainer's client state: numpy's RNG state as its tuple (an ndarray
    inside), python's as its tuple."""
    from nexus_megatron.safe_load import numpy_rng_from_plain, python_rng_from_plain
    rng = state["rng"]
    return {**state, "rng": {"torch": rng["torch"], "numpy": numpy_rng_from_plain(rng["numpy"]),
                             "python": python_rng_from_plain(rng["python"])}}


# -- plain engine ---------------------------------------------------------------------------------------

@pytest.fixture
def only_torchs_safe_globals():
    """The test sees torch's own weights_only allow-list: importing megatron-core (another test in this process)
    registers numpy arrays with ``torch.serialization.add_safe_globals``, after which an old checkpoint's numpy
    RNG state would already load safely and the conversion below would have nothing to rewrite."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.add_safe_globals(saved)


def test_rng_states_round_trip_as_plain_data():
    from nexus_megatron.safe_load import rng_to_plain, set_rng_from_plain
    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()   # leaves a cached gaussian
    st = rng_to_plain()
    want = (np.random.standard_normal(3).tolist(), random.random(), torch.rand(2).tolist())
    import io
    buf = io.BytesIO()
    torch.save(st, buf)
    buf.seek(0)
    st = torch.load(buf, weights_only=True)
    set_rng_from_plain(st)
    assert (np.random.standard_normal(3).tolist(), random.random(), torch.rand(2).tolist()) == want


def _tiny(data, run_dir, **over):
    return config_with(TINY, data, run_dir, **over)


def test_plain_resume_refuses_a_code_payload(synthetic_data, tmp_path, capsys):
    from nexus_megatron.cli import main
    from nexus_megatron.train import train
    cfg = _tiny(synthetic_data, tmp_path / "r", **{"train.steps": 2, "train.checkpoint_every": 2})
    train(cfg)
    path = latest_checkpoint(str(tmp_path / "r" / "checkpoints"))
    state_file = os.path.join(path, "state.pt")
    state = load_checkpoint(path)
    marker = tmp_path / "pwned"
    state["client_state"]["note"] = Payload(marker)
    torch.save(state, state_file)

    with pytest.raises(UnsafeCheckpointError) as e:
        train(_tiny(synthetic_data, tmp_path / "r", **{"train.steps": 4}))
    msg = one_line(e.value)
    assert msg.startswith(f"checkpoint file {state_file} holds Python objects that a safe load refuses "
                          "(Unsupported global: GLOBAL io.open)"), msg
    assert msg.endswith(f"`nexus-megatron convert-checkpoint {path}` (docs/reliability.md, Security)")
    assert not marker.exists()
    # through the CLI: one line on stderr, exit 2, nothing run
    rc = main(["train", "--set", f"data.path={synthetic_data}", "--set", f"train.run_dir={tmp_path / 'r'}",
               *sum((["--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}"]
                     for sec, kv in TINY.items() for k, v in ((f"{sec}.{k}", v) for k, v in kv.items())), [])])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"nexus-megatron: error: checkpoint file {state_file} holds Python objects")
    assert not marker.exists()
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2]   # nothing trained


def test_plain_old_format_is_refused_then_converted_and_resumes_bitwise(synthetic_data, tmp_path,
                                                                        crash_after_checkpoint, capsys,
                                                                        only_torchs_safe_globals):
    from nexus_megatron.cli import main
    from nexus_megatron.train import train
    over = {"train.steps": 6, "train.eval_every": 3}
    train(_tiny(synthetic_data, tmp_path / "a", **over))
    part = _tiny(synthetic_data, tmp_path / "b", **over, **{"train.checkpoint_every": 3})
    crash_after_checkpoint(3)
    with pytest.raises(KeyboardInterrupt):
        train(part)
    # rewrite the step-3 checkpoint the way nexus_megatron wrote it before format 2
    path = latest_checkpoint(str(tmp_path / "b" / "checkpoints"))
    state = load_checkpoint(path)
    state["client_state"] = old_way(state["client_state"])
    torch.save(state, os.path.join(path, "state.pt"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": 3}, f)
    # an old checkpoint also has no run record (resume.py): the resume cannot compare settings and is refused
    # until the user says to resume it unchecked (--allow-changed run)
    with pytest.raises(CheckpointError, match="has no run record"):
        train(part)
    part_old = _tiny(synthetic_data, tmp_path / "b", **over,
                     **{"train.checkpoint_every": 3, "train.allow_changed": ["run"]})
    with pytest.raises(UnsafeCheckpointError) as e:
        train(part_old)
    assert one_line(e.value) == (
        f"checkpoint {path}/state.pt was written before checkpoint format 2 (its files hold pickled Python objects, "
        f"so loading it could run code): if you trust where it came from, convert it once with "
        f"`nexus-megatron convert-checkpoint {path}` (docs/reliability.md, Security)")

    assert main(["convert-checkpoint", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"{path}: plain, state.pt rewritten, format 2" in out
    assert main(["convert-checkpoint", str(tmp_path / "b")]) == 0   # again: nothing to do
    assert f"{path}: plain, already format 2" in capsys.readouterr().out
    torch.load(os.path.join(path, "state.pt"), weights_only=True)

    train(part_old)   # resumes from step 3
    a = load_checkpoint(latest_checkpoint(str(tmp_path / "a" / "checkpoints")))
    b = load_checkpoint(latest_checkpoint(str(tmp_path / "b" / "checkpoints")))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}
    assert [strip(r) for r in read_metrics(tmp_path / "a")] == [strip(r) for r in read_metrics(tmp_path / "b")]


def test_convert_checkpoint_errors_are_one_line(tmp_path, capsys):
    from nexus_megatron.cli import main
    assert main(["convert-checkpoint", str(tmp_path / "nope")]) == 2
    assert main(["convert-checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nexus-megatron: error: convert-checkpoint: {tmp_path / 'nope'} is not a directory: pass a run "
                   "directory, a checkpoint root or one checkpoint directory",
                   f"nexus-megatron: error: convert-checkpoint: no checkpoint under {tmp_path} (looked for state.pt, "
                   "DeepSpeed's *_states.pt and Megatron's common.pt + metadata.json)"]
    bad = tmp_path / "step_00000001"
    bad.mkdir()
    (bad / "state.pt").write_bytes(b"not a checkpoint")
    assert main(["convert-checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"nexus-megatron: error: convert-checkpoint: {bad}/state.pt cannot be "
                                               "read (UnpicklingError: "), err
    assert err[0].endswith("); it was not changed") and (bad / "state.pt").read_bytes() == b"not a checkpoint"


# -- DeepSpeed: the Nexus state inside DeepSpeed's optimizer files, and the trainer's client state -----------

def _ds_worker(rank, world, data, tmp):
    """One spawn: an uninterrupted 4-step run; a 2-step run with a checkpoint; copies of it with a payload
    in the Nexus state of every ZeRO optimizer file (c) and written the old way (d); both resumes refused;
    d converted (rank 0), then resumed to step 4."""
    import torch.distributed as dist
    from nexus_megatron.convert_checkpoint import convert_checkpoints
    from nexus_megatron.safe_load import MARKER_FILE
    from nexus_megatron.train import train
    ds = {"train.engine": "deepspeed", "train.eval_every": 0,   # constant lr: a 2-step run stops mid-schedule
          "optim.schedule": "constant", "optim.warmup_steps": 0}
    train(config_with(TINY, data, f"{tmp}/full", **ds))
    train(config_with(TINY, data, f"{tmp}/b", **ds, **{"train.steps": 2, "train.checkpoint_every": 2}))
    dist.barrier()
    if rank == 0:
        src = f"{tmp}/b"
        for name in ("c", "d"):
            shutil.copytree(src, f"{tmp}/{name}")
        ck = f"{tmp}/c/checkpoints/step_00000002"
        for f in sorted(os.listdir(ck)):
            if f.endswith("optim_states.pt"):
                sd = torch.load(os.path.join(ck, f), weights_only=False)
                sd["optimizer_state_dict"]["base_optimizer_state"]["nexus"]["note"] = Payload(f"{tmp}/pwned")
                torch.save(sd, os.path.join(ck, f))
        ck = f"{tmp}/d/checkpoints/step_00000002"
        f = os.path.join(ck, "mp_rank_00_model_states.pt")
        sd = torch.load(f, weights_only=False)
        key = "nexus_megatron_trainer_state"
        sd[key] = old_way(sd[key])
        torch.save(sd, f)
        os.remove(os.path.join(ck, MARKER_FILE))
    dist.barrier()
    out = {}
    for name in ("c", "d"):
        try:
            train(config_with(TINY, data, f"{tmp}/{name}", **ds))
            out[name] = "resumed"
        except UnsafeCheckpointError as e:
            out[name] = str(e)
    out["pwned"] = os.path.exists(f"{tmp}/pwned")
    dist.barrier()
    if rank == 0:
        out["convert"] = convert_checkpoints(f"{tmp}/d")
    dist.barrier()
    train(config_with(TINY, data, f"{tmp}/d", **ds))
    return out


def test_deepspeed_resume_refuses_payload_and_old_format_then_converts(tmp_path):
    pytest.importorskip("deepspeed")
    from tests.conftest import write_synthetic_data
    from tests.distributed import run_distributed
    data = write_synthetic_data(str(tmp_path / "data"))
    res = run_distributed(_ds_worker, 2, data, str(tmp_path), timeout=900)
    ck = tmp_path / "c" / "checkpoints" / "step_00000002"
    for r in res:
        assert "\n" not in r["c"] and "\n" not in r["d"]
        assert r["c"].startswith(f"checkpoint file {ck}/zero_pp_rank_"), r["c"]
        assert "optim_states.pt holds Python objects that a safe load refuses (Unsupported global: GLOBAL io.open)" \
            in r["c"], r["c"]
        assert r["c"].endswith(f"`nexus-megatron convert-checkpoint {ck}` (docs/reliability.md, Security)")
        d = tmp_path / "d" / "checkpoints" / "step_00000002"
        assert r["d"] == (f"checkpoint {d} was written before checkpoint format 2 (its files hold pickled Python "
                          f"objects, so loading it could run code): if you trust where it came from, convert it once "
                          f"with `nexus-megatron convert-checkpoint {d}` (docs/reliability.md, Security)")
        assert r["pwned"] is False
    assert not (tmp_path / "pwned").exists()
    # the 6 .pt files: model states, 2 optimizer shards, nexus_full_state.pt and its 2 shards (resume on other ranks)
    assert res[0]["convert"] == [f"{tmp_path}/d/checkpoints/step_00000002: deepspeed, 1 of 6 files rewritten, "
                                 "format 2"]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "d")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [strip(r) for r in resumed] == [strip(r) for r in full]


# -- Megatron dist_checkpointing --------------------------------------------------------------------------

def _mcore_worker(rank, world, tmp):
    """One spawn: a 3-step reference; a 2-step run saved normally and with payloads (in the client state of
    common.pt, in this rank's RNG object -> a __*.distcp shard, as .metadata) and the old way (numpy/python
    RNG tuples, no marker); every payload resume refused, the old one refused, converted, resumed exactly."""
    import pickle

    import torch.distributed as dist
    from tests import mcore_helpers as H
    from nexus_megatron.convert_checkpoint import convert_checkpoints
    from nexus_megatron.engines.megatron import checkpoint as C
    from nexus_megatron.safe_load import MARKER_FILE

    H.init_megatron()
    kw = dict(mode="source-parallel", num_sources=2, weights=(0.7, 0.3), distopt=True)

    def built(seed=0):
        model, cfg = H.build_model(seed=seed)
        return H.build_nexus(model, cfg, k=2, **kw)

    ddp, opt, sched, groups = built()
    cont = H.run_steps(ddp, opt, sched, groups, 3)
    ddp, opt, sched, groups = built()
    H.run_steps(ddp, opt, sched, groups, 2)
    pw = f"{tmp}/pwned"
    C.save_checkpoint(f"{tmp}/common", 2, [ddp], opt, sched)
    real_rng = C._rng_states
    C._rng_states = lambda: {**real_rng(), "note": Payload(pw)}
    C.save_checkpoint(f"{tmp}/object", 2, [ddp], opt, sched)
    C._rng_states = lambda: {**real_rng(), "numpy": np.random.get_state(), "random": random.getstate()}
    C.save_checkpoint(f"{tmp}/old", 2, [ddp], opt, sched)   # the RNG states as nexus_megatron wrote them before
    C._rng_states = real_rng
    C.save_checkpoint(f"{tmp}/meta", 2, [ddp], opt, sched)
    if rank == 0:   # (megatron-core exchanges the common state between ranks when saving: planted afterwards)
        common = torch.load(f"{tmp}/common/iter_0000002/common.pt", weights_only=False)
        common["client_state"]["note"] = Payload(pw)
        torch.save(common, f"{tmp}/common/iter_0000002/common.pt")
        ck = f"{tmp}/meta/iter_0000002"
        with open(f"{ck}/.metadata", "wb") as f:
            pickle.dump(Payload(pw), f)
        os.remove(f"{tmp}/old/iter_0000002/{MARKER_FILE}")
    dist.barrier()
    out = {}
    for name in ("common", "object", "meta", "old"):
        ddp, opt, sched, groups = built(seed=7)
        try:
            C.load_checkpoint(f"{tmp}/{name}", [ddp], opt, sched)
            out[name] = "loaded"
        except UnsafeCheckpointError as e:
            out[name] = str(e)
        dist.barrier()
    out["pwned"] = os.path.exists(pw)
    if rank == 0:
        out["convert"] = convert_checkpoints(f"{tmp}/old")
    dist.barrier()
    ddp, opt, sched, groups = built(seed=7)
    info = C.load_checkpoint(f"{tmp}/old", [ddp], opt, sched)
    resumed = H.run_steps(ddp, opt, sched, groups, 1)
    out["exact"] = H.rel_error(resumed[0], cont[2])
    out["iteration"] = info["iteration"]
    return out


def test_megatron_load_refuses_payloads_and_old_format_then_converts(tmp_path):
    pytest.importorskip("megatron.core")
    from tests.distributed import run_distributed
    res = run_distributed(_mcore_worker, 2, str(tmp_path), timeout=900, preload="megatron")
    hint = lambda name: (f"`nexus-megatron convert-checkpoint {tmp_path}/{name}/iter_0000002` "
                         "(docs/reliability.md, Security)")
    for r in res:
        for name in ("common", "object", "meta", "old"):
            assert "\n" not in r[name] and r[name].endswith(hint(name)), (name, r[name])
        assert r["common"].startswith(f"checkpoint file {tmp_path}/common/iter_0000002/common.pt holds Python objects "
                                      "that a safe load refuses (Unsupported global: GLOBAL io.open)"), r["common"]
        assert r["object"].startswith(f"checkpoint {tmp_path}/object/iter_0000002: its object 'rng_state"), r["object"]
        assert "refuses" in r["object"]
        assert r["meta"].startswith(f"checkpoint file {tmp_path}/meta/iter_0000002/.metadata holds Python objects "
                                    "that a safe load refuses (Unsupported global: GLOBAL io.open)"), r["meta"]
        assert r["old"].startswith(f"checkpoint {tmp_path}/old/iter_0000002 was written before checkpoint format 2")
        assert r["pwned"] is False and r["iteration"] == 2
        assert r["exact"] == 0.0
    assert res[0]["convert"] == [f"{tmp_path}/old/iter_0000002: megatron, 0 of 1 files rewritten, format 2"]
    assert not (tmp_path / "pwned").exists()
