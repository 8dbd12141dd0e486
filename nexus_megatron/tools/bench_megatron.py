"""``nexus-megatron bench --engine megatron``: one run of the benchmark on megatron-core.

The same measurements as the plain and DeepSpeed engines (:mod:`nexus_megatron.tools.bench`): a megatron-core
``GPTModel`` (local layer spec, no Transformer Engine needed) in megatron-core's
``DistributedDataParallel`` with the distributed optimizer (default; ``--no-dist-opt`` for plain DDP); AdamW is
Megatron's own optimizer (``get_megatron_optimizer``, Adam with decoupled weight decay) driven by
``get_forward_backward_func`` with ``k`` micro-batches per iteration, Nexus is
:class:`~nexus_megatron.engines.megatron.optimizer.NexusMegatronOptimizer` around the same optimizer with
:func:`~nexus_megatron.engines.megatron.schedule.nexus_forward_backward` (k passes of one micro-batch). The overlap axis is Megatron's
``overlap_grad_reduce`` (``--overlap-grad-reduce``) and, with the distributed optimizer,
``overlap_param_gather`` (``--overlap-param-gather``).

megatron-core needs CUDA. This module never installs the CPU shim (:mod:`.mcore_cpu_shim`);
:func:`check_megatron_runtime` refuses to run without CUDA unless a process installed it (the test-side entry
``python -m tests.mcore_bench_cpu`` does, see docs/performance.md).
"""
from __future__ import annotations

import gc
import math
import statistics
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import NexusConfigError

CPU_SHIM_MARK = "_nexus_megatron_cpu_shim"


def check_megatron_runtime() -> None:
    """Fail early, before any process or model, when megatron-core cannot run here."""
    import importlib.util
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise NexusConfigError("bench --engine megatron: megatron-core is not installed; pip install "
                               "megatron-core==0.16.1 (or use --engine plain / deepspeed)")
    if not torch.cuda.is_available() and not getattr(torch, CPU_SHIM_MARK, False):
        raise NexusConfigError(
            "bench --engine megatron: megatron-core needs CUDA GPUs and none is visible here. Run it on a GPU "
            "machine, or on a CPU-only machine through the test shim from a source checkout: "
            "`PYTHONPATH=. python -m tests.mcore_bench_cpu --nproc 2 ...` (same arguments; the shim rewrites "
            "megatron-core's CUDA calls to CPU, for tests and smoke figures only, see docs/performance.md)")


class _Iterator:
    """Micro-batches of synthetic tokens: the source of each pass from ``set_micro_step`` (Nexus), else from
    the layout's sequential draw per micro-batch (AdamW)."""

    def __init__(self, sources: dict, names, layout, B: int, rank_reader):
        self.sources, self.names, self.layout, self.B = sources, list(names), layout, B
        self.rank_reader = rank_reader
        self.step, self.src, self.micro, self.j = 0, None, 0, 0

    def begin(self, step: int):
        self.step, self.src, self.micro, self.j = step, None, 0, 0

    def set_micro_step(self, source, step, micro):
        self.src, self.step, self.micro, self.j = source, step, micro, 0

    def __iter__(self):
        return self

    def __next__(self):
        from ..engines.megatron.data import make_megatron_batch
        micro = self.micro if self.src is not None else self.j
        src = self.src if self.src is not None else self.layout.source_for(self.step, micro)
        reader = self.rank_reader(src, self.step, micro)
        start = ((self.step * 64 + micro) * 16 + reader) * self.B * 4 + self.j * self.B
        b = make_megatron_batch(self.sources[self.names[src]].train.batch(start, self.B), src)
        self.j += 1
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        return {k: v.to(dev) for k, v in b.items()} if dev is not None else b


def _forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])

    def loss_func(output):
        mask = b["loss_mask"]
        loss = (output.float() * mask).sum() / mask.sum()
        return loss, {"lm loss": loss.detach()}
    return out, loss_func


def _init_parallel(tp: int):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)


