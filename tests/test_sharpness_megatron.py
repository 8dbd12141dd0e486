"""Critical sharpness on megatron-core (nexus_megatron/engines/megatron/sharpness.py): real processes (2 ranks,
gloo, the CPU shim in the workers only) against a single-process reference on the same probe batches.

One spawn runs everything (process start-up and the megatron import dominate on this machine): the
unsharded reference (torch AdamW on one GPTModel, tests/mcore_helpers.reference_run), then DP=2 with the
distributed optimizer (Nexus, fp32; the AdamW baseline through Megatron's optimizer, bf16 and fp32), then
the same processes re-initialized as TP=2. The tests assert on what it returns.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests import mcore_helpers as H
from tests.conftest import ROOT, write_synthetic_data
from tests.distributed import run_distributed

pytest.importorskip("megatron.core")

STEPS, K = 3, 2
NAMES, OOD = ("web", "code"), ("poetry",)
TOL = 1e-5


# ---------------------------------------------------------------------------------------------------
# probe batches: fixed sequences per source, dealt over the data-parallel ranks like ProbeSet.from_sources

def probe_tokens():
    """{name: [b, SEQ+1] batches}: 2 batches of H.MBS sequences per training source and for the OOD set."""
    out = {}
    for i, name in enumerate(NAMES + OOD):
        out[name] = [H.tokens_for(i, 1000, 0, r, 0) for r in range(2)]   # step 1000: never a training batch
    return out


def probe_set(rank=0, world=1):
    """The mixture loss is the outer step's own micro-batches (sharpness.split=step, handed over with
    hook.begin_step); the relative losses use the fixed batches above."""
    from nexus_megatron.sharpness import STEP, ProbeSet
    batches = {n: [H.make_batch(b, i) for b in bs[rank::world]] for i, (n, bs) in enumerate(probe_tokens().items())}
    batches[STEP] = []
    return ProbeSet(batches, {STEP: 1.0}, list(OOD), list(NAMES))


def _result(res: dict, passes: int) -> dict:
    return {"passes": passes, **{k: {"eta_c": r.eta_c, "lambda_c": r.lambda_c, "fp": r.forward_passes, "cap": r.cap_hit,
                "loss0": r.loss0, "etas": [e for e, _ in r.trace], "losses": [v for _, v in r.trace]}
            for k, r in res.items()}}


# ---------------------------------------------------------------------------------------------------
# the single-process reference: the spec's Nexus with torch AdamW on one unsharded GPTModel

def _reference(dp):
    from nexus_megatron.layout import LayoutConfig, SequentialLayout
    from nexus_megatron.sharpness import STEP, PlainHost, SharpnessMeter, adamw_direction

    class LocalHost(PlainHost):       # one process: nothing to reduce
        def all_reduce(self, t):
            return t

    def loss_sum(model, b):
        out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
        return float((out.double() * b["loss_mask"].double()).sum()), int(b["loss_mask"].sum())

    model = H.build_model()[0]
    params = list(model.parameters())
    meter = SharpnessMeter(model, probe_set(), LocalHost(params), loss_sum=loss_sum)
    out = []

    layout = SequentialLayout(LayoutConfig(mode="sequential", sources=NAMES, seed=0))

    def measure(t, outer, ps):
        srcs = [layout.source_for(t, m) for m in range(K)]       # every reader's micro-batches of outer step t
        meter.probe.batches[STEP] = [H.make_batch(H.tokens_for(s, t, m, r, 0), s)
                                     for m, s in enumerate(srcs) for r in range(dp)]
        u = adamw_direction(outer, ps, [p.grad for p in ps])
        lr = float(outer.param_groups[0]["lr"])
        res = meter.measure(u, eta0=lr)
        out.append(_result(res, meter.last_cost["passes"]))
    H.reference_run(model, mode="sequential", num_sources=len(NAMES), dp=dp, steps=STEPS, k=K,
                    pre_outer_step=measure)
    return out


# ---------------------------------------------------------------------------------------------------
# distributed runs

def _snapshot(ddp, host, opt):
    snap = {"model": [p.detach().clone() for p in ddp.module.parameters()],
            "main": [p.detach().clone() for p in host.mains],
            "grad": [None if p.grad is None else p.grad.detach().clone() for p in host.mains],
            "state": [], "groups": []}
    for child in host.children:
        for g in child.optimizer.param_groups:
            snap["groups"].append({k: v for k, v in g.items() if k != "params"})
            for p in g["params"]:
                snap["state"] += [(k, v.detach().clone() if torch.is_tensor(v) else v)
                                  for k, v in child.optimizer.state[p].items()]
    if host.nexus:
        snap["anchor"] = opt.anchor.clone()
    return snap


def _bitwise_same(a, b) -> bool:
    def eq(x, y):
        if torch.is_tensor(x):
            return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(i, j) for i, j in zip(x, y))
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return x == y
    return eq(a, b)


class Checked:
    """Wraps the hook: everything the measurement can touch is bitwise the same afterwards; records the
    direction's size on this rank, and theta and u of the last measurement (test-only copies)."""

    def __init__(self, hook, ddp, opt):
        self.hook, self.ddp, self.opt = hook, ddp, opt
        self.same, self.u_numel, self.last, self.results = [], [], None, []
        host = hook.meter.host
        self.main_numel = sum(p.numel() for p in host.mains)
        begin, measure = host.begin, hook.meter.measure

        def recording_measure(u, eta0, master=None):
            res = measure(u, eta0, master)
            self.results.append(_result(res, hook.meter.last_cost["passes"]))
            return res
        hook.meter.measure = recording_measure

        def recording_begin(u, master=None):
            self.u_numel.append(sum(t.numel() for t in u))
            self.last = {"theta": [p.detach().clone() for p in host.mains], "u": [t.clone() for t in u]}
            return begin(u, master)
        host.begin = recording_begin

    def due(self, opt):
        return self.hook.due(opt)

    def __call__(self, opt):
        host = self.hook.meter.host
        before = _snapshot(self.ddp, host, self.opt)
        self.hook(opt)
        self.same.append(_bitwise_same(before, _snapshot(self.ddp, host, self.opt)))


