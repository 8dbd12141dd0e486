"""ds_config files as people write them, read the way DeepSpeed reads them (issue 16).

The configs below are written for this project in the styles of the public LLM training repos: the heredocs
of Megatron-DeepSpeed's launch scripts (train_batch_size and the micro-batch, no
gradient_accumulation_steps), DeepSpeed-Chat's generated configs (fp16 default, offload, hybrid engine,
tensorboard), the HF transformers DeepSpeed test configs ("auto" placeholders, ZeRO-3 with an AdamW
section), BLOOM-era configs (bigscience: bf16 or fp16 with a loss scale, huge steps_per_print), the
DeepSpeedExamples training scripts (Adam/Lamb/OneBitAdam sections) and hjson files with comments and
trailing commas. Each gets a ``nexus`` section and the number of ranks its script implies, and is either
accepted with the expected k (DeepSpeed's own batch arithmetic) and outer AdamW settings, or refused with
the expected one-line message before DeepSpeed starts.

Pure config tests (no process group; ~15 s on the 2-core machine, most of it the DeepSpeed import), plus one
2-rank DeepSpeed run (~40 s): a Megatron-DeepSpeed-style config without gradient_accumulation_steps and with
an Adam section and gradient_clipping < 1 trains and matches the single-process reference.
"""
import base64
import copy
import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from nexus_megatron.engines.deepspeed import prepare_ds_config  # noqa: E402
from nexus_megatron.engines.deepspeed.ds_view import read_ds_config  # noqa: E402
from nexus_megatron.errors import NexusConfigError  # noqa: E402
from nexus_megatron.layout import LayoutConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "ds_configs")
SEQ3 = {"sources": ["web", "code", "math"]}
SP2 = {"layout": "source-parallel", "sources": ["web", "code"]}


def megatron_heredoc(global_batch, micro_batch, zero_stage, dtype="bf16", **extra):
    """What a Megatron-DeepSpeed launch script writes with ``cat <<EOT > $CONFIG_JSON`` (no gas)."""
    cfg = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro_batch, "steps_per_print": 1,
           "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 1.0, "prescale_gradients": False,
           "wall_clock_breakdown": False}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
                       "min_loss_scale": 1, "initial_scale_power": 11}
    cfg.update(extra)
    return cfg


def dschat_generated(offload=False, dtype="bf16", stage=2, hybrid=False, lora_mixed=False, global_batch=32,
                     micro_batch=4):
    """What DeepSpeed-Chat's ds_utils.get_train_ds_config returns (for its step-1/2/3 trainers)."""
    device = "cpu" if offload else "none"
    zero = {"stage": stage, "overlap_comm": True, "offload_param": {"device": device},
            "offload_optimizer": {"device": device}, "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7, "memory_efficient_linear": False}
    if lora_mixed:
        zero["zero_quantized_nontrainable_weights"] = True
    precision = {"fp16": {"enabled": True, "loss_scale_window": 100}} if dtype == "fp16" else \
        {"bfloat16": {"enabled": True}}
    return {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro_batch, "steps_per_print": 10,
            "zero_optimization": zero, **precision, "gradient_clipping": 1.0, "prescale_gradients": False,
            "wall_clock_breakdown": False,
            "hybrid_engine": {"enabled": hybrid, "max_out_tokens": 512, "inference_tp_size": 1,
                              "release_inference_cache": False, "pin_parameters": True, "tp_gather_partition_size": 8},
            "tensorboard": {"enabled": False, "output_path": "step1_tensorboard/ds_tensorboard_logs/",
                            "job_name": "step1_model_tensorboard"}}


def examples_style(opt_type="Adam", params=None, **extra):
    """A DeepSpeedExamples training script's ds_config (cifar / bing_bert style) with an optimizer section."""
    cfg = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 2000,
           "optimizer": {"type": opt_type, "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8,
                                                      "weight_decay": 3e-7} if params is None else params},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001,
                                                        "warmup_num_steps": 1000}},
           "gradient_clipping": 1.0, "prescale_gradients": False, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 0, "allgather_partitions": True, "reduce_scatter": True,
                                 "allgather_bucket_size": 50000000, "reduce_bucket_size": 50000000,
                                 "overlap_comm": True, "contiguous_gradients": True}, "wall_clock_breakdown": False}
    cfg.update(extra)
    return cfg


