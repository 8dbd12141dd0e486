"""Workers for tests/test_sharpness_deepspeed.py. Everything runs inside ONE 2-rank gloo job (process start and
the DeepSpeed imports cost ~20 s per job on the 2-core machine; a tiny engine costs about a second)."""
import time

import torch
import torch.distributed as dist

NAMES, OOD = ["web", "code", "math"], ["poetry"]

TINY = {
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"sources": NAMES, "ood": OOD, "seq_len": 16, "micro_batch_size": 2},
    "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
    "train": {"steps": 3, "micro_steps": 2, "progress": False, "eval_every": 0, "probe_every": 0},
}


def probe_setup(data, rank, world):
    """The tiny Llama, its probe batches (this rank's share) and u: AdamW's first direction for the
    full-batch mixture gradient, identical on every rank (a copy of test_sharpness._probe_setup)."""
    from nexus_megatron.config import ModelConfig
    from nexus_megatron.data.shards import open_sources
    from nexus_megatron.models import build_model, lm_loss
    from nexus_megatron.sharpness import ProbeSet, adamw_direction
    _, sources = open_sources(data, NAMES, OOD, 16, 0)
    model = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2), 64, 16, seed=0)
    params = list(model.parameters())
    full = ProbeSet.from_sources(sources, NAMES, OOD, [1, 1, 1], split="val", batches=2, micro_batch_size=4)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for n in NAMES:
        for b in full.batches[n]:
            (lm_loss(model, b) / len(NAMES) / len(full.batches[n])).backward()
    u = adamw_direction(opt, params, [p.grad for p in params])
    for p in params:
        p.grad = None
    probe = ProbeSet.from_sources(sources, NAMES, OOD, [1, 1, 1], split="val", batches=2, micro_batch_size=4,
                                  rank=rank, world=world)
    return model, params, probe, u


def results_of(res):
    return {k: {"eta_c": r.eta_c, "lambda_c": r.lambda_c, "forward_passes": r.forward_passes, "cap_hit": r.cap_hit,
                "trace": [list(t) for t in r.trace]} for k, r in res.items()}


def _esize(t):
    return t.element_size()


def shard_direction(parts, u_of):
    """This rank's partitions of the full direction ``u_of[id(param)]``, placed where DeepSpeed keeps each
    parameter's elements (offsets read from the tensors' storage: the test's independent account of the layout)."""
    opt, out = parts.ds_opt, []
    if parts.kind == "zero12":
        for i, lp in enumerate(parts.lps):
            flat = opt.bit16_groups_flat[i]
            buf = torch.zeros(flat.numel())
            for p in opt.bit16_groups[i]:
                off = (p.data_ptr() - flat.data_ptr()) // _esize(flat)
                buf[off:off + p.numel()] = u_of[id(p)].reshape(-1)
            start = (lp.data_ptr() - flat.data_ptr()) // _esize(flat)
            out.append(buf[start:start + lp.numel()].clone())
    elif parts.kind == "zero3":
        world, rank = dist.get_world_size(), dist.get_rank()
        for j, lp in enumerate(parts.lps):
            buf = torch.zeros(lp.numel())
            for p in opt.fp16_groups[j]:
                n = p.ds_tensor.numel()
                full = torch.zeros(n * world)
                full[:p.ds_numel] = u_of[id(p)].reshape(-1)
                off = (p.ds_tensor.data_ptr() - lp.data_ptr()) // _esize(lp)
                buf[off:off + n] = full[rank * n:(rank + 1) * n]
            out.append(buf)
    elif parts.kind == "stage0":          # the parameters themselves
        out = [u_of[id(p)].clone() for p in parts.masters]
    else:
        raise AssertionError(parts.kind)
    return out


def gathered_params(module, stage):
    if stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return [p.detach().clone() for p in module.parameters()]
    return [p.detach().clone() for p in module.parameters()]