def _probe_hook(opt, ddp, every=1):
    from megatron.core import parallel_state as ps
    from nexus_megatron.engines.megatron.sharpness import (ChunkModes, MegatronHost, MegatronProbeLoss,
                                                           MegatronSharpnessHook)
    from nexus_megatron.sharpness import SharpnessMeter
    host = MegatronHost(opt)
    meter = SharpnessMeter(ChunkModes([ddp]), probe_set(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
                           host, loss_sum=MegatronProbeLoss([ddp], H.SEQ))
    return MegatronSharpnessHook(meter, every=every)


def _applied_update_error(checked, host, lr):
    """max |main_after - (theta - lr u)| / max |lr u| over this rank's shard: u is the step Adam then took."""
    theta, u = checked.last["theta"], checked.last["u"]
    err = max(float((m.detach() - (t - lr * d)).abs().max()) for m, t, d in zip(host.mains, theta, u))
    scale = max(float((lr * d).abs().max()) for d in u)
    return err / scale


def _nexus_steps(ddp, opt, sched, groups, hook):
    """H.run_steps with the data iterator recorded and the step's batches handed to the hook."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from nexus_megatron.engines.megatron import nexus_forward_backward
    from nexus_megatron.engines.megatron.sharpness import RecordingIterator
    fb = nexus_forward_backward(opt, get_forward_backward_func())
    it = RecordingIterator(H.TestIterator(groups.layout))
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=H.forward_step, data_iterator=it, model=[ddp], num_microbatches=opt.micro_steps,
           seq_length=H.SEQ, micro_batch_size=H.MBS, forward_only=False)
        hook.begin_step(step + 1, it.take())
        ok, _, _ = opt.step()
        assert ok
        sched.step(1)


def _nexus_run(hooked, *, tp=1, pp=1, distopt=True, ddp_kwargs=None):
    from megatron.core import parallel_state as ps
    model, cfg = H.build_model(tp=tp, pp=pp)
    ddp, opt, sched, groups = H.build_nexus(model, cfg, mode="sequential", num_sources=len(NAMES), distopt=distopt, k=K,
                                            ddp_kwargs=ddp_kwargs)
    out = {"inner": [type(c).__name__ for c in opt.children], "shard_numel": opt.numel,
           "local_numel": sum(p.numel() for p in model.parameters())}
    if hooked:
        hook = _probe_hook(opt, ddp)
        checked = Checked(hook, ddp, opt)
        opt.pre_outer_step = checked
        _nexus_steps(ddp, opt, sched, groups, hook)
        out.update(same=checked.same, u_numel=checked.u_numel, main_numel=checked.main_numel,
                   update_err=_applied_update_error(checked, hook.meter.host, H.LR),
                   metrics=[m for _, m in hook.history], results=checked.results)
    else:
        H.run_steps(ddp, opt, sched, groups, STEPS)
    opt.sync_model_params()       # --overlap-param-gather: the last step's gather is still pending
    out["final"] = [p.detach().clone() for p in model.parameters()]
    out["state"] = [v.clone() for c in opt.children for st in c.optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v)]
    out["tp"] = ps.get_tensor_model_parallel_world_size()
    out["pp"] = ps.get_pipeline_model_parallel_world_size()
    return out


def _adam_run(hooked, *, distopt, bf16):
    """The AdamW baseline through Megatron's own optimizer: u from the reduced, clipped gradient."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module
    from nexus_megatron.engines.megatron.optimizer import step_with_pre_update
    model, cfg = H.build_model(bf16=bf16)
    module = Float16Module(cfg, model) if bf16 else model
    ddp = DistributedDataParallel(config=cfg, module=module, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=distopt, grad_reduce_in_fp32=True))
    cfg.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=H.LR, weight_decay=H.WD, adam_beta1=0.9,
                                                 adam_beta2=0.95, adam_eps=H.EPS, clip_grad=0.05, bf16=bf16,
                                                 use_distributed_optimizer=distopt), [ddp])
    sched = H.scheduler(opt, H.LR)
    fb = get_forward_backward_func()
    hook = _probe_hook(opt, ddp) if hooked else None
    checked = Checked(hook, ddp, opt) if hooked else None
    rank = ps.get_data_parallel_rank()
    norms = []
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        batches = [H.make_batch(H.tokens_for(step % 2, step, 0, rank, j), step % 2) for j in range(2)]
        fb(forward_step_func=H.forward_step, data_iterator=iter(batches), model=[ddp], num_microbatches=2,
           seq_length=H.SEQ, micro_batch_size=H.MBS, forward_only=False)
        if hooked:
            hook.begin_step(step + 1, batches)
            ok, gn, _ = step_with_pre_update(opt, checked)
        else:
            ok, gn, _ = opt.step()
        norms.append(float(gn))
        sched.step(1)
    out = {"final": [p.detach().float() for p in model.parameters()], "norms": norms,   # bf16 -> fp32: exact
           "state": [v.clone() for c in getattr(opt, "chained_optimizers", [opt]) for st in c.optimizer.state.values()
                     for v in st.values() if torch.is_tensor(v)],
           "inner": type(opt).__name__}
    if hooked:
        out.update(same=checked.same, u_numel=checked.u_numel, main_numel=checked.main_numel,
                   metrics=[m for _, m in hook.history],
                   update_err=_applied_update_error(checked, hook.meter.host, H.LR))
    return out


