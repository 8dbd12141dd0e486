"""Nexus on megatron-core (real processes, gloo, CPU shim in the workers only) equals a single-process
reference written from ALGORITHMS.md §1.1 on the same micro-batches.

Each fixture below is one spawn of real processes that runs several configurations one after another
(process start-up dominates on this machine); the tests assert on what they return.
"""
import math

import pytest
import torch

from tests import mcore_helpers as H
from tests.distributed import run_distributed

pytest.importorskip("megatron.core")

STEPS, K = 3, 2
TOL = 1e-5


# ---------------------------------------------------------------------------------------------------
# workers (module level: spawned processes import them)
# ---------------------------------------------------------------------------------------------------

REF_SPECS = {
    # name: (reference_run kwargs, tied embeddings)
    "seq3_dp2": (dict(mode="sequential", num_sources=3, dp=2), False),
    "seq3_dp2_clip": (dict(mode="sequential", num_sources=3, dp=2, clip=0.5), False),
    "sp2_dp2": (dict(mode="source-parallel", num_sources=2, dp=2), False),
    "sp2_dp2_w_exact": (dict(mode="source-parallel", num_sources=2, dp=2, weights=[0.7, 0.3], one_buffer=False), False),
    "seq2_dp1": (dict(mode="sequential", num_sources=2, dp=1), False),
    "pp_seq3_M2": (dict(mode="sequential", num_sources=3, dp=1, M=2, clip=0.5), True),
    "sp2_dp4_w": (dict(mode="source-parallel", num_sources=2, dp=4, weights=[0.6, 0.4]), False),
}


def _reference_worker(rank, world, names):
    H.init_megatron()
    models = {tied: H.build_model(tied=tied)[0] for tied in (False, True)}
    out = {}
    for name in names:
        kw, tied = REF_SPECS[name]
        hist, norms = H.reference_run(models[tied], steps=STEPS, k=K, **kw)
        out[name] = {"hist": hist, "norms": norms}
    return out


