"""Every bad setting is an error that names the setting, raised before any compute."""
import pytest

from nexus_megatron.config import load_config
from nexus_megatron.errors import NexusConfigError


def test_defaults_and_repo_configs_load():
    import glob
    import os
    cfg = load_config(None)
    assert cfg.optim.name == "nexus" and cfg.nexus.layout == "sequential"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(f for f in glob.glob(os.path.join(root, "configs", "*.yaml"))
                   if not os.path.basename(f).startswith("study"))   # studies: tests/test_experiment.py
    assert {os.path.basename(f) for f in files} >= {"tiny.yaml", "quickstart.yaml", "130m.yaml", "1b.yaml", "3b.yaml", "7b.yaml"}
    for f in files:
        load_config(f)


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1e-3", r"unknown setting 'optim.lrr'; did you mean 'optim.lr'"),
    ("nexus.gama=0.1", r"did you mean 'nexus.gamma'"),
    ("modle.hidden_size=8", r"unknown setting 'modle'; did you mean 'model'"),
    ("optim.name=adam", r"optim.name='adam'"),
    ("nexus.layout=parallel", r"nexus.layout='parallel'"),
    ("nexus.gamma=-0.5", r"nexus.gamma=-0.5"),
    ("nexus.gamma=0", r"nexus.gamma=0"),
    ("nexus.gamma_mode=relative", r"nexus.gamma_mode"),
    ("train.micro_steps=0", r"train.micro_steps=0"),
    ("train.steps=-3", r"train.steps=-3"),
    ("data.sources=[]", r"data.sources"),
    ("data.ood=[code]", r"also in data.sources"),
    ("data.seq_len=0", r"data.seq_len"),
    ("data.micro_batch_size=1.5", r"data.micro_batch_size"),
    ("data.max_epochs=0", r"data.max_epochs"),
    ("optim.lr=0", r"optim.lr"),
    ("optim.min_lr=1", r"optim.min_lr=1 is above optim.lr"),
    ("optim.beta2=1.0", r"optim.beta2"),
    ("optim.schedule=linear", r"optim.schedule"),
    ("optim.warmup_steps=500", r"optim.warmup_steps=500 is not below train.steps"),
    ("model.num_heads=3", r"model.hidden_size=128 is not divisible by model.num_heads=3"),
    ("model.num_kv_heads=3", r"num_kv_heads"),
    ("train.wandb.mode=cloud", r"train.wandb.mode"),
    ("train.wandb.entity=me", r"unknown setting 'train.wandb.entity'"),
    ("optim.lr", r"section.key=value"),
])
def test_bad_setting_names_the_key(override, match):
    with pytest.raises(NexusConfigError, match=match):
        load_config(None, [override])


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim: {lr: [1,\n")
    with pytest.raises(NexusConfigError, match="not valid YAML"):
        load_config(str(p))
    with pytest.raises(NexusConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_cli_reports_config_errors_without_traceback(capsys):
    from nexus_megatron.cli import main
    assert main(["train", "--set", "nexus.gama=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'nexus.gamma'" in err and "Traceback" not in err


def test_cli_layout_error_before_compute(tmp_path, capsys):
    """source-parallel with 3 sources on 1 rank: an error naming nexus.layout, before the model is built."""
    from nexus_megatron.cli import main
    from tests.conftest import write_synthetic_data
    data = write_synthetic_data(str(tmp_path / "d"))
    rc = main(["train", "--set", f"data.path={data}", "--set", "data.sources=[web, code, math]",
               "--set", "data.ood=[poetry]", "--set", "nexus.layout=source-parallel",
               "--set", f"train.run_dir={tmp_path / 'r'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nexus.layout=source-parallel" in err and "3 sources" in err
    assert not (tmp_path / "r").exists()