def _megatron_lm_run(data):
    """Megatron-LM's seams patched by enable_nexus with --sharpness-every 1, driven the way train() drives
    them (a stand-in for megatron.training.training, as in tests/test_megatron.py)."""
    import types

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from nexus_megatron.engines.megatron.megatron_lm import NexusSettings, enable_nexus
    from nexus_megatron.sharpness import SharpnessConfig

    T = types.SimpleNamespace(DDP=DistributedDataParallel, get_megatron_optimizer=get_megatron_optimizer,
                              get_forward_backward_func=get_forward_backward_func,
                              finalize_model_grads=finalize_model_grads)
    probe = {"data_path": ["0.5", os.path.join(data, "web"), "0.5", os.path.join(data, "code")], "seq_length": H.SEQ,
             "micro_batch_size": H.MBS, "ood_data_path": [data]}
    settings = enable_nexus(NexusSettings(sources=NAMES, gamma=H.GAMMA, gamma_mode="absolute", micro_steps=K,
                                          sharpness=SharpnessConfig(enabled=True, every=1), probe_data=probe), T)
    model, cfg = H.build_model()
    ddp = T.DDP(config=cfg, ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                     grad_reduce_in_fp32=True), module=model)
    opt = T.get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=H.LR, min_lr=H.LR, weight_decay=H.WD,
                                                   adam_beta1=0.9, adam_beta2=0.95, adam_eps=H.EPS,
                                                   use_distributed_optimizer=True), [ddp],
                                   config_overrides=None, use_gloo_process_groups=True)
    sched = H.scheduler(opt, H.LR)
    cfg.finalize_model_grads_func = T.finalize_model_grads
    fb = T.get_forward_backward_func()
    it = H.TestIterator(opt.layout)
    for _ in range(2):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=H.forward_step, data_iterator=it, model=[ddp], num_microbatches=K, seq_length=H.SEQ,
           micro_batch_size=H.MBS, forward_only=False)
        assert opt.step()[0]
        sched.step(1)
    hook = settings.state["sharpness"]
    return {"history": hook.history, "installed": opt.pre_outer_step is hook,
            "probe_sizes": {k: [int(b["tokens"].shape[0]) for b in v] for k, v in hook.meter.probe.batches.items()}}


