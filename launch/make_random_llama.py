#!/usr/bin/env python
"""A randomly initialised transformers Llama checkpoint of any shape, for smoke-testing
`nexus-megatron sharpness` (and its memory) at a size without downloading one.

Nothing is downloaded: the weights are drawn with a fixed seed (transformers' own Llama init), the
tokenizer is copied from a prepare-data directory (so `--data` of that directory passes the command's
vocabulary check), and the result is written with ``save_pretrained`` as sharded safetensors.

    python launch/make_random_llama.py --tokenizer data/quickstart --hidden 2048 --intermediate 8192 \
        --heads 32 --kv-heads 8 --layers 6 --out runs/big_ckpt            # Llama-3.2-1B width, 6 layers
    python launch/make_random_llama.py --tokenizer data/quickstart --preset llama-3.2-3b --dtype bfloat16 \
        --out ckpt_3b                                                       # the 3B shape (GPU smoke test)

The vocabulary of the embedding is ``--vocab-size`` (default: the tokenizer's); a larger one (the presets'
real vocabularies) is fine for the command, whose data only uses the tokenizer's ids. Building needs the
model once in host memory in ``--dtype`` (7B in bfloat16: ~14 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# Llama shapes (hidden, intermediate, layers, heads, kv heads, vocabulary, tied embeddings)
PRESETS = {
    "llama-3.2-1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab_size=128256, tie=True),
    "llama-3.2-3b": dict(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab_size=128256, tie=True),
    "llama-2-7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab_size=32000, tie=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (save_pretrained)")
    p.add_argument("--tokenizer", required=True,
                   help="a prepare-data directory (its tokenizer/ is used) or a directory with tokenizer.json")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a Llama shape; the flags below override it")
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: the tokenizer's size)")
    p.add_argument("--untied", action="store_true", help="separate output layer (default: tied embeddings)")
    p.add_argument("--max-position", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--max-shard-size", default="1GB", help="safetensors shard size")
    return p.parse_args(argv)


def llama_shape(args, vocab: int) -> dict:
    s = dict(PRESETS[args.preset]) if args.preset else {}
    for k in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab_size"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    if args.untied:
        s["tie"] = False
    if "hidden" not in s or "layers" not in s:
        sys.exit("give --hidden and --layers (or --preset)")
    s.setdefault("intermediate", 4 * s["hidden"])
    s.setdefault("heads", max(1, s["hidden"] // 64))
    s.setdefault("kv_heads", s["heads"])
    s.setdefault("vocab_size", vocab)
    s.setdefault("tie", True)
    if s["hidden"] % s["heads"] or s["heads"] % s["kv_heads"]:
        sys.exit(f"--hidden {s['hidden']} must be a multiple of --heads {s['heads']}, and --heads of --kv-heads {s['kv_heads']}")
    if s["vocab_size"] < vocab:
        sys.exit(f"--vocab-size {s['vocab_size']} is smaller than the tokenizer's {vocab} tokens")
    return s


def count_params(s: dict) -> int:
    """Parameters of a Llama of shape ``s`` (no biases; RMSNorm weights included)."""
    h, f, hd = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    layer = 2 * h * h + 2 * h * s["kv_heads"] * hd + 3 * h * f + 2 * h
    return s["layers"] * layer + s["vocab_size"] * h * (1 if s["tie"] else 2) + h


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tdir = args.tokenizer
    if os.path.isdir(os.path.join(tdir, "tokenizer")) and not os.path.isfile(os.path.join(tdir, "tokenizer.json")):
        tdir = os.path.join(tdir, "tokenizer")
    if not os.path.isfile(os.path.join(tdir, "tokenizer.json")):
        sys.exit(f"--tokenizer {args.tokenizer}: no tokenizer.json (nor tokenizer/tokenizer.json)")
    eot = "<|endoftext|>"
    meta = os.path.join(tdir, "nexus_tokenizer.json")
    if os.path.isfile(meta):
        eot = json.load(open(meta)).get("eot_token", eot)
    raw = Tokenizer.from_file(os.path.join(tdir, "tokenizer.json"))
    s = llama_shape(args, raw.get_vocab_size(with_added_tokens=True))
    n = count_params(s)
    print(f"Llama {s}: {n:,} parameters, {args.dtype}", flush=True)

    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], max_position_embeddings=args.max_position,
                         tie_word_embeddings=s["tie"], bos_token_id=None, eos_token_id=raw.token_to_id(eot),
                         pad_token_id=None)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)        # allocate once, in the target dtype
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    got = sum(p.numel() for p in model.parameters())
    assert got == n, (got, n)
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eot).save_pretrained(args.out)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
