"""Per-source data routing for Megatron (no processes), and the Megatron-LM-style launcher as a CPU smoke
run under torchrun (2 processes, gloo, ``--cpu-test-shim``): train, checkpoint, resume."""
import json
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import write_synthetic_data

pytest.importorskip("megatron.core")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeLayout:
    """Two data-parallel ranks; ``mode`` sequential (both read the drawn source) or source-parallel."""

    def __init__(self, mode, rank, K=3, D=2):
        self.mode, self.rank, self.num_sources, self.D = mode, rank, K, D

    def source_for(self, step, micro):
        return (step + micro) % self.num_sources if self.mode == "sequential" else self.rank % self.num_sources

    def readers(self, source, step, micro):
        return (self.rank, self.D) if self.mode == "sequential" else (0, 1)

    def present(self, step, micro):
        if self.mode == "sequential":
            return [(self.source_for(step, micro), self.D)]
        return [(i, 1) for i in range(self.num_sources)]


def _iterators(data, mode, K):
    from nexus_megatron.engines.megatron.data import build_source_iterator, parse_data_path
    specs = parse_data_path([data])[:K]
    return specs, [build_source_iterator(FakeLayout(mode, r, K=K), specs, 16, 2, 3, seed=5) for r in range(2)]


def test_routing_sequential_every_rank_reads_the_drawn_source(tmp_path):
    data = write_synthetic_data(str(tmp_path / "d"))
    specs, its = _iterators(data, "sequential", 3)
    seen = set()
    for step in range(2):
        for m in range(2):
            want = (step + m) % 3
            for it in its:
                it.set_micro_step(want, step, m)
            for _ in range(3):
                for it in its:
                    b = next(it)
                    assert b["tokens"].shape == (2, 16) and b["labels"].shape == (2, 16)
                    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])
                    assert set(b["source_id"].tolist()) == {want}          # the source id reaches the loss
                    key = (want, tuple(b["tokens"][0, :4].tolist()), tuple(b["tokens"][1, :4].tolist()))
                    assert key not in seen                                  # ranks read disjoint samples
                    seen.add(key)
    # The counters are the same on every rank (they are the data state of a checkpoint).
    assert its[0].state_dict() == its[1].state_dict() == {"consumed": [12, 24, 12]}   # 2 readers x 3 micro-batches x 2 per pass
    with pytest.raises(RuntimeError, match="more than 3 micro-batches"):
        next(its[0])


def test_routing_source_parallel_and_resume(tmp_path):
    data = write_synthetic_data(str(tmp_path / "d"))
    specs, its = _iterators(data, "source-parallel", 2)
    for it in its:
        it.set_micro_step(it.layout.source_for(0, 0), 0, 0)
    assert [int(next(it)["source_id"][0]) for it in its] == [0, 1]
    # The sample stream is a pure function of the counters: a fresh iterator with the state continues it.
    _, fresh = _iterators(data, "source-parallel", 2)
    fresh[1].load_state_dict(its[1].state_dict())
    for it in (its[1], fresh[1]):
        it.set_micro_step(1, 1, 0)
    assert torch.equal(next(its[1])["tokens"], next(fresh[1])["tokens"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # megatron-core 0.16 builder under numpy 2
def test_data_path_forms(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from nexus_megatron.engines.megatron.data import open_source, parse_data_path
    from nexus_megatron.errors import DataError
    data = write_synthetic_data(str(tmp_path / "d"))
    specs = parse_data_path(["0.7", os.path.join(data, "web"), "0.3", os.path.join(data, "code")])
    assert [(s.name, s.weight) for s in specs] == [("web", 0.7), ("code", 0.3)]
    assert [s.name for s in parse_data_path([data])] == ["web", "code", "math"]      # OOD sources excluded
    # A Megatron indexed dataset (Megatron-LM's preprocess_data.py output): documents concatenated.
    prefix = str(tmp_path / "wiki_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    docs = [torch.arange(i * 100, i * 100 + 50, dtype=torch.int32) for i in range(20)]
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(prefix + ".idx")
    (spec,) = parse_data_path([prefix])
    assert spec.name == "wiki_text_document"
    train = open_source(spec, 16, "9,1,0", "train")
    valid = open_source(spec, 16, "9,1,0", "valid")
    flat = torch.cat(docs).numpy()
    assert train.num_windows(16) + valid.num_windows(16) == (len(flat) - 1) // 16
    assert np.array_equal(np.asarray(train.window(0, 16)), flat[:17])
    with pytest.raises(DataError, match="weight/path pairs"):
        parse_data_path(["0.5", "a", "b"])


def _launch(args, log, timeout=400):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "launch", "pretrain_gpt_nexus.py"), *args, "--nexus-log-file", log]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


@pytest.mark.skipif(importlib.util.find_spec("megatron.training") is not None,
                    reason="megatron-core >= 0.17: the launcher runs Megatron-LM's own loop "
                           "(tested in test_megatron_training_loop.py)")
def test_launcher_cpu_smoke_train_save_resume(tmp_path):
    data = write_synthetic_data(str(tmp_path / "d"))
    ckpt, log = str(tmp_path / "ckpt"), str(tmp_path / "log.jsonl")
    base = ["--cpu-test-shim", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", "1", "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta2", "0.95",
            "--data-path", "0.6", os.path.join(data, "web"), "0.4", os.path.join(data, "code"),
            "--split", "969,30,1", "--tokenizer-type", "NullTokenizer", "--use-distributed-optimizer", "--bf16",
            "--optimizer", "nexus", "--nexus-layout", "source-parallel", "--nexus-gamma", "1.0",
            "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "2", "--save", ckpt,
            "--save-interval", "2", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--some-megatron-lm-flag-we-ignore"]
    r = _launch(base + ["--train-iters", "2"], log)
    assert "ignoring Megatron-LM arguments" in r.stdout
    assert os.path.isdir(os.path.join(ckpt, "iter_0000002"))
    _launch(base + ["--train-iters", "3", "--load", ckpt], log)
    recs = [json.loads(line) for line in open(log)]
    assert [x["iteration"] for x in recs] == [1, 2, 3]                      # resumed at iteration 3
    for x in recs:
        assert not x["skipped"] and np.isfinite(x["loss"])
        assert {"loss/web", "loss/code", "nexus/gnorm/web", "nexus/gnorm/code"} <= set(x)   # per source
    assert recs[0]["nexus/gamma"] == 0.0 and recs[1]["nexus/gamma"] > 0     # lr = 0 in the first warmup step
    assert {"val/web", "val/code"} <= set(recs[2]) and recs[2]["val/web"] < 6.0
