"""One table of scenarios (tests/conformance.py: SCENARIOS) on every engine against one single-process
reference written from the spec, to 1e-5 relative in fp32: gamma_t from 1e-8 to 1, gamma_t = 0 (a warmup from
lr = 0 through the engine's own scheduler), weighted sources, both layouts, a vanishing source, NaN in one
micro-step on one rank, the random-direction control. One real 2-rank job per engine runs every scenario.
Scenarios an engine cannot run are listed in conformance.NOT_SUPPORTED with the reason (and checked to be
the only ones left out). Megatron runs its own table in tests/test_megatron.py::test_conformance_*."""
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


def _check(res, spec, ref, label):
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
    moved = C.rel_err(want[-1], C.flat_params(C.make_model()))
    assert moved > 1e-4, f"{label}: the parameters barely moved ({moved:.1e}); the check would be vacuous"


def test_plain_engine_conforms(references):
    res = run_distributed(C.plain_worker, WORLD, C.SCENARIOS, timeout=600)
    for spec in C.SCENARIOS:
        for rank in range(WORLD):
            _check(res[rank][spec["name"]], spec, references, f"plain {spec['name']} rank {rank}")


@pytest.mark.parametrize("stages", [(0, 1), (2, 3)], ids=["zero0-1", "zero2-3"])
def test_deepspeed_conforms(references, stages):
    pytest.importorskip("deepspeed")
    res = run_distributed(C.deepspeed_worker, WORLD, stages, C.SCENARIOS, timeout=900)
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