def _model(raw: dict, tp: int, bf16: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    m, d = raw["model"], raw["data"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = TransformerConfig(num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                            num_attention_heads=m["num_heads"], use_cpu_initialization=not torch.cuda.is_available(),
                            tensor_model_parallel_size=tp, hidden_dropout=0.0, attention_dropout=0.0,
                            bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=m["vocab_size"],
                     max_sequence_length=d["seq_len"], share_embeddings_and_output_weights=False)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if bf16:
        from megatron.core.transformer.module import Float16Module
        model = Float16Module(cfg, model)
    return model, cfg


def account_megatron(ddp, opt) -> dict:
    """Exact bytes of the training state on this rank (every storage once, first category wins): params (the
    DDP param buffer, or the params themselves), grads (the DDP grad buffer), master (fp32 main-param shards
    that are not views of the params: bf16), optimizer (Adam's moments), nexus (the anchor and the sum of
    directions d_sum, the exact displacement), other (everything else reachable: step counters, model buffers)."""
    from .measure import StateAccount, moments
    from ..engines.megatron.optimizer import NexusMegatronOptimizer
    from ..engines.megatron.params import main_params, optimizer_children
    nexus = isinstance(opt, NexusMegatronOptimizer)
    children = opt.children if nexus else optimizer_children(opt)
    acc = StateAccount()
    params = list(ddp.module.parameters())
    acc.add("params", params + [b.param_data for b in ddp.buffers if b.param_data is not None])
    acc.add("grads", [b.grad_data for b in ddp.buffers] + [getattr(p, "main_grad", None) for p in params])
    acc.add("master", [p for c in children for p in main_params(c)])
    acc.add("optimizer", [t for c in children if getattr(c, "optimizer", None) is not None for t in moments(c.optimizer)])
    if nexus:
        acc.add("nexus", [opt.anchor, opt.d_sum])
    acc.add("other", [ddp, opt])
    return acc.totals()


def run_one_megatron(raw: dict, spec, args, sources: dict, rank: int, world: int, device,
                     steps: Optional[int] = None, warmup: Optional[int] = None) -> dict:
    """One row of the table (the same keys as :func:`nexus_megatron.tools.bench.run_one`)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .measure import COUNTER, HookFigures, PeakMemory, max_over_ranks, quiet_barrier, summarize_comm, sync_device
    from ..layout import LayoutConfig, build_layout
    from ..nexus import NexusConfig
    from ..engines.megatron.groups import build_nexus_groups, nexus_finalize_model_grads
    from ..engines.megatron.optimizer import get_nexus_megatron_optimizer
    from ..engines.megatron.schedule import nexus_forward_backward

    from megatron.core.distributed import param_and_grad_buffer as pgb
    for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
        if not getattr(getattr(pgb, name, None), "_nexus_counted", False):
            raise RuntimeError(f"bench: megatron-core was imported before the collectives were wrapped for counting "
                               f"({pgb.__name__}.{name}); install nexus_megatron.tools.measure.COUNTER first")
    tp = args.tp
    _init_parallel(tp)
    names = [f"s{i}" for i in range(args.sources)]
    k, B, L = raw["train"]["micro_steps"], raw["data"]["micro_batch_size"], raw["data"]["seq_len"]
    nexus = spec.optim == "nexus"
    mem = PeakMemory(device)
    model, cfg = _model(raw, tp, args.bf16)
    ov_grad = spec.overlap and args.overlap_grad_reduce
    ov_param = spec.overlap and args.overlap_param_gather and args.dist_opt
    ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=args.dist_opt, grad_reduce_in_fp32=True,
                                            overlap_grad_reduce=ov_grad, overlap_param_gather=ov_param,
                                            bucket_size=args.bucket_size)
    ocfg = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                           adam_eps=1e-8, clip_grad=1.0, bf16=args.bf16, use_distributed_optimizer=args.dist_opt)
    if nexus:
        groups = build_nexus_groups(LayoutConfig(mode=spec.layout, sources=tuple(names)))
        layout = groups.layout
        ddp = DistributedDataParallel(config=cfg, module=model, ddp_config=ddp_cfg, pg_collection=groups.pg_collection)
        cfg.finalize_model_grads_func = nexus_finalize_model_grads(groups)
        opt = get_nexus_megatron_optimizer(ocfg, [ddp], groups, NexusConfig(), micro_steps=k)
        fb = nexus_forward_backward(opt, get_forward_backward_func())
        from megatron.core import parallel_state as ps
        dp_rank = ps.get_data_parallel_rank()
        reader = lambda src, step, micro: layout.readers(src, step, micro)[0]   # noqa: E731
    else:
        layout = build_layout(LayoutConfig(mode="sequential", sources=tuple(names)))
        ddp = DistributedDataParallel(config=cfg, module=model, ddp_config=ddp_cfg)
        cfg.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(ocfg, [ddp])
        fb = get_forward_backward_func()
        from megatron.core import parallel_state as ps
        dp_rank = ps.get_data_parallel_rank()
        reader = lambda src, step, micro: dp_rank   # noqa: E731
    it = _Iterator(sources, names, layout, B, reader)
    hook = None
    if spec.sharpness:   # the critical-sharpness hook in every outer step, on the step's own micro-batches
        from ..sharpness import SharpnessConfig
        from ..engines.megatron.sharpness import RecordingIterator, build_megatron_sharpness_hook
        hook = build_megatron_sharpness_hook(
            SharpnessConfig(enabled=True, every=1, split="step", relative=True, batches=1), opt, [ddp],
            train_samplers=[sources[n].train for n in names], val_samplers=[sources[n].val for n in names],
            names=names, weights=layout.weights.tolist(), micro_batch_size=B, seq_length=L)
        it = RecordingIterator(it)
    steps = args.steps if steps is None else steps
    warmup = args.warmup if warmup is None else warmup
    figures = HookFigures()
    COUNTER.take()
    for step in range(warmup + steps):
        timed = step >= warmup
        if step == warmup:
            mem.reset_peak()
        it.begin(step)
        sync_device(device)
        quiet_barrier()
        figures.start(timed)
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=_forward_step, data_iterator=it, model=[ddp], num_microbatches=k, seq_length=L,
           micro_batch_size=B, forward_only=False)
        if hook is None:
            ok, _, _ = opt.step()
        else:
            hook.begin_step(step + 1, it.take())
            if nexus:                     # installed as the Nexus optimizer's pre_outer_step
                ok, _, _ = opt.step()
            else:                         # Megatron's own optimizer: the hook right before its update
                from ..engines.megatron.optimizer import step_with_pre_update
                ok, _, _ = step_with_pre_update(opt, hook)
        if not ok:
            raise RuntimeError(f"bench: {spec.label} step {step} was skipped (non-finite gradient)")
        figures.stop(timed, hook, device)
    comm = summarize_comm(COUNTER.take(), steps, k)
    state = account_megatron(ddp, opt)
    peak = mem.peak()
    times = max_over_ranks(figures.times, device)
    cpu_times = max_over_ranks(figures.cpu_times, device)
    local = sum(p.numel() for p in model.parameters())
    t = torch.tensor([float(local)], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if tp > 1:
        dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())   # replicated (layernorm) params counted
    P = int(t.item())                                                    # per TP rank: an upper bound at TP > 1
    grad_numel = sum(b.grad_data.numel() for b in ddp.buffers)
    main_numel = opt.numel if nexus else sum(
        p.numel() for c in getattr(opt, "chained_optimizers", [opt]) for g in c.optimizer.param_groups
        for p in g["params"])
    row = {"optim": spec.optim, "layout": spec.layout, "overlap": spec.overlap, "sharpness": spec.sharpness,
           "engine": "megatron", "step_s": statistics.median(times), "step_times": times, "cpu_times": cpu_times,
           "cpu_s": statistics.median(cpu_times), "tokens_per_s": world // tp * k * B * L / statistics.median(times),
           "state": state, "peak_bytes": peak, "peak_what": mem.what, "comm": comm, "params": P,
           "flat_numel": None, "grad_buffer_numel": grad_numel, "main_numel": main_numel,
           "buckets": len(ddp.bucket_groups), "overlap_grad_reduce": ov_grad, "overlap_param_gather": ov_param,
           "dist_opt": args.dist_opt, "tp": tp}
    if hook is not None:
        figures.summarize(row, times, device)
    del opt, ddp, model, fb, it, hook
    gc.collect()
    return row
