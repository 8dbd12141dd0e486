"""Every input error is one line and exit status 2, by class (docs/reliability.md, by class): each test
covers a whole class, most of them generically (every declared setting, every way a file can be unusable),
rather than one row. The CLI form is checked with ``one_line``: status 2, a single stderr line
``nexus-megatron: error: ...``, no traceback."""
import dataclasses
import json
import os
import socket

import pytest

from nexus_megatron.cli import main
from nexus_megatron.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, WandbConfig, load_config
from nexus_megatron.errors import CheckpointError, NexusConfigError
from tests.conftest import write_synthetic_data

SECTIONS = [("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig), ("train", TrainConfig),
            ("train.wandb", WandbConfig)]
SETTINGS = [(f"{where}.{f.name}", f.metadata["rule"]) for where, cls in SECTIONS
            for f in dataclasses.fields(cls) if "rule" in f.metadata]


def deny(monkeypatch, module, *, opens=None, makedirs=None):
    """Permission denied (EACCES) for ``module``'s own ``open`` of paths containing ``opens`` or its
    ``os.makedirs`` of paths containing ``makedirs``: what a read-only file or directory gives a non-root user,
    simulated so the case runs the same for every user (CI runs as root, which chmod does not stop)."""
    import builtins
    import errno

    def fail(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    if opens is not None:
        def fake_open(path, *a, **k):
            if opens in str(path):
                fail(path)
            return builtins.open(path, *a, **k)
        monkeypatch.setattr(module, "open", fake_open, raising=False)
    if makedirs is not None:
        real = os.makedirs

        def fake_makedirs(path, *a, **k):
            if makedirs in str(path):
                fail(path)
            return real(path, *a, **k)
        monkeypatch.setattr(module.os, "makedirs", fake_makedirs)


def one_line(rc, capsys, start):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("nexus-megatron: error: " + start), lines[0]
    return lines[0]


def test_every_setting_of_these_sections_declares_a_rule():
    """A new setting without a rule would reach the model unchecked (the nexus and sharpness sections have
    their own validation)."""
    missing = [f"{w}.{f.name}" for w, cls in SECTIONS for f in dataclasses.fields(cls)
               if "rule" not in f.metadata and not dataclasses.is_dataclass(f.default_factory() if callable(
                   f.default_factory) else f.default)]
    assert not missing


# -- class: a value of the wrong type, for every declared setting ------------------------------------

@pytest.mark.parametrize("key", [k for k, _ in SETTINGS])
def test_wrong_type_for_every_setting(key):
    with pytest.raises(NexusConfigError, match="^" + key.replace(".", r"\.") + "="):
        load_config(None, [f"{key}={{a: 1}}"])     # a mapping where a value is expected


@pytest.mark.parametrize("key", [k for k, r in SETTINGS if r.kind == "bool"])
def test_quoted_bool_is_an_error_not_truthy(key):
    """A quoted "false" is a string; before, `train.resume: "false"` resumed."""
    with pytest.raises(NexusConfigError, match=f"^{key}='false': must be true or false"):
        load_config(None, [f'{key}="false"'])


def _out_of_range(r):
    if r.lo is not None:
        return r.lo if r.lo_open else r.lo - 1
    return r.hi if r.hi_open else r.hi + 1


@pytest.mark.parametrize("key,rule", [(k, r) for k, r in SETTINGS if r.kind in ("int", "float")
                                      and (r.lo is not None or r.hi is not None)], ids=lambda x: str(x)[:40])
def test_out_of_range_for_every_numeric_setting(key, rule):
    bad = [_out_of_range(rule)]
    if rule.lo is not None and rule.hi is not None:
        bad.append(rule.hi if rule.hi_open else rule.hi + 1)
    for v in bad:
        with pytest.raises(NexusConfigError, match=f"^{key}={v!r}: must be"):
            load_config(None, [f"{key}={v}", "optim.warmup_steps=0", "optim.min_lr=0"]
                        if key not in ("optim.warmup_steps", "optim.min_lr") else [f"{key}={v}"])


@pytest.mark.parametrize("key", [k for k, r in SETTINGS if r.kind == "float"])
def test_strings_for_floats(key):
    with pytest.raises(NexusConfigError, match=f"^{key}='abc': must be a finite number"):
        load_config(None, [f"{key}=abc"])


def test_numeric_string_for_a_float_is_read_as_a_number():
    """YAML 1.1 reads 3e-4 (no dot) as a string; a float setting takes it as the number."""
    assert load_config(None, ["optim.lr=3e-4"]).optim.lr == 3e-4
    assert load_config(None, ["optim.lr='0.5'"]).optim.lr == 0.5


@pytest.mark.parametrize("override,msg", [
    ("data.sources=[[web, code]]", "data.sources: ['web', 'code'] is not a source name"),
    ("data.sources={web: 1}", "data.sources={'web': 1}: must be a non-empty list of prepared source names"),
    ("data.ood=web", "data.ood='web': must be a list of prepared source names"),
    ("data.weights=[1, a]", "data.weights=[1, 'a']: must be a list of finite numbers"),
    ("data.weights=[[1], 2]", "data.weights=[[1], 2]: must be a list of finite numbers"),
    ("model.hidden_size=null", "model.hidden_size=null: give a value"),
    ("model.hidden_size='64'", "model.hidden_size='64': must be an integer >= 1"),
    ("train.steps=1e3", "train.steps='1e3': must be an integer >= 1"),
    ("model.init_std=0", "model.init_std=0: must be > 0"),
    ("model.rope_theta=0", "model.rope_theta=0: must be > 0"),
    ("train.run_dir=''", "train.run_dir='': must be a non-empty string"),
])
def test_nested_and_mistyped_values(override, msg):
    with pytest.raises(NexusConfigError, match="^" + msg.replace("[", r"\[").replace("(", r"\(")
                       .replace("{", r"\{").replace("|", r"\|").replace(".", r"\.")):
        load_config(None, [override])


# -- class: source names (directories under data.path, parts of metric keys) -------------------------

@pytest.mark.parametrize("name", ["a|b", "a/b", "..", "../etc", ".hidden", "web code", "ood", ""])
@pytest.mark.parametrize("key", ["data.sources", "data.ood"])
def test_source_names_that_collide_or_escape(key, name):
    other = "data.ood=[]" if key == "data.sources" else "data.sources=[web]"
    with pytest.raises(NexusConfigError, match=f"^{key}: .* is not a source name: use letters, digits"):
        load_config(None, [f"{key}={json.dumps([name])}", other])


def test_cli_setting_errors_are_one_line(capsys):
    one_line(main(["train", "--set", 'train.resume="false"']), capsys, "train.resume='false'")
    one_line(main(["train", "--set", "data.sources=[a|b]"]), capsys, "data.sources: 'a|b' is not a source name")
    one_line(main(["train", "--nproc", "0"]), capsys, "--nproc 0: must be >= 1")


# -- class: a config file that cannot be used ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["directory", "binary", "nul", "list", "unreadable", "missing", "bad-yaml"])
def test_config_file_unusable(tmp_path, capsys, monkeypatch, kind):
    p = tmp_path / "c.yaml"
    if kind == "directory":
        p.mkdir()
    elif kind == "binary":
        p.write_bytes(bytes(range(256)) * 4)
    elif kind == "nul":
        p.write_bytes(b"model:\x00\n")
    elif kind == "list":
        p.write_text("- model\n- data\n")
    elif kind == "unreadable":
        import nexus_megatron.faults as F   # config.read_config_file reads through faults.read_file_bytes
        p.write_text("model: {}\n")
        deny(monkeypatch, F, opens=str(p))
    elif kind == "bad-yaml":
        p.write_text("optim: {lr: [1,\n")
    line = one_line(main(["train", "--config", str(p)]), capsys, f"--config {p}: ")
    assert {"directory": "is a directory", "binary": "not a text file", "nul": "not a text file",
            "list": "holds a list, not a mapping", "unreadable": "cannot be read", "missing": "no such file",
            "bad-yaml": "not valid YAML"}[kind] in line


# -- class: a run_dir that cannot be used (before any compute) ----------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_data(str(tmp_path_factory.mktemp("classes") / "data"))


def tiny(data, run_dir, *more):
    sets = [f"data.path={data}", "data.sources=[web, code, math]", "data.ood=[poetry]", f"train.run_dir={run_dir}",
            "model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "data.seq_len=16",
            "data.micro_batch_size=2", "train.micro_steps=2", "train.steps=2", "optim.warmup_steps=1",
            "train.eval_every=0", "train.probe_every=0", "train.progress=false", *more]
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture
def no_compute(monkeypatch):
    import nexus_megatron.launcher as launcher
    import nexus_megatron.train as T

    def forbidden(*a, **k):
        raise AssertionError("compute (or a worker) started before the bad input was reported")
    monkeypatch.setattr(T, "build_model", forbidden)
    monkeypatch.setattr(launcher, "run_job", forbidden)


@pytest.mark.parametrize("nproc", ["1", "2"])
@pytest.mark.parametrize("kind", ["a-file", "read-only-fs", "read-only-parent", "read-only-dir"])
def test_run_dir_unusable(data, tmp_path, capsys, monkeypatch, no_compute, kind, nproc):
    import nexus_megatron.train as T
    run = tmp_path / "parent" / "run"
    run.parent.mkdir()
    if kind == "a-file":
        run.write_text("x")
    elif kind == "read-only-fs":   # what makedirs raises on a read-only mount (EROFS)
        import errno

        def erofs(path, *a, **k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        monkeypatch.setattr(T.os, "makedirs", erofs)
    elif kind == "read-only-parent":
        deny(monkeypatch, T, makedirs=str(run))
    else:
        run.mkdir()
        (run / "checkpoints").mkdir()
        deny(monkeypatch, T, opens=str(run / ".write-test-"))
    line = one_line(main(["train", "--nproc", nproc, *tiny(data, run)]), capsys, f"train.run_dir={str(run)!r}")
    assert {"a-file": "is a file, not a directory", "read-only-parent": "cannot be created",
            "read-only-fs": "cannot be created (Read-only file system",
            "read-only-dir": "is not writable"}[kind] in line


# -- class: what the launching command checks before it starts any worker (--nproc N) ------------------

def test_master_port_in_use(data, tmp_path, capsys, monkeypatch, no_compute):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        from nexus_megatron.launcher import launch_torchrun
        with pytest.raises(NexusConfigError, match=f"^MASTER_PORT={port} is in use on this machine"):
            launch_torchrun(2, ["train"])
        one_line(main(["train", "--nproc", "2", *tiny(data, tmp_path / "r")]), capsys, f"MASTER_PORT={port} is in use")
    assert not (tmp_path / "r" / "run.lock").exists()   # released


@pytest.mark.parametrize("more,start", [
    (["nexus.layout=source-parallel"], "nexus.layout=source-parallel: 3 sources (web, code, math) but only 2"),
    (["train.steps=2000", "train.checkpoint_every=0"], "source 'web' has"),
    (["model.vocab_size=8"], "model.vocab_size=8 is smaller than the data's tokenizer vocabulary"),
    (["data.sources=[web, nope]"], "source 'nope' is not in"),
], ids=["layout-split", "data-budget", "vocab", "source"])
def test_checked_before_any_worker_starts(data, tmp_path, capsys, no_compute, more, start):
    one_line(main(["train", "--nproc", "2", *tiny(data, tmp_path / "r", *more)]), capsys, start)
    assert not (tmp_path / "r").exists()


def test_data_file_error_before_any_worker_starts(tmp_path, capsys, no_compute):
    d = write_synthetic_data(str(tmp_path / "d"))
    os.remove(os.path.join(d, "code", "val.bin"))
    one_line(main(["train", "--nproc", "2", *tiny(d, tmp_path / "r")]), capsys, "source 'code': ")


# -- class: an error only the workers can find, on every rank: printed once by the command -------------

def test_error_on_every_rank_is_printed_once(data, tmp_path):
    """Both ranks stop with the NaN abort (found during training): the command prints one line and exits 2
    (before: the message once per rank, then torchrun's 40-line ChildFailedError and exit 1)."""
    import subprocess

    from tests.conftest import ROOT
    from tests.fault_runs import cli_train, stray_workers
    from tests.test_faults import write_config
    config = write_config(tmp_path, data, tmp_path / "run", steps=4, checkpoint_every=1)
    with open(config) as f:
        cfg = json.load(f)
    cfg["nexus"] = {"max_consecutive_skips": 2}
    with open(config, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", NEXUS_FAULT_INJECT="nan_steps=2:3")
    env.pop("MASTER_PORT", None)
    r = subprocess.run(cli_train(config), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith(
        "nexus-megatron: error: 2 outer steps in a row had NaN/Inf gradients (nexus.max_consecutive_skips=2)"), err
    assert not stray_workers(config)


def test_two_jobs_started_together_both_run(data, tmp_path):
    """Two `train --nproc 2` commands started at the same moment on one machine, MASTER_PORT unset: both run.
    Before, both found the fixed default port 29531 free, both handed it to torchrun, and one died with
    EADDRINUSE and a traceback (rc 1): torchrun now runs --standalone, its rendezvous on a port the OS picks."""
    import subprocess

    from tests.conftest import ROOT
    from tests.fault_runs import cli_train
    from tests.test_faults import write_config
    configs = [write_config(tmp_path, data, tmp_path / f"run{i}", steps=2, checkpoint_every=0) for i in range(2)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("MASTER_PORT", None)
    jobs = [subprocess.Popen(cli_train(c), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for c in configs]
    outs = [j.communicate(timeout=600) for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], [err[-3000:] for _, err in outs]
    for i in range(2):
        assert (tmp_path / f"run{i}" / "metrics.jsonl").exists()


# -- class: files this package wrote, read back ------------------------------------------------------

@pytest.mark.parametrize("content,msg", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a prepare-data manifest"),
    ('{"vocab_size": 64, "sources": {"web": {"kind": "train"}}}', "source 'web' has no token dtype"),
    (b"\xff\xfe\x00", "is not valid JSON"),
], ids=["not-json", "a-list", "no-dtype", "binary"])
def test_malformed_manifest(tmp_path, capsys, no_compute, content, msg):
    d = write_synthetic_data(str(tmp_path / "d"))
    mf = os.path.join(d, "manifest.json")
    (open(mf, "wb").write(content) if isinstance(content, bytes) else open(mf, "w").write(content))
    line = one_line(main(["train", *tiny(d, tmp_path / "r")]), capsys, mf)
    assert msg in line and "re-run `nexus-megatron prepare-data`" in line


def _finished_run(tmp_path, name, steps=3):
    run = tmp_path / name
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"optimizer": "nexus", "steps": steps, "tokens": 10, "params": 1,
                                                  "wall_s": 1.0, "skipped_steps": 0, "skipped_sources": 0,
                                                  "final": {"eval/loss": 3.0}}))
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 4.0 - s / 10}) + "\n")
    return run


