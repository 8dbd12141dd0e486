"""Disk full while checkpointing, and a dead writer's temporary checkpoint (docs/reliability.md#disk-full):
a one-line CheckpointError naming the checkpoint, the space it needs and the space free; the partial
temporary directory is removed, the previous checkpoint stays loadable and a resume on the same disk works;
`.tmp-*` left by a killed writer are removed at the start of a run."""
import errno
import os
import re
from collections import namedtuple

import pytest

import nexus_megatron.checkpoint as ckpt
from nexus_megatron.errors import CheckpointError
from tests.conftest import read_metrics, write_synthetic_data
from tests.test_train import tiny_config

OVER = {"train.steps": 2, "train.checkpoint_every": 1, "train.eval_every": 0, "train.probe_every": 0}


def run(data, run_dir, **over):
    from nexus_megatron.train import train
    return train(tiny_config(data, run_dir, **{**OVER, **over}))


@pytest.fixture
def data(tmp_path):
    return write_synthetic_data(str(tmp_path / "data"))


def fail_save_at(monkeypatch, step, exc):
    """torch.save of checkpoint ``step`` raises ``exc`` (after writing part of the file)."""
    real = ckpt.torch.save

    def save(state, f):
        if state["client_state"]["step"] == step:
            f.write(b"partial")
            raise exc
        return real(state, f)
    monkeypatch.setattr(ckpt.torch, "save", save)


def _tmp_entries(root):
    return [n for n in os.listdir(root) if n.startswith(".tmp-") or ".tmp-" in n]


def test_enospc_is_one_line_and_resume_works(data, tmp_path, monkeypatch):
    root = str(tmp_path / "r" / "checkpoints")
    fail_save_at(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointError) as e:
        run(data, tmp_path / "r")
    msg = str(e.value)
    assert re.fullmatch(re.escape(f"no space left on the device of {root} while writing checkpoint {root}/step_00000002: "
                                  "it needs about ") + r"\d+\.\d MiB, \d+\.\d MiB free" + re.escape(
                                      "; free space there (or move train.run_dir to a larger disk) and resume: the "
                                      "previous checkpoint is intact"), msg), msg
    assert _tmp_entries(root) == []                                   # the partial directory is gone
    assert open(os.path.join(root, "latest")).read() == "step_00000001"
    monkeypatch.undo()
    run(data, tmp_path / "r")                                         # space freed: the resume finishes the run
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2]
    assert open(os.path.join(root, "latest")).read() == "step_00000002"


def test_cli_disk_full_is_one_line_exit_2(data, tmp_path, monkeypatch, capsys):
    from nexus_megatron.cli import main
    fail_save_at(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    rc = main(["train", "--set", f"data.path={data}", "--set", "data.sources=[web, code, math]",
               "--set", "data.ood=[poetry]", "--set", f"train.run_dir={tmp_path / 'r'}", "--set", "train.steps=2",
               "--set", "train.checkpoint_every=1", "--set", "train.progress=false", "--set", "model.hidden_size=16",
               "--set", "model.num_layers=1", "--set", "model.num_heads=2", "--set", "data.seq_len=16",
               "--set", "data.micro_batch_size=2", "--set", "train.micro_steps=2", "--set", "optim.warmup_steps=1",
               "--set", "train.eval_every=0", "--set", "train.probe_every=0"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("nexus-megatron: error: no space left on the device of ")


Usage = namedtuple("Usage", "total used free")


def test_torch_writer_error_on_a_full_disk(data, tmp_path, monkeypatch):
    """torch's writer reports a failed write as a RuntimeError without errno: judged by the free space."""
    fail_save_at(monkeypatch, 2, RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos"))
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(CheckpointError, match=r"^no space left on the device of .*: it needs about [\d.]+ MiB, 0\.0 MiB free"):
        run(data, tmp_path / "r")
    assert _tmp_entries(str(tmp_path / "r" / "checkpoints")) == []


def test_other_write_errors_are_not_called_disk_full(data, tmp_path, monkeypatch):
    fail_save_at(monkeypatch, 2, RuntimeError("some other failure"))
    with pytest.raises(RuntimeError, match="^some other failure$"):
        run(data, tmp_path / "r")
    assert _tmp_entries(str(tmp_path / "r" / "checkpoints")) == []


def test_dead_writers_tmp_is_cleaned_at_start(data, tmp_path):
    """A writer killed mid-save leaves .tmp-* (a checkpoint directory, a `latest` being replaced); the next
    start removes them (freeing their space) and resumes from the published checkpoint."""
    run(data, tmp_path / "r", **{"train.steps": 2})
    root = str(tmp_path / "r" / "checkpoints")
    stale = os.path.join(root, ".tmp-step_00000003-4242")
    os.makedirs(stale)
    with open(os.path.join(stale, "state.pt"), "wb") as f:
        f.write(os.urandom(1 << 16))
    os.makedirs(os.path.join(root, ".tmp-step_00000003"))            # the DeepSpeed engine's name
    open(os.path.join(root, "latest.tmp-4242"), "w").write("step_00000003")
    run(data, tmp_path / "r", **{"train.steps": 3})
    assert _tmp_entries(root) == []
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3]
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_00000002", "step_00000003"]


def test_clean_stale_tmp_touches_nothing_else(tmp_path):
    root = tmp_path / "c"
    (root / "step_00000001").mkdir(parents=True)
    (root / "latest").write_text("step_00000001")
    (root / ".tmp-x").mkdir()
    assert ckpt.clean_stale_tmp(str(root)) == [str(root / ".tmp-x")]
    assert sorted(os.listdir(root)) == ["latest", "step_00000001"]
    assert ckpt.clean_stale_tmp(str(tmp_path / "missing")) == []
