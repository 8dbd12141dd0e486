"""One table of scenarios (tests/conformance.py: SCENARIOS) on every engine against one single-process
reference written from the spec, to 1e-5 relative in fp32: gamma_t from 1e-8 to 1, gamma_t = 0 (a warmup from
lr = 0 through the engine's own scheduler), weighted sources, both layouts, a vanishing source, NaN in one
micro-step on one rank, the random-direction control. One real 2-rank job per engine runs every scenario.
Scenarios an engine cannot run are listed in conformance.NOT_SUPPORTED with the reason (and checked to be
the only ones left out; the control under TP/PP is checked to be refused with a NexusConfigError naming it).
Engines: plain; DeepSpeed ZeRO 0/1/2/3 (fp32) and ZeRO 1/2/3 with bf16 (conformance.BF16_SCENARIOS, against a
reference with the same bf16 roundings); Megatron DDP, distributed optimizer, TP=2, PP=2 (fp32)."""
import pytest

from tests import conformance as C
from tests.distributed import run_distributed

TOL = 1e-5
WORLD = 2


@pytest.fixture(scope="module")
def references():
    out = {}

    def ref(spec, lrs):
        key = (spec["name"], tuple(lrs))
        if key not in out:
            out[key] = C.reference(spec, WORLD, lrs)
        return out[key]
    return ref


def _check(res, spec, ref, label, start="toy"):
    assert all(len(h) for h in res["hist"]) and len(res["hist"]) == C.STEPS, label
    if spec["warmup"]:
        assert res["lrs"][0] == 0.0 and res["lrs"][-1] > 0, (label, res["lrs"])   # gamma_t = 0 at step 0
    else:
        assert res["lrs"] == [C.LR] * C.STEPS, (label, res["lrs"])
    want = ref(spec, res["lrs"])
    if spec["nan"] is not None:
        assert res["skipped"][spec["nan"][0]] and sum(res["skipped"]) == 1, (label, res["skipped"])
    else:
        assert not any(res["skipped"]), label
    for t, (got, exp) in enumerate(zip(res["hist"], want)):
        err = C.rel_err(got, exp)
        assert err <= TOL, f"{label}: outer step {t}: relative error {err:.2e} > {TOL:g}"
    first = want[0] if start is None else C.flat_params(C.make_model())
    moved = C.rel_err(want[-1], first)
    assert moved > 1e-5, f"{label}: the parameters barely moved ({moved:.1e}); the check would be vacuous"


def test_control_scenario_is_not_nexus():
    """The control's reference differs from Nexus's on the same data by far more than the tolerance, so an
    engine that ignored nexus.control would fail the control rows."""
    spec = next(s for s in C.SCENARIOS if s["control"] != "none")
    ctl = C.reference(spec, WORLD, [C.LR] * C.STEPS)
    nexus = C.reference(dict(spec, control="none"), WORLD, [C.LR] * C.STEPS)
    assert C.rel_err(ctl[-1], nexus[-1]) > 100 * TOL


def test_plain_engine_conforms(references):
    res = run_distributed(C.plain_worker, WORLD, C.SCENARIOS, timeout=600)
    for spec in C.SCENARIOS:
        for rank in range(WORLD):
            _check(res[rank][spec["name"]], spec, references, f"plain {spec['name']} rank {rank}")


def test_deepspeed_conforms(references):
    """ZeRO 0, 1, 2 and 3 (fp32), and ZeRO 1, 2, 3 with bf16 (BF16_SCENARIOS), in one 2-rank job."""
    pytest.importorskip("deepspeed")
    stages, bf16_stages = (0, 1, 2, 3), (1, 2, 3)
    res = run_distributed(C.deepspeed_worker, WORLD, stages, C.SCENARIOS, bf16_stages, timeout=1500)
    bf16_refs = {}
    for stage in bf16_stages:
        for spec in C.SCENARIOS:
            if spec["name"] not in C.BF16_SCENARIOS:
                continue
            for rank in range(WORLD):
                got = res[rank][f"bf16-z{stage}/{spec['name']}"]
                key = (spec["name"], tuple(got["lrs"]))
                if key not in bf16_refs:
                    bf16_refs[key] = C.reference(spec, WORLD, got["lrs"], C.BF16ToyProblem())
                label = f"deepspeed bf16 zero-{stage} {spec['name']} rank {rank}"
                _check(got, spec, lambda s, lrs, k=key: bf16_refs[k], label)
                gap = C.rel_err(got["hist"][-1], references(spec, got["lrs"])[-1])
                assert gap > 1e-4, f"{label}: {gap:.1e} from the fp32 reference: did it run in bf16?"
    assert set(C.BF16_SCENARIOS) <= {s["name"] for s in C.SCENARIOS}
    for r in res:   # where the control is not implemented (bf16 at stage 0) it is refused, naming the setting
        msg = r["refused/bf16-z0/random-direction-control"]
        assert msg and msg.startswith("nexus.control=random_direction") and "\n" not in msg, msg
    ran = set()
    for stage in stages:
        for spec in C.SCENARIOS:
            if spec["name"] in C.NOT_SUPPORTED["deepspeed"]:
                continue
            ran.add(spec["name"])
            for rank in range(WORLD):
                _check(res[rank][f"z{stage}/{spec['name']}"], spec, references,
                       f"deepspeed zero-{stage} {spec['name']} rank {rank}")
    assert ran | set(C.NOT_SUPPORTED["deepspeed"]) == {s["name"] for s in C.SCENARIOS}


