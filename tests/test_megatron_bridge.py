"""Nexus through NVIDIA Megatron-Bridge's seams (``megatron.bridge``, docs/megatron.md "NeMo / Megatron-Bridge"):
the optimizer built by Bridge's own ``setup_optimizer`` from :class:`NexusOptimizerConfig` (its ``provide()``
plug-in point) and the schedule from Bridge's ``megatron.bridge.training.train.get_forward_backward_func``
patched by :func:`enable_nexus_bridge`, driven the way Bridge's ``train_step`` drives them
(``forward_backward_func(...)`` then ``optimizer.step()``, then the scheduler), on 2 data-parallel gloo ranks:
the parameters after every outer step equal the single-process reference of ALGORITHMS.md §1.1
(tests/mcore_helpers.py).

Bridge's own ``pretrain()`` (``megatron.bridge.training.pretrain``: its setup, model provider, optimizer seam, data
setup with :class:`NexusDatasetProvider`, training loop and log) trains a tiny GPT on CPU with
tests/bridge_pretrain.py on ranks forked with torchrun's environment (tests/distributed.py run_script): 2 data-parallel gloo ranks print the losses and grad norms
of the 1-process run, every pass reads one source, and another K gives another run.

Needs Python 3.12 + megatron-core 0.19 + Bridge installed with ``make bridge-312`` (or ``NEXUS_BRIDGE_SITE``);
skips otherwise. Bridge is imported with the test-only Transformer Engine stand-in of tests/bridge_import.py."""
import os
import re

import pytest

from tests import mcore_helpers as H
from tests.bridge_import import BRIDGE_SITE, ROOT, bridge_available, import_bridge
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
    assert opt.micro_steps == K
    hist = H.run_steps(ddp, opt, sched, None, STEPS, fb=fb, data=H.TestIterator(opt.layout))
    return {"hist": hist, "type": type(opt).__name__, "is_nexus": isinstance(opt, NexusMegatronOptimizer),
            "inner": [type(c).__name__ for c in opt.children], "same": settings.state.get("optimizer") is opt,
            "lr": opt.param_groups[0]["lr"]}


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference_worker, 1, timeout=600, preload="bridge")[0]


@needs_bridge
@pytest.mark.parametrize("distopt,inner", [(False, "FP32Optimizer"), (True, "DistributedOptimizer")],
                         ids=["adam", "distributed-optimizer"])
def test_bridge_seams_dp2_equal_single_process(reference, distopt, inner):
    out = run_distributed(_bridge_worker, 2, distopt, timeout=900, preload="bridge")
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


def _provider_refusals_worker(rank, world, tmp):
    import_bridge("megatron.bridge.data.base")
    from nexus_megatron.engines.megatron.bridge import NexusDatasetProvider
    from nexus_megatron.engines.megatron.megatron_lm import NexusSettings
    from nexus_megatron.errors import NexusConfigError

    class Loaded:
        iteration = 3

    def provider(settings, **kw):
        return NexusDatasetProvider(nexus=settings, data_path=kw.pop("data_path", ["0.5", "d/web", "0.5", "d/code"]),
                                    seq_length=32, micro_batch_size=2, **kw)

    resumed = NexusSettings(sources=["web", "code"])
    resumed.state["optimizer"] = Loaded()
    cases = [provider(resumed), provider(NexusSettings(sources=["web", "code"]), dataloader_type="cyclic"),
             provider(NexusSettings(sources=["web", "code"]),
                      data_path=["0.5", os.path.join(tmp, "code"), "0.5", os.path.join(tmp, "web")])]
    out = []
    for p in cases:
        try:
            p.build_datasets(None)
            out.append(None)
        except NexusConfigError as e:
            out.append(str(e))
    return out


@needs_bridge
def test_bridge_data_provider_refuses_what_it_cannot_run(tmp_path):
    """NexusDatasetProvider.build_datasets stops with one line, before reading any data: a resumed run (the Nexus
    optimizer loaded at iteration > 0: Bridge's checkpoint has no per-source read positions), another
    dataloader_type, data_path sources that are not NexusSettings.sources in order (in a worker: importing Bridge
    puts its own transformers first on sys.path)."""
    resumed, cyclic, order = run_distributed(_provider_refusals_worker, 1, str(tmp_path), timeout=600,
                                             preload="bridge")[0]
    assert resumed and re.match(r"checkpoint.load: resuming a Megatron-Bridge run .* iteration 3", resumed), resumed
    assert cyclic and "dataloader_type='cyclic'" in cyclic, cyclic
    assert order and "names the sources ['code', 'web']" in order, order