def _worker(rank, world, data):
    H.init_megatron()                     # DP=2
    out = {"ref_dp2": _reference(dp=2), "ref_dp1": _reference(dp=1)}
    for hooked in (True, False):
        out[f"nexus_dp2_{hooked}"] = _nexus_run(hooked)
        out[f"adam_bf16_distopt_{hooked}"] = _adam_run(hooked, distopt=True, bf16=True)
        out[f"adam_fp32_{hooked}"] = _adam_run(hooked, distopt=False, bf16=False)
    out["total_numel"] = sum(p.numel() for p in H.build_model()[0].parameters())
    out["megatron_lm"] = _megatron_lm_run(data)
    # --overlap-param-gather (distributed optimizer): the probes gather synchronously, the next training
    # forward gathers the stepped params again
    out["nexus_dp2_overlap_True"] = _nexus_run(True, ddp_kwargs=dict(overlap_param_gather=True,
                                                                      overlap_grad_reduce=True))
    H.init_megatron(tp=2)                 # the same two processes as TP=2 (DP=1)
    out["nexus_tp2_True"] = _nexus_run(True, tp=2)
    H.init_megatron(pp=2)                 # and as two pipeline stages
    out["nexus_pp2_True"] = _nexus_run(True, pp=2)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data = write_synthetic_data(str(tmp_path_factory.mktemp("sharp_mcore") / "d"))
    return run_distributed(_worker, 2, data, timeout=600, preload="megatron")


# ---------------------------------------------------------------------------------------------------
# tests

def _same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=TOL)


def _logged(m: dict, key: str) -> str:
    """The metric of relative loss ``key``: its measurement, or its bound when the search hit the cap."""
    found = [f"sharpness/{n}/{key}" for n in ("lambda_c", "lambda_c_at_most", "lambda_c_at_least")
             if f"sharpness/{n}/{key}" in m]
    assert len(found) == 1, (key, m)
    return found[0]