def with_nexus(cfg, nexus=SEQ3):
    cfg = copy.deepcopy(cfg)
    cfg["nexus"] = copy.deepcopy(nexus)
    return cfg


def _b64(cfg):
    return base64.urlsafe_b64encode(json.dumps(cfg).encode()).decode()


HF_ADAMW = {"lr": 3e-5, "betas": (0.8, 0.999), "eps": 1e-8, "weight_decay": 3e-7}
EX_ADAMW = {"lr": 0.001, "betas": (0.8, 0.999), "eps": 1e-8, "weight_decay": 3e-7}

# (id, config, ranks, expected): expected = {"k": ..., "optimizer": ..., other PreparedConfig / ds checks}
ACCEPTED = [
    ("megatron-gpt-350m-z1-bf16", with_nexus(megatron_heredoc(256, 4, 1)), 16,
     {"k": 4, "micro_batch": 4, "optimizer": None, "ds": {"steps_per_print": 4, "train_batch_size": 64}}),
    ("megatron-llama2-7b-z2", with_nexus(megatron_heredoc(1024, 2, 2, steps_per_print=10)), 64,
     {"k": 8, "ds": {"steps_per_print": 80, "train_batch_size": 128}}),
    ("megatron-z3-source-parallel", with_nexus(megatron_heredoc(64, 2, 3), SP2), 8,
     {"k": 4, "dp_size": 4, "ds": {"train_batch_size": 8}}),
    ("megatron-flops-profiler", with_nexus(megatron_heredoc(96, 2, 2, flops_profiler={
        "enabled": True, "profile_step": 3, "module_depth": -1, "top_modules": 1, "detailed": True})), 8,
     {"k": 6, "ds": {"flops_profiler.profile_step": 18, "steps_per_print": 6}}),
    ("megatron-monitors", with_nexus(megatron_heredoc(32, 4, 2, tensorboard={"enabled": True, "output_path": "tb/"},
                                                      csv_monitor={"enabled": True, "output_path": "csv/"},
                                                      comms_logger={"enabled": False})), 4,
     {"k": 2}),
    ("megatron-clip-0.3", with_nexus(megatron_heredoc(32, 4, 1, gradient_clipping=0.3)), 4,
     {"k": 2, "clip": 0.3, "ds": {"gradient_clipping": 0.0}}),
    ("dschat-sft-bf16-z2", with_nexus(dschat_generated()), 4, {"k": 2, "micro_batch": 4, "bf16": True}),
    ("dschat-z3-bf16", with_nexus(dschat_generated(stage=3, global_batch=64, micro_batch=2), SP2), 8,
     {"k": 4, "zero_stage": 3, "dp_size": 4}),
    ("hf-zero3-filled", os.path.join(DATA, "hf_zero3_filled.json"), 2,
     {"k": 4, "optimizer": HF_ADAMW, "zero_stage": 3, "dp_size": 1, "ds": {"scheduler.type": "WarmupLR"}}),
    ("bloom-bf16-z0", with_nexus({"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2048,
                                  "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
                                  "bf16": {"enabled": True}, "steps_per_print": 2000,
                                  "wall_clock_breakdown": False}), 64,
     {"k": 16, "ds": {"steps_per_print": 32000, "train_batch_size": 128}}),
    ("examples-adam-decoupled", with_nexus(examples_style("Adam")), 2, {"k": 4, "optimizer": EX_ADAMW}),
    ("examples-ADAMW-upper", with_nexus(examples_style("ADAMW")), 2, {"k": 4, "optimizer": EX_ADAMW}),
    ("examples-adam-l2-no-decay", with_nexus(examples_style("Adam", {"lr": 2e-4, "adam_w_mode": False,
                                                                     "weight_decay": 0.0})), 2,
     {"optimizer": {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}}),
    ("examples-adam-fused-defaults", with_nexus(examples_style("Adam", {"lr": 5e-4})), 2,   # FusedAdam: wd 0
     {"optimizer": {"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}}),
    ("examples-adamw-torch-defaults", with_nexus(examples_style("adamw", {"lr": 5e-4, "torch_adam": True})), 2,
     {"optimizer": {"lr": 5e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}}),   # torch AdamW: 0.01
    ("hjson-comments-trailing-commas", os.path.join(DATA, "megatron_gpt_125m_z1.hjson"), 16,
     {"k": 4, "zero_stage": 1, "ds": {"steps_per_print": 40}}),
    ("megatron-fp16", with_nexus(megatron_heredoc(256, 4, 1, dtype="fp16")), 16,     # dynamic loss scale
     {"k": 4, "fp16": True, "ds": {"fp16.loss_scale_window": 2000, "fp16.initial_scale_power": 11}}),
    ("dschat-fp16-default", with_nexus(dschat_generated(dtype="fp16")), 4,
     {"k": 2, "fp16": True, "ds": {"fp16.loss_scale_window": 200}}),
    ("bloom-fp16", os.path.join(DATA, "bloom_style_fp16.json"), 8,
     {"k": 64, "fp16": True, "ds": {"fp16.loss_scale_window": 32000, "steps_per_print": 128000}}),
    ("fp16-static-scale", with_nexus(megatron_heredoc(64, 4, 2, dtype="none", fp16={"enabled": True,
                                                                                   "loss_scale": 1024})), 4,
     {"k": 4, "fp16": True, "ds": {"fp16.loss_scale": 1024}}),
    ("base64", _b64(with_nexus(megatron_heredoc(16, 2, 2))), 2, {"k": 4}),
    ("json-text", json.dumps(with_nexus(megatron_heredoc(16, 2, 2))), 4, {"k": 2}),
]

REFUSED = [
    # Megatron-DeepSpeed
    ("megatron-legacy-curriculum", with_nexus(megatron_heredoc(256, 4, 1, curriculum_learning={
        "enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 1024,
        "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 15000,
                                                             "difficulty_step": 8}})), 16,
     "ds_config curriculum_learning DeepSpeed refuses it: Legacy top-level 'curriculum_learning' has been removed"),
    ("megatron-random-ltd", with_nexus(megatron_heredoc(256, 4, 1, data_efficiency={
        "enabled": True, "seed": 1234, "data_routing": {"enabled": True, "random_ltd": {
            "enabled": True, "total_layer_num": 24, "random_ltd_layer_num": 22,
            "random_ltd_layer_id": list(range(1, 23)), "model_mask_name": "attention_mask",
            "model_type": "decoder", "hidden_state_order": "seq_batch_dim",
            "random_ltd_schedule": {"min_value": 128, "max_value": 2048, "schedule_type": "fixed_linear",
                                    "schedule_config": {"require_steps": 200000, "seq_per_step": 16}}}}})), 16,
     "ds_config data_efficiency.data_routing.random_ltd.enabled=true"),
    ("megatron-batch-not-divisible", with_nexus(megatron_heredoc(100, 4, 1)), 8,
     "train_batch_size=100 is not a multiple of train_micro_batch_size_per_gpu * ranks = 4 * 8"),
    ("megatron-universal-load", with_nexus(megatron_heredoc(64, 4, 1, checkpoint={"load_universal": True})), 8,
     "checkpoint.load_universal=true"),
    ("megatron-sp-ranks", with_nexus(megatron_heredoc(36, 4, 1), {"layout": "source-parallel",
                                                                  "sources": ["a", "b"]}), 9,
     "9 rank(s) cannot be split into 2 equal source groups"),
    # DeepSpeed-Chat
    ("dschat-offload", with_nexus(dschat_generated(offload=True, stage=3)), 4,
     "zero_optimization.offload_optimizer.device='cpu'"),
    ("dschat-hybrid-engine", with_nexus(dschat_generated(hybrid=True)), 4, "hybrid_engine.enabled=true"),
    ("dschat-lora-mixed", with_nexus(dschat_generated(stage=3, lora_mixed=True)), 4,
     "zero_optimization.zero_quantized_nontrainable_weights=true"),
    # HF transformers
    ("hf-zero2-auto", os.path.join(DATA, "hf_zero2_auto.json"), 2,
     "ds_config has 'auto' values in bf16.enabled, optimizer.params.lr, optimizer.params.betas, "
     "optimizer.params.eps, optimizer.params.weight_decay, scheduler.params.warmup_max_lr, "
     "scheduler.params.warmup_num_steps, scheduler.params.total_num_steps, zero_optimization.reduce_bucket_size, "
     "gradient_accumulation_steps, gradient_clipping, train_batch_size, train_micro_batch_size_per_gpu: only the HF"),
    ("hf-zero3-bucket-0", with_nexus({**read_ds_config(os.path.join(DATA, "hf_zero3_filled.json")),
                                      "zero_optimization": {"stage": 3, "reduce_bucket_size": 0}}), 2,
     "ds_config zero_optimization.reduce_bucket_size=0: DeepSpeed refuses it"),
    ("hf-optimizer-and-offload", with_nexus({**read_ds_config(os.path.join(DATA, "hf_zero3_filled.json")),
                                             "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme",
                                                                                                  "nvme_path": "/x"}}}),
     2, "zero_optimization.offload_param.device='nvme'"),
    # DeepSpeedExamples optimizers
    ("examples-lamb", with_nexus(examples_style("Lamb", {"lr": 11e-3, "weight_decay": 0.01, "bias_correction": False,
                                                          "max_coeff": 0.3, "min_coeff": 0.01})), 2,
     "ds_config optimizer.type='Lamb': the Nexus outer optimizer is AdamW"),
    ("examples-onebitadam", with_nexus(examples_style("OneBitAdam", {"lr": 4e-4, "freeze_step": 23000,
                                                                     "cuda_aware": False})), 2,
     "ds_config optimizer.type='OneBitAdam'"),
    ("examples-fusedadam", with_nexus(examples_style("FusedAdam")), 2, "ds_config optimizer.type='FusedAdam'"),
    ("examples-adam-l2", with_nexus(examples_style("Adam", {"lr": 1e-3, "adam_w_mode": False,
                                                            "weight_decay": 0.01})), 2,
     "that is Adam with L2 regularization"),
    ("examples-max-grad-norm", with_nexus(examples_style("Adam", {"lr": 1e-3, "max_grad_norm": 1.0})), 2,
     "optimizer.params.max_grad_norm"),
    ("examples-adam-unknown-param", with_nexus(examples_style("AdamW", {"lr": 1e-3, "momentum": 0.9})), 2,
     "optimizer.params.momentum: not a setting of DeepSpeed's AdamW"),
    # removed or unsupported DeepSpeed features
    ("elasticity", with_nexus(megatron_heredoc(64, 4, 1, elasticity={"enabled": True, "max_train_batch_size": 2000,
                                                                     "micro_batch_sizes": [2, 4, 6]})), 4,
     "Elastic training has been removed"),
    ("sparse-gradients", with_nexus(megatron_heredoc(64, 4, 1, sparse_gradients=True)), 4,
     "'sparse_gradients' flag would be ignored"),
    ("compression-training", with_nexus(megatron_heredoc(64, 4, 1, compression_training={"weight_quantization": {}})),
     4, "'compression_training' block would be ignored"),
    ("zeropp-qgz", with_nexus(megatron_heredoc(64, 4, 3, zero_optimization={
        "stage": 3, "zero_quantized_weights": False, "zero_quantized_gradients": True})), 4,
     "zero_optimization.zero_quantized_gradients=true"),
    ("zeropp-qwz", with_nexus(megatron_heredoc(64, 4, 3, zero_optimization={"stage": 3,
                                                                             "zero_quantized_weights": True})), 4,
     "zero_optimization.zero_quantized_weights=true"),
    ("zeropp-hpz", with_nexus(megatron_heredoc(64, 4, 3, zero_optimization={"stage": 3, "zero_hpz_partition_size": 8})),
     4, "zero_optimization.zero_hpz_partition_size=8"),
    ("zero-key-typo", with_nexus(megatron_heredoc(64, 4, 3, zero_optimization={"stage": 3,
                                                                                "stage3_prefetch_bucket_sise": 5e7})),
     4, "ds_config: unknown setting 'zero_optimization.stage3_prefetch_bucket_sise'"),
    ("fp16-key-typo", with_nexus(megatron_heredoc(64, 4, 1, bf16={"enabled": True, "loss_scale": 0})), 4,
     "ds_config: unknown setting 'bf16.loss_scale'"),
    ("autotuning", with_nexus(megatron_heredoc(64, 4, 1, autotuning={"enabled": True})), 4,
     "autotuning.enabled=true"),
    ("amp", with_nexus(megatron_heredoc(64, 4, 1, amp={"enabled": True, "opt_level": "O1"})), 4,
     "ds_config amp DeepSpeed refuses it: NVIDIA Apex AMP integration has been removed"),
    ("bf16-and-fp16", with_nexus(megatron_heredoc(64, 4, 1, fp16={"enabled": True})), 4,
     "bfloat16 and fp16 modes cannot be simultaneously enabled"),
    ("torch-autocast", with_nexus(megatron_heredoc(64, 4, 1, dtype="none", torch_autocast={"enabled": True})), 4,
     "torch_autocast.enabled=true"),
    ("bf16-master-weights", with_nexus(megatron_heredoc(64, 4, 2, bf16={"enabled": True,
                                                                        "bf16_master_weights_and_grads": True})), 4,
     "bf16.bf16_master_weights_and_grads"),
    ("fp16-master-weights", with_nexus(megatron_heredoc(64, 4, 2, dtype="none", fp16={
        "enabled": True, "fp16_master_weights_and_grads": True})), 4, "fp16.fp16_master_weights_and_grads=true"),
    ("no-grad-norm", with_nexus(megatron_heredoc(64, 4, 2, zero_optimization={"stage": 2, "compute_grad_norm": False})),
     4, "zero_optimization.compute_grad_norm=false"),
    ("deepcompile", with_nexus(megatron_heredoc(64, 4, 3, compile={"deepcompile": True})), 4,
     "compile.deepcompile=true"),
    ("sequence-parallel", with_nexus(megatron_heredoc(64, 4, 1, sequence_parallel_size=2)), 4,
     "sequence_parallel_size > 1"),
    ("autotp", with_nexus(megatron_heredoc(64, 4, 1, tensor_parallel={"autotp_size": 2})), 4,
     "tensor_parallel.autotp_size > 1"),
    ("adam-no-bias-correction", with_nexus(examples_style("Adam", {"lr": 1e-3, "bias_correction": False})), 2,
     "optimizer.params.bias_correction=false"),
    ("adam-amsgrad-fused", with_nexus(examples_style("AdamW", {"lr": 1e-3, "amsgrad": True})), 2,
     "FusedAdam refuses AMSGrad"),
    ("mics", with_nexus(megatron_heredoc(64, 4, 3, zero_optimization={"stage": 3, "mics_shard_size": 2})), 4,
     "ds_config zero_optimization.mics_shard_size DeepSpeed refuses it: MiCS ZeRO-3 sharding has been removed"),
    # files DeepSpeed reads, and what it refuses
    ("duplicate-key", os.path.join(DATA, "duplicate_key.json"), 8, "Duplicate keys in DeepSpeed config: "
                                                                  "['train_micro_batch_size_per_gpu']"),
    ("missing-file", os.path.join(DATA, "no_such_config.json"), 2, "no_such_config.json: no such file"),
    ("not-base64", "this is not a config", 2, "neither an existing file nor a base64-encoded config"),
    ("bad-hjson", '{"train_batch_size": 8, "zero_optimization": {"stage": 2}', 2, "not valid JSON/hjson"),
]


