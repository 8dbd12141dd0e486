"""The study: the random-direction control of Nexus (step lengths, pseudo-gradient, determinism, ranks
agree), the study configuration's checks, the job runner, and the experiment command end to end on
synthetic data (runs, matched continuation, analyses, report, skip on rerun)."""
import argparse
import json
import os
import sys

import pytest
import torch

from nexus_megatron.errors import NexusConfigError
from nexus_megatron.layout import LayoutConfig, build_layout
from nexus_megatron.nexus import Nexus, NexusConfig, hash_control_seed, random_direction
from tests.distributed import run_distributed

# ---------------------------------------------------------------------------------------------------
# the random-direction control


def _toy(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _batches(k, seed=1, n=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)) for _ in range(k)]


def _run_control(model, k=3, steps=2, sources=("a", "b"), control="random_direction", control_seed=0,
                 gamma=0.05, batches=None, record=None):
    lay = build_layout(LayoutConfig(mode="sequential", sources=sources))
    outer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = Nexus(model.parameters(), outer, lay, NexusConfig(gamma=gamma, gamma_mode="absolute", control=control,
                                                            control_seed=control_seed), micro_steps=k)
    for t in range(steps):
        for m, (x, y) in enumerate(batches or _batches(k, seed=t)):
            src = lay.source_for(t, m)
            if record is not None:
                record.append(("before", _flat(model)))
            ((model(x) - y) ** 2).mean().mul(1.0 + src).backward()
            opt.inner_step(src)
            if record is not None:
                record.append(("after", _flat(model)))
        info = opt.step()
        if record is not None:
            record.append(("G", info))
    return opt


def test_random_direction_steps_have_the_inner_step_length_and_G_sums_the_normalized_gradients():
    model = _toy()
    k, gamma = 3, 0.05
    batches = _batches(k)
    theta0 = _flat(model)
    lay = build_layout(LayoutConfig(mode="sequential", sources=("a", "b")))
    outer = torch.optim.SGD(model.parameters(), lr=1.0)    # theta1 = theta0 - G: G can be read off
    opt = Nexus(model.parameters(), outer, lay, NexusConfig(gamma=gamma, gamma_mode="absolute",
                                                            control="random_direction"), micro_steps=k)
    expected_G = torch.zeros_like(theta0)
    point = theta0.clone()
    for m, (x, y) in enumerate(batches):
        assert torch.equal(_flat(model), point)            # the forward pass sees the random path
        src = lay.source_for(0, m)
        loss = ((model(x) - y) ** 2).mean().mul(1.0 + src)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)])
        loss.backward()
        opt.inner_step(src)
        d = g / g.norm()
        expected_G += d / k
        moved = theta0 + opt.random_delta[: theta0.numel()]   # theta_t + R: the next forward point
        if m < k - 1:
            assert torch.allclose(_flat(model), moved, atol=1e-7)
        # (after the k-th micro-step the parameters are left as they are: step() writes theta_t over them)
        step = moved - point
        assert float(step.norm()) == pytest.approx(gamma * float(d.norm()), rel=1e-5)   # same length ...
        assert abs(float(torch.dot(step, d)) / float(step.norm())) < 0.9                 # ... not the gradient's direction
        r = random_direction(d, d.numel(), hash_control_seed(0, 0, m + 1))
        assert torch.allclose(step, -gamma * r, atol=1e-6)
        point = moved
    opt.step()
    assert torch.allclose(theta0 - _flat(model), expected_G, atol=1e-5)   # the pseudo-gradient: mean of the d_m


def _after(**kw):
    m = _toy()
    _run_control(m, **kw)
    return _flat(m)


def test_random_direction_is_deterministic_and_seeded():
    a, b, c = _after(control_seed=0), _after(control_seed=0), _after(control_seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, _after(control="none"))        # the control is not plain Nexus


def test_random_direction_norm_uses_the_norm_segments_and_padding():
    d = torch.tensor([3.0, 4.0, 100.0, 0.0])       # last element: padding; third: excluded from the norm
    r = random_direction(d, 3, seed=5, segments=[(0, 2)])
    assert float(r[:2].norm()) == pytest.approx(5.0, rel=1e-6)
    assert r[3] == 0.0
    assert torch.equal(r, random_direction(d, 3, seed=5, segments=[(0, 2)]))