def _compare_search(got: dict, want: dict, label: str) -> bool:
    """The two searches probe the same etas and see the same losses (rel TOL) until, possibly, a probe whose
    loss ties with L0 at float rounding (|L - L0| <= TOL L0) is decided differently. Returns True if the
    traces are identical (then eta_c, lambda_c, passes and the cap flag agree too)."""
    assert _same(got["loss0"], want["loss0"]), (label, got["loss0"], want["loss0"])
    l0, tie = want["loss0"], False
    for i, ((eg, lg), (ew, lw)) in enumerate(zip(zip(got["etas"], got["losses"]), zip(want["etas"], want["losses"]))):
        if eg != ew:
            assert tie, f"{label}: probe {i} differs (eta {eg} vs {ew}) after a clear decision"
            return False
        assert _same(lg, lw), f"{label}: L(eta={ew}) = {lg} vs {lw}"
        tie = abs(lw - l0) <= TOL * abs(l0)
    assert len(got["etas"]) == len(want["etas"]), label
    assert got["eta_c"] == pytest.approx(want["eta_c"], rel=TOL) and got["lambda_c"] == pytest.approx(
        want["lambda_c"], rel=TOL), label
    assert got["fp"] == want["fp"] and got["cap"] == want["cap"], label
    return True


@pytest.mark.parametrize("name,ref", [("nexus_dp2_True", "ref_dp2"), ("nexus_tp2_True", "ref_dp1"),
                                      ("nexus_pp2_True", "ref_dp1")])
def test_sharded_runs_match_one_process(runs, name, ref):
    """DP=2 with the distributed optimizer, TP=2 and PP=2 (3 outer steps, measured at each, warm-started): the
    searches take the same decisions on the same losses as the unsharded single-process reference on the same
    probe batches along its own AdamW direction; both ranks log identical numbers."""
    want = runs[0][ref]
    for rank, r in enumerate(runs):
        res = r[name]
        assert len(res["results"]) == len(res["metrics"]) == len(want) == STEPS
        for t, (got, w, m) in enumerate(zip(res["results"], want, res["metrics"])):
            assert got.keys() == w.keys() == {"passes", "mixture", "web", "code", "ood"}
            for key in ("mixture", "web", "code", "ood"):
                same = _compare_search(got[key], w[key], f"{name} rank {rank} step {t + 1} {key}")
                if key == "mixture":      # the step's own batch: a real descent direction, no ties
                    assert same and not got[key]["cap"], (t, got[key])
            assert m["sharpness/lambda_c"] == got["mixture"]["lambda_c"]
            assert m["sharpness/forward_passes"] == got["passes"]
            ood = "sharpness/lambda_c/ood" if not got["ood"]["cap"] else [k for k in m if k.endswith("/ood")][0]
            assert m[ood] == got["ood"]["lambda_c"]
        # one shared search for the 4 losses: every probe pass serves several losses (measured: 10 to 21 passes
        # for 23 to 31 loss evaluations on this 3-step run, whose sharpness moves by 10x between steps)
        # (without sharing: passes = loss evaluations - (losses - 1), the L0 pass being the only shared one)
        assert all(m["sharpness/forward_passes"] < sum(v["fp"] for k, v in got.items() if k != "passes") - 3
                   for m, got in zip(res["metrics"], res["results"])), [
            {k: (v["cap"], v["fp"], [f"{e:.3g}" for e in v["etas"]]) for k, v in got.items() if k != "passes"}
            for got in res["results"]]
    m0, m1 = (r[name]["metrics"] for r in runs)
    for a, b in zip(m0, m1):
        a, b = dict(a), dict(b)
        a.pop("sharpness/time_s"), b.pop("sharpness/time_s")
        assert a == b                                  # identical decisions and values on both ranks
    assert runs[0][name]["tp"] == (2 if "tp2" in name else 1) and runs[0][name]["pp"] == (2 if "pp2" in name else 1)


