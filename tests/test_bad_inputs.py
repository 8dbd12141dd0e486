"""Bad configurations and inputs through the trainer (docs/reliability.md groups them by class, with the
rows already covered elsewhere): each is an exact error raised before compute starts (the model is
never built, or no training step runs), or the documented recovery during the run."""
import json
import os
import re

import numpy as np
import pytest
import torch

from nexus_megatron.checkpoint import latest_checkpoint, load_checkpoint
from nexus_megatron.errors import CheckpointError, DataError, NexusConfigError
from tests.conftest import VOCAB, write_synthetic_data
from tests.test_train import read_metrics, tiny_config


@pytest.fixture
def data(tmp_path):
    return write_synthetic_data(str(tmp_path / "data"))


@pytest.fixture
def no_compute(monkeypatch):
    """Building the model (the first compute) fails the test: the error must come before it."""
    import nexus_megatron.train as T

    def forbidden(*a, **k):
        raise AssertionError("compute started before the bad input was reported")
    monkeypatch.setattr(T, "build_model", forbidden)


def forbid_training(monkeypatch):
    """From now on a training forward pass fails the test (for errors found after the model is built, on
    resume)."""
    import nexus_megatron.train as T

    def forbidden(*a, **k):
        raise AssertionError("a training step ran before the bad input was reported")
    monkeypatch.setattr(T, "lm_loss", forbidden)


def run(data, run_dir, **over):
    from nexus_megatron.train import train
    return train(tiny_config(data, run_dir, **over))


def exact(msg):
    return "^" + re.escape(msg) + "$"


# -- configuration the trainer checks when it builds the layout (before the data and the model) ------

@pytest.mark.parametrize("over,msg", [
    ({"data.weights": "[1, 0, 1]"},
     "data.weights: source 'code' has weight 0.0; weights must be finite and > 0 (remove the source from "
     "data.sources instead of giving it weight 0)"),
    ({"data.weights": "[1, -2, 1]"},
     "data.weights: source 'code' has weight -2.0; weights must be finite and > 0 (remove the source from "
     "data.sources instead of giving it weight 0)"),
    ({"data.weights": "[1, 1]"},
     "data.weights has 2 entries but data.sources has 3: give one weight per source"),
    ({"data.sources": "[web, code, web]"},
     "data.sources names ['web'] more than once: list each source once"),
], ids=["zero-weight", "negative-weight", "weights-count", "duplicate-source"])
def test_bad_weights_and_sources_before_compute(data, tmp_path, no_compute, over, msg):
    with pytest.raises(NexusConfigError, match=exact(msg)):
        run(data, tmp_path / "r", **over)
    assert not (tmp_path / "r").exists()


