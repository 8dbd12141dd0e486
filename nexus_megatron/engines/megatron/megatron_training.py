"""Nexus inside Megatron-LM's own training loop as megatron-core >= 0.17 ships it (``megatron.training``).

``launch/pretrain_gpt_nexus.py`` calls :func:`main` when ``megatron.training`` is importable. Megatron parses
and validates every argument as usual (``parse_and_validate_args``), builds the config container
(``pretrain_cfg_container_from_args``) and runs its own ``pretrain()``. Nexus is switched on by
``--optimizer nexus`` (an extra choice of Megatron's own ``--optimizer`` flag, added through the
``extra_args_provider``) and configured by the ``--nexus-*`` flags. The outer optimizer is Megatron's Adam.

What Nexus cannot run stops before training with an error naming the flag (:func:`check_nexus_args`).
"""
from __future__ import annotations

import sys
from functools import partial

from ...errors import NexusConfigError
from .megatron_lm import NexusSettings, add_nexus_args, enable_nexus, register_settings, settings_from_args

NEXUS = "nexus"


def add_nexus_megatron_args(parser):
    """``extra_args_provider``: the --nexus-* / --sharpness-* flags, and ``nexus`` as a choice of Megatron's
    ``--optimizer``. ``--optimizer nexus`` is stored as ``optimizer='adam'`` (the outer optimizer) with
    ``nexus_optimizer=True``: Megatron's ``validate_args`` runs before anyone else sees the arguments, and it
    treats any optimizer but sgd/adam as an "emerging" one (it turns --use-distributed-optimizer into its
    layer-wise distributed optimizer)."""
    add_nexus_args(parser)
    parser.set_defaults(nexus_optimizer=False)
    for action in parser._actions:          # argparse has no public accessor for an action's choices
        if "--optimizer" in action.option_strings and action.choices is not None:
            action.choices = list(action.choices) + [NEXUS]
            action.__class__ = type("NexusOuterOptimizerAction", (type(action),), {"__call__": _store_optimizer})
    return parser


def _store_optimizer(self, parser, namespace, values, option_string=None):
    nexus = values == NEXUS
    setattr(namespace, "nexus_optimizer", nexus)
    setattr(namespace, self.dest, "adam" if nexus else values)


# (flag, attribute, predicate that refuses, why)
REFUSED = [
    ("--fp16", "fp16", lambda v: bool(v), "Nexus has no loss scaling; use --bf16"),
    ("--fp8-format", "fp8", lambda v: v is not None, "fp8 needs Transformer Engine on a GPU; not supported with Nexus"),
    ("--use-precision-aware-optimizer", "use_precision_aware_optimizer", bool,
     "Nexus updates fp32 main params; drop the flag"),
    ("--optimizer-cpu-offload", "optimizer_cpu_offload", bool, "not supported with Nexus"),
    ("--use-megatron-fsdp", "use_megatron_fsdp", bool, "not supported with Nexus; use --use-distributed-optimizer"),
    ("--use-torch-fsdp2", "use_torch_fsdp2", bool, "not supported with Nexus; use --use-distributed-optimizer"),
    ("--num-distributed-optimizer-instances", "num_distributed_optimizer_instances", lambda v: (v or 1) > 1,
     "Nexus's source-parallel layout builds the instances itself; leave it at 1"),
    ("--overlap-param-gather-with-optimizer-step", "overlap_param_gather_with_optimizer_step", bool,
     "the inner steps cannot dispatch the gather from Megatron's chained step; use --overlap-param-gather"),
    ("--rampup-batch-size", "rampup_batch_size", lambda v: v is not None,
     "Megatron-LM deprecates it for --step-batch-size-schedule (megatron-core 0.19's loop ignores it); give the "
     "ramp as --step-batch-size-schedule, which Nexus runs with K inner steps per iteration of N_t/K micro-batches"),
    ("--context-parallel-size", "context_parallel_size", lambda v: (v or 1) > 1,
     "not supported with Nexus: its per-source data path does not cut sequences per context-parallel rank, and "
     "Megatron runs context parallelism only with Transformer Engine's attention (GPU); leave it at 1"),
    ("--optimizer-cuda-graph", "optimizer_cuda_graph", bool, "Nexus's optimizer step cannot be graph-captured"),
    ("--full-validation", "full_validation", bool,
     "the validation data is one blended stream of every source's validation windows, read --eval-iters batches "
     "at a time; drop the flag"),
    ("--multiple-validation-sets", "multiple_validation_sets", bool,
     "the validation data is one blended stream of every source; drop the flag"),
    ("--cuda-graph-impl", "cuda_graph_impl", lambda v: v not in (None, "none"),
     "CUDA graphs capture a fixed schedule; Nexus runs K passes with an inner step after each"),
]