def _dp2_worker(rank, world, ckpt_root):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from nexus_megatron.engines.megatron import build_nexus_groups
    from nexus_megatron.engines.megatron.checkpoint import load_checkpoint, save_checkpoint
    from nexus_megatron.errors import NexusConfigError
    from nexus_megatron.layout import LayoutConfig

    H.init_megatron()
    out = {}
    runs = {  # name: build_nexus kwargs
        "seq3_dp2": dict(mode="sequential", num_sources=3, distopt=False),
        "seq3_dp2_clip": dict(mode="sequential", num_sources=3, distopt=True, clip=0.5),
        "sp2_dp2": dict(mode="source-parallel", num_sources=2, distopt=False),
        "sp2_dp2_w_exact": dict(mode="source-parallel", num_sources=2, weights=(0.7, 0.3), distopt=True, exact=True),
    }
    for name, kw in runs.items():
        model, cfg = H.build_model()
        ddp, opt, sched, groups = H.build_nexus(model, cfg, k=K, **kw)
        rec = []
        out[name] = {"hist": H.run_steps(ddp, opt, sched, groups, STEPS, record=rec), "rec": rec,
                     "inner": [type(c).__name__ for c in opt.children]}

    # Megatron-LM's seams (DDP / get_megatron_optimizer / get_forward_backward_func / finalize_model_grads,
    # looked up in megatron.training.training) patched by enable_nexus, driven the way train() drives them.
    out["megatron_lm"] = {"hist": _megatron_lm_style_run()}

    # Save after 2 outer steps, rebuild everything from a different init, load, take the 3rd step.
    kw = runs["sp2_dp2_w_exact"] | {"exact": False}
    model, cfg = H.build_model()
    ddp, opt, sched, groups = H.build_nexus(model, cfg, k=K, **kw)
    cont = H.run_steps(ddp, opt, sched, groups, STEPS)
    model, cfg = H.build_model()
    ddp, opt, sched, groups = H.build_nexus(model, cfg, k=K, **kw)
    H.run_steps(ddp, opt, sched, groups, 2)
    save_checkpoint(ckpt_root, 2, [ddp], opt, sched, client_state={"note": "hello"})
    model, cfg = H.build_model(seed=7)
    ddp, opt, sched, groups = H.build_nexus(model, cfg, k=K, **kw)
    info = load_checkpoint(ckpt_root, [ddp], opt, sched)
    resumed = H.run_steps(ddp, opt, sched, groups, 1)
    out["ckpt"] = {"continuous": cont[2], "resumed": resumed[0], "iteration": info["iteration"],
                   "client_state": info["client_state"], "opt_iteration": opt.iteration}

    # NaN/Inf: a non-finite loss on one rank in micro-step 0 of outer step 1 skips that outer step (and the
    # remaining pass of that step is not computed).
    model, cfg = H.build_model()
    ddp, opt, sched, groups = H.build_nexus(model, cfg, mode="sequential", num_sources=3, distopt=True, k=K)
    h0 = H.run_steps(ddp, opt, sched, groups, 1)
    state0 = {k: v.clone() for k, v in _adam_state(opt).items()}
    lr_steps0 = sched.num_steps
    orig = H.forward_step

    calls = []

    def poisoned_forward(data_iterator, model_):
        calls.append(opt.inner_steps)
        out_, loss_func = orig(data_iterator, model_)
        if rank == 1 and opt.inner_steps == 0:
            return out_ * float("nan"), loss_func
        return out_, loss_func
    H.forward_step = poisoned_forward
    rec = []
    try:
        h1 = H.run_steps(ddp, opt, sched, groups, 1, record=rec)
    finally:
        H.forward_step = orig
    state1 = _adam_state(opt)
    sched_unchanged = sched.num_steps == lr_steps0
    h2 = H.run_steps(ddp, opt, sched, groups, 1)
    out["nan"] = {"before": h0[0], "after_skip": h1[0], "after_next": h2[0], "rec": rec,
                  "state_unchanged": all(torch.equal(state0[k], state1[k]) for k in state0),
                  "sched_unchanged": sched_unchanged, "skipped": opt.stats.skipped_steps, "calls": calls}

    # Settings the adapter refuses, with the setting to change in the message.
    errors = {}
    try:
        build_nexus_groups(LayoutConfig(mode="source-parallel", sources=("a", "b", "c")))
    except NexusConfigError as e:
        errors["three_sources_two_ranks"] = str(e)
    model, cfg = H.build_model()
    try:
        ddp = DistributedDataParallel(config=cfg, module=model, ddp_config=DistributedDataParallelConfig(
            use_distributed_optimizer=True, overlap_param_gather=True, overlap_grad_reduce=True))
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from nexus_megatron.engines.megatron import NexusMegatronOptimizer
        groups = build_nexus_groups(LayoutConfig(mode="sequential", sources=("a",)))
        inner = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [ddp])
        NexusMegatronOptimizer(inner, [ddp], groups, micro_steps=2)       # --overlap-param-gather: accepted
        inner.config.overlap_param_gather_with_optimizer_step = True       # what Megatron-LM's flag sets
        NexusMegatronOptimizer(inner, [ddp], groups, micro_steps=2)
    except NexusConfigError as e:
        errors["overlap_param_gather_with_optimizer_step"] = str(e)
    out["errors"] = errors
    return out


def _megatron_lm_style_run():
    import types

    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from nexus_megatron.engines.megatron.megatron_lm import NexusSettings, enable_nexus

    T = types.SimpleNamespace(DDP=DistributedDataParallel, get_megatron_optimizer=get_megatron_optimizer,
                              get_forward_backward_func=get_forward_backward_func,
                              finalize_model_grads=finalize_model_grads)
    enable_nexus(NexusSettings(sources=H.SOURCES[:2], layout="source-parallel", gamma=H.GAMMA,
                               gamma_mode="absolute", micro_steps=K), T)
    # what megatron.training.training does with those names
    model, cfg = H.build_model()
    ddp = T.DDP(config=cfg, ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                     grad_reduce_in_fp32=True),
                module=model, disable_bucketing=False)
    opt = T.get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=H.LR, min_lr=H.LR, weight_decay=H.WD,
                                                   adam_beta1=0.9, adam_beta2=0.95, adam_eps=H.EPS, clip_grad=0.0,
                                                   use_distributed_optimizer=True), [ddp],
                                   config_overrides=None, use_gloo_process_groups=True)
    sched = H.scheduler(opt, H.LR)
    cfg.finalize_model_grads_func = T.finalize_model_grads
    fb = T.get_forward_backward_func()

    class RerunLike:   # Megatron-LM wraps data iterators in RerunDataIterator(.iterable)
        def __init__(self, it):
            self.iterable = it

        def __next__(self):
            return next(self.iterable)

    assert opt.micro_steps == K
    hist = H.run_steps(ddp, opt, sched, None, STEPS, fb=fb, data=RerunLike(H.TestIterator(opt.layout)))
    return hist


