"""Llama-style decoders from transformers, built from a ModelConfig (no hub download)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def default_intermediate(hidden: int) -> int:
    return -(-int(8 * hidden / 3) // 64) * 64


def build_model(m, vocab_size: int, seq_len: int, seed: int, eot_id: int = 0):
    """A LlamaForCausalLM in fp32 from ``m``, a :class:`nexus_megatron.config.ModelConfig` (seeded init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size or default_intermediate(m.hidden_size),
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads, max_position_embeddings=seq_len,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
        attention_dropout=0.0, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.float()


def lm_loss(model, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of a [B, L+1] token batch."""
    dev = next(model.parameters()).device
    x, y = batch[:, :-1].to(dev), batch[:, 1:].to(dev)
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction=reduction)


def count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
