"""Data integrity (docs/data.md#integrity): a shard whose size is not the manifest's token count, or whose
bytes are not the manifest's sha256, is never read: a one-line DataError naming the file and
`re-run prepare-data`, before any compute. Verified shards are cached by size and mtime_ns."""
import os
import re

import numpy as np
import pytest

import nexus_megatron.data.shards as shards
from nexus_megatron.data.prepare import prepare_data
from nexus_megatron.data.sources import SOURCES, Source
from nexus_megatron.errors import DataError
from tests.conftest import write_synthetic_data
from tests.test_resume_safety import write_hashed_data
from tests.test_train import tiny_config

NAMES, OOD = ["web", "code", "math"], ["poetry"]


def exact(msg):
    return "^" + re.escape(msg) + "$"


@pytest.fixture
def no_compute(monkeypatch):
    import nexus_megatron.train as T

    def forbidden(*a, **k):
        raise AssertionError("compute started before the bad data was reported")
    monkeypatch.setattr(T, "build_model", forbidden)


def run(data, run_dir):
    from nexus_megatron.train import train
    return train(tiny_config(data, run_dir, **{"train.steps": 2, "train.eval_every": 0, "train.probe_every": 0}))


def hash_calls(monkeypatch):
    calls = []
    real = shards.sha256_file

    def counted(path):
        calls.append(os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path))
        return real(path)
    monkeypatch.setattr(shards, "sha256_file", counted)
    return calls


@pytest.mark.parametrize("hashed", [False, True], ids=["manifest-counts-only", "manifest-with-sha256"])
def test_shard_truncated_to_whole_tokens(tmp_path, no_compute, hashed):
    """Cut to a whole number of tokens (so no odd byte count gives it away): the manifest's count does."""
    data = (write_hashed_data if hashed else write_synthetic_data)(str(tmp_path / "data"))
    path = os.path.join(data, "code", "train.bin")
    np.fromfile(path, dtype=np.uint16)[:12000].tofile(path)
    with pytest.raises(DataError, match=exact(
            f"source 'code': {path} holds 12000 tokens but manifest.json says 20000: the file was truncated or "
            "replaced; re-run `nexus-megatron prepare-data`")):
        run(data, tmp_path / "r")


@pytest.mark.parametrize("split", ["train", "val"])
def test_shard_with_changed_bytes(tmp_path, no_compute, split):
    """Same length, valid token ids, other content: only the sha256 tells."""
    data = write_hashed_data(str(tmp_path / "data"))
    path = os.path.join(data, "math", f"{split}.bin")
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[7] = (int(tokens[7]) % 60) + 1 if tokens[7] != (int(tokens[7]) % 60) + 1 else 2
    tokens.tofile(path)
    with pytest.raises(DataError, match=exact(
            f"source 'math': {path} has changed since prepare-data (its sha256 is not the one in manifest.json): "
            "the file is corrupted or was replaced; re-run `nexus-megatron prepare-data`")):
        run(data, tmp_path / "r")


def test_changed_after_a_verified_run_is_still_caught(tmp_path, monkeypatch):
    """The cache does not hide a later change: a rewrite changes mtime_ns, so the file is hashed again."""
    data = write_hashed_data(str(tmp_path / "data"))
    shards.open_sources(data, NAMES, OOD, 16, 0)                  # verified, cached
    path = os.path.join(data, "web", "val.bin")
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[0] = 1 if tokens[0] != 1 else 2
    tokens.tofile(path)
    with pytest.raises(DataError, match="web/val.bin has changed since prepare-data"):
        shards.open_sources(data, NAMES, OOD, 16, 0)


def test_verification_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    data = write_hashed_data(str(tmp_path / "data"))
    calls = hash_calls(monkeypatch)
    shards.open_sources(data, NAMES, OOD, 16, 0)
    assert sorted(calls) == sorted([f"{n}/{s}.bin" for n in NAMES for s in ("train", "val")] + ["poetry/val.bin"])
    assert os.path.isfile(os.path.join(data, shards.VERIFIED_CACHE))
    del calls[:]
    shards.open_sources(data, NAMES, OOD, 16, 0)
    assert calls == []                                              # the second run hashes nothing
    path = os.path.join(data, "code", "train.bin")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))     # touched: hashed again, once
    shards.open_sources(data, NAMES, OOD, 16, 0)
    shards.open_sources(data, NAMES, OOD, 16, 0)
    assert calls == ["code/train.bin"]


def test_unwritable_cache_still_verifies(tmp_path, monkeypatch):
    data = write_hashed_data(str(tmp_path / "data"))

    def refuse(*a, **k):
        raise PermissionError("read-only file system")
    monkeypatch.setattr(shards.os, "replace", refuse)
    calls = hash_calls(monkeypatch)
    shards.open_sources(data, NAMES, OOD, 16, 0)
    shards.open_sources(data, NAMES, OOD, 16, 0)
    assert len(calls) == 2 * 7 and not os.path.exists(os.path.join(data, shards.VERIFIED_CACHE))


@pytest.fixture
def fake_source(monkeypatch):
    def docs(pkg_dir, seed=0):
        for i in range(400):
            yield f"Document {i}: the quick brown fox number {i * 7 % 13} jumps over the lazy dog {i % 5}. " * 2

    monkeypatch.setitem(SOURCES, "fake", Source("fake", "train", "generated documents", "none", (), docs))
    return "fake"


def test_prepare_verifies_and_fills_the_cache(tmp_path, monkeypatch, fake_source, capsys):
    """prepare-data hashes what it writes (the trainer's first use hashes nothing); a re-run verifies the
    sha256s instead of trusting sizes, so a corrupted file is rebuilt rather than reported up to date."""
    out = tmp_path / "data"
    kw = dict(sources=("fake",), ood=(), train_tokens_per_source=2000, val_tokens_per_source=200, vocab_size=300,
              pkg_dir=tmp_path / "pkgs", verbose=False)
    man = prepare_data(out, **kw)
    calls = hash_calls(monkeypatch)
    shards.open_sources(str(out), ["fake"], [], 16, 0)
    assert calls == []
    path = out / "fake" / "train.bin"
    tokens = np.fromfile(path, dtype=man["dtype"])
    tokens[3] = tokens[3] + 1 if tokens[3] + 1 < 300 else 1
    tokens.tofile(path)
    with pytest.raises(DataError, match="fake/train.bin has changed since prepare-data"):
        shards.open_sources(str(out), ["fake"], [], 16, 0)
    capsys.readouterr()
    again = prepare_data(out, **{**kw, "verbose": True})
    assert "up to date" not in capsys.readouterr().out               # rebuilt
    assert again["sources"]["fake"]["files"] == man["sources"]["fake"]["files"]   # deterministic: same bytes
    shards.open_sources(str(out), ["fake"], [], 16, 0)
    prepare_data(out, **{**kw, "verbose": True})
    assert "up to date" in capsys.readouterr().out