def _adam_state(opt):
    st = {}
    for c in opt.children:
        for gi, g in enumerate(c.optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                for k, v in c.optimizer.state[p].items():
                    st[f"{gi}.{pi}.{k}"] = v.detach().clone().reshape(-1).float()
    return st


def _tp2_worker(rank, world):
    from megatron.core import parallel_state as ps
    import torch.distributed as dist

    H.init_megatron(tp=2)
    model, cfg = H.build_model(tp=2)
    ddp, opt, sched, groups = H.build_nexus(model, cfg, mode="sequential", num_sources=2, distopt=True, k=K)
    probes = []
    orig = opt.inner.get_grad_norm

    def probing_get_grad_norm():
        n = orig()
        if len(probes) < 1:    # first micro-step: the logical gradient, gathered over TP
            tp, tp_size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
            logical, naive, dup_only = 0.0, 0.0, 0.0
            for name, p in model.named_parameters():
                g = p.main_grad.detach().float()
                naive += float(g.pow(2).sum())
                if getattr(p, "tensor_model_parallel", False):
                    parts = [torch.empty_like(g) for _ in range(tp_size)]
                    dist.all_gather(parts, g.contiguous(), group=tp)
                    logical += float(torch.cat(parts, p.partition_dim).pow(2).sum())
                else:
                    logical += float(g.pow(2).sum())      # replicated on every TP rank: count it once
                    dup_only += float(g.pow(2).sum())
            t = torch.tensor([naive], dtype=torch.float64)
            dist.all_reduce(t, group=tp)
            probes.append({"megatron": n, "logical": logical ** 0.5, "naive": float(t) ** 0.5,
                           "replicated_sq": dup_only,
                           "ln_is_duplicate": not getattr(model.decoder.layers[0].input_layernorm.weight,
                                                          "tensor_model_parallel", False)})
        return n
    opt.inner.get_grad_norm = probing_get_grad_norm
    hist = H.run_steps(ddp, opt, sched, groups, STEPS)
    return {"hist": hist, "probe": probes[0]}


def _pp2_worker(rank, world):
    H.init_megatron(pp=2)
    model, cfg = H.build_model(pp=2, tied=True)
    ddp, opt, sched, groups = H.build_nexus(model, cfg, mode="sequential", num_sources=3, distopt=True, k=K, clip=0.5)
    return {"hist": H.run_steps(ddp, opt, sched, groups, STEPS, M=2)}


def _dp4_worker(rank, world):
    H.init_megatron()
    model, cfg = H.build_model()
    ddp, opt, sched, groups = H.build_nexus(model, cfg, mode="source-parallel", num_sources=2, weights=(0.6, 0.4),
                                            distopt=True, k=K)
    import torch.distributed as dist
    return {"hist": H.run_steps(ddp, opt, sched, groups, STEPS), "block": dist.get_process_group_ranks(groups.source_dp_group),
            "cross": dist.get_process_group_ranks(groups.cross_group), "shard_numel": opt.numel}


# ---------------------------------------------------------------------------------------------------
# fixtures: one spawn each
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference_worker, 1, list(REF_SPECS), timeout=600, preload="megatron")[0]


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    return run_distributed(_dp2_worker, 2, str(tmp_path_factory.mktemp("mcore_ckpt")), timeout=600, preload="megatron")


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp2_worker, 2, timeout=600, preload="megatron")


def _assert_matches(hist, ref, label):
    assert len(hist) == len(ref) == STEPS
    for t, (got, want) in enumerate(zip(hist, ref)):
        err = H.rel_error(got, want)
        assert err <= TOL, f"{label}: outer step {t}: relative error {err:.2e} > {TOL}"
    moved = H.rel_error(ref[-1], ref[0])
    assert moved > 1e-3, f"{label}: the parameters barely moved ({moved:.1e}); the test would be vacuous"


# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------

def test_version_check():
    from nexus_megatron.engines.megatron.version import OVERRIDE_ENV, check_megatron_core_version
    from nexus_megatron.errors import NexusConfigError
    assert check_megatron_core_version("0.16.1") == "0.16.1"
    assert check_megatron_core_version("0.16.0rc2") == "0.16.0rc2"
    for good in ("0.17.0", "0.18.1", "0.19.2", "0.19.3rc0+abc"):
        assert check_megatron_core_version(good) == good
    for bad in ("0.15.2", "0.20.0", "1.0.0"):
        with pytest.raises(NexusConfigError, match=OVERRIDE_ENV):
            check_megatron_core_version(bad)


