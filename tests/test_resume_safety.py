"""Safe resume (docs/training.md#resume, nexus_megatron/resume.py): a checkpoint records the resolved config,
the data fingerprint, the world layout and the run id; a resume that would change the run is refused with
every difference in one error, before anything in run_dir is written; the changeable settings and the
explicit override are accepted; `latest` must name a checkpoint of this run inside its checkpoints/."""
import hashlib
import json
import os
import re
import shutil

import pytest

from nexus_megatron.safe_load import FORMAT

from nexus_megatron.checkpoint import read_meta
from nexus_megatron.errors import CheckpointError, NexusConfigError
from nexus_megatron.resume import CHANGEABLE, check_resume, default_settings, run_record
from tests.conftest import read_metrics, write_synthetic_data
from tests.test_train import tiny_config

BASE = {"train.steps": 2, "train.eval_every": 0, "train.probe_every": 0}


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_hashed_data(path, tokenizer="tok-a", **kw):
    """Synthetic data with a manifest like prepare-data's: per-split path, token count and sha256, and a
    tokenizer hash (``tokenizer`` stands for the tokenizer file's content)."""
    write_synthetic_data(path, **kw)
    mf = os.path.join(path, "manifest.json")
    with open(mf) as f:
        man = json.load(f)
    man["tokenizer"] = {"kind": "synthetic", "vocab_size": man["vocab_size"],
                        "sha256": hashlib.sha256(tokenizer.encode()).hexdigest()}
    for name, info in man["sources"].items():
        info["files"] = {s: {"path": f"{name}/{s}.bin", "tokens": info[f"{s}_tokens"],
                             "sha256": _sha(os.path.join(path, name, f"{s}.bin"))}
                         for s in ("train", "val") if info[f"{s}_tokens"]}
    with open(mf, "w") as f:
        json.dump(man, f)
    return path


def run(data, run_dir, **over):
    from nexus_megatron.train import train
    return train(tiny_config(data, run_dir, **{**BASE, **over}))