def check_nexus_args(args) -> None:
    """Stop, naming the flag, at anything in Megatron's parsed arguments that Nexus cannot run."""
    for flag, attr, refused, why in REFUSED:
        if refused(getattr(args, attr, None)):
            raise NexusConfigError(f"{flag}: {why} (--optimizer nexus)")
    if getattr(args, "mtp_num_layers", None) and (getattr(args, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise NexusConfigError("--mtp-num-layers with --pipeline-model-parallel-size > 1: multi-token prediction "
                               "under Nexus is tested without pipeline parallelism only (with PP the MTP layer sits "
                               "on the last stage and shares the embedding across stages; not verified); use one "
                               "pipeline stage")
    if getattr(args, "dataloader_type", None) == "cyclic":      # Megatron's default is single
        raise NexusConfigError("--dataloader-type cyclic: --optimizer nexus reads one source per inner step from its "
                               "own per-source iterator (it runs as external); drop the flag")
    if getattr(args, "nexus_layout", "sequential") == "source-parallel":
        raise NexusConfigError("--nexus-layout source-parallel: Megatron's own loop builds the model and its DDP "
                               "inside megatron.training with Megatron's data-parallel groups, which would sum the "
                               "sources before Nexus normalizes them; use --nexus-layout sequential here, or "
                               "source-parallel through the library API (docs/megatron.md §3)")
    if not getattr(args, "data_path", None):
        raise NexusConfigError("--data-path: --optimizer nexus needs one path per source (W1 P1 W2 P2 ...)")
    if args.nexus_micro_steps is not None and args.nexus_micro_steps < 1:
        raise NexusConfigError(f"--nexus-micro-steps {args.nexus_micro_steps}: must be >= 1")
    check_batch_size_schedule(args)


def schedule_batch_sizes(schedule: str) -> list:
    """The global batch sizes of Megatron's ``--step-batch-size-schedule "THRESHOLD:BS THRESHOLD:BS ..."``."""
    try:
        return [int(tok.rpartition(":")[2]) for tok in schedule.split()]
    except ValueError:
        raise NexusConfigError(f"--step-batch-size-schedule {schedule!r}: expected THRESHOLD:BATCH_SIZE pairs") from None


def check_batch_size_schedule(args) -> None:
    """Batch-size schedules under Nexus: an iteration is one outer step of K inner steps whatever its batch; K is
    fixed for the run (``--nexus-micro-steps``, default: the micro-batch count N of the first stage) and an
    iteration of N_t micro-batches runs K passes of N_t/K. Every stage's N_t must therefore be a multiple of K."""
    schedule = getattr(args, "step_batch_size_schedule", None)
    if not schedule:
        return
    unit = args.micro_batch_size * args.data_parallel_size * (getattr(args, "gtp_weight_remat_size", 1) or 1)
    counts = [bs // unit for bs in schedule_batch_sizes(schedule)]
    k = args.nexus_micro_steps or counts[0]
    for bs, n in zip(schedule_batch_sizes(schedule), counts):
        if n < 1 or n % k:
            raise NexusConfigError(
                f"--step-batch-size-schedule: global batch {bs} is {n} micro-batches of {unit} samples (micro batch "
                f"x data-parallel size), not a multiple of K={k} inner steps per iteration (--nexus-micro-steps"
                f"{'' if args.nexus_micro_steps else ', default: the first stage'}); give batch sizes whose "
                "micro-batch counts K divides")


def gpt_model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """A GPTModel from Megatron's parsed arguments (local layer spec; Transformer Engine's on a GPU with TE)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args
    args = get_args()
    cfg = config if config is not None else core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(normalization=args.normalization)
    use_te = False
    if getattr(args, "transformer_impl", "local") == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
            spec = get_gpt_layer_with_transformer_engine_spec()
            use_te = True
        except ImportError:
            pass
    mtp_spec = None
    if getattr(cfg, "mtp_num_layers", None):
        # multi-token prediction: GPTModel builds the MTP block only from a spec (without one it would split the
        # decoder's hidden states as if they held MTP outputs); the MTP layer is a decoder layer, as in
        # Megatron-LM's own GPT builder (which 0.19's pretrain() uses when the config container has a model config,
        # as the launcher's does: this provider is the fallback)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
        mtp_spec = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=use_te, vp_stage=vp_stage)
    return GPTModel(config=cfg, transformer_layer_spec=spec, mtp_block_spec=mtp_spec, vocab_size=args.padded_vocab_size,
                    max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
                    post_process=post_process, share_embeddings_and_output_weights=not
                    args.untie_embeddings_and_output_weights, position_embedding_type=args.position_embedding_type,
                    rotary_percent=args.rotary_percent, rotary_base=args.rotary_base)


def gpt_forward_step(data_iterator, model):
    """Megatron-LM's GPT forward step on the per-source batches (loss, num_tokens, report)."""
    import torch
    b = next(data_iterator)
    dev = next(model.parameters()).device
    b = {k: v.to(dev) for k, v in b.items()}
    out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])

    def loss_func(output):
        losses = output.view(-1).float()
        mask = b["loss_mask"].view(-1).float()
        loss = torch.sum(losses * mask)
        num_tokens = mask.sum().clone().detach().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return out, loss_func


def enable_nexus_from_parsed_args(args, training_module=None):
    """After Megatron-LM's ``parse_and_validate_args(extra_args_provider=add_nexus_megatron_args)``: with
    ``--optimizer nexus``, refuse what Nexus cannot run (naming the flag), make Adam the outer optimizer and patch
    ``megatron.training.training`` (:func:`~.megatron_lm.enable_nexus`). Returns the settings, or None without
    ``--optimizer nexus``. The train dataset provider is then :func:`~.megatron_lm.nexus_datasets_provider`."""
    if not (getattr(args, "nexus_optimizer", False) or args.optimizer == NEXUS):
        return None
    from megatron.training import training as T
    check_nexus_args(args)
    args.optimizer = "adam"               # the outer optimizer; Megatron builds it
    args.nexus = True
    args.dataloader_type = "external"
    args.check_for_nan_in_loss_and_grad = False   # Nexus skips a non-finite outer step itself
    settings: NexusSettings = settings_from_args(args)
    enable_nexus(settings, training_module or T)
    register_settings(settings)
    # Megatron re-parses sys.argv later (ft_integration / inprocess_restart, parse_known_args, without the
    # extra provider): let it see the outer optimizer there.
    sys.argv = _outer_optimizer_argv(sys.argv)
    return settings


def main(argv=None):
    """Run Megatron-LM's ``pretrain()`` (from the megatron-core wheel) on a GPT, with ``--optimizer nexus``."""
    from megatron.core.enums import ModelType
    from megatron.training import training as T
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from .compat import pretrain_takes_config_container, use_prebuilt_dataset_helpers
    from .megatron_lm import nexus_datasets_provider
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    if not pretrain_takes_config_container():
        raise NexusConfigError("this megatron-core's pretrain() takes no config container; use the hook-in "
                               "recipe of docs/megatron.md §2 with your Megatron-LM checkout")
    args = parse_and_validate_args(extra_args_provider=add_nexus_megatron_args,
                                   args_defaults={"tokenizer_type": "NullTokenizer"})
    nexus = enable_nexus_from_parsed_args(args, T) is not None
    use_prebuilt_dataset_helpers()
    model_cfg = gpt_config_from_args(args)
    full_config = pretrain_cfg_container_from_args(args, model_cfg)
    provider = nexus_datasets_provider if nexus else None
    if provider is None:
        raise NexusConfigError("--optimizer: this entry point trains with --optimizer nexus; for plain Adam run "
                               "Megatron-LM's own pretrain_gpt.py")
    T.pretrain(full_config, provider, ModelType.encoder_or_decoder, gpt_forward_step,
               model_provider=partial(_provider_adapter))
    return T


def _outer_optimizer_argv(argv):
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--optimizer" and i + 1 < len(out) and out[i + 1] == NEXUS:
            out[i + 1] = "adam"
        elif a == f"--optimizer={NEXUS}":
            out[i] = "--optimizer=adam"
    return out


def _provider_adapter(*a, **kw):
    return gpt_model_provider(*a, **kw)