def _control_worker(rank, world, layout, k, steps):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    sources = ("a", "b")
    lay = build_layout(LayoutConfig(mode=layout, sources=sources))
    outer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = Nexus(model.parameters(), outer, lay, NexusConfig(gamma=0.05, gamma_mode="absolute",
                                                            control="random_direction"), micro_steps=k)
    g = torch.Generator().manual_seed(1)
    data = [[(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(world)]
            for _ in range(steps * k)]
    points = []
    for t in range(steps):
        for m in range(k):
            src = lay.source_for(t, m)
            x, y = data[t * k + m][rank]
            ((model(x) - y) ** 2).mean().mul(1.0 + src).backward()
            opt.inner_step(src)
            points.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        opt.step()
    return {"final": torch.cat([p.detach().reshape(-1) for p in model.parameters()]), "points": torch.stack(points)}


@pytest.mark.parametrize("layout", ["sequential", "source-parallel"])
def test_random_direction_ranks_agree(layout):
    r0, r1 = run_distributed(_control_worker, 2, layout, 3, 2)
    assert torch.equal(r0["points"], r1["points"])         # every inner point, bitwise
    assert torch.equal(r0["final"], r1["final"])


def test_control_settings_are_checked():
    from nexus_megatron.config import load_config
    with pytest.raises(NexusConfigError, match="nexus.control='sideways'"):
        load_config(None, ["nexus.control=sideways"])
    with pytest.raises(NexusConfigError, match="needs optim.name=nexus"):
        load_config(None, ["nexus.control=random_direction", "optim.name=adamw"])
    with pytest.raises(NexusConfigError, match="nexus.control"):
        NexusConfig(control="sideways")
    assert load_config(None, ["nexus.control=random_direction"]).nexus.control == "random_direction"


# ---------------------------------------------------------------------------------------------------
# the study configuration and the job runner

STUDY = {
    "study": {"seeds": [0], "slots": 2, "reference": "adamw", "prepare": {"enabled": False}},
    "run": {
        "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "vocab_size": 320},
        "data": {"sources": ["web", "code"], "ood": ["poetry"], "seq_len": 16, "micro_batch_size": 2},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 4, "micro_steps": 2, "eval_every": 2, "probe_every": 2, "eval_batches": 2,
                  "probe_batches": 2, "threads": 1},
        "sharpness": {"enabled": True, "every": 2, "batches": 2},
    },
    "arms": {
        "adamw": {"set": {"optim.name": "adamw"}},
        "nexus_seq": {"set": {"optim.name": "nexus"}},
        "nexus_sp": {"nproc": 2, "set": {"optim.name": "nexus", "nexus.layout": "source-parallel",
                                         "data.micro_batch_size": 1, "train.eval_batches": 4,
                                         "train.probe_batches": 4, "sharpness.batches": 4}},
    },
    "matched": {"arm": "adamw", "target": "nexus_seq", "chunk_steps": 2, "max_extra_steps": 4},
    "downstream": {"tasks": ["gsm_heldout"], "items": 4},
    "minima": {"arms": ["adamw", "adamw_matched", "nexus_seq"], "steps": 2, "batch_size": 2, "eval_batches": 1,
               "points": 3},
}


def _study(tmp_path, data, **sets):
    from nexus_megatron.study.runner import load_study
    raw = json.loads(json.dumps(STUDY))
    raw["study"]["out"] = str(tmp_path / "study")
    raw["run"]["data"]["path"] = data
    return load_study(None, [f"{k}={v}" for k, v in sets.items()], raw=raw), raw


def test_study_config_errors(synthetic_data, tmp_path):
    _study(tmp_path, synthetic_data)
    with pytest.raises(NexusConfigError, match="different numbers of tokens"):
        _study(tmp_path, synthetic_data, **{"arms.nexus_sp.nproc": 4})
    with pytest.raises(NexusConfigError, match="evaluate on different sequences"):
        _study(tmp_path, synthetic_data, **{"arms.nexus_sp.set.train.eval_batches": 2})
    with pytest.raises(NexusConfigError, match="unknown setting 'minima.step'"):
        _study(tmp_path, synthetic_data, **{"minima.step": 3})
    with pytest.raises(NexusConfigError, match="matched.target='nexus'"):
        _study(tmp_path, synthetic_data, **{"matched.target": "nexus"})
    with pytest.raises(NexusConfigError, match="arm 'adamw', seed 0: .*optim.lr"):
        _study(tmp_path, synthetic_data, **{"arms.adamw.set": "{optim.name: adamw, optim.lr: -1}"})
    with pytest.raises(NexusConfigError, match="multiple of 2"):
        _study(tmp_path, synthetic_data, **{"arms.nexus_sp.nproc": 3, "arms.nexus_sp.set.data.micro_batch_size": 1})