def forbid_training(monkeypatch):
    import nexus_megatron.train as T

    def forbidden(*a, **k):
        raise AssertionError("a training step ran before the refused resume was reported")
    monkeypatch.setattr(T, "build_model", forbidden)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One 2-step run (plain engine, 1 process) with its checkpoint; each test resumes a copy of it."""
    tmp = tmp_path_factory.mktemp("resume_base")
    data = write_hashed_data(str(tmp / "data"))
    run(data, tmp / "run")
    return data, str(tmp / "run")


@pytest.fixture
def resumable(base, tmp_path):
    data, run_dir = base
    d = str(tmp_path / "data")
    shutil.copytree(data, d)
    r = str(tmp_path / "run")
    shutil.copytree(run_dir, r)
    return d, r


def test_checkpoint_records_the_run(base):
    data, run_dir = base
    meta = read_meta(os.path.join(run_dir, "checkpoints", "step_00000002"))
    rec = meta["run"]
    assert meta["step"] == 2
    assert rec["config"]["model"]["num_heads"] == 2 and rec["config"]["train"]["micro_steps"] == 2
    assert rec["world"] == {"size": 1, "layout": "sequential", "source_groups": None}
    assert rec["run_id"] == open(os.path.join(run_dir, "run_id")).read().strip()
    assert rec["data"]["tokenizer"] == hashlib.sha256(b"tok-a").hexdigest()
    assert rec["data"]["sources"]["code"]["train"] == {"sha256": _sha(os.path.join(data, "code", "train.bin")),
                                                       "tokens": 20000}
    assert set(rec["data"]["sources"]) == {"web", "code", "math", "poetry"}


# every setting that changes what the run computes, on its own -> refused, naming it
REFUSED = [
    ({"model.num_heads": 4}, "model.num_heads 2 -> 4"),
    ({"model.hidden_size": 32}, "model.hidden_size 16 -> 32"),
    ({"data.seq_len": 8}, "data.seq_len 16 -> 8"),
    ({"data.micro_batch_size": 1}, "data.micro_batch_size 2 -> 1"),
    ({"train.micro_steps": 3}, "train.micro_steps 2 -> 3"),
    ({"train.seed": 1}, "train.seed 0 -> 1"),
    ({"optim.lr": 0.02}, "optim.lr 0.01 -> 0.02"),
    ({"optim.schedule": "constant"}, 'optim.schedule "cosine" -> "constant"'),
    ({"optim.name": "adamw"}, 'optim.name "nexus" -> "adamw"'),
    ({"nexus.gamma": 0.5}, "nexus.gamma 0.25 -> 0.5"),
    ({"nexus.seed": 3}, "nexus.seed 0 -> 3"),
    ({"data.weights": "[1, 2, 1]"}, "data.weights null -> [1, 2, 1]"),
    ({"data.sources": "[web, code]"}, 'data.sources ["web", "code", "math"] -> ["web", "code"]'),
    ({"data.ood": "[]"}, 'data.ood ["poetry"] -> []'),
]


@pytest.mark.parametrize("over,shown", REFUSED, ids=[next(iter(o)) for o, _ in REFUSED])
def test_resume_that_changes_a_setting_is_refused(resumable, monkeypatch, over, shown):
    data, run_dir = resumable
    key = next(iter(over))
    with open(os.path.join(run_dir, "config.json"), "rb") as f:
        config_before = f.read()
    forbid_training(monkeypatch)
    with pytest.raises(NexusConfigError, match="^" + re.escape(f"resume would change the run of {run_dir}: {shown}; "
                                                               "use the same settings, a new train.run_dir, "
                                                               "train.resume=false to start over, or --allow-changed "
                                                               f"{key} (train.allow_changed) to resume anyway") + "$"):
        run(data, run_dir, **{"train.steps": 3, **over})
    with open(os.path.join(run_dir, "config.json"), "rb") as f:
        assert f.read() == config_before                      # config.json not overwritten
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_every_difference_in_one_error(resumable, monkeypatch):
    data, run_dir = resumable
    forbid_training(monkeypatch)
    with pytest.raises(NexusConfigError) as e:
        run(data, run_dir, **{"model.num_heads": 4, "train.micro_steps": 3, "optim.lr": 0.02, "train.steps": 3})
    msg = str(e.value)
    assert "\n" not in msg
    assert ": model.num_heads 2 -> 4, optim.lr 0.01 -> 0.02, train.micro_steps 2 -> 3; " in msg
    assert msg.endswith("--allow-changed model.num_heads,optim.lr,train.micro_steps (train.allow_changed) to resume "
                        "anyway")


def _rewrite_manifest(data, fn):
    mf = os.path.join(data, "manifest.json")
    with open(mf) as f:
        man = json.load(f)
    fn(man)
    with open(mf, "w") as f:
        json.dump(man, f)


def test_data_from_another_tokenizer_with_the_same_vocabulary_is_refused(resumable, monkeypatch):
    """Same vocab_size, same file sizes: only the tokenizer's hash tells that the ids now mean other text."""
    data, run_dir = resumable
    _rewrite_manifest(data, lambda m: m["tokenizer"].update(sha256=hashlib.sha256(b"tok-b").hexdigest()))
    forbid_training(monkeypatch)
    a, b = hashlib.sha256(b"tok-a").hexdigest()[:12], hashlib.sha256(b"tok-b").hexdigest()[:12]
    with pytest.raises(NexusConfigError, match=re.escape(f": data.fingerprint.tokenizer {a} -> {b}; ")):
        run(data, run_dir, **{"train.steps": 3})


def test_re_prepared_data_with_other_content_is_refused(resumable, tmp_path, monkeypatch):
    """data.path may change, the data may not: a re-prepared source (other text, a consistent manifest)."""
    data, run_dir = resumable
    other = write_hashed_data(str(tmp_path / "other"), seed=5)
    forbid_training(monkeypatch)
    old, new = _sha(os.path.join(data, "code", "train.bin"))[:12], _sha(os.path.join(other, "code", "train.bin"))[:12]
    with pytest.raises(NexusConfigError) as e:
        run(other, run_dir, **{"train.steps": 3})
    assert (f"data.fingerprint.code.train (sha256 {old}, 20000 tokens -> sha256 {new}, 20000 tokens)"
            in str(e.value))
    assert "data.path" not in str(e.value)


def test_another_world_layout_is_refused(base):
    """World size and source groups are part of the run (the data order and the reduction depend on them)."""
    data, run_dir = base
    from nexus_megatron.config import to_dict
    from nexus_megatron.data.shards import load_manifest
    cfg = tiny_config(data, run_dir, **BASE)
    for world, shown in ((2, "world.size 1 -> 2"), (4, "world.size 1 -> 4")):
        rec = run_record(to_dict(cfg), load_manifest(data), world)
        with pytest.raises(NexusConfigError, match=re.escape(f": {shown}; ")):
            check_resume(run_dir, rec, (), default_settings())
        assert check_resume(run_dir, rec, ("world",), default_settings())   # the override accepts it
    sp = tiny_config(data, run_dir, **{**BASE, "nexus.layout": "source-parallel"})
    rec = run_record(to_dict(sp), load_manifest(data), 6)
    with pytest.raises(NexusConfigError, match=re.escape(
            'nexus.layout "sequential" -> "source-parallel", world.size 1 -> 6, world.source_groups null -> '
            "[[0, 1], [2, 3], [4, 5]]; ")):
        check_resume(run_dir, rec, (), default_settings())


