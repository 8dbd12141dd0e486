#!/usr/bin/env python
"""GPT pretraining on megatron-core with Nexus (or Adam), Megatron-LM style command line.

megatron-core >= 0.17 (Python >= 3.12): this runs Megatron-LM's own training loop from the wheel
(``megatron.training``: ``parse_and_validate_args`` + ``pretrain()``), with ``--optimizer nexus`` and the
``--nexus-*`` flags; every Megatron-LM argument is parsed, validated and honoured by Megatron itself, and what
Nexus cannot run stops before training naming the flag
(:mod:`nexus_megatron.engines.megatron.megatron_training`).

megatron-core 0.16 (no ``megatron.training`` in the wheel) runs the loop below, which re-implements the subset
of Megatron-LM's loop listed by ``--help``; prefer the hook-in recipe of docs/megatron.md §2 with your own
Megatron-LM checkout there.

Takes Megatron-LM's usual ``pretrain_gpt.py`` arguments (the subset listed by ``--help``; other
Megatron-LM flags are accepted and ignored with a warning) plus::

    --optimizer nexus                    # instead of adam: Nexus, with Adam as the outer optimizer
    --nexus-gamma 0.25                    # inner step (gamma_mode=update: a multiple of the lr-scaled step)
    --nexus-gamma-mode update|absolute
    --nexus-layout sequential|source-parallel
    --nexus-micro-steps K                # inner steps per iteration (default: see --help)

so an existing launch script changes in one line (``--optimizer adam`` -> ``--optimizer nexus``), plus the
data: ``--data-path W1 P1 W2 P2 ...`` names one dataset per source (Megatron indexed-dataset prefixes or
prepared source directories of this package) and the weights become the Nexus source weights.

Launch with torchrun on GPUs::

    torchrun --nproc_per_node 8 launch/pretrain_gpt_nexus.py --num-layers 24 ... --optimizer nexus

CPU smoke runs only (tests, laptops): add ``--cpu-test-shim``, which imports the test-only monkeypatch
``nexus_megatron/tools/mcore_cpu_shim.py`` (it fakes CUDA for megatron-core 0.16 on a CPU torch build) and uses gloo.
It patches torch globally and is never imported without that flag.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


# ---------------------------------------------------------------------------------------------------
# arguments (names and defaults as in Megatron-LM's megatron/training/arguments.py)
# ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--num-layers", type=int, required=True)
    m.add_argument("--hidden-size", type=int, required=True)
    m.add_argument("--ffn-hidden-size", type=int, default=None)
    m.add_argument("--num-attention-heads", type=int, required=True)
    m.add_argument("--group-query-attention", action="store_true")
    m.add_argument("--num-query-groups", type=int, default=1)
    m.add_argument("--kv-channels", type=int, default=None)
    m.add_argument("--seq-length", type=int, required=True)
    m.add_argument("--max-position-embeddings", type=int, default=None)
    m.add_argument("--position-embedding-type", choices=["learned_absolute", "rope", "none"], default="learned_absolute")
    m.add_argument("--rotary-percent", type=float, default=1.0)
    m.add_argument("--rotary-base", type=int, default=10000)
    m.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    m.add_argument("--norm-epsilon", type=float, default=1e-5)
    m.add_argument("--swiglu", action="store_true")
    m.add_argument("--disable-bias-linear", action="store_true")
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    m.add_argument("--init-method-std", type=float, default=0.02)
    m.add_argument("--attention-dropout", type=float, default=0.1)
    m.add_argument("--hidden-dropout", type=float, default=0.1)
    m.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion")
    m.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion")
    m.add_argument("--use-cpu-initialization", action="store_true")
    m.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, required=True)
    t.add_argument("--global-batch-size", type=int, default=None)
    t.add_argument("--train-iters", type=int, required=True)
    t.add_argument("--lr", type=float, required=True)
    t.add_argument("--min-lr", type=float, default=0.0)
    t.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="linear")
    t.add_argument("--lr-decay-iters", type=int, default=None)
    t.add_argument("--lr-warmup-iters", type=int, default=0)
    t.add_argument("--lr-warmup-fraction", type=float, default=None)
    t.add_argument("--lr-warmup-init", type=float, default=0.0)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--start-weight-decay", type=float, default=None)
    t.add_argument("--end-weight-decay", type=float, default=None)
    t.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant")
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.999)
    t.add_argument("--adam-eps", type=float, default=1e-8)
    t.add_argument("--optimizer", choices=["adam", "nexus"], default="adam")
    t.add_argument("--bf16", action="store_true")
    t.add_argument("--fp16", action="store_true")
    t.add_argument("--seed", type=int, default=1234)

    d = p.add_argument_group("parallelism")
    d.add_argument("--tensor-model-parallel-size", type=int, default=1)
    d.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    d.add_argument("--sequence-parallel", action="store_true")
    d.add_argument("--use-distributed-optimizer", action="store_true")
    d.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    d.add_argument("--overlap-grad-reduce", action="store_true")
    d.add_argument("--overlap-param-gather", action="store_true")
    d.add_argument("--ddp-bucket-size", type=int, default=None)
    d.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)
    d.add_argument("--distributed-timeout-minutes", type=int, default=10)

    io = p.add_argument_group("data, checkpoints, logging")
    io.add_argument("--data-path", nargs="+", required=True,
                    help="one path, or weight/path pairs W1 P1 W2 P2 ... (one source per path: a Megatron "
                         "indexed-dataset prefix or a prepared source directory; a prepared root = all its sources)")
    io.add_argument("--split", type=str, default="969, 30, 1")
    io.add_argument("--tokenizer-type", type=str, default=None)
    io.add_argument("--vocab-file", type=str, default=None)
    io.add_argument("--merge-file", type=str, default=None)
    io.add_argument("--tokenizer-model", type=str, default=None)
    io.add_argument("--vocab-size", type=int, default=None)
    io.add_argument("--reset-attention-mask", action="store_true")
    io.add_argument("--eod-mask-loss", action="store_true")
    io.add_argument("--save", type=str, default=None)
    io.add_argument("--load", type=str, default=None)
    io.add_argument("--save-interval", type=int, default=None)
    io.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist")
    io.add_argument("--log-interval", type=int, default=100)
    io.add_argument("--eval-interval", type=int, default=1000)
    io.add_argument("--eval-iters", type=int, default=100)

    n = p.add_argument_group("nexus")
    from nexus_megatron.settings import add_nexus_flags
    add_nexus_flags(n)   # --nexus-gamma, --nexus-gamma-mode, --nexus-min-grad-norm, --nexus-max-consecutive-skips
    n.add_argument("--nexus-layout", choices=["sequential", "source-parallel"], default="sequential")
    n.add_argument("--nexus-micro-steps", type=int, default=None,
                   help="inner steps K per iteration; each runs N/K of the N micro-batches. Default: N with "
                        "PP=1; with PP=p the largest divisor of N not above N/p (>= p micro-batches per pass)")
    n.add_argument("--nexus-layout-seed", type=int, default=None, help="seed of the sequential source draws (--seed)")
    n.add_argument("--nexus-exact-displacement", action="store_true",
                   help="keep the displacement in its own fp32 shard (+4 bytes/param/DP)")
    n.add_argument("--nexus-log-file", type=str, default=None, help="JSON lines of the training log (rank 0)")
    n.add_argument("--cpu-test-shim", action="store_true",
                   help="CPU smoke runs only: apply nexus_megatron/tools/mcore_cpu_shim.py (fakes CUDA for megatron-core) and gloo")
    from nexus_megatron.engines.megatron.megatron_lm import add_sharpness_args   # --sharpness-*
    add_sharpness_args(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.ignored = unknown
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.fp16:
        parser.error("--fp16 is not supported with this launcher (Nexus needs no loss scale): use --bf16")
    from nexus_megatron.engines.megatron.megatron_lm import sharpness_config_from_args
    from nexus_megatron.errors import NexusConfigError
    try:
        args.sharpness = sharpness_config_from_args(args)
    except NexusConfigError as e:
        parser.error(str(e))
    return args


def log0(*a):
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


# ---------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------

def init_distributed(args):
    import datetime

    import torch
    import torch.distributed as dist
    if args.cpu_test_shim:
        from nexus_megatron.tools.mcore_cpu_shim import patch_megatron_for_cpu   # smoke runs only; never without the flag
        patch_megatron_for_cpu()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = args.distributed_backend or ("gloo" if args.cpu_test_shim else "nccl")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: megatron-core needs GPUs; for a CPU smoke run add --cpu-test-shim")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def resolve_vocab(args, specs) -> tuple:
    """(padded vocabulary size, end-of-document id or None)."""
    from nexus_megatron.data.shards import load_manifest
    from nexus_megatron.engines.megatron.data import vocab_size_of
    vocab, eod = args.vocab_size, None
    for s in specs:
        root = os.path.dirname(s.path)
        if os.path.isfile(os.path.join(root, "manifest.json")):
            man = load_manifest(root)
            eod = man.get("eot_id")
            break
    if vocab is None:
        vocab = vocab_size_of(specs)
    if vocab is None and args.tokenizer_type == "GPT2BPETokenizer" and args.vocab_file:
        with open(args.vocab_file) as f:
            enc = json.load(f)
        vocab, eod = len(enc), enc.get("<|endoftext|>")
    if vocab is None and args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.tokenizer_model)
        vocab, eod = len(tok), tok.eos_token_id
    if vocab is None:
        raise SystemExit("cannot tell the vocabulary size: give --vocab-size, or --tokenizer-type GPT2BPETokenizer "
                         "--vocab-file, or --tokenizer-type HuggingFaceTokenizer --tokenizer-model, or prepared data")
    mult = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab / mult) * mult), eod


def build_model(args, vocab_size, on_gpu):
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear, bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel and args.tensor_model_parallel_size > 1,
        use_cpu_initialization=args.use_cpu_initialization or not on_gpu,
        masked_softmax_fusion=args.masked_softmax_fusion and on_gpu,
        bias_activation_fusion=args.bias_gelu_fusion and on_gpu and not args.swiglu,
        persist_layer_norm=on_gpu)
    spec = get_gpt_layer_local_spec()
    if on_gpu:
        try:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
            import transformer_engine  # noqa: F401
            spec = get_gpt_layer_with_transformer_engine_spec()
        except Exception:
            pass
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=vocab_size,
                     max_sequence_length=args.max_position_embeddings,
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                     rotary_base=args.rotary_base)
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        model = Float16Module(cfg, model)
    return model, cfg


def default_micro_steps(n_mb: int, pp: int) -> int:
    if pp <= 1:
        return n_mb
    cap = max(1, n_mb // pp)
    return max(d for d in range(1, cap + 1) if n_mb % d == 0)


def make_forward_step(source_names, on_batch=None):
    import torch

    def forward_step(data_iterator, model):
        if on_batch is not None:
            on_batch()
        b = next(data_iterator)
        dev = next(model.parameters()).device
        b = {k: v.to(dev) for k, v in b.items()}
        out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
        src = int(b["source_id"][0])

        def loss_func(output):
            mask = b["loss_mask"].view(-1).float()
            loss = torch.sum(output.view(-1).float() * mask) / mask.sum().clamp_min(1.0)
            return loss, {"lm loss": loss.detach().clone(), "source": src}   # the schedule scales loss in place
        return out, loss_func
    return forward_step


def reduce_losses(losses, K, device):
    """Per-source mean of the micro-batch losses over the whole job (losses live on the last stage)."""
    import torch
    import torch.distributed as dist
    acc = torch.zeros(2 * K, dtype=torch.float64, device=device)
    for d in losses or []:
        acc[d["source"]] += float(d["lm loss"])
        acc[K + d["source"]] += 1
    dist.all_reduce(acc)
    return [float(acc[i] / acc[K + i]) if acc[K + i] > 0 else float("nan") for i in range(K)]


def evaluate(args, model, fb_eval, forward_step, val_samplers, names, dp_rank, dp_size, device):
    import torch
    from nexus_megatron.engines.megatron.data import make_megatron_batch
    for c in model:
        c.eval()
    out = {}
    for i, sampler in enumerate(val_samplers):
        if sampler is None:
            continue
        n = max(1, min(args.eval_iters, sampler.windows // max(1, args.micro_batch_size * dp_size)))

        def it(i=i, sampler=sampler, n=n):
            for j in range(n):
                start = ((j * dp_size + dp_rank) * args.micro_batch_size) % max(1, sampler.windows)
                yield make_megatron_batch(sampler.batch(start, args.micro_batch_size), i)
        with torch.no_grad():
            losses = fb_eval(forward_step_func=forward_step, data_iterator=it(), model=model, num_microbatches=n,
                             seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=True)
        out[f"val/{names[i]}"] = reduce_losses(losses, len(names), device)[i]
    for c in model:
        c.train()
    return out


def build_sharpness(args, scfg, opt, model, specs, data, val, fb_eval, eod):
    """(hook, data iterator): the critical-sharpness hook with per-source probe batches from the data
    routing (and --sharpness-ood-data-path), and the iterator wrapped to keep each iteration's micro-batches.
    (None, data) when --sharpness-every is 0."""
    if not scfg.enabled:
        return None, data
    from nexus_megatron.engines.megatron.megatron_lm import ood_samplers
    from nexus_megatron.engines.megatron.sharpness import RecordingIterator, build_megatron_sharpness_hook
    hook = build_megatron_sharpness_hook(
        scfg, opt, model, train_samplers=data.samplers, val_samplers=val, names=[s.name for s in specs],
        weights=[s.weight for s in specs], micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        ood_samplers=ood_samplers(args.sharpness_ood_data_path, args.seq_length, args.seed, args.split), eod=eod,
        mask_eod=args.eod_mask_loss, forward_backward_func=fb_eval)
    return hook, RecordingIterator(data)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    init_distributed(args)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from nexus_megatron.engines.megatron import (build_eval_samplers, build_nexus_groups, build_source_iterator,
                                                 get_nexus_megatron_optimizer, load_checkpoint,
                                                 megatron_core_version, nexus_finalize_model_grads,
                                                 nexus_forward_backward, parse_data_path, save_checkpoint)
    from nexus_megatron.engines.megatron.optimizer import step_with_pre_update
    from nexus_megatron.faults import fault_point
    from nexus_megatron.layout import LayoutConfig
    from nexus_megatron.settings import nexus_config_from_flags

    if args.ignored:
        log0(f"[pretrain_gpt_nexus] ignoring Megatron-LM arguments this launcher does not implement: {args.ignored}")
    on_gpu = not args.cpu_test_shim and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    ps.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    dp_size = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    gbs = args.global_batch_size or args.micro_batch_size * dp_size
    if gbs % (args.micro_batch_size * dp_size):
        raise SystemExit(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size x data-parallel size "
                         f"({args.micro_batch_size} x {dp_size})")
    n_mb = gbs // (args.micro_batch_size * dp_size)

    scfg = args.sharpness
    specs = parse_data_path(args.data_path)
    names = [s.name for s in specs]
    nexus = args.optimizer == "nexus"
    layout_cfg = LayoutConfig(mode=args.nexus_layout if nexus else "sequential", sources=tuple(names),
                              weights=tuple(s.weight for s in specs),
                              seed=args.seed if args.nexus_layout_seed is None else args.nexus_layout_seed)
    groups = build_nexus_groups(layout_cfg)
    k = (args.nexus_micro_steps or default_micro_steps(n_mb, args.pipeline_model_parallel_size)) if nexus else 1
    vocab, eod = resolve_vocab(args, specs)

    model, cfg = build_model(args, vocab, on_gpu)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32 or not args.bf16,
                                            overlap_grad_reduce=args.overlap_grad_reduce,
                                            overlap_param_gather=args.overlap_param_gather,
                                            use_distributed_optimizer=args.use_distributed_optimizer,
                                            bucket_size=args.ddp_bucket_size)
    model = [DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=model,
                                     pg_collection=groups.pg_collection if nexus else None)]
    cfg.finalize_model_grads_func = nexus_finalize_model_grads(groups) if nexus else finalize_model_grads
    cfg.no_sync_func = model[0].no_sync
    ocfg = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                           adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                           clip_grad=args.clip_grad, bf16=args.bf16,
                           params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                           use_distributed_optimizer=args.use_distributed_optimizer)
    if nexus:
        ncfg = nexus_config_from_flags(args)
        opt = get_nexus_megatron_optimizer(ocfg, model, groups, ncfg, micro_steps=k,
                                           exact_displacement=args.nexus_exact_displacement)
    else:
        opt = get_megatron_optimizer(ocfg, model)
    cfg.grad_scale_func = opt.scale_loss
    wd0 = args.weight_decay if args.start_weight_decay is None else args.start_weight_decay
    wd1 = args.weight_decay if args.end_weight_decay is None else args.end_weight_decay
    warm = args.lr_warmup_iters if args.lr_warmup_fraction is None else int(args.lr_warmup_fraction * args.train_iters)
    sched = OptimizerParamScheduler(opt, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
                                    lr_warmup_steps=warm, lr_decay_steps=args.lr_decay_iters or args.train_iters,
                                    lr_decay_style=args.lr_decay_style, start_wd=wd0, end_wd=wd1,
                                    wd_incr_steps=args.train_iters, wd_incr_style=args.weight_decay_incr_style)

    if nexus and k == 1:
        log0("[pretrain_gpt_nexus] WARNING: 1 Nexus inner step per iteration (one micro-batch per iteration): that is "
             "Adam on normalized source gradients, without Nexus's alignment term; raise --global-batch-size or "
             "--nexus-micro-steps")
    per_pass = n_mb // k
    if n_mb % k:
        raise SystemExit(f"--nexus-micro-steps {k} must divide the {n_mb} micro-batches per iteration")
    data = build_source_iterator(groups.layout, specs, args.seq_length, args.micro_batch_size,
                                 per_pass if nexus else n_mb, seed=args.seed, split=args.split, eod=eod,
                                 mask_eod=args.eod_mask_loss)
    val = build_eval_samplers(specs, args.seq_length, seed=args.seed, split=args.split)
    # fault-injection hook (tests; NEXUS_FAULT_INJECT unset: no-op): the middle of iteration `it` is the
    # forward of its first micro-batch after the first Nexus inner step (Adam: after the first micro-batch)
    fault = {"it": 0, "batch": 0, "at": per_pass if (nexus and k > 1) else min(1, n_mb - 1)}

    def on_batch():
        if fault["batch"] == fault["at"]:
            fault_point("step", fault["it"])
        fault["batch"] += 1

    forward_step = make_forward_step(names, on_batch)
    base_fb = get_forward_backward_func()
    fb = nexus_forward_backward(opt, base_fb) if nexus else base_fb
    hook, data = build_sharpness(args, scfg, opt, model, specs, data, val, base_fb, eod)

    start = 0
    if args.load:
        from nexus_megatron.errors import CheckpointError
        try:   # an old-format or unsafe checkpoint: one line (naming the file and the convert command), exit 2
            info = load_checkpoint(args.load, model, opt, sched)
        except CheckpointError as e:
            log0(f"pretrain_gpt_nexus.py: error: {e}")
            sys.exit(2)
        if info is not None:
            start = info["iteration"]
            data.load_state_dict(info["client_state"]["data"])
            if hook is not None and "sharpness" in info["client_state"]:
                hook.load_state_dict(info["client_state"]["sharpness"])
            log0(f"[pretrain_gpt_nexus] resumed from {info['path']} at iteration {start}")

    log_f = open(args.nexus_log_file, "a") if (args.nexus_log_file and dist.get_rank() == 0) else None
    n_params = sum(p.numel() for p in model[0].parameters())
    log0(f"[pretrain_gpt_nexus] megatron-core {megatron_core_version()}, optimizer={args.optimizer}"
         + (f" ({opt!r}, K={k} inner steps x {per_pass} micro-batches)" if nexus else "")
         + f", sources={names}, world={dist.get_world_size()} (TP={args.tensor_model_parallel_size}, "
           f"PP={args.pipeline_model_parallel_size}, DP={dp_size}), {n_params} params on rank 0, "
           f"{n_mb} micro-batches/iteration")
    last = {}
    tokens_per_iter = gbs * args.seq_length
    t_log = time.time()
    for it in range(start, args.train_iters):
        t0 = time.time()
        for c in model:
            c.zero_grad_buffer()
        opt.zero_grad()
        if not nexus:
            data.begin_iteration(it)
        lr = opt.param_groups[0]["lr"]
        fault.update(it=it + 1, batch=0)
        losses = fb(forward_step_func=forward_step, data_iterator=data, model=model, num_microbatches=n_mb,
                    seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=False)
        if hook is not None:      # the iteration's own micro-batches (the mixture loss of --sharpness-split step)
            hook.begin_step(it + 1, data.take())
        ok, grad_norm, _ = opt.step() if nexus else step_with_pre_update(opt, hook)
        if ok:
            sched.step(increment=1)
        per_src = reduce_losses(losses, len(names), device)
        rec = {"iteration": it + 1, "lr": lr, "skipped": not ok, "grad_norm": grad_norm,
               "time_s": time.time() - t0, "tokens": (it + 1) * tokens_per_iter}
        valid = [v for v in per_src if not math.isnan(v)]
        rec["loss"] = sum(valid) / len(valid) if valid else float("nan")
        for nme, v in zip(names, per_src):
            if not math.isnan(v):
                rec[f"loss/{nme}"] = v
        if nexus:
            rec.update(opt.step_stats())
        if hook is not None:
            rec.update(hook.pop_metrics())
        done = it + 1
        if args.eval_interval and (done % args.eval_interval == 0 or done == args.train_iters):
            rec.update(evaluate(args, model, base_fb, forward_step, val, names, dp_rank, dp_size, device))
        if args.save and args.save_interval and (done % args.save_interval == 0 or done == args.train_iters):
            client = {"data": data.state_dict()}
            if hook is not None:
                client["sharpness"] = hook.state_dict()
            save_checkpoint(args.save, done, model, opt, sched, client_state=client)
            rec["saved"] = True
        if log_f:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
        if done % args.log_interval == 0 or done == args.train_iters:
            dt = (time.time() - t_log) / args.log_interval
            t_log = time.time()
            msg = " | ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}" for k_, v in rec.items())
            log0(f"[pretrain_gpt_nexus] {msg} | s/iter={dt:.3f}")
        last = rec
    if log_f:
        log_f.close()
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return last


def megatron_loop_available() -> bool:
    """megatron-core >= 0.17 ships Megatron-LM's loop (``megatron.training``) with a config-container pretrain()."""
    from nexus_megatron.engines.megatron.compat import has_megatron_training
    if not has_megatron_training():
        return False
    from nexus_megatron.engines.megatron.compat import pretrain_takes_config_container
    return pretrain_takes_config_container()


def run(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    import importlib.util
    if "--cpu-test-shim" in argv and importlib.util.find_spec("megatron.training") is not None:   # test-only; before megatron.training is imported
        argv.remove("--cpu-test-shim")
        from nexus_megatron.tools.mcore_cpu_shim import patch_megatron_training_for_cpu
        patch_megatron_training_for_cpu()
    from nexus_megatron.launcher import close_process_groups
    if megatron_loop_available():
        from nexus_megatron.engines.megatron.megatron_training import main as megatron_main
        out = megatron_main(argv)
    else:
        out = main(argv)
    close_process_groups()   # before interpreter teardown (gloo's threads can abort it otherwise)
    return out


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        run()
