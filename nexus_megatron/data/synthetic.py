"""A tiny prepared-data directory with distinguishable sources, for tests and CPU smoke runs
(``launch/megatron_gpt_nexus_cpu.sh``): the layout of ``nexus-megatron prepare-data`` without any download."""
import json
import os

import numpy as np

VOCAB = 64


def write_synthetic_data(path, train_tokens=20000, val_tokens=2000, sources=("web", "code", "math"),
                         ood=("poetry",), seed=0):
    """Prepared-data layout (manifest.json + <source>/{train,val}.bin) with distinguishable sources:
    source i emits a noisy arithmetic progression with its own stride, so each has its own statistics."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    manifest = {"format": 1, "tokenizer": "synthetic", "vocab_size": VOCAB, "eot_id": 0, "sources": {}}
    for i, name in enumerate(list(sources) + list(ood)):
        kind = "ood" if name in ood else "train"
        os.makedirs(os.path.join(path, name), exist_ok=True)
        for split, n in (("train", train_tokens if kind == "train" else 0), ("val", val_tokens)):
            if n == 0:
                continue
            start = rng.integers(1, VOCAB, size=n // 16 + 1)
            seq = (start[:, None] + (i + 1) * np.arange(16)[None, :]) % (VOCAB - 1) + 1
            noise = rng.random(seq.shape) < 0.1
            seq = np.where(noise, rng.integers(1, VOCAB, size=seq.shape), seq)
            seq[:, -1] = 0
            seq.reshape(-1)[:n].astype(np.uint16).tofile(os.path.join(path, name, f"{split}.bin"))
        manifest["sources"][name] = {"kind": kind, "dtype": "uint16", "train_tokens": train_tokens if kind == "train" else 0,
                                     "val_tokens": val_tokens}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return path
