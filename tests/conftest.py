import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


@pytest.fixture
def synthetic_data(tmp_path):
    return write_synthetic_data(str(tmp_path / "data"))


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """crash_after_checkpoint(step): the plain engine's next checkpoint at `step` is written completely,
    then the run dies (KeyboardInterrupt), like a process killed right after a save."""
    import nexus_megatron.engines.plain as plain

    def arm(crash_step):
        orig = plain.save_checkpoint

        def save_then_crash(root, step, state, keep=2, **kw):
            out = orig(root, step, state, keep, **kw)
            if step == crash_step:
                monkeypatch.setattr(plain, "save_checkpoint", orig)
                raise KeyboardInterrupt("simulated crash")
            return out
        monkeypatch.setattr(plain, "save_checkpoint", save_then_crash)
    return arm


def config_with(base: dict, data, run_dir, **over):
    """A RunConfig from ``base`` (a dict of sections) with data.path, train.run_dir and ``over`` set
    (keys ``section.key``, as on the command line)."""
    from nexus_megatron.config import load_config
    sets = [f"data.path={data}", f"train.run_dir={run_dir}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, sets, base=json.loads(json.dumps(base)))


def read_metrics(run_dir):
    """The records of ``run_dir/metrics.jsonl``."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
