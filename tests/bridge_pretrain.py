"""TESTS ONLY: a tiny GPT trained with Nexus through Megatron-Bridge's own ``pretrain()`` on CPU.

Run with ``python -m torch.distributed.run --nproc_per_node N tests/bridge_pretrain.py DATA_ROOT K ITERS [distopt]``
(tests/test_megatron_bridge.py does). Applies the test-only CPU shim (nexus_megatron/tools/mcore_cpu_shim.py) and
imports Bridge with the Transformer Engine stand-in of tests/bridge_import.py. Bridge prints its training log (loss,
grad norm per iteration); this script writes ``bridge_nexus_rank<R>.json`` (in the working directory) per rank: the
optimizer it ran, K, the outer iterations, the inner optimizer, and for every pass (step, pass, source, the source
ids of the micro-batches read)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(data_root: str, k: int, iters: int, distopt: bool = False) -> None:
    import torch
    from nexus_megatron.tools.mcore_cpu_shim import patch_megatron_training_for_cpu
    patch_megatron_training_for_cpu()
    torch.set_num_threads(1)
    from tests.bridge_import import import_bridge
    pretrain_mod, config, gpt_step, gpt_provider = import_bridge(
        "megatron.bridge.training.pretrain", "megatron.bridge.training.config", "megatron.bridge.training.gpt_step",
        "megatron.bridge.models.gpt_provider")
    from megatron.bridge.training.tokenizers.config import TokenizerConfig
    # the megatron-core wheel ships its dataset helpers compiled but not their Makefile; Bridge's initialize runs
    # `make` there (imported by name) and exits when it fails: skip it as the Megatron-LM path does (compat.py)
    from megatron.bridge.training import initialize as bridge_init
    from megatron.core.datasets import utils as dutils
    from nexus_megatron.engines.megatron.compat import use_prebuilt_dataset_helpers
    use_prebuilt_dataset_helpers()
    bridge_init.compile_helpers = dutils.compile_helpers
    from nexus_megatron.engines.megatron.bridge import (NexusDatasetProvider, NexusOptimizerConfig,
                                                        enable_nexus_bridge)
    from nexus_megatron.engines.megatron.megatron_lm import NexusSettings

    seq, mbs, gbs = 32, 2, 8
    sources = ["web", "code"]
    settings = NexusSettings(sources=sources, weights=[0.6, 0.4], layout="sequential", gamma=1.0, micro_steps=k)
    model = gpt_provider.GPTModelProvider(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=128, seq_length=seq,
        vocab_size=256, make_vocab_size_divisible_by=128, cross_entropy_loss_fusion=False,
        init_method_std=0.006, hidden_dropout=0.0, attention_dropout=0.0,
        transformer_layer_spec=gpt_provider.local_layer_spec, bf16=False, fp16=False, params_dtype=torch.float32,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=True, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    optimizer = NexusOptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-4, weight_decay=0.1, adam_beta1=0.9,
                                     adam_beta2=0.95, clip_grad=1.0, bf16=False, fp16=False,
                                     use_distributed_optimizer=distopt, nexus=settings)
    cfg = config.ConfigContainer(
        model=model,
        train=config.TrainingConfig(train_iters=iters, micro_batch_size=mbs, global_batch_size=gbs),
        validation=config.ValidationConfig(eval_iters=0, eval_interval=1000),
        optimizer=optimizer,
        scheduler=config.SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=1, lr_decay_iters=iters,
                                         start_weight_decay=0.1, end_weight_decay=0.1,
                                         weight_decay_incr_style="constant"),
        ddp=config.DistributedDataParallelConfig(use_distributed_optimizer=distopt, grad_reduce_in_fp32=True),
        dataset=NexusDatasetProvider(nexus=settings, data_path=["0.6", os.path.join(data_root, "web"),
                                                                "0.4", os.path.join(data_root, "code")],
                                     seq_length=seq, micro_batch_size=mbs),
        logger=config.LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=256),
        checkpoint=config.CheckpointConfig(save=None),
        dist=config.DistributedInitConfig(distributed_backend="gloo"),
        rng=config.RNGConfig(seed=1234),
    )
    # record the source of every micro-batch the run reads (the per-source iterator of NexusDatasetProvider)
    from nexus_megatron.engines.megatron import data as nexus_data
    reads, real_next, real_set = [], nexus_data.SourceRoutedIterator.__next__, \
        nexus_data.SourceRoutedIterator.set_micro_step

    def set_micro_step(self, source, step, micro):
        reads.append((step, micro, source, []))
        return real_set(self, source, step, micro)

    def next_(self):
        batch = real_next(self)
        reads[-1][3].extend(sorted(set(batch["source_id"].tolist())) if self._mixture_step is None else ["mixture"])
        return batch
    nexus_data.SourceRoutedIterator.set_micro_step = set_micro_step
    nexus_data.SourceRoutedIterator.__next__ = next_
    enable_nexus_bridge(settings)
    pretrain_mod.pretrain(cfg, gpt_step.forward_step)
    opt = settings.state.get("optimizer")
    rank = int(os.environ.get("RANK", "0"))
    with open(f"bridge_nexus_rank{rank}.json", "w") as f:      # one file per rank (printed lines interleave)
        json.dump({"optimizer": type(opt).__name__, "K": getattr(opt, "micro_steps", None),
                   "iterations": getattr(opt, "iteration", None), "inner": [type(c).__name__ for c in opt.children],
                   "passes": reads}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), len(sys.argv) > 4 and sys.argv[4] == "distopt")
