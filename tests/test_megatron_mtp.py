"""Multi-token prediction (``mtp_num_layers``) under Nexus on megatron-core, single process (gloo, CPU shim in the
worker only), on every installed version (0.16.x has MTP in GPTModel too, but no separate grad-norm group).

* Nexus's per-source norm n_i (the outer book's ``nexus/gnorm/<source>``) equals the norm of the *whole* gradient,
  the MTP parameters included, computed by hand from every parameter's ``main_grad``; and it differs from the norm
  without the MTP parameters (what megatron-core 0.17+'s ``get_grad_norm()`` returns), so the check has teeth.
* The outer step clips G exactly as megatron-core's own Adam does on that version (0.17+: the main parameters by
  the main norm, the MTP parameters by their own group norm): Nexus with one source and one inner step has
  G = g / ||g||; two outer steps equal two steps of Megatron's own optimizer on the same gradients divided by the
  same norm, with ``clip_grad`` small enough to act on both groups. The clipping Nexus had before (every parameter
  by the main norm) is run too and must NOT match on 0.17+ (the test has teeth there).
"""
import pytest
import torch

from tests import mcore_helpers as H
from tests.distributed import run_distributed

pytest.importorskip("megatron.core")

CLIP = 0.05


def build_mtp_model(seed=0, detach=False):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
    cfg = H.transformer_config()
    cfg.mtp_num_layers = 1
    cfg.mtp_loss_scaling_factor = 0.5
    if detach:      # 0.19: the MTP heads train alone and their parameters form the separate 'mtp' norm group
        cfg.mtp_detach_heads = True
    spec = get_gpt_layer_local_spec()
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=H.VOCAB, max_sequence_length=H.SEQ,
                     position_embedding_type="rope",
                     mtp_block_spec=get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False))
    H.deterministic_init(model, seed)
    return model, cfg


def _is_mtp(name):
    return ".mtp." in f".{name}"


def _norm_worker(rank, world, detach):
    """One outer step of K=2 inner steps (two sources, sequential): per inner step the hand-computed norms of
    main_grad (all / MTP only / without MTP) when Nexus takes its norm, and what the book recorded."""
    from nexus_megatron.engines.megatron import compat
    H.init_megatron()
    model, cfg = build_mtp_model(detach=detach)
    names = [n for n, _ in model.named_parameters()]
    ddp, opt, sched, groups = H.build_nexus(model, cfg, mode="sequential", num_sources=2, k=2)
    probes = []
    orig = opt.inner.get_grad_norm

    def probing_get_grad_norm():      # called by compat.full_grad_norm after prepare_grads, before the move
        n = float(orig())
        all_sq = mtp_sq = 0.0
        for name, p in model.named_parameters():
            sq = float(p.main_grad.detach().double().pow(2).sum())
            all_sq += sq
            mtp_sq += sq if _is_mtp(name) else 0.0
        probes.append({"get_grad_norm": n, "all": all_sq ** 0.5, "mtp": mtp_sq ** 0.5,
                       "no_mtp": (all_sq - mtp_sq) ** 0.5})
        return n
    opt.inner.get_grad_norm = probing_get_grad_norm
    inner_norms, orig_inner_step = [], opt.inner_step

    def recording_inner_step(source=None):
        src = opt.source_for(opt.book.inner_steps) if source is None else int(source)
        norms = orig_inner_step(source)
        inner_norms.append((src, [float(x) for x in norms]))
        return norms
    opt.inner_step = recording_inner_step
    H.run_steps(ddp, opt, sched, groups, 1)
    stats = opt.step_stats()
    # (the third get_grad_norm call is the outer step's, on G)
    return {"probes": probes[:2], "inner": inner_norms,
            "stats": {k: float(v) for k, v in stats.items() if k.startswith("nexus/gnorm/")},
            "mtp_params": [n for n in names if _is_mtp(n)],
            "groups": list(compat.separate_grad_norm_groups()),
            "tagged": sorted(n for n, p in model.named_parameters() if compat.grad_norm_group_of(p) is not None)}