@pytest.mark.parametrize("name,inner", [
    ("seq3_dp2", "FP32Optimizer"),                  # sequential layout, distributed optimizer off
    ("seq3_dp2_clip", "DistributedOptimizer"),      # sequential, distributed optimizer on, clip_grad active on G
    ("sp2_dp2", "FP32Optimizer"),                   # source-parallel, off
    ("sp2_dp2_w_exact", "DistributedOptimizer"),    # source-parallel, on, weights, exact_displacement
])
def test_dp2_matches_reference(dp2, reference, name, inner):
    for rank, res in enumerate(dp2):
        assert res[name]["inner"] == [inner]
        _assert_matches(res[name]["hist"], reference[name]["hist"], f"{name} rank {rank}")
        assert all(r["ok"] for r in res[name]["rec"])
    if name == "seq3_dp2_clip":   # G's norm (reported as grad_norm) exceeded clip_grad, so clipping acted
        assert max(r["grad_norm"] for r in dp2[0][name]["rec"]) > 0.5


def test_megatron_lm_seams_patched_by_enable_nexus(dp2, reference):
    for rank, res in enumerate(dp2):
        _assert_matches(res["megatron_lm"]["hist"], reference["sp2_dp2"]["hist"], f"megatron-lm style rank {rank}")


def test_checkpoint_resume_is_exact(dp2):
    for res in dp2:
        c = res["ckpt"]
        assert c["iteration"] == 2 and c["client_state"] == {"note": "hello"} and c["opt_iteration"] == 3
        assert H.rel_error(c["resumed"], c["continuous"]) == 0.0


def test_nonfinite_gradient_skips_the_outer_step(dp2):
    for res in dp2:
        n = res["nan"]
        assert n["rec"][0]["ok"] is False and n["skipped"] == 1
        assert n["calls"] == [0]                                        # micro-step 1 was not computed
        assert H.rel_error(n["after_skip"], n["before"]) == 0.0       # parameters back at the anchor
        assert n["state_unchanged"] and n["sched_unchanged"]           # Adam state and lr schedule untouched
        assert H.rel_error(n["after_next"], n["before"]) > 1e-4         # training continues
        assert all(math.isfinite(float(v.abs().sum())) for v in n["after_next"].values())


def test_layout_and_setting_errors(dp2):
    errors = dp2[0]["errors"]
    assert "source-parallel" in errors["three_sources_two_ranks"] and "3 sources" in errors["three_sources_two_ranks"]
    assert "--overlap-param-gather-with-optimizer-step" in errors["overlap_param_gather_with_optimizer_step"]


def test_tp2_matches_reference(tp2, reference):
    for rank, res in enumerate(tp2):
        _assert_matches(res["hist"], reference["seq2_dp1"]["hist"], f"tp2 rank {rank}")


def test_tp_duplicated_params_count_once_in_source_norms(tp2, reference):
    want = list(reference["seq2_dp1"]["norms"][0].values())[0]   # first micro-step, unsharded model
    for res in tp2:
        p = res["probe"]
        assert p["ln_is_duplicate"] and p["replicated_sq"] > 0
        assert abs(p["megatron"] - want) / want <= TOL          # Megatron's filtered norm = the logical norm
        assert abs(p["logical"] - want) / want <= TOL
        assert p["naive"] > want * (1 + 10 * TOL)                 # counting TP replicas twice would differ


def test_pp2_matches_pp1(reference):
    res = run_distributed(_pp2_worker, 2, timeout=600, preload="megatron")
    hist = [{**a, **b} for a, b in zip(res[0]["hist"], res[1]["hist"])]   # stage 0 + stage 1 parameters
    assert not set(res[0]["hist"][0]) & set(res[1]["hist"][0])
    _assert_matches(hist, reference["pp_seq3_M2"]["hist"], "pp2")


def test_source_blocks_of_two_ranks(reference):
    """DP=4, two sources: blocks {0,1} and {2,3} reduce-scatter inside the block, the scaled shards are
    all-reduced across blocks ({0,2}, {1,3})."""
    res = run_distributed(_dp4_worker, 4, timeout=600, preload="megatron")
    assert [r["block"] for r in res] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["cross"] for r in res] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    for rank, r in enumerate(res):
        _assert_matches(r["hist"], reference["sp2_dp4_w"]["hist"], f"dp4 rank {rank}")