# ---------------------------------------------------------------------------------------------------
# Bridge's own pretrain() (tests/bridge_pretrain.py)
# ---------------------------------------------------------------------------------------------------

LOG = re.compile(r"iteration\s+(\d+)/\s*(\d+) \| consumed samples:\s+(\d+) .*?learning rate: ([0-9.E+-]+) \| "
                 r"global batch size:\s+(\d+) \| lm loss: ([0-9.E+-]+) .*?grad norm: ([0-9.]+)")
ITERS, MICRO_BATCHES = 3, 4          # bridge_pretrain.py: global batch 8, micro-batch 2


def _bridge_pretrain(data, nproc, k, tmp_path, distopt=False):
    """tests/bridge_pretrain.py on ``nproc`` ranks, forked with torchrun's environment by tests/distributed.py's
    run_script from a server that imported Bridge once (about 20 s a process otherwise): (Bridge's iteration log
    lines, [what each rank wrote])."""
    import json
    from tests.distributed import run_script
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NEXUS_BRIDGE_SITE=BRIDGE_SITE, TORCHDYNAMO_DISABLE="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    r = run_script(os.path.join(ROOT, "tests", "bridge_pretrain.py"),
                   [data, str(k), str(ITERS)] + (["distopt"] if distopt else []), nproc, cwd=tmp_path, env=env,
                   timeout=900, preload="bridge")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    ranks = []
    for rank in range(nproc):
        with open(os.path.join(str(tmp_path), f"bridge_nexus_rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return LOG.findall(r.stdout + r.stderr), ranks


@pytest.fixture(scope="module")
def bridge_data(tmp_path_factory):
    from tests.conftest import write_synthetic_data
    return write_synthetic_data(str(tmp_path_factory.mktemp("bridge") / "d"))


@pytest.fixture(scope="module")
def bridge_one_process(bridge_data, tmp_path_factory):
    return _bridge_pretrain(bridge_data, 1, K, tmp_path_factory.mktemp("one"))


def _check_run(ranks, k, inner):
    """Every rank ran Nexus with K = ``k`` for ITERS outer steps; K passes per iteration, each reading N/(K*dp)
    micro-batches, all of its one assigned source, every rank the same source per pass. Returns the
    (step, pass, source) sequence."""
    per_pass = MICRO_BATCHES // (k * len(ranks))
    orders = []
    for rank, res in enumerate(ranks):
        assert (res["optimizer"], res["K"], res["iterations"], res["inner"]) == \
            ("NexusMegatronOptimizer", k, ITERS, [inner]), (rank, res)
        rows = res["passes"]
        assert [(s, m) for s, m, _, _ in rows] == [(s, m) for s in range(ITERS) for m in range(k)], rows
        for step, micro, src, ids in rows:
            assert ids == [src] * per_pass, (rank, step, micro, src, ids)
        orders.append([(s, m, src) for s, m, src, _ in rows])
    assert all(o == orders[0] for o in orders), orders
    return orders[0]


@needs_bridge
@pytest.mark.parametrize("distopt,inner", [(False, "FP32Optimizer"), (True, "DistributedOptimizer")],
                         ids=["adam", "distributed-optimizer"])
def test_bridge_pretrain_dp2_equals_one_process(bridge_data, bridge_one_process, tmp_path, distopt, inner):
    log1, ranks1 = bridge_one_process
    log2, ranks2 = _bridge_pretrain(bridge_data, 2, K, tmp_path, distopt)
    assert len(log1) == ITERS and [int(x[0]) for x in log1] == list(range(1, ITERS + 1)), log1
    assert log2 == log1, (log1, log2)          # loss, grad norm, learning rate, consumed samples: to the digit
    assert _check_run(ranks2, K, inner) == _check_run(ranks1, K, "FP32Optimizer")
    assert float(log1[-1][5]) < float(log1[0][5])                        # it trains


@needs_bridge
def test_bridge_pretrain_other_k_is_another_run(bridge_data, bridge_one_process, tmp_path):
    log1, _ = bridge_one_process
    log_k1, ranks_k1 = _bridge_pretrain(bridge_data, 1, 1, tmp_path)
    _check_run(ranks_k1, 1, "FP32Optimizer")
    assert len(log_k1) == ITERS and log_k1 != log1
    assert [x[6] for x in log_k1] != [x[6] for x in log1]               # other grad norms
