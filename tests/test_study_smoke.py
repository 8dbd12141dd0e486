"""configs/study_smoke.yaml end to end on synthetic data (4 sources named like the real ones): the lr sweep and its
pre-registered selection, every arm (sequential, mixed micro-batches, gamma -> 0, and the three 4-process
source-parallel arms), the dense matched continuation and its interpolated primary endpoint, the mechanism
measures and the report; then a rerun that skips everything. It proves the pipeline runs, nothing about Nexus.
About 1.5 minutes on 2 idle cores (an estimate: 13 processes, 3 of them torchrun jobs of 4 ranks; much longer
on a loaded machine)."""
import argparse
import json
import os

import pytest

from nexus_megatron.data.synthetic import write_synthetic_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("code", "math", "prose", "dictionary")


def test_study_smoke_config_runs_every_arm_and_measure(tmp_path, capsys):
    from nexus_megatron.study.runner import experiment
    from nexus_megatron.study.spec import arm_config, load_study
    data = write_synthetic_data(str(tmp_path / "data"), train_tokens=12000, val_tokens=2400, sources=SOURCES,
                                ood=("shakespeare",))
    out = tmp_path / "study"
    sets = [f"study.out={out}", f"run.data.path={data}", "study.prepare.enabled=false"]
    args = argparse.Namespace(config=os.path.join(ROOT, "configs", "study_smoke.yaml"), set=sets, only=None)
    assert experiment(args) == 0
    st = load_study(args.config, sets)
    sel = json.load(open(out / "lr_sweep" / "selected.json"))
    assert sel["selected"] in (1e-3, 3e-3, 1e-2) and set(sel["mean_id_loss"]) == {"0.001", "0.003", "0.01"}
    for arm in ("adamw", "adamw_sp"):       # the swept arms train at the selected lr
        assert arm_config(st, arm, 0).optim.lr == pytest.approx(sel["selected"])
        cfg = json.load(open(out / arm / "seed0" / "config.json"))
        assert cfg["optim"]["lr"] == pytest.approx(sel["selected"])
    tokens = set()
    for arm in st.arms:
        for seed in st.study.seeds:
            s = json.load(open(out / arm / f"seed{seed}" / "summary.json"))
            tokens.add(s["tokens"])
            assert s["world_size"] == st.arms[arm].nproc
    assert tokens == {4 * 4 * 4 * 32}
    assert json.load(open(out / "nexus_mixed" / "seed0" / "config.json"))["data"]["mixed_micro_batches"] is True
    for seed in st.study.seeds:
        m = json.load(open(out / "adamw_matched" / f"seed{seed}" / "match.json"))
        steps = [c[0] for c in m["curve"]]
        assert steps == list(range(4, 4 + len(steps)))        # evaluated at every step of the continuation
        assert (m["ood_at_target"] is None) == (not m["reached"])
        if m["reached"]:
            assert 0 <= m["extra_steps_at_target"] <= m["extra_steps"]
        for arm in ("adamw", "nexus_seq"):
            mech = json.load(open(out / arm / f"seed{seed}" / "mechanisms.json"))
            assert set(mech["cosine"]["corrected"]) == {f"{a}|{b}" for i, a in enumerate(SOURCES) for b in SOURCES[i + 1:]}
            assert set(mech["interference"]["matrix"]) == set(SOURCES)
            assert set(mech["interference"]["matrix"]["code"]) == set(SOURCES) | {"shakespeare"}
            assert len(mech["barriers"]["pairs"]) == 6 and len(mech["barriers"]["alphas"]) == 3
            assert set(mech["relative_sharpness"]["math"]) >= set(SOURCES)
    report = (out / "report" / "results.md").read_text()
    for title in ("Primary endpoint (pre-registered)", "pre-registered sweep", "Mechanism measures",
                  "Interference matrix", "Reading (pre-registered rule)"):
        assert title in report
    capsys.readouterr()
    assert experiment(args) == 0                                 # rerun: nothing trains again
    assert "jobs already done; 0 to run" in capsys.readouterr().out