CHANGEABLE_CASES = [
    {"train.eval_every": 1}, {"train.eval_batches": 1}, {"train.probe_every": 1}, {"train.probe_batches": 1},
    {"train.checkpoint_every": 1}, {"train.log_every": 5}, {"train.progress": True},
    {"train.wandb.project": "other"}, {"train.collective_timeout_s": 30}, {"train.threads": 1},
    {"data.max_epochs": 2.0},
]


@pytest.mark.parametrize("over", CHANGEABLE_CASES, ids=[next(iter(o)) for o in CHANGEABLE_CASES])
def test_changeable_settings_resume(resumable, over):
    """train.steps (here 2 -> 3) and each other changeable setting: the run continues from step 2."""
    data, run_dir = resumable
    run(data, run_dir, **{"train.steps": 3, **over})
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["train"]["steps"] == 3   # config.json written once the check passed


def test_moved_run_and_moved_data_resume(resumable, tmp_path):
    data, run_dir = resumable
    moved_data, moved_run = str(tmp_path / "data2"), str(tmp_path / "run2")
    shutil.move(data, moved_data)
    shutil.move(run_dir, moved_run)
    run(moved_data, moved_run, **{"train.steps": 3})
    assert [r["step"] for r in read_metrics(moved_run)] == [1, 2, 3]


def test_changeable_list_is_documented():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "training.md")) as f:
        doc = f.read()
    for key in CHANGEABLE:
        assert f"`{key}`" in doc, key


def test_override_resumes_with_the_named_change(resumable):
    data, run_dir = resumable
    run(data, run_dir, **{"train.steps": 3, "optim.lr": 0.02, "train.allow_changed": "[optim.lr]"})
    m = read_metrics(run_dir)
    assert [r["step"] for r in m] == [1, 2, 3]
    meta = read_meta(os.path.join(run_dir, "checkpoints", "step_00000003"))
    assert meta["run"]["config"]["optim"]["lr"] == 0.02   # the new setting is the record from now on


def test_override_of_a_section(resumable):
    data, run_dir = resumable
    run(data, run_dir, **{"train.steps": 3, "optim.lr": 0.02, "optim.weight_decay": 0.0,
                          "train.allow_changed": "[optim]"})
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_cli_refusal_is_one_line_and_allow_changed_flag(resumable, capsys):
    from nexus_megatron.cli import main
    data, run_dir = resumable
    argv = ["train", "--set", f"data.path={data}", "--set", f"train.run_dir={run_dir}", "--set", "train.steps=3",
            "--set", "model.hidden_size=16", "--set", "model.num_layers=1", "--set", "model.num_heads=2",
            "--set", "data.sources=[web, code, math]", "--set", "data.ood=[poetry]", "--set", "data.seq_len=16",
            "--set", "data.micro_batch_size=2", "--set", "optim.lr=0.02", "--set", "optim.min_lr=0.001",
            "--set", "optim.warmup_steps=1", "--set", "train.micro_steps=2", "--set", "train.eval_every=0",
            "--set", "train.probe_every=0", "--set", "train.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"nexus-megatron: error: resume would change the run of {run_dir}: optim.lr 0.01 -> 0.02; ")
    assert main(argv + ["--allow-changed", "optim.lr"]) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


# -- `latest` must name a checkpoint of this run inside its checkpoints/ ------------------------------

def _point_latest(run_dir, name):
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(name)


@pytest.mark.parametrize("name", ["../../elsewhere/checkpoints/step_00000002", "/tmp/step_00000002",
                                  "step_00000002/../step_00000002", "other"])
def test_latest_outside_checkpoints_is_refused(resumable, monkeypatch, name):
    data, run_dir = resumable
    _point_latest(run_dir, name)
    forbid_training(monkeypatch)
    root = os.path.join(run_dir, "checkpoints")
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"{root}/latest names {name!r}, which is not a checkpoint of this run: 'latest' must name a "
            f"step_NNNNNNNN directory inside {root}; point it at one, or start a new train.run_dir") + "$"):
        run(data, run_dir, **{"train.steps": 3})


def test_latest_through_a_link_out_of_checkpoints_is_refused(resumable, tmp_path, monkeypatch):
    data, run_dir = resumable
    root = os.path.join(run_dir, "checkpoints")
    elsewhere = str(tmp_path / "elsewhere")
    shutil.move(os.path.join(root, "step_00000002"), elsewhere)
    os.symlink(elsewhere, os.path.join(root, "step_00000002"))
    forbid_training(monkeypatch)
    with pytest.raises(CheckpointError, match="not a checkpoint of this run"):
        run(data, run_dir, **{"train.steps": 3})