def _clip_worker(rank, world, distopt, detach):
    """Nexus (1 source, K=1: G = g/||g||) vs Megatron's own optimizer on g/||g||, 2 steps, clip_grad = CLIP; and
    Nexus with the old clipping (every parameter by the main norm)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from nexus_megatron.engines.megatron import compat
    from nexus_megatron.engines.megatron import optimizer as nexus_opt
    H.init_megatron()
    steps = 2
    batches = [H.make_batch(H.tokens_for(0, t, 0, 0, 0)) for t in range(steps)]

    def fwd(data_iterator, model):
        return H.forward_step(data_iterator, model)

    def backward(ddp, b):
        ddp.zero_grad_buffer()
        get_forward_backward_func()(forward_step_func=fwd, data_iterator=iter([b]), model=[ddp], num_microbatches=1,
                                    seq_length=H.SEQ, micro_batch_size=H.MBS, forward_only=False)

    def nexus_run():
        model, cfg = build_mtp_model(detach=detach)
        ddp, opt, sched, groups = H.build_nexus(model, cfg, mode="sequential", num_sources=1, k=1, clip=CLIP,
                                                distopt=distopt)
        norms = []
        orig_clip = nexus_opt.clip_grads_like_megatron

        def probing_clip(inner, grad_norm):
            norms.append({"main": float(grad_norm), **compat.separate_group_norms(inner)})
            return orig_clip(inner, grad_norm)
        nexus_opt.clip_grads_like_megatron = probing_clip
        try:
            for b in batches:
                opt.zero_grad()
                backward(ddp, b)
                opt.inner_step(0)
                ok, _, _ = opt.step()
                assert ok
                sched.step(1)
        finally:
            nexus_opt.clip_grads_like_megatron = orig_clip
        return H.gather_full_params(ddp.module), norms

    def megatron_run():
        model, cfg = build_mtp_model(detach=detach)
        ddp = DistributedDataParallel(config=cfg, module=model, ddp_config=DistributedDataParallelConfig(
            use_distributed_optimizer=distopt, grad_reduce_in_fp32=True))
        ocfg = OptimizerConfig(optimizer="adam", lr=H.LR, min_lr=H.LR, weight_decay=H.WD, adam_beta1=0.9,
                               adam_beta2=0.95, adam_eps=H.EPS, clip_grad=CLIP, use_distributed_optimizer=distopt)
        opt = get_megatron_optimizer(ocfg, [ddp])
        sched = H.scheduler(opt, H.LR)
        for b in batches:
            opt.zero_grad()
            backward(ddp, b)
            with torch.no_grad():      # Nexus's G with one source and one inner step: g / ||g|| (all parameters)
                n = sum(float(p.main_grad.double().pow(2).sum()) for p in model.parameters()) ** 0.5
                for p in model.parameters():
                    p.main_grad.div_(n)
            ok, _, _ = opt.step()
            assert ok
            sched.step(1)
        return H.gather_full_params(ddp.module)

    def old_clip(inner, grad_norm):      # what Nexus did before: every parameter by the main norm
        for c in getattr(inner, "chained_optimizers", [inner]):
            if c.get_parameters() and c.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(c.get_parameters(), max_norm=c.config.clip_grad, total_norm=grad_norm)

    got, norms = nexus_run()
    want = megatron_run()
    nexus_opt.clip_grads_like_megatron, keep = old_clip, nexus_opt.clip_grads_like_megatron
    try:
        old, _ = nexus_run()
    finally:
        nexus_opt.clip_grads_like_megatron = keep
    init = H.gather_full_params(build_mtp_model(detach=detach)[0])
    mtp = [n for n in want if _is_mtp(n)]
    return {"nexus": H.rel_error(got, want), "old": H.rel_error(old, want), "moved": H.rel_error(want, init),
            "nexus_mtp": H.rel_error({n: got[n] for n in mtp}, {n: want[n] for n in mtp}),
            "old_mtp": H.rel_error({n: old[n] for n in mtp}, {n: want[n] for n in mtp}),
            "norms": norms, "groups": list(compat.separate_grad_norm_groups())}


def _has_detach_heads():
    from tests.mcore_helpers import transformer_config
    return hasattr(transformer_config(), "mtp_detach_heads")


DETACH = [pytest.param(False, id="mtp_in_main_group"), pytest.param(True, id="mtp_detached_own_group")]


def _skip_without_groups(detach):
    if detach and not _has_detach_heads():
        pytest.skip("this megatron-core has no mtp_detach_heads (0.16): MTP parameters are never a separate "
                    "grad-norm group there; the main-group case covers it")


@pytest.mark.parametrize("detach", DETACH)
def test_mtp_source_norm_counts_every_parameter(detach):
    _skip_without_groups(detach)
    out = run_distributed(_norm_worker, 1, detach, timeout=600, preload="megatron")[0]
    assert out["mtp_params"], "the model has no MTP parameters; the test would be vacuous"
    # megatron-core tags the MTP parameters (their own grad-norm group) only with mtp_detach_heads (0.19)
    assert out["tagged"] == (sorted(out["mtp_params"]) if detach else [])
    probes, stats, inner = out["probes"], out["stats"], out["inner"]
    assert len(probes) == len(inner) == 2, (probes, inner)
    per_source = {}
    for pr, (src, norms) in zip(probes, inner):     # one norm per inner step: the source it read
        recorded = norms[src]
        per_source.setdefault(src, []).append(recorded)
        assert recorded == pytest.approx(pr["all"], rel=1e-6), (src, recorded, pr)
        assert pr["mtp"] > 1e-2 * pr["all"], pr
        # teeth: leaving the MTP parameters out would be visibly different
        assert abs(recorded - pr["no_mtp"]) > 1e-3 * pr["all"], (src, recorded, pr)
        # Megatron's own main norm leaves the tagged (detached) MTP parameters out, else counts them
        assert pr["get_grad_norm"] == pytest.approx(pr["no_mtp"] if detach else pr["all"], rel=1e-6), pr
    # the outer book's per-step statistics (what the loop logs): the mean over the step's inner steps
    names = ("web", "code")
    assert set(stats) == {f"nexus/gnorm/{names[i]}" for i in per_source}, stats
    for i, ns in per_source.items():
        assert stats[f"nexus/gnorm/{names[i]}"] == pytest.approx(sum(ns) / len(ns), rel=1e-12)


@pytest.mark.parametrize("detach", DETACH)
@pytest.mark.parametrize("distopt", [False, True], ids=["fp32", "distopt"])
def test_mtp_outer_step_clips_like_megatron_adam(distopt, detach):
    _skip_without_groups(detach)
    out = run_distributed(_clip_worker, 1, distopt, detach, timeout=600, preload="megatron")[0]
    assert out["moved"] > 1e-3, "the parameters barely moved; the test would be vacuous"
    for n in out["norms"]:    # clipping acts on every group (G has norm 1 over all parameters)
        assert all(v > CLIP for v in n.values()), n
    assert out["nexus"] <= 1e-6, out
    assert out["nexus_mtp"] <= 1e-6, out
    if detach:     # the MTP group has its own norm; clipping it by the main norm (the old way) is wrong
        assert all(set(n) == {"main", "mtp"} for n in out["norms"]), out["norms"]
        assert out["old_mtp"] > 1e2 * max(out["nexus_mtp"], 1e-9), out
    else:          # one norm over every parameter: the old clipping is Megatron's too
        assert all(set(n) == {"main"} for n in out["norms"]), out["norms"]
        assert out["old"] <= 1e-6, out