def snapshot(parts, module, stage):
    """Everything a measurement may touch: the module's parameters (gathered), DeepSpeed's low-precision
    partitions and fp32 masters, and the client AdamW's state."""
    st = parts.client.state
    return {"params": gathered_params(module, stage),
            "lps": [t.detach().clone() for t in parts.lps],
            "masters": [t.detach().clone() for t in parts.masters],
            "state": [{k: v.detach().clone() for k, v in st[m].items()} for m in parts.masters if m in st]}


def same(a, b):
    """Names of the snapshot entries that differ (bitwise)."""
    bad = []
    for key in ("params", "lps", "masters"):
        if len(a[key]) != len(b[key]) or not all(torch.equal(x, y) for x, y in zip(a[key], b[key])):
            bad.append(key)
    if len(a["state"]) != len(b["state"]) or not all(
            x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a["state"], b["state"])):
        bad.append("state")
    return bad


def host_worker(rank, world, data, stages):
    """(a) the DeepSpeed host's measurement on the same probe batches and direction as PlainHost's, (b) after it
    everything is bitwise as before (also after AdamW steps gave the state values), (d) u is shard-sized."""
    from nexus_megatron.engines.deepspeed.adapter import prepare_deepspeed_runtime
    from nexus_megatron.engines.deepspeed.sharpness import DeepSpeedHost, Partitions
    from nexus_megatron.models import lm_loss
    from nexus_megatron.sharpness import SharpnessMeter
    deepspeed = prepare_deepspeed_runtime()
    out = {}
    for spec in stages:
        t0 = time.time()
        stage = spec["stage"]
        model, params, probe, u = probe_setup(data, rank, world)
        u_of = {id(p): x for p, x in zip(params, u)}
        P = sum(p.numel() for p in params)
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 1 << 30,
               "zero_optimization": {"stage": stage, **spec.get("zero", {})}}
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-2), config=cfg)
        module = eng.module
        parts = Partitions(eng.optimizer, getattr(eng.optimizer, "optimizer", eng.optimizer))
        host = DeepSpeedHost(parts)
        us = shard_direction(parts, u_of)
        meter = SharpnessMeter(module, probe, host, eps=2 ** -6)
        before = snapshot(parts, module, stage)
        res = meter.measure(us, eta0=1e-2)
        after = snapshot(parts, module, stage)
        rec = {"results": results_of(res), "changed_fresh": same(before, after), "buffers": dict(host.last_buffers),
               "P": P, "kind": parts.kind, "gathered_numel_now": sum(p.data.numel() for p in module.parameters())}
        # two AdamW steps (nonzero optimizer state, masters moved), then measure again: bitwise restore
        for step in range(2):
            b = probe.batches["web"][0]
            eng.backward(lm_loss(eng, b))
            eng.step()
        before = snapshot(parts, module, stage)
        meter.measure(us, eta0=1e-2)
        after = snapshot(parts, module, stage)
        rec["changed_trained"] = same(before, after)
        rec["seconds"] = time.time() - t0
        out[spec["name"]] = rec
    return out


# ---------------------------------------------------------------------------------------------------
# the trainer with the hook at every step

def _ctx_snapshot(ctx):
    """What the hook must leave bitwise at the seam: the fp32 master partitions (Nexus: they hold delta), their
    gradients, the Nexus anchors, the AdamW state."""
    if not hasattr(ctx, "ds_opt") and not hasattr(ctx, "parts"):
        return None                        # the plain engine (tests/test_sharpness.py checks it)
    if hasattr(ctx, "anchors"):            # the Nexus core
        masters, state = [p for p, _ in ctx.parts], ctx.client.state
        extra = [a.detach().clone() for a in ctx.anchors]
    else:                                  # the AdamW seam
        masters, state = ctx.parts.masters, ctx.opt.state
        extra = [None if ctx.pending[id(m)][0] is None else ctx.pending[id(m)][0].detach().clone() for m in masters]
    return {"masters": [m.detach().clone() for m in masters],
            "grads": [None if m.grad is None else m.grad.detach().clone() for m in masters],
            "extra": extra,
            "state": [{k: v.detach().clone() for k, v in state[m].items()} for m in masters]}