@pytest.mark.parametrize("name", ["nexus_dp2", "adam_bf16_distopt", "adam_fp32", "nexus_tp2", "nexus_pp2"])
def test_measurement_restores_everything_bitwise(runs, name):
    """Around every measurement: model params, main params, main grads, Adam state, param groups and the
    Nexus anchor are bitwise what they were; and u is the step the optimizer then took."""
    for r in runs:
        res = r[f"{name}_True"]
        assert res["same"] == [True] * STEPS
        assert res["update_err"] < 1e-4, res["update_err"]


@pytest.mark.parametrize("name", ["nexus_dp2", "adam_bf16_distopt", "adam_fp32"])
def test_hook_every_step_keeps_the_trajectory(runs, name):
    for r in runs:
        a, b = r[f"{name}_True"], r[f"{name}_False"]
        assert len(a["final"]) == len(b["final"]) and all(torch.equal(x, y) for x, y in zip(a["final"], b["final"]))
        assert all(torch.equal(x, y) for x, y in zip(a["state"], b["state"]))
    if name.startswith("adam"):
        assert runs[0][f"{name}_True"]["norms"][0] > 0.05        # clip_grad acted on the gradient u comes from


def test_direction_is_shard_sized_under_the_distributed_optimizer(runs):
    total = runs[0]["total_numel"]
    for r in runs:
        for name in ("nexus_dp2_True", "adam_bf16_distopt_True"):
            res = r[name]
            assert set(res["u_numel"]) == {res["main_numel"]}                # u has the shape of the main shards
            assert res["u_numel"][0] <= total // 2 + 64 < total          # half the model (bucket padding aside)
        assert r["nexus_dp2_True"]["inner"] == ["DistributedOptimizer"]
        assert r["adam_fp32_True"]["u_numel"][0] == total                  # no distributed optimizer: all of it
        tp = r["nexus_tp2_True"]
        assert tp["u_numel"][0] == tp["shard_numel"] < total              # TP shard (DP=1)
    assert sum(r["nexus_dp2_True"]["u_numel"][0] for r in runs) >= total


def test_megatron_lm_seams_measure_with_the_iterations_batches(runs):
    for r in runs:
        res = r["megatron_lm"]
        assert res["installed"] and [s for s, _ in res["history"]] == [1, 2]
        for _, m in res["history"]:
            assert math.isfinite(m["sharpness/lambda_c"]) and m["sharpness/lambda_c"] > 0
            for key in ("web", "code", "ood"):
                key = _logged(m, key)
                assert math.isfinite(m[key]) and m[key] > 0, key
        # fixed probes: 1 batch of MBS sequences per source, dealt over 2 ranks; the mixture: the step's batches
        assert res["probe_sizes"]["web"] == [1] and res["probe_sizes"]["poetry"] == [1]
    strip = lambda hist: [{k: v for k, v in m.items() if k != "sharpness/time_s"} for _, m in hist]  # noqa: E731
    assert strip(runs[0]["megatron_lm"]["history"]) == strip(runs[1]["megatron_lm"]["history"])


def test_overlap_param_gather_measures_the_same(runs):
    """With Megatron's --overlap-param-gather the same measurements (bitwise) and the same trajectory; the
    model params (all of them, gathered) bitwise restored around every measurement."""
    for r in runs:
        a, b = r["nexus_dp2_overlap_True"], r["nexus_dp2_True"]
        assert a["same"] == [True] * STEPS and a["results"] == b["results"]
        assert all(torch.equal(x, y) for x, y in zip(a["final"], b["final"]))
        assert all(torch.equal(x, y) for x, y in zip(a["state"], b["state"]))