def _get(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


@pytest.mark.parametrize("name,cfg,world,want", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_configs(name, cfg, world, want):
    before = copy.deepcopy(cfg)
    p = prepare_ds_config(cfg, world_size=world)
    for key, value in want.items():
        if key == "ds":
            for dotted, v in value.items():
                assert _get(p.ds, dotted) == v, dotted
        else:
            assert getattr(p, key) == value, key
    # what DeepSpeed gets: one DeepSpeed step per micro-step, no optimizer/nexus section, our clipping
    assert p.ds["gradient_accumulation_steps"] == 1 and p.ds["gradient_clipping"] == 0.0
    assert "optimizer" not in p.ds and "nexus" not in p.ds
    assert p.ds["train_batch_size"] == p.micro_batch * p.dp_size
    assert p.micro_batch * p.k * world == (p.user.get("train_batch_size") or p.micro_batch * p.k * world)
    assert cfg == before                                  # the caller's dict is not modified


@pytest.mark.parametrize("name,cfg,world,needle", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_configs(name, cfg, world, needle):
    with pytest.raises(NexusConfigError) as e:
        prepare_ds_config(cfg, world_size=world)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg                                # one line


def test_file_reading_is_deepspeeds():
    """Our loader returns exactly the dict DeepSpeed's DeepSpeedConfig reads from the same file / base64
    string, and refuses what it refuses."""
    from deepspeed.runtime.config import DeepSpeedConfig

    path = os.path.join(DATA, "megatron_gpt_125m_z1.hjson")
    ours = read_ds_config(path)
    theirs = DeepSpeedConfig(path)._param_dict           # noqa: SLF001 (the comparison needs DeepSpeed's dict)
    assert ours == theirs and ours["zero_optimization"] == {"stage": 1}
    cfg = megatron_heredoc(16, 2, 2)
    assert read_ds_config(_b64(cfg)) == DeepSpeedConfig(_b64(cfg))._param_dict == cfg
    with pytest.raises(ValueError, match="Duplicate keys"):
        DeepSpeedConfig(os.path.join(DATA, "duplicate_key.json"))


def test_k_and_the_callers_micro_steps():
    cfg = with_nexus(megatron_heredoc(64, 4, 1))                 # 8 ranks -> DeepSpeed derives 2
    assert prepare_ds_config(cfg, world_size=8, micro_steps=2).k == 2
    with pytest.raises(NexusConfigError, match=r"gradient_accumulation_steps derived by DeepSpeed = train_batch_size "
                                               r"64 / \(train_micro_batch_size_per_gpu 4 x 8 ranks\) is 2, but "
                                               r"micro_steps=4"):
        prepare_ds_config(cfg, world_size=8, micro_steps=4)
    # only the micro-batch: DeepSpeed's default gradient_accumulation_steps (1) gives way to initialize(micro_steps=)
    only_mb = with_nexus({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}})
    p = prepare_ds_config(only_mb, world_size=2, micro_steps=3)
    assert (p.k, p.ds["train_batch_size"]) == (3, 8)
    # the ranks are not known yet (the trainer's YAML check): the config's implied number of ranks is used
    layout = LayoutConfig(mode="sequential", sources=("web", "code", "math"))
    assert prepare_ds_config(megatron_heredoc(64, 4, 1), world_size=None, micro_steps=4, layout=layout).k == 4
    with pytest.raises(NexusConfigError, match="train_batch_size=64 is not a multiple of"):
        prepare_ds_config(megatron_heredoc(64, 4, 1), world_size=None, micro_steps=3, layout=layout)


def test_trainer_optimizer_section_must_agree_with_the_yaml(tmp_path):
    from nexus_megatron.config import load_config

    base = {"data": {"sources": ["web", "code"], "micro_batch_size": 2},
            "train": {"engine": "deepspeed", "micro_steps": 2, "steps": 4},
            "optim": {"warmup_steps": 1, "lr": 3e-4, "beta2": 0.95, "weight_decay": 0.1}}
    good = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}}}
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(good))
    load_config(None, [f"train.deepspeed_config={f}"], base=copy.deepcopy(base))
    bad = copy.deepcopy(good)
    bad["optimizer"]["params"]["lr"] = 1e-3
    f.write_text(json.dumps(bad))
    with pytest.raises(NexusConfigError, match=r"optimizer.params.lr=0.001 conflicts with the YAML's optim.lr"):
        load_config(None, [f"train.deepspeed_config={f}"], base=copy.deepcopy(base))