def test_compare_tolerates_a_partial_last_line_and_rejects_corruption(tmp_path, capsys):
    run = _finished_run(tmp_path, "nexus")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')                      # the run stopped while writing step 4
    assert main(["compare", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {run / 'metrics.jsonl'}: the last line (4) is incomplete" in err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]                           # damage in the middle
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    one_line(main(["compare", str(run)]), capsys, f"{run / 'metrics.jsonl'} line 2 is not a JSON object")
    (run / "summary.json").write_text('{"optimizer": "nexus"}')
    one_line(main(["compare", str(run)]), capsys, f"{run / 'summary.json'} is not a run summary (missing final")
    (run / "summary.json").write_text("{")
    one_line(main(["compare", str(run)]), capsys, f"{run / 'summary.json'} is not valid JSON")


def test_sharpness_on_a_directory_without_a_model(tmp_path, capsys):
    tok = tmp_path / "tokenizer_only"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{}")
    from nexus_megatron.sharpness_cli import resolve_model
    with pytest.raises(NexusConfigError, match=r"the directory has no config\.json and weights"):
        resolve_model(str(tok))
    one_line(main(["sharpness", "--model", str(tok), "--data", str(tmp_path)]), capsys, f"--model {tok}: ")


def test_deepspeed_checkpoint_missing_one_ranks_file(tmp_path):
    """The files are named by DeepSpeed's data-parallel rank: 2 ranks expect zero_pp_rank_0 and _1; under the
    source-parallel layout with one rank per source group DeepSpeed's data-parallel size is 1 (one file)."""
    import nexus_megatron.engines.deepspeed.adapter as A
    d = tmp_path / "step_00000002"
    d.mkdir()
    for name in ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]:
        (d / name).write_bytes(b"x")
    A._check_rank_files(str(tmp_path), "step_00000002", 1)
    with pytest.raises(CheckpointError, match=r"^checkpoint .*step_00000002 is incomplete: .*zero_pp_rank_1_mp_rank_00_"
                                              r"optim_states\.pt \(rank 1's file\) is missing; delete "):
        A._check_rank_files(str(tmp_path), "step_00000002", 2)
    (d / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
    A._check_rank_files(str(tmp_path), "step_00000002", 2)


def test_an_integer_beyond_the_float_range_is_not_finite():
    with pytest.raises(NexusConfigError, match=r"^optim\.lr=1000+: must be a finite number$"):
        load_config(None, ["optim.lr=1" + "0" * 400])