class FusedFormatAdam(torch.optim.Optimizer):
    """Transformer Engine's FusedAdam bookkeeping (the step count in the param group, ``adam_w_mode``,
    ``bias_correction``) with its documented update written out in torch: Megatron's Adam on GPUs."""

    def __init__(self, params, lr, betas, eps, weight_decay, adam_w_mode=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=True))
        self.adam_w_mode = 1 if adam_w_mode else 0

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            g["step"] = g.get("step", 0) + 1
            (b1, b2), t, wd = g["betas"], g["step"], g["weight_decay"]
            for p in g["params"]:
                st = self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                grad = p.grad if self.adam_w_mode else p.grad + wd * p
                m = st["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
                v = st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + g["eps"])
                if self.adam_w_mode:
                    upd = upd + wd * p
                p.add_(upd, alpha=-g["lr"])


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_fused_adam_format_direction(adam_w_mode):
    from nexus_megatron.engines.megatron.sharpness import child_direction
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))
    opt = FusedFormatAdam([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=3e-2,
                          betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, adam_w_mode=adam_w_mode)
    x = torch.randn(8, 6)
    for i in range(4):
        opt.zero_grad()
        ((x @ w + b).tanh() ** 2).mean().backward()
        if i < 3:
            opt.step()
    state = {k: v.clone() for p in (w, b) for k, v in opt.state[p].items()}
    theta = [w.detach().clone(), b.detach().clone()]
    u = child_direction(opt, [w, b])
    assert all(torch.equal(v, opt.state[p][k]) for p in (w, b) for k, v in opt.state[p].items() if k in state)
    assert [g["step"] for g in opt.param_groups] == [3, 3]                 # reads, never writes
    opt.step()
    for p, t, d in zip((w, b), theta, u):
        torch.testing.assert_close(p.detach(), t - 3e-2 * d, rtol=1e-6, atol=1e-7)


def test_launcher_refuses_bad_sharpness_flags(capsys):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    from pretrain_gpt_nexus import parse_args
    base = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--train-iters", "1", "--lr", "1e-3", "--data-path", "x"]
    assert not parse_args(base).sharpness.enabled
    for flags, name in ((["--sharpness-every", "-1"], "--sharpness-every"),
                        (["--sharpness-every", "2", "--sharpness-batches", "0"], "--sharpness-batches"),
                        (["--sharpness-every", "2", "--sharpness-eps", "1.5"], "--sharpness-eps")):
        with pytest.raises(SystemExit):
            parse_args(base + flags)
        assert name in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the launcher: settings, per-source probes from the data routing, OOD, logged keys

def test_launcher_logs_sharpness(tmp_path):
    data = write_synthetic_data(str(tmp_path / "d"))
    log = str(tmp_path / "log.jsonl")
    args = ["--cpu-test-shim", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--train-iters", "2", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--data-path", "0.6", os.path.join(data, "web"), "0.4", os.path.join(data, "code"),
            "--split", "969,30,1", "--use-distributed-optimizer", "--optimizer", "adam",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1", "--eval-interval", "0",
            "--sharpness-every", "1", "--sharpness-batches", "2", "--sharpness-ood-data-path",
            os.path.join(data, "poetry"), "--nexus-log-file", log]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "launch", "pretrain_gpt_nexus.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    recs = [json.loads(line) for line in open(log)]
    assert [x["iteration"] for x in recs] == [1, 2]
    for m in recs:
        for key in ["sharpness/lambda_c", "sharpness/eta_c", "sharpness/forward_passes", "sharpness/probe_tokens",
                    "sharpness/param_gathers"] + [_logged(m, k) for k in ("web", "code", "ood")]:
            assert key in m and math.isfinite(m[key]) and m[key] > 0, key
        assert m["sharpness/lambda_c"] == pytest.approx(2 / m["sharpness/eta_c"])
    assert recs[0]["lr"] == 0 and recs[0]["sharpness/threshold"] == math.inf     # warmup from 0: no threshold
    assert recs[1]["sharpness/threshold"] == pytest.approx(38 / recs[1]["lr"] - 0.1 * 19, rel=1e-6)