@pytest.mark.parametrize("name", ["study_cpu.yaml"])
def test_shipped_study_configs_are_valid(name):
    """Every arm x seed of the shipped studies passes the run-config checks, with equal tokens and the
    same evaluation sequences in every arm."""
    from nexus_megatron.study.runner import arm_config, load_study
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    st = load_study(os.path.join(root, "configs", name))
    assert len(st.study.seeds) >= 3 and {"adamw", "nexus_seq", "gamma0", "k1", "random_dir"} <= set(st.arms)
    assert arm_config(st, "random_dir", 1).nexus.control == "random_direction"
    assert arm_config(st, "gamma0", 2).nexus.gamma == 1e-6 and arm_config(st, "k1", 0).train.micro_steps == 1
    assert arm_config(st, "adamw", 2).train.seed == 2


def _llama_params(h, layers, vocab):
    inter = -(-int(8 * h / 3) // 64) * 64
    return vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h


@pytest.mark.parametrize("name", ["study.yaml", "study_smoke.yaml", "study_gpu_45m.yaml", "study_gpu_130m.yaml"])
def test_pre_registered_study_configs(name):
    """The issue-19 studies: every arm (swept AdamW, stratified AdamW, Nexus sequential, mixed micro-batches,
    gamma -> 0, and the three source-parallel arms), the lr sweep on separate seeds, dense matching, mechanisms;
    the GPU designs at 45M / 124M parameters and ~20 tokens per parameter."""
    from nexus_megatron.study.runner import arm_config, load_study
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    st = load_study(os.path.join(root, "configs", name))
    assert set(st.arms) == {"adamw", "adamw_sp", "nexus_seq", "nexus_mixed", "gamma0", "nexus_sp", "sp_gamma0"}
    assert st.lr_sweep.enabled and len(st.lr_sweep.values) == 3 and set(st.lr_sweep.apply_to) == {"adamw", "adamw_sp"}
    assert not set(st.lr_sweep.seeds) & set(st.study.seeds)
    assert st.matched.eval_every >= 1 and st.mechanisms.enabled
    assert arm_config(st, "nexus_mixed", 0).data.mixed_micro_batches
    sp = arm_config(st, "adamw_sp", 0)
    assert sp.optim.name == "adamw" and sp.nexus.layout == "source-parallel" and st.arms["adamw_sp"].nproc == 4
    if name != "study_smoke.yaml":
        assert len(st.study.seeds) >= 10
    if name.startswith("study_gpu"):
        m, c = arm_config(st, "adamw", 0).model, arm_config(st, "adamw", 0)
        n = _llama_params(m.hidden_size, m.num_layers, st.study.prepare.vocab_size)
        tokens = c.train.steps * c.train.micro_steps * c.data.micro_batch_size * c.data.seq_len
        assert 45e6 <= n <= 125e6 and 18 <= tokens / n <= 22
        assert set(st.study.prepare.indexed) == set(c.data.sources) | set(c.data.ood)


def test_run_jobs_dependencies_and_failures(tmp_path):
    from nexus_megatron.study.runner import Job, run_jobs
    out = tmp_path / "o"
    ok = [sys.executable, "-c", f"open({str(out)!r} + '.' + __import__('sys').argv[1], 'w')"]
    jobs = [Job("a", ok + ["a"]), Job("wide", ok + ["wide"], slots=2, deps=["a"]),
            Job("bad", [sys.executable, "-c", "raise SystemExit(3)"]),
            Job("after_bad", ok + ["after_bad"], deps=["bad"]),
            Job("done_before", ok + ["done_before"], done=lambda: True)]
    rec = run_jobs(jobs, 2, str(tmp_path / "logs"), say=lambda m: None)
    assert rec["a"]["status"] == "ok" and rec["wide"]["status"] == "ok"
    assert rec["bad"]["status"] == "failed (exit 3)"
    assert rec["after_bad"]["status"].startswith("not run")
    assert rec["done_before"]["status"].startswith("skipped")
    assert os.path.exists(f"{out}.a") and os.path.exists(f"{out}.wide")
    assert not os.path.exists(f"{out}.after_bad") and not os.path.exists(f"{out}.done_before")


# ---------------------------------------------------------------------------------------------------
# end to end


def _tokenizer_for(data):
    """Synthetic data has no tokenizer: give it a tiny byte-level BPE (ids < model.vocab_size) for the
    downstream step."""
    from nexus_megatron.data.tokenizer import train_bpe
    tok = train_bpe(["Question: How many apples? Answer: 3 + 4 = 7\n#### 7"] * 20, vocab_size=300)
    tok.save(os.path.join(data, "tokenizer"))
    assert tok.vocab_size <= 320


def test_experiment_end_to_end_and_skip_on_rerun(synthetic_data, tmp_path, capsys):
    from nexus_megatron.study.runner import experiment
    _tokenizer_for(synthetic_data)
    st, raw = _study(tmp_path, synthetic_data)
    cfg_path = tmp_path / "study.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(raw))
    args = argparse.Namespace(config=str(cfg_path), set=[], only=None)
    assert experiment(args) == 0
    out = tmp_path / "study"
    for arm in ("adamw", "nexus_seq", "nexus_sp"):
        s = json.load(open(out / arm / "seed0" / "summary.json"))
        assert s["steps"] == 4 and s["tokens"] == 4 * 2 * 2 * 16
        assert s["world_size"] == (2 if arm == "nexus_sp" else 1)
        a = json.load(open(out / arm / "seed0" / "analysis.json"))
        assert 0.0 <= a["downstream"]["gsm_heldout"]["accuracy"] <= 1.0
        assert a["downstream"]["gsm_heldout"]["chance"] == 0.25
        assert ("minima" in a) == (arm != "nexus_sp")
    m = json.load(open(out / "adamw_matched" / "seed0" / "match.json"))
    assert m["target_arm"] == "nexus_seq" and 0 <= m["extra_steps"] <= 4 and m["extra_steps"] % 2 == 0
    assert m["reached"] == (m["loss"] <= m["target_loss"])
    # the primary endpoint: the OOD loss on the reference's own curve at the target's ID loss (first crossing)
    from nexus_megatron.study.stats import value_at_first_crossing
    at = value_at_first_crossing(m["curve"], m["target_loss"])
    assert m["curve"][0][0] == 4 and (at is None) == (m["ood_at_target"] is None) == (not m["reached"])
    if at is not None:
        assert m["ood_at_target"] == at["value"] and m["extra_steps_at_target"] == at["step"] - 4
    mm = [json.loads(l) for l in open(out / "adamw_matched" / "seed0" / "metrics.jsonl")]
    assert [r["step"] for r in mm] == list(range(1, 5 + m["extra_steps"]))
    assert all(r["lr"] == pytest.approx(m["lr"]) for r in mm[4:])   # continued at the final lr
    mi = json.load(open(out / "adamw_matched" / "seed0" / "analysis.json"))["minima"]
    assert list(mi["pairs"]) == ["web|code"] and mi["mean_l2"] > 0 and mi["mean_barrier"] >= 0
    report = (out / "report" / "results.md").read_text()
    for title in ("Same tokens", "Matched in-distribution loss", "Downstream", "Closeness of per-source minima"):
        assert title in report
    for png in ("curves.png", "downstream.png", "minima.png", "matched.png"):
        assert (out / "report" / png).stat().st_size > 1000
    # rerun: everything is skipped, nothing is retrained
    mtime = os.path.getmtime(out / "adamw" / "seed0" / "summary.json")
    capsys.readouterr()
    assert experiment(args) == 0
    assert "8 of 8 jobs already done; 0 to run" in capsys.readouterr().out
    assert os.path.getmtime(out / "adamw" / "seed0" / "summary.json") == mtime
    # a finished run with another configuration is refused, not silently reused
    bad = argparse.Namespace(config=str(cfg_path), set=["run.optim.lr=0.02"], only="train")
    with pytest.raises(NexusConfigError, match="different configuration"):
        experiment(bad)
