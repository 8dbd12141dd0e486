"""Workers for tests/test_deepspeed.py: each runs many configurations inside ONE 2-rank job (process start
and the DeepSpeed / torch._dynamo imports cost ~20 s per job on the 2-core machine; an engine costs < 1 s)."""
import os
import time

import torch

from tests.ds_reference import SOURCES, batch, flat_params, loss_fn, make_model, param_groups

STEPS, K, GAMMA, LR, WD = 3, 2, 0.05, 1e-2, 0.1
WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.002, "warmup_max_lr": LR, "warmup_num_steps": 3,
                                         "warmup_type": "linear"}}


def num_sources(mode):
    return 3 if mode == "sequential" else 2   # source-parallel on 2 ranks: 2 sources, one rank per group


def ds_config(mode, stage, bf16=False, extra=None, nexus_extra=None):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": K,
           "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
           "bf16": {"enabled": bf16},
           "nexus": {"layout": mode, "sources": list(SOURCES[:num_sources(mode)]), "gamma": GAMMA,
                     "gamma_mode": "absolute", **(nexus_extra or {})}}
    cfg.update(extra or {})
    return cfg


def realistic_ds_config(bf16=True):
    """A ds_config as users write them (every common section), plus the nexus section."""
    return {
        "train_batch_size": 4 * K * 2,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": K,
        "gradient_clipping": 1.0,
        "steps_per_print": 1000,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "prescale_gradients": False,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                              "overlap_comm": False, "reduce_scatter": True, "reduce_bucket_size": 5e8,
                              "contiguous_gradients": True, "round_robin_gradients": False,
                              "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}},
        "scheduler": WARMUP,
        "activation_checkpointing": {"partition_activations": False, "contiguous_memory_optimization": False},
        "flops_profiler": {"enabled": False},
        "tensorboard": {"enabled": False},
        "checkpoint": {"use_node_local_storage": False},
        "nexus": {"layout": "sequential", "sources": list(SOURCES), "gamma": GAMMA, "gamma_mode": "absolute",
                  "min_grad_norm": 1e-8, "max_consecutive_skips": 10, "seed": 0},
    }


def full_params(engine):
    """The whole parameter vector (gathered under ZeRO-3), fp32."""
    mod = engine.module
    engine.sync_model_params()        # nexus.overlap_param_gather: finish the last step's deferred gather
    if engine.prepared.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(mod.parameters())):
            return flat_params(mod)
    return flat_params(mod)


def build(spec):
    from nexus_megatron.engines.deepspeed import initialize

    cfg = spec.get("config") or ds_config(spec["mode"], spec["stage"], spec.get("bf16", False), spec.get("extra"),
                                          spec.get("nexus_extra"))
    model = make_model()
    nexus = spec.get("nexus_api")   # settings given through the API (e.g. the control, not a ds_config key)
    if nexus:
        from nexus_megatron import NexusConfig
        nexus = NexusConfig(gamma=GAMMA, gamma_mode="absolute", **nexus)
    return initialize(model, cfg, nexus_config=nexus,
                      optimizer=torch.optim.AdamW(param_groups(model.parameters(), WD), lr=LR))


def micro_step(eng, rank, bf16, nan=None):
    """One micro-batch of the source the engine assigns, as a DeepSpeed user writes it."""
    t, m = eng.outer_steps, eng.micro_step
    src = eng.source_for_micro_step()
    reader, _ = eng.readers()
    x, y = batch(src, t, m, reader)
    if bf16:
        x, y = x.bfloat16(), y.bfloat16()
    loss = loss_fn(eng, x, y).float()
    if nan is not None and (t, m) == tuple(nan[:2]) and rank in nan[2]:
        loss = loss * float("nan")
    eng.backward(loss)
    return eng.step()