def test_world_size_the_layout_cannot_split(monkeypatch):
    """source-parallel, 3 sources on 4 data-parallel ranks (the trainer builds the layout first thing)."""
    import nexus_megatron.layout as L
    monkeypatch.setattr(L.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(L.dist, "get_process_group_ranks", lambda g: [0, 1, 2, 3])
    monkeypatch.setattr(L.dist, "get_rank", lambda: 0)
    with pytest.raises(NexusConfigError, match=exact(
            "nexus.layout=source-parallel: the data-parallel size 4 is not a multiple of the number of sources 3, "
            "so the ranks cannot be split into equal source groups. Use 3 or 6 data-parallel ranks, change "
            "data.sources, or use nexus.layout=sequential")):
        L.build_layout(L.LayoutConfig(mode="source-parallel", sources=("web", "code", "math")))


@pytest.mark.parametrize("override,msg", [
    ("train.collective_timeout_s=0", "train.collective_timeout_s=0: must be > 0"),
    ("train.collective_timeout_s=-5", "train.collective_timeout_s=-5: must be > 0"),
    ("optim.lr=.nan", "optim.lr=nan: must be a finite number"),
    ("train.engine=megatron", "train.engine='megatron': use one of plain, deepspeed"),
    ("nexus.max_consecutive_skips=-1", "nexus.max_consecutive_skips=-1: must be an integer >= 0"),
])
def test_more_bad_settings(override, msg):
    from nexus_megatron.config import load_config
    with pytest.raises(NexusConfigError, match=exact(msg)):
        load_config(None, [override])


# -- data --------------------------------------------------------------------------------------------

def test_missing_train_file(data, tmp_path, no_compute):
    path = os.path.join(data, "code", "train.bin")
    os.remove(path)
    with pytest.raises(DataError, match=exact(f"source 'code': {path} is missing; re-run `nexus-megatron prepare-data`")):
        run(data, tmp_path / "r")


def test_truncated_train_file(data, tmp_path, no_compute):
    path = os.path.join(data, "math", "train.bin")
    with open(path, "ab") as f:
        f.write(b"\x01")   # an odd byte count cannot be uint16 tokens
    size = os.path.getsize(path)
    with pytest.raises(DataError, match=exact(f"source 'math': {path} is empty or truncated ({size} bytes); "
                                              "re-run prepare-data")):
        run(data, tmp_path / "r")


def test_source_shorter_than_one_sequence(data, tmp_path, no_compute):
    np.arange(1, 11, dtype=np.uint16).tofile(os.path.join(data, "web", "train.bin"))
    with open(os.path.join(data, "manifest.json")) as f:
        man = json.load(f)
    man["sources"]["web"]["train_tokens"] = 10   # consistent with its manifest (tests/test_data_integrity.py)
    with open(os.path.join(data, "manifest.json"), "w") as f:
        json.dump(man, f)
    with pytest.raises(DataError, match=exact("source 'web' has 10 training tokens, fewer than one sequence of "
                                              "data.seq_len+1=17: prepare more data or lower data.seq_len")):
        run(data, tmp_path / "r")


def test_validation_split_shorter_than_one_sequence(data, tmp_path, no_compute):
    with pytest.raises(DataError, match=exact("source 'web' has 2000 validation tokens, fewer than one sequence "
                                              "of 4001: prepare more validation data or lower data.seq_len")):
        run(data, tmp_path / "r", **{"data.seq_len": 4000, "train.steps": 1, "optim.warmup_steps": 0})


def test_held_out_source_as_training_source(data, tmp_path, no_compute):
    with pytest.raises(DataError, match=exact("source 'poetry' was prepared as held-out (OOD, no train split): "
                                              "move it to data.ood")):
        run(data, tmp_path / "r", **{"data.sources": "[web, poetry]", "data.ood": "[]"})


@pytest.mark.parametrize("split", ["train", "val"])
def test_out_of_vocabulary_token_id(data, tmp_path, no_compute, split):
    """A token id >= the tokenizer vocabulary (a corrupted file, another tokenizer) would be an index error
    (on GPU a device-side assert) in the middle of the run; it is a DataError naming file, position, id."""
    path = os.path.join(data, "code", f"{split}.bin")
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[123] = VOCAB + 7
    tokens.tofile(path)
    with pytest.raises(DataError, match=exact(
            f"source 'code': {path} holds token id {VOCAB + 7} at position 123, outside the tokenizer vocabulary "
            f"(manifest.json vocab_size={VOCAB}): the file is corrupted or was written with another tokenizer; "
            "re-run `nexus-megatron prepare-data`")):
        run(data, tmp_path / "r")


def test_model_vocab_smaller_than_tokenizer(data, tmp_path, no_compute):
    with pytest.raises(NexusConfigError, match=exact(
            f"model.vocab_size=32 is smaller than the data's tokenizer vocabulary ({VOCAB}): remove "
            "model.vocab_size or raise it")):
        run(data, tmp_path / "r", **{"model.vocab_size": 32})


def test_cli_data_error_is_one_line(data, tmp_path, capsys):
    """Through the CLI a data error is one line on stderr and exit status 2, no traceback."""
    from nexus_megatron.cli import main
    os.remove(os.path.join(data, "code", "val.bin"))
    rc = main(["train", "--set", f"data.path={data}", "--set", "data.sources=[web, code, math]",
               "--set", "data.ood=[poetry]", "--set", f"train.run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("nexus-megatron: error: source 'code':") and "val.bin is missing" in err


# -- checkpoints and resume --------------------------------------------------------------------------

def _two_step_run(data, run_dir, **over):
    run(data, run_dir, **{"train.steps": 2, "train.eval_every": 0, "train.probe_every": 0, **over})
    return os.path.join(str(run_dir), "checkpoints")


def test_corrupted_checkpoint(data, tmp_path, monkeypatch):
    root = _two_step_run(data, tmp_path / "r")
    path = latest_checkpoint(root)
    with open(os.path.join(path, "state.pt"), "r+b") as f:
        f.truncate(100)
    forbid_training(monkeypatch)
    with pytest.raises(CheckpointError, match=r"^" + re.escape(f"checkpoint {path} cannot be read (") +
                       r".*" + re.escape("); delete it and point 'latest' at an earlier step_* directory, or "
                                         "start a new run_dir") + "$"):
        run(data, tmp_path / "r", **{"train.steps": 4})


def test_cli_corrupted_checkpoint_is_one_line(data, tmp_path, capsys):
    root = _two_step_run(data, tmp_path / "r")
    with open(os.path.join(latest_checkpoint(root), "state.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    from nexus_megatron.cli import main
    rc = main(["train", "--set", f"data.path={data}", "--set", "data.sources=[web, code, math]",
               "--set", "data.ood=[poetry]", "--set", f"train.run_dir={tmp_path / 'r'}", "--set", "train.steps=4",
               "--set", "train.progress=false", "--set", "model.hidden_size=16", "--set", "model.num_layers=1",
               "--set", "model.num_heads=2", "--set", "data.seq_len=16", "--set", "data.micro_batch_size=2",
               "--set", "train.micro_steps=2", "--set", "optim.warmup_steps=1", "--set", "optim.lr=0.01",
               "--set", "optim.min_lr=0.001"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "cannot be read" in err


def test_latest_names_a_missing_checkpoint(data, tmp_path, monkeypatch):
    """Before: a dangling `latest` silently started the run over (and truncated metrics.jsonl to step 0)."""
    root = _two_step_run(data, tmp_path / "r")
    forbid_training(monkeypatch)
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000009")
    with pytest.raises(CheckpointError, match=exact(
            f"{root}/latest names 'step_00000009' but {root}/step_00000009/state.pt does not exist: point 'latest' "
            "at an existing step_* directory, or start a new run_dir (train.resume=false starts over)")):
        run(data, tmp_path / "r", **{"train.steps": 4})
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2]   # nothing lost


def test_resume_with_another_optimizer(data, tmp_path, monkeypatch):
    root = _two_step_run(data, tmp_path / "r")
    forbid_training(monkeypatch)
    # the general rule (tests/test_resume_safety.py): every difference listed, before anything is loaded
    with pytest.raises(NexusConfigError, match=exact(
            f"resume would change the run of {tmp_path / 'r'}: optim.name \"nexus\" -> \"adamw\"; use the same "
            "settings, a new train.run_dir, train.resume=false to start over, or --allow-changed optim.name "
            "(train.allow_changed) to resume anyway")):
        run(data, tmp_path / "r", **{"train.steps": 4, "optim.name": "adamw"})
    # forced past that check, the engine's own check still refuses the other optimizer's state
    with pytest.raises(NexusConfigError, match=exact(
            f"{root} holds a run of optim.name='nexus', this run has 'adamw': use another train.run_dir or set "
            "train.resume=false")):
        run(data, tmp_path / "r", **{"train.steps": 4, "optim.name": "adamw", "train.allow_changed": "[optim.name]"})


def test_resume_with_other_weights(data, tmp_path, monkeypatch):
    _two_step_run(data, tmp_path / "r")
    forbid_training(monkeypatch)
    with pytest.raises(NexusConfigError, match=r"^resume would change the run of .*: data.weights null -> \[1, 2, 1\]; "):
        run(data, tmp_path / "r", **{"train.steps": 4, "data.weights": "[1, 2, 1]"})
    # forced past that check, the optimizer's own layout check still refuses
    with pytest.raises(NexusConfigError, match=r"^checkpoint was written with layout .* but this run has .*: resume "
                                               r"with the same nexus.layout, data.sources, data.weights and number "
                                               r"of ranks$"):
        run(data, tmp_path / "r", **{"train.steps": 4, "data.weights": "[1, 2, 1]",
                                     "train.allow_changed": "[data.weights]"})


# -- numerical faults during the run (nexus.py §1.4, end to end through the trainer) ------------------

def test_nan_loss_skips_the_step_without_touching_state(data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_FAULT_INJECT", "nan_steps=3")
    run(data, tmp_path / "r", **{"train.steps": 3, "train.checkpoint_every": 1, "train.eval_every": 0,
                                 "train.probe_every": 0})
    m = read_metrics(tmp_path / "r")
    assert [r["skipped_steps"] for r in m] == [0, 0, 1]
    root = str(tmp_path / "r" / "checkpoints")
    before = load_checkpoint(os.path.join(root, "step_00000002"))
    after = load_checkpoint(os.path.join(root, "step_00000003"))
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), k                     # parameters untouched
    ob, oa = before["optimizer"]["outer"], after["optimizer"]["outer"]
    for pid, st in ob["state"].items():
        for k, v in st.items():
            assert torch.equal(v, oa["state"][pid][k]), (pid, k)         # AdamW moments and step count untouched
    assert torch.equal(before["optimizer"]["anchor"], after["optimizer"]["anchor"])
    assert before["scheduler"]["last_epoch"] == after["scheduler"]["last_epoch"]   # schedule not advanced
    assert after["optimizer"]["stats"]["skipped_steps"] == 1


def test_nan_loss_on_one_rank_is_skipped_by_every_rank(data, tmp_path, monkeypatch):
    from tests.distributed import run_distributed
    from tests.test_train import _train_worker
    monkeypatch.setenv("NEXUS_FAULT_INJECT", "nan_steps=2,nan_rank=1")
    cfg = tiny_config(data, tmp_path / "r", **{"train.steps": 3, "train.eval_every": 0, "train.probe_every": 0})
    s0, s1 = run_distributed(_train_worker, 2, cfg)
    assert s0["skipped_steps"] == s1["skipped_steps"] == 1
    assert s0["final"] == s1["final"]
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "r")] == [0, 1, 1]


def test_consecutive_nan_steps_abort_with_message(data, tmp_path, monkeypatch, capsys):
    from nexus_megatron.cli import main
    monkeypatch.setenv("NEXUS_FAULT_INJECT", "nan_steps=2:3:4:5")
    cfg = tiny_config(data, tmp_path / "r", **{"train.steps": 6, "nexus.max_consecutive_skips": 3,
                                               "train.checkpoint_every": 1})
    from nexus_megatron.config import to_dict
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(to_dict(cfg)))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nexus-megatron: error: 3 outer steps in a row had NaN/Inf gradients "
                          "(nexus.max_consecutive_skips=3); the last good parameters are intact.")
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "r")] == [0, 1, 2]   # step 4 aborted
    # the last checkpoint is the last good state; it resumes once the fault is gone
    monkeypatch.delenv("NEXUS_FAULT_INJECT")
    assert main(["train", "--config", str(path)]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3, 4, 5, 6]


def test_vanishing_gradients_are_dropped_and_counted(data, tmp_path):
    """Every source's gradient below nexus.min_grad_norm (here: all, by a huge threshold): each micro-step's
    source is dropped and counted in skipped_sources; the run goes on."""
    run(data, tmp_path / "r", **{"train.steps": 2, "nexus.min_grad_norm": 1e9, "train.eval_every": 0,
                                 "train.probe_every": 0})
    m = read_metrics(tmp_path / "r")
    assert [r["skipped_sources"] for r in m] == [2, 4]        # k=2 micro-steps, one source each (sequential)
    assert [r["skipped_steps"] for r in m] == [0, 0]
