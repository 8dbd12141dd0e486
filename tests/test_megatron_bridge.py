"""Nexus through NVIDIA Megatron-Bridge's seams (``megatron.bridge``, docs/megatron.md "NeMo / Megatron-Bridge"):
the optimizer built by Bridge's own ``setup_optimizer`` from :class:`NexusOptimizerConfig` (its ``provide()``
plug-in point) and the schedule from Bridge's ``megatron.bridge.training.train.get_forward_backward_func``
patched by :func:`enable_nexus_bridge`, driven the way Bridge's ``train_step`` drives them
(``forward_backward_func(...)`` then ``optimizer.step()``, then the scheduler), on 2 data-parallel gloo ranks:
the parameters after every outer step equal the single-process reference of ALGORITHMS.md §1.1
(tests/mcore_helpers.py). Bridge's full ``pretrain()`` is NOT run here (see the docs).

Needs Python 3.12 + megatron-core 0.19 + Bridge installed with ``make bridge-312`` (or ``NEXUS_BRIDGE_SITE``);
skips otherwise. Bridge is imported with the test-only Transformer Engine stand-in of tests/bridge_import.py."""
import pytest

from tests import mcore_helpers as H
from tests.bridge_import import BRIDGE_SITE, bridge_available, import_bridge
from tests.distributed import run_distributed

pytest.importorskip("megatron.core")
needs_bridge = pytest.mark.skipif(not bridge_available(), reason=f"megatron.bridge is not importable here: it needs "
                                  f"Python 3.12 and `make bridge-312` (Megatron-Bridge 0.6.2 into {BRIDGE_SITE})")

STEPS, K, TOL = 3, 2, 1e-5
REF = dict(mode="sequential", num_sources=3, dp=2)


def _reference_worker(rank, world):
    H.init_megatron()
    model, _ = H.build_model()
    hist, _ = H.reference_run(model, steps=STEPS, k=K, **REF)
    return hist


def _bridge_worker(rank, world, distopt):
    H.init_megatron()
    optim, train, config = import_bridge("megatron.bridge.training.optim", "megatron.bridge.training.train",
                                         "megatron.bridge.training.config")
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from nexus_megatron.engines.megatron import NexusMegatronOptimizer
    from nexus_megatron.engines.megatron.bridge import NexusOptimizerConfig, enable_nexus_bridge
    from nexus_megatron.engines.megatron.megatron_lm import NexusSettings

    settings = NexusSettings(sources=H.SOURCES[:3], layout="sequential", gamma=H.GAMMA, gamma_mode="absolute",
                             micro_steps=K)
    ocfg = NexusOptimizerConfig(optimizer="adam", lr=H.LR, min_lr=H.LR, weight_decay=H.WD, adam_beta1=0.9,
                                adam_beta2=0.95, adam_eps=H.EPS, clip_grad=0.0, use_distributed_optimizer=distopt,
                                nexus=settings)
    sched_cfg = config.SchedulerConfig()
    for k, v in dict(lr_warmup_init=H.LR, lr_warmup_steps=0, lr_decay_steps=1000, lr_decay_style="constant",
                     start_weight_decay=H.WD, end_weight_decay=H.WD, wd_incr_steps=1000,
                     weight_decay_incr_style="constant").items():
        setattr(sched_cfg, k, v)
    enable_nexus_bridge(settings)                    # before Bridge's train() looks the name up

    # what Bridge's setup() + train() do (sequential layout: Bridge's own DDP and finalize_model_grads)
    model, cfg = H.build_model()
    ddp = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=distopt, grad_reduce_in_fp32=True), module=model)
    cfg.finalize_model_grads_func = finalize_model_grads
    opt, sched = optim.setup_optimizer(ocfg, sched_cfg, [ddp], use_gloo_process_groups=True)
    fb = train.get_forward_backward_func(pp_size=1, vp_size=None)
    data = H.TestIterator(opt.layout)
    hist = []
    for _ in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=H.forward_step, data_iterator=data, model=[ddp], num_microbatches=K,
           seq_length=H.SEQ, micro_batch_size=H.MBS, forward_only=False)
        ok, _, _ = opt.step()
        if ok:
            sched.step(increment=1)
        hist.append(H.gather_full_params(model))
    return {"hist": hist, "type": type(opt).__name__, "is_nexus": isinstance(opt, NexusMegatronOptimizer),
            "inner": [type(c).__name__ for c in opt.children], "same": settings.state.get("optimizer") is opt,
            "lr": opt.param_groups[0]["lr"]}


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference_worker, 1, timeout=600)[0]


@needs_bridge
@pytest.mark.parametrize("distopt,inner", [(False, "FP32Optimizer"), (True, "DistributedOptimizer")],
                         ids=["adam", "distributed-optimizer"])
def test_bridge_seams_dp2_equal_single_process(reference, distopt, inner):
    out = run_distributed(_bridge_worker, 2, distopt, timeout=900)
    for rank, res in enumerate(out):
        assert res["is_nexus"] and res["same"] and res["inner"] == [inner], res
        assert res["lr"] == H.LR
        assert len(res["hist"]) == len(reference) == STEPS
        for t, (got, want) in enumerate(zip(res["hist"], reference)):
            err = H.rel_error(got, want)
            assert err <= TOL, f"rank {rank}, outer step {t}: relative error {err:.2e} > {TOL}"
    assert H.rel_error(reference[-1], reference[0]) > 1e-3      # the parameters moved: not vacuous


def test_bridge_refuses_what_it_cannot_run():
    """Needs megatron-core only (nexus_megatron.engines.megatron.bridge does not import Bridge)."""
    from nexus_megatron.engines.megatron.bridge import check_bridge_settings
    from nexus_megatron.engines.megatron.megatron_lm import NexusSettings
    from nexus_megatron.errors import NexusConfigError
    with pytest.raises(NexusConfigError, match="sequential"):
        check_bridge_settings(NexusSettings(sources=["a", "b"], layout="source-parallel"))
    with pytest.raises(NexusConfigError, match="adam"):
        check_bridge_settings(NexusSettings(sources=["a", "b"]), "sgd")
    with pytest.raises(NexusConfigError, match="NexusSettings"):
        check_bridge_settings(None)