# ---------------------------------------------------------------------------------------------------
# one real run: a Megatron-DeepSpeed-style config (no gradient_accumulation_steps, an Adam section,
# gradient_clipping 0.5) on 2 ranks against the single-process reference

def _run_worker(rank, world, cfg):
    from nexus_megatron.engines.deepspeed import initialize
    from tests.ds_reference import make_model, param_groups
    from tests.ds_workers import STEPS, WD, full_params, micro_step

    model = make_model()
    # Megatron-DeepSpeed hands DeepSpeed its param groups (no decay on biases); the section's settings apply
    eng = initialize(model, cfg, model_parameters=param_groups(model.parameters(), WD))
    hist, infos = [], []
    while eng.outer_steps < STEPS:
        info = micro_step(eng, rank, False)
        if info is not None:
            infos.append(info)
            hist.append(full_params(eng))
    ds = eng.ds_engine
    return {"hist": hist, "infos": infos, "k": eng.gradient_accumulation_steps(),
            "steps_per_print": ds.steps_per_print(), "global_steps": ds.global_steps,
            "groups": [(g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"]) for g in eng.client.param_groups]}


def test_megatron_style_config_trains_like_the_reference():
    from tests.distributed import run_distributed
    from tests.ds_reference import SOURCES, reference_run
    from tests.ds_workers import GAMMA, K, LR, STEPS, WD

    cfg = {"train_batch_size": 4 * K * 2, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 1,
           "zero_optimization": {"stage": 2}, "gradient_clipping": 0.5, "wall_clock_breakdown": False,
           "optimizer": {"type": "Adam", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": WD}},
           "nexus": {"sources": list(SOURCES), "gamma": GAMMA, "gamma_mode": "absolute"}}
    res = run_distributed(_run_worker, 2, cfg, timeout=600)
    ref = reference_run("sequential", 3, 2, STEPS, K, GAMMA, lr=LR, wd=WD, clip=0.5)
    for r in range(2):
        out = res[r]
        assert out["k"] == K                                         # derived by DeepSpeed: 16 / (4 x 2)
        assert out["groups"] == [(LR, (0.9, 0.999), 1e-8, WD), (LR, (0.9, 0.999), 1e-8, 0.0)]
        assert out["steps_per_print"] == K and out["global_steps"] == STEPS * K   # printed once per outer step
        assert any(i["clip_scale"] < 1 for i in out["infos"])        # the clipping acted on G
        assert len(out["hist"]) == STEPS
        for got, want in zip(out["hist"], ref):
            assert float((got - want).norm() / want.norm()) <= 1e-5
        assert torch.equal(out["hist"][-1], res[0]["hist"][-1])


# ---------------------------------------------------------------------------------------------------
# fp16 with DeepSpeed's loss scaling, 2 ranks. DeepSpeed's CPU accelerator reports no fp16 on this machine
# (is_fp16_supported() is false: no mkldnn fp16), so the worker tells DeepSpeed it has it; the model then
# runs in torch's CPU half precision, DeepSpeed's loss scaler, overflow check and unscaling run unchanged.

def fp16_config(stage, scale=None, power=None, window=None, nexus=None):
    from tests.ds_reference import SOURCES
    from tests.ds_workers import GAMMA, K

    fp16 = {"enabled": True, "loss_scale": scale or 0, "hysteresis": 2, "min_loss_scale": 1}
    if power is not None:
        fp16["initial_scale_power"] = power
    if window is not None:
        fp16["loss_scale_window"] = window
    return {"train_batch_size": 4 * K * 2, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
            "gradient_clipping": 1.0, "fp16": fp16, "steps_per_print": 10 ** 6,
            "nexus": nexus or {"sources": list(SOURCES), "gamma": GAMMA, "gamma_mode": "absolute"}}


def _fp16_worker(rank, world, specs):
    from deepspeed.accelerator import get_accelerator

    from nexus_megatron.engines.deepspeed import initialize
    from tests.ds_reference import batch, loss_fn, make_model, param_groups
    from tests.ds_workers import LR, STEPS, WD, full_params

    type(get_accelerator()).is_fp16_supported = lambda self: True

    def micro_step(eng):
        x, y = batch(eng.source_for_micro_step(), eng.outer_steps, eng.micro_step, eng.readers()[0])
        eng.backward(loss_fn(eng, x.half(), y.half()).float())
        return eng.step()

    out = {}
    for name, cfg in specs:
        model = make_model()
        eng = initialize(model, cfg, optimizer=torch.optim.AdamW(param_groups(model.parameters(), WD), lr=LR))
        start = full_params(eng)
        hist, infos, scales = [], [], []
        while eng.outer_steps < STEPS:
            info = micro_step(eng)
            scales.append(float(eng.ds_engine.optimizer.loss_scale if hasattr(eng.ds_engine.optimizer, "loss_scale")
                                else eng.ds_engine.optimizer.cur_scale))
            if info is not None:
                infos.append(info)
                hist.append(full_params(eng))
        out[name] = {"start": start, "hist": hist, "infos": infos, "scales": scales, "counters": eng.counters()}
    return out


FP16 = [("static-256-z2", fp16_config(2, scale=256)), ("static-4096-z2", fp16_config(2, scale=4096)),
        ("grow-z0", fp16_config(0, power=8, window=1)), ("grow-z2", fp16_config(2, power=8, window=1)),
        ("grow-z3", fp16_config(3, power=8, window=1)), ("overflow-z2", fp16_config(2, power=16)),
        ("overflow-z3", fp16_config(3, power=16)),
        ("grow-source-parallel-z2", fp16_config(2, power=8, window=1, nexus={
            "layout": "source-parallel", "sources": ["web", "code"], "gamma": 0.05, "gamma_mode": "absolute"}))]


def test_fp16_loss_scale_cancels_and_an_overflow_skips_the_outer_step():
    """fp16 on 2 ranks at ZeRO 0/2/3. (1) The loss scale cancels: static scales 256 and 4096, and a dynamic
    scale that doubles every outer step (loss_scale_window 1, x k = 2 DeepSpeed steps), give the same
    trajectory bit for bit, within 3e-4 of the fp32 reference. At ZeRO-1/2 this needs the adapter's correction
    for DeepSpeed unscaling the handed gradients by the freshly doubled scale (without it: 1e-2 off).
    (2) Starting at 2^16 the gradients overflow: DeepSpeed skips the client step, the whole outer step is
    skipped on every rank (theta stays exactly at the start), the scale halves, and training goes on."""
    from tests.distributed import run_distributed
    from tests.ds_reference import reference_run
    from tests.ds_workers import GAMMA, K, LR, STEPS, WD

    res = run_distributed(_fp16_worker, 2, FP16, timeout=600)
    ref = reference_run("sequential", 3, 2, STEPS, K, GAMMA, lr=LR, wd=WD, clip=1.0)
    base = res[0]["static-256-z2"]["hist"]
    for r in range(2):
        for name, _ in FP16:
            out = res[r][name]
            assert torch.equal(out["hist"][-1], res[0][name]["hist"][-1])          # ranks agree
            if name.startswith("overflow"):
                assert [i["skipped"] for i in out["infos"]] == [True, False, False]
                assert out["counters"] == {"outer_steps": 2, "skipped_steps": 1, "skipped_sources": 0}
                assert torch.equal(out["hist"][0], out["start"]) and not torch.equal(out["hist"][1], out["start"])
                assert out["scales"][0] == 2.0 ** 16 and out["scales"][-1] == 2.0 ** 15
                continue
            assert not any(i["skipped"] for i in out["infos"])
            if "source-parallel" in name:    # one source group per rank, each with its own loss scaler
                sp_ref = reference_run("source-parallel", 2, 2, STEPS, K, GAMMA, lr=LR, wd=WD, clip=1.0)
                assert all(float((g - w).norm() / w.norm()) <= 3e-4 for g, w in zip(out["hist"], sp_ref))
                continue
            for got, want, same in zip(out["hist"], ref, base):
                assert torch.equal(got, same), name
                assert float((got - want).norm() / want.norm()) <= 3e-4
        grow = res[r]["grow-z2"]["scales"]
        assert grow == [256.0, 256.0, 512.0, 512.0, 1024.0, 1024.0]     # doubled every k = 2 micro-steps