def test_another_runs_checkpoint_is_refused(resumable, base, tmp_path, monkeypatch):
    """A checkpoint copied in from another run (same settings, other run id) is not resumed."""
    data, run_dir = resumable
    other = str(tmp_path / "other")
    run(data, other)
    root = os.path.join(run_dir, "checkpoints")
    shutil.copytree(os.path.join(other, "checkpoints", "step_00000002"), os.path.join(root, "step_00000007"))
    _point_latest(run_dir, "step_00000007")
    mine = open(os.path.join(run_dir, "run_id")).read().strip()
    theirs = open(os.path.join(other, "run_id")).read().strip()
    assert mine != theirs
    forbid_training(monkeypatch)
    with pytest.raises(CheckpointError, match="^" + re.escape(
            f"{root}/latest names step_00000007, a checkpoint of another run (run id {theirs}, this run_dir's is "
            f"{mine}): point 'latest' at a checkpoint of this run, or start a new train.run_dir") + "$"):
        run(data, run_dir, **{"train.steps": 3})


def test_checkpoint_without_a_record_is_refused_unless_allowed(resumable, monkeypatch):
    data, run_dir = resumable
    path = os.path.join(run_dir, "checkpoints", "step_00000002")
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": 2, "format": FORMAT}, f)   # a safe-format checkpoint without a run record
    with pytest.raises(CheckpointError, match="has no run record"):
        run(data, run_dir, **{"train.steps": 3})
    run(data, run_dir, **{"train.steps": 3, "train.allow_changed": "[run]"})
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_resume_false_starts_a_new_run(resumable):
    """train.resume=false ignores the checkpoint and gives the run_dir a new id."""
    data, run_dir = resumable
    before = open(os.path.join(run_dir, "run_id")).read()
    run(data, run_dir, **{"train.resume": False, "model.num_heads": 4})
    assert open(os.path.join(run_dir, "run_id")).read() != before
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


# -- the DeepSpeed trainer engine: the same record in its checkpoints, the same check ----------------

def _ds_worker(rank, world, data, tmp):
    from nexus_megatron.train import train
    out = {}
    for optim in ("nexus", "adamw"):
        run_dir = os.path.join(tmp, f"ds-{optim}")
        over = {**BASE, "train.engine": "deepspeed", "optim.name": optim}
        train(tiny_config(data, run_dir, **over))
        try:
            train(tiny_config(data, run_dir, **{**over, "train.steps": 3, "optim.lr": 0.02}))
            out[optim] = None
        except NexusConfigError as e:
            out[optim] = str(e)
    # the override: the Nexus run continues to step 3 with the new lr
    train(tiny_config(data, os.path.join(tmp, "ds-nexus"), **{**BASE, "train.engine": "deepspeed", "train.steps": 3,
                                                              "optim.lr": 0.02, "train.allow_changed": "[optim.lr]"}))
    return out


def test_deepspeed_engine_resume_is_checked(base, tmp_path, monkeypatch):
    from tests.distributed import run_distributed
    data, _ = base
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    r0, r1 = run_distributed(_ds_worker, 2, data, str(tmp_path), timeout=600)
    for optim in ("nexus", "adamw"):
        run_dir = str(tmp_path / f"ds-{optim}")
        msg = (f"resume would change the run of {run_dir}: optim.lr 0.01 -> 0.02; use the same settings, a new "
               "train.run_dir, train.resume=false to start over, or --allow-changed optim.lr (train.allow_changed) "
               "to resume anyway")
        assert r0[optim] == msg and r1[optim] == msg
        meta = read_meta(os.path.join(run_dir, "checkpoints", "step_00000002"))
        assert meta["step"] == 2 and meta["run"]["config"]["train"]["engine"] == "deepspeed"
        assert meta["run"]["world"] == {"size": 2, "layout": "sequential", "source_groups": None}
        assert meta["run"]["run_id"] == open(os.path.join(run_dir, "run_id")).read().strip()
    m = read_metrics(tmp_path / "ds-nexus")
    assert [r["step"] for r in m] == [1, 2, 3]
    assert read_meta(str(tmp_path / "ds-nexus" / "checkpoints" / "step_00000003"))["run"]["config"]["optim"]["lr"] == 0.02
    # one process resuming the two-process checkpoint: refused
    from nexus_megatron.config import to_dict
    from nexus_megatron.data.shards import load_manifest
    cfg = tiny_config(data, str(tmp_path / "ds-adamw"), **{**BASE, "train.engine": "deepspeed", "optim.name": "adamw"})
    with pytest.raises(NexusConfigError, match=re.escape(": world.size 2 -> 1; ")):
        check_resume(str(tmp_path / "ds-adamw"), run_record(to_dict(cfg), load_manifest(data), 1), (),
                     default_settings())