class _LazyGather:
    """An all-gather that moves nothing until it is waited on: a module whose forward pre-hook did not wait
    for every bucket holding its parameters computes with stale ones, and the run leaves its twin's numbers."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs, self.done = args, kwargs, False

    def wait(self):
        if not self.done:
            import torch.distributed as dist
            dist.all_gather(*self.args, **{**self.kwargs, "async_op": False})
            self.done = True


def matrix_worker(rank, world, specs, ckpt_root):
    """Every spec: train STEPS outer steps (params after each), counters, shard sizes, lr per micro-step.
    Specs with ``ckpt`` also save tag ``a`` after 2 outer steps and tag ``m`` one micro-step later
    (save_latest=False), then run to 4 outer steps: the uninterrupted run the resume test compares with."""
    out = {}
    for spec in specs:
        t0 = time.time()
        bf16 = spec.get("bf16", False)
        eng = build(spec)
        if spec.get("lazy_gather"):
            eng._core.param_gather._all_gather = lambda *a, **kw: _LazyGather(a, kw)
        steps = 4 if spec.get("ckpt") else STEPS
        hist, infos, lrs, err = [], [], [], None
        d = os.path.join(ckpt_root, spec["name"])
        try:
            while eng.outer_steps < steps:
                if spec.get("ckpt") and eng.outer_steps == 2 and eng.micro_step == 0:
                    eng.save_checkpoint(d, tag="a", client_state={"note": "a"})
                if spec.get("ckpt") and eng.outer_steps == 2 and eng.micro_step == 1:
                    eng.save_checkpoint(d, tag="m", save_latest=False)
                lrs.append(eng.get_nexus_lr())
                info = micro_step(eng, rank, bf16, spec.get("nan"))
                if info is not None:
                    infos.append(info)
                    hist.append(full_params(eng))
        except Exception as e:  # reported and asserted on by the test
            err = f"{type(e).__name__}: {e}"
        out[spec["name"]] = {"hist": hist, "infos": infos, "lrs": lrs, "err": err, "counters": eng.counters(),
                             "report": eng.shard_report(), "anchor_sizes": [a.numel() for a in eng._core.anchors],
                             "seconds": time.time() - t0, "param_gather": _pg_stats(eng)}
    return out


def _pg_stats(eng):
    pg = eng._core.param_gather
    return None if pg is None else {**pg.stats, "buckets": pg.num_buckets}


def resume_worker(rank, world, specs, ckpt_root):
    """New processes (the first job has exited: a killed job): load ``latest`` and, separately, the mid-step
    tag ``m``; run to 4 outer steps."""
    out = {}
    for spec in specs:
        d = os.path.join(ckpt_root, spec["name"])
        res = {}
        for tag in (None, "m"):
            eng = build(spec)
            path, client_state = eng.load_checkpoint(d, tag=tag)
            hist = []
            while eng.outer_steps < 4:
                if micro_step(eng, rank, spec.get("bf16", False)) is not None:
                    hist.append(full_params(eng))
            res[str(tag)] = {"hist": hist, "path": path, "client_state": client_state, "counters": eng.counters()}
        out[spec["name"]] = res
    return out


def reshard_worker(rank, world, specs, ckpt_root):
    """One process resumes checkpoints that 2 ranks wrote (tag ``a``, between outer steps, and the mid-step tag
    ``m``): the full state is cut for 1 rank (engines/deepspeed/reshard.py). The global batch stays the same: each
    micro-batch is the 2 readers' batches together (loss_fn is a mean over equal halves)."""
    import copy

    from nexus_megatron.engines.deepspeed import initialize

    out = {}
    for spec in specs:
        d = os.path.join(ckpt_root, spec["name"])
        res = {}
        for tag in ("a", "m"):
            cfg = copy.deepcopy(ds_config(spec["mode"], spec["stage"], spec.get("bf16", False), spec.get("extra"),
                                          spec.get("nexus_extra")))
            cfg["train_micro_batch_size_per_gpu"] = 8
            model = make_model()
            eng = initialize(model, cfg, optimizer=torch.optim.AdamW(param_groups(model.parameters(), WD), lr=LR))
            resharded = eng.resharded(d, tag=tag)
            path, client_state = eng.load_checkpoint(d, tag=tag)
            hist = []
            while eng.outer_steps < 4:
                t, m = eng.outer_steps, eng.micro_step
                src = eng.source_for_micro_step()
                parts = [batch(src, t, m, r) for r in range(2)]
                x, y = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
                if spec.get("bf16", False):
                    x, y = x.bfloat16(), y.bfloat16()
                eng.backward(loss_fn(eng, x, y).float())
                if eng.step() is not None:
                    hist.append(full_params(eng))
            res[tag] = {"hist": hist, "path": path, "client_state": client_state, "counters": eng.counters(),
                        "resharded": resharded}
        out[spec["name"]] = res
    return out


def trainer_worker(rank, world, runs):
    """nexus_megatron.train.train for each (name, RunConfig)."""
    from nexus_megatron.train import train

    out = {}
    for name, cfg in runs:
        t0 = time.time()
        out[name] = {"summary": train(cfg), "seconds": time.time() - t0}
    return out
