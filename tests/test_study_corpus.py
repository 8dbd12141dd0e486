"""A user's own corpus for the study (study.prepare.indexed, nexus_megatron/study/corpus.py): one Megatron indexed
dataset per source becomes the prepared layout the runs read, with the last val_tokens of each training source as
validation and the OOD source validation only; bad inputs are one-line errors."""
import struct

import numpy as np
import pytest

from nexus_megatron.data.shards import open_sources
from nexus_megatron.errors import DataError
from nexus_megatron.study.corpus import import_indexed_corpus


def _indexed(prefix, tokens, dtype_code=8):
    """A Megatron indexed dataset (MMIDIDX header, version 1, dtype code 8 = uint16; one document) of ``tokens``."""
    np.asarray(tokens, dtype=np.uint16).tofile(str(prefix) + ".bin")
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code))
        f.write(struct.pack("<Q", 1) + struct.pack("<Q", 2))
        f.write(np.array([len(tokens)], np.int32).tobytes() + np.array([0], np.int64).tobytes()
                + np.array([0, 1], np.int64).tobytes())


def test_indexed_sources_become_the_prepared_layout(tmp_path):
    rng = np.random.default_rng(0)
    toks = {n: rng.integers(1, 300, size=n_tok) for n, n_tok in (("web", 900), ("code", 700), ("poems", 400))}
    for n, t in toks.items():
        _indexed(tmp_path / n, t)
    out = str(tmp_path / "data")
    indexed = {n: str(tmp_path / n) for n in toks}
    import_indexed_corpus(out, indexed, ["web", "code"], ["poems"], val_tokens=100, train_tokens=500,
                          vocab_size=300, log=lambda m: None)
    _, src = open_sources(out, ["web", "code"], ["poems"], 9, 0)
    web_train = np.fromfile(tmp_path / "data" / "web" / "train.bin", dtype=np.uint16)
    assert np.array_equal(web_train, toks["web"][:500])
    assert np.array_equal(np.fromfile(tmp_path / "data" / "code" / "val.bin", dtype=np.uint16), toks["code"][-100:])
    assert np.array_equal(np.fromfile(tmp_path / "data" / "poems" / "val.bin", dtype=np.uint16), toks["poems"][:100])
    assert src["web"].train.windows == (500 - 1) // 9 and src["poems"].train is None
    # the same inputs again: a no-op, the files are not rewritten
    mtime = (tmp_path / "data" / "web" / "train.bin").stat().st_mtime_ns
    import_indexed_corpus(out, indexed, ["web", "code"], ["poems"], val_tokens=100, train_tokens=500,
                          vocab_size=300, log=lambda m: None)
    assert (tmp_path / "data" / "web" / "train.bin").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="no prefix for \\['math'\\]"):
        import_indexed_corpus(out, indexed, ["web", "math"], [], val_tokens=100, train_tokens=None, vocab_size=300)
    with pytest.raises(DataError, match="vocab_size=200"):
        import_indexed_corpus(str(tmp_path / "d2"), indexed, ["web"], [], val_tokens=100, train_tokens=None,
                              vocab_size=200)