def _check_against_gpt_reference(jobs, checks):
    """Run the single-process GPT references of ``jobs`` ({key: (key, spec, dp, lrs)}) in one process and check
    every ``(history, spec, key, label)`` of ``checks`` against its reference (all failures reported at once)."""
    refs = run_distributed(C.megatron_reference_worker, 1, list(jobs.values()), timeout=1200, preload="megatron")[0]
    failures = []
    for got, spec, ref_key, label in checks:
        try:
            _check(got, spec, lambda s, lrs, k=ref_key: refs[k], label, start=None)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert not failures, "\n".join(failures)


def test_megatron_conforms():
    """DDP and the distributed optimizer (DP=2), TP=2 and PP=2 (DP=1): every scenario they can run."""
    pytest.importorskip("megatron.core")
    variants = list(C.MEGATRON_VARIANTS)
    res = run_distributed(C.megatron_worker, WORLD, variants, C.SCENARIOS, timeout=1200, preload="megatron")
    jobs, checks = {}, []
    for v in variants:
        tp, pp, _ = C.MEGATRON_VARIANTS[v]
        dp = WORLD // (tp * pp)
        for spec in C.SCENARIOS:
            key = f"{v}/{spec['name']}"
            if C.megatron_skip(v, spec):
                assert all(key not in r for r in res), key
                assert key in C.MP_SOURCE_PARALLEL or key in C.NOT_SUPPORTED["megatron"] or \
                    spec["name"] in C.NOT_SUPPORTED["megatron"], key
                if spec["control"] != "none":   # refused on every rank, naming the setting
                    for r in res:
                        msg = r[f"refused/{key}"]
                        assert msg and "nexus.control=random_direction" in msg and "\n" not in msg, (key, msg)
                continue
            runs = [r[key] for r in res]
            if pp > 1:   # each stage holds its own parameters: merge them
                merged = dict(runs[0])
                merged["hist"] = [{**a, **b} for a, b in zip(runs[0]["hist"], runs[1]["hist"])]
                assert not set(runs[0]["hist"][0]) & set(runs[1]["hist"][0])
                runs = [merged]
            ref_key = (spec["name"], dp, tuple(runs[0]["lrs"]))
            jobs[ref_key] = (ref_key, spec, dp, list(runs[0]["lrs"]))
            checks += [(runs[i], spec, ref_key, f"megatron {key} rank {i}") for i in range(len(runs))]
    _check_against_gpt_reference(jobs, checks)
    names = {k.split("/", 1)[1] for r in res for k in r if not k.startswith("refused/")}
    assert names | set(C.NOT_SUPPORTED["megatron"]) >= {s["name"] for s in C.SCENARIOS}


def _merge_stages(runs):
    """One history of the whole model from the ranks' per-stage (and replicated) {name: tensor} histories,
    checking that every rank holding a parameter holds the same value."""
    merged = dict(runs[0])
    hist = []
    for t in range(len(runs[0]["hist"])):
        full = {}
        for r in runs:
            for name, v in r["hist"][t].items():
                if name in full:
                    assert C.rel_err(v, full[name]) == 0.0 or C.rel_err(v, full[name]) < 1e-12, name
                full[name] = v
        hist.append(full)
    merged["hist"] = hist
    return merged


def test_megatron_model_parallel_source_parallel_conforms():
    """The source-parallel rows under TP=2 and PP=2 (weighted sources, a vanishing source, NaN on one rank, the
    warmup from lr 0): a 4-rank job, so that TP=2 / PP=2 leave DP=2, one rank per source."""
    pytest.importorskip("megatron.core")
    variants = ["tp2", "pp2"]
    specs = [s for s in C.SCENARIOS if s["mode"] == "source-parallel"]
    res = run_distributed(C.megatron_worker, 4, variants, specs, timeout=1500, preload="megatron")
    jobs, checks = {}, []
    for key in C.MP_SOURCE_PARALLEL:
        v, name = key.split("/", 1)
        spec = next(s for s in specs if s["name"] == name)
        got = _merge_stages([r[key] for r in res])
        ref_key = (name, 2, tuple(got["lrs"]))
        jobs[ref_key] = (ref_key, spec, 2, list(got["lrs"]))
        checks.append((got, spec, ref_key, f"megatron 4 ranks {key}"))
    assert len(checks) == 2 * len(specs)
    _check_against_gpt_reference(jobs, checks)
