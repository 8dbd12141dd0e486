"""The validation stream of Nexus inside Megatron-LM's loop (--eval-iters > 0; engines/megatron/data.py):
Megatron's blend of the sources, the same samples whatever the data-parallel and micro-batch sizes, continued
across evaluations and resumes. Megatron's own evaluate() on it: test_megatron_training_loop.py."""
import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from nexus_megatron.engines.megatron.data import (SourceSpec, ValidationIterator, blend_samples,  # noqa: E402
                                                  build_validation_iterator)
from nexus_megatron.errors import DataError  # noqa: E402


class Rows:
    """A sampler whose sample k of source s is the row [s, k, ...] (seq_len + 1 = 4 tokens)."""

    def __init__(self, s):
        self.s, self.windows = s, 1 << 20

    def batch(self, start, count):
        return torch.tensor([[self.s, k, 0, 0] for k in range(start, start + count)], dtype=torch.long)


def test_blend_is_megatrons_greedy_order():
    src, idx = blend_samples([0.6, 0.4], 5)
    # by hand: the source whose count lags furthest behind weight x (g+1): 0, 1, 0, 1, 0
    assert src.tolist() == [0, 1, 0, 1, 0] and idx.tolist() == [0, 0, 1, 1, 2]
    src, _ = blend_samples([3.0, 1.0, 1.0], 1000)          # weights need not be normalized
    assert np.abs(np.bincount(src, minlength=3) - np.array([600, 200, 200])).max() <= 1


def _evaluation(mbs, dp, global_batch, iters, start=0):
    """The (source, index) pairs every rank reads in one evaluation of ``iters`` x ``global_batch`` samples."""
    n_mb = global_batch // (mbs * dp)
    seen = []
    for r in range(dp):
        it = ValidationIterator([Rows(0), Rows(1)], [0.6, 0.4], mbs, r, dp, start_sample=start)
        for _ in range(iters * n_mb):
            b = next(it)
            assert b["tokens"].shape == (mbs, 3) and b["labels"].shape == (mbs, 3)
            assert b["source_id"].tolist() == b["tokens"][:, 0].tolist()   # source_id per row, mixed batches
            seen += [(int(s), int(k)) for s, k in b["tokens"][:, :2].tolist()]
    return sorted(seen)


def test_an_evaluation_reads_the_same_samples_whatever_the_parallelism():
    want = _evaluation(8, 1, 8, 2)
    src, idx = blend_samples([0.6, 0.4], 16)
    assert want == sorted(zip(src.tolist(), idx.tolist()))       # the first 2 x 8 samples of the blend
    for mbs, dp in ((4, 2), (2, 2), (1, 4), (2, 4), (1, 8)):
        assert _evaluation(mbs, dp, 8, 2) == want, (mbs, dp)


def test_evaluations_continue_where_the_last_one_stopped():
    """Megatron advances consumed_valid_samples by eval_iters x global batch per evaluation and restores it on
    --load: an iterator started there reads what an uninterrupted one reads next."""
    it = ValidationIterator([Rows(0), Rows(1)], [0.6, 0.4], 2, 1, 2)
    for _ in range(4):     # one evaluation: 2 iterations x 2 micro-batches of 2 per rank
        next(it)
    resumed = ValidationIterator([Rows(0), Rows(1)], [0.6, 0.4], 2, 1, 2, start_sample=16)
    for _ in range(5):
        assert torch.equal(next(it)["tokens"], next(resumed)["tokens"])
    assert _evaluation(2, 2, 8, 1, start=16) != _evaluation(2, 2, 8, 1)


def test_sources_without_validation_data(tmp_path):
    """A source without a validation window leaves the blend (its weight goes to the others); none at all is one
    line naming --eval-iters and --split; a validation file that cannot be read is an error, not a skipped source."""
    import os

    from nexus_megatron.data.synthetic import write_synthetic_data
    a = write_synthetic_data(str(tmp_path / "a"), sources=("web",))
    b = write_synthetic_data(str(tmp_path / "b"), val_tokens=10, sources=("code",))
    specs = [SourceSpec("web", 0.6, f"{a}/web"), SourceSpec("code", 0.4, f"{b}/code")]
    it = build_validation_iterator(specs, 16, 2, 0, 1)
    batches = [next(it) for _ in range(4)]
    assert all(x["tokens"].shape == (2, 16) for x in batches)
    assert {int(s) for x in batches for s in x["source_id"]} == {0}     # code has 10 validation tokens < 17
    with pytest.raises(DataError, match=r"^--eval-iters: no source of --data-path has validation data of 100001 "
                                        r"tokens .*give --eval-iters 0 or a --split with a validation part$"):
        build_validation_iterator(specs, 100000, 2, 0, 1)
    os.remove(f"{b}/code/val.bin")
    with pytest.raises(DataError, match="code"):
        build_validation_iterator(specs, 16, 2, 0, 1)