def _ctx_diff(a, b):
    if a is None:
        return None
    bad = []
    for key in ("masters", "grads", "extra"):
        if not all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                   for x, y in zip(a[key], b[key])):
            bad.append(key)
    if not all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a["state"], b["state"])):
        bad.append("state")
    return bad


def trainer_worker(rank, world, runs):
    """nexus_megatron.train.train for each (name, RunConfig), with every hook call wrapped: everything at the
    seam is compared before / after, and the host's buffer sizes are recorded."""
    from nexus_megatron.sharpness import SharpnessHook
    from nexus_megatron.train import train
    calls = []
    orig = SharpnessHook._measure

    def checked(self, ctx):
        before = _ctx_snapshot(ctx)
        orig(self, ctx)
        calls.append({"changed": _ctx_diff(before, _ctx_snapshot(ctx)),
                      "buffers": dict(getattr(self.meter.host, "last_buffers", {}))})
    SharpnessHook._measure = checked
    out = {}
    try:
        for name, cfg in runs:
            t0 = time.time()
            del calls[:]
            out[name] = {"summary": train(cfg), "calls": list(calls), "seconds": time.time() - t0}
    finally:
        SharpnessHook._measure = orig
    return out


# ---------------------------------------------------------------------------------------------------
# the standalone command, sharded

def command_worker(rank, world, argv):
    """``nexus-megatron sharpness ARGV`` on this rank (the process group is already up, as under torchrun)."""
    from nexus_megatron.tools.sharpness_cli import run_sharpness, sharpness_parser
    t0 = time.time()
    res = run_sharpness(sharpness_parser().parse_args(argv))
    return {"result": res, "seconds": time.time() - t0}


def all_worker(rank, world, data, stages, runs, argv):
    """The whole 2-rank part of tests/test_sharpness_deepspeed.py in one job."""
    return {"host": host_worker(rank, world, data, stages), "train": trainer_worker(rank, world, runs),
            "command": command_worker(rank, world, argv)}


def gathered_worker(rank, world, argv, configs):
    """For each ds_config file: the most non-persistent parameter elements gathered on this rank while the last
    module before the output layer (the final norm) starts its forward, over three mixture gradients of the
    command's ZeRO-3 engine (DeepSpeed's parameter trace is complete from the second micro-step on)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from nexus_megatron.engines.deepspeed.sharpness import ZeroCommand
    from nexus_megatron.tools.sharpness_cli import name_list, prepared_batches, sharpness_parser
    out = {}
    for cfg in configs:
        args = sharpness_parser().parse_args(argv + ["--deepspeed-config", cfg])
        names, ood = name_list(args.sources), name_list(args.ood)
        cmd = ZeroCommand(args, len(names))
        model, tok = cmd.load()
        params = list(model.parameters())
        norm = model.model.norm
        own = {id(p) for p in norm.parameters()}
        seen = []

        def pre(mod, inp):
            seen.append(sum(p.ds_numel for p in params if id(p) not in own and not p.ds_persist
                            and p.ds_status == ZeroParamStatus.AVAILABLE))
        handle = norm.register_forward_pre_hook(pre)
        data = prepared_batches(names, ood, tok, args, 3, 1)
        weights = {n: 1.0 / len(names) for n in names}
        for i in range(3):
            cmd.gradient({n: cmd.share(data[n]["acc"][i]) for n in names}, weights, direction=False)
        handle.remove()
        out[cfg] = {"gathered": seen, "total": sum(p.ds_numel for p in params),
                    "reduce_bucket": cmd.engine.zero_reduce_bucket_size()}
        cmd.close()
    return out
