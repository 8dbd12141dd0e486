"""Reading prepared token shards, and per-source samplers that are a pure function of
(seed, source, sample index): a run resumes mid-way from the per-source sample counters alone.

Integrity (docs/data.md#integrity): a shard whose size differs from the manifest's token count is refused
when it is opened, and a shard whose sha256 differs from the manifest's is refused on first use; a verified
shard is remembered in ``<data>/.verified.json`` by path, size and mtime_ns, so later runs do not hash it
again (prepare-data fills that cache as it writes the files)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import DataError
from ..faults import check_token_range, read_json_file
from ..layout import hash_seed


def load_manifest(path: str) -> dict:
    mf = os.path.join(path, "manifest.json")
    if not os.path.isfile(mf):
        raise DataError(
            f"data.path={path!r} has no manifest.json: prepare it first with "
            f"`nexus-megatron prepare-data --out {path}` (or point data.path at a prepared directory)")
    manifest = read_json_file(mf, "re-run `nexus-megatron prepare-data` for this directory")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sources"), dict) or \
            not isinstance(manifest.get("vocab_size"), int):
        raise DataError(f"{mf} is not a prepare-data manifest (it needs 'sources' and an integer 'vocab_size'): "
                        "re-run `nexus-megatron prepare-data` for this directory")
    for name, info in manifest["sources"].items():
        if not isinstance(info, dict) or info.get("dtype") not in ("uint16", "uint32"):
            raise DataError(f"{mf}: source {name!r} has no token dtype (uint16 or uint32): the manifest is damaged; "
                            "re-run `nexus-megatron prepare-data` for this directory")
    return manifest


VERIFIED_CACHE = ".verified.json"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardVerifier:
    """sha256 checks of a data directory's shards against its manifest, with a cache of the files already
    verified keyed by (relative path, size, mtime_ns, expected sha256). A file rewritten in place keeps
    neither its mtime nor, usually, its size, so it is hashed again; the cache is best effort (an unwritable
    data directory just means hashing on every run)."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, VERIFIED_CACHE)
        try:
            with open(self.path) as f:
                self.cache = json.load(f)
            if not isinstance(self.cache, dict):
                self.cache = {}
        except (OSError, ValueError):
            self.cache = {}
        self.dirty = False

    def _key(self, path: str, sha256: str) -> tuple:
        st = os.stat(path)
        return os.path.relpath(path, self.data_dir), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}

    def is_verified(self, path: str, sha256: str) -> bool:
        rel, key = self._key(path, sha256)
        return self.cache.get(rel) == key

    def record(self, path: str, sha256: str) -> None:
        """Remember ``path`` (as it is now) as matching ``sha256``."""
        rel, key = self._key(path, sha256)
        if self.cache.get(rel) != key:
            self.cache[rel], self.dirty = key, True

    def matches(self, path: str, sha256: str) -> bool:
        """Whether ``path`` hashes to ``sha256`` (from the cache when size and mtime are unchanged)."""
        if self.is_verified(path, sha256):
            return True
        if sha256_file(path) != sha256:
            return False
        self.record(path, sha256)
        return True

    def check(self, path: str, sha256: str, name: str) -> None:
        if not self.matches(path, sha256):
            raise DataError(f"source {name!r}: {path} has changed since prepare-data (its sha256 is not the one in "
                            "manifest.json): the file is corrupted or was replaced; re-run `nexus-megatron "
                            "prepare-data`")

    def save(self) -> None:
        if not self.dirty:
            return
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(self.cache, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:   # a read-only data directory: verified again next time
            try:
                os.remove(tmp)
            except OSError:
                pass


class FlatTokens:
    """A flat array of token ids, read as windows of seq_len + 1 tokens (inputs and shifted targets)."""

    def __init__(self, tokens: np.ndarray, name: str):
        self.tokens, self.name = tokens, name

    def __len__(self):
        return len(self.tokens)

    def num_windows(self, seq_len: int) -> int:
        """Non-overlapping windows of seq_len + 1 tokens."""
        return max((len(self.tokens) - 1) // seq_len, 0)

    def window(self, i: int, seq_len: int) -> np.ndarray:
        s = i * seq_len
        return self.tokens[s:s + seq_len + 1]


class TokenShard(FlatTokens):
    """One split (train or val) of one source: a flat uint16/uint32 memmap of token ids."""

    def __init__(self, path: str, dtype: str, name: str, tokens: Optional[int] = None):
        """``tokens``: the manifest's token count for this file, checked against the file's size."""
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"source {name!r}: {path} is missing; re-run `nexus-megatron prepare-data`")
        size = os.path.getsize(path)
        itemsize = np.dtype(dtype).itemsize
        if size == 0 or size % itemsize:
            raise DataError(f"source {name!r}: {path} is empty or truncated ({size} bytes); re-run prepare-data")
        if tokens is not None and size // itemsize != int(tokens):
            raise DataError(f"source {name!r}: {path} holds {size // itemsize} tokens but manifest.json says {tokens}: "
                            "the file was truncated or replaced; re-run `nexus-megatron prepare-data`")
        super().__init__(np.memmap(path, dtype=dtype, mode="r"), name)

    def check_vocab(self, vocab_size: int) -> None:
        check_token_range(self.path, self.tokens, vocab_size, self.name)


class SourceSampler:
    """Sample ``j`` of a source is window ``perm_e[j mod W]`` of epoch ``e = j // W``, where ``perm_e`` is a
    permutation seeded by (seed, source, e)."""

    def __init__(self, shard: TokenShard, seq_len: int, seed: int, source_index: int, shuffle: bool = True):
        self.shard, self.seq_len, self.seed, self.source_index = shard, seq_len, seed, source_index
        self.windows = shard.num_windows(seq_len)
        self.shuffle = shuffle
        self._epoch, self._perm = -1, None

    def _window_index(self, j: int) -> int:
        e, r = divmod(j, self.windows)
        if not self.shuffle:
            return r
        if e != self._epoch:
            g = torch.Generator().manual_seed(hash_seed(self.seed, self.source_index, e))
            self._perm = torch.randperm(self.windows, generator=g).numpy()
            self._epoch = e
        return int(self._perm[r])

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Samples start .. start+count-1 as a LongTensor [count, seq_len + 1]."""
        rows = [np.asarray(self.shard.window(self._window_index(j), self.seq_len), dtype=np.int64)
                for j in range(start, start + count)]
        return torch.from_numpy(np.stack(rows))


def open_checked_shard(data_dir: str, name: str, info: dict, split: str,
                       verifier: Optional[ShardVerifier] = None) -> TokenShard:
    """``<data_dir>/<name>/<split>.bin`` of a prepared directory, its size checked against the manifest's
    token count and its content against the manifest's sha256 (``info``: the source's manifest entry).
    Pass one ``verifier`` for several shards and call its ``save()`` afterwards."""
    entry = (info.get("files") or {}).get(split, {})
    sh = TokenShard(os.path.join(data_dir, name, f"{split}.bin"), info["dtype"], name,
                    tokens=entry.get("tokens", info.get(f"{split}_tokens")))
    if entry.get("sha256"):
        own = verifier is None
        verifier = verifier or ShardVerifier(data_dir)
        verifier.check(sh.path, entry["sha256"], name)
        if own:
            verifier.save()
    return sh


@dataclass
class SourceData:
    name: str
    index: int
    train: Optional[SourceSampler]
    val: SourceSampler


def open_sources(path: str, names, ood, seq_len: int, seed: int):
    """(manifest, {name: SourceData}) for the training sources and the OOD sources; clear errors for
    missing or empty sources."""
    manifest = load_manifest(path)
    known = manifest.get("sources", {})
    vocab = manifest.get("vocab_size")
    verifier = ShardVerifier(path)
    out = {}

    def shard(name: str, info: dict, split: str) -> TokenShard:
        sh = open_checked_shard(path, name, info, split, verifier)
        if vocab:
            sh.check_vocab(int(vocab))
        return sh

    for i, name in enumerate(list(names) + list(ood)):
        if name not in known:
            raise DataError(
                f"source {name!r} is not in {path}/manifest.json (it has: {', '.join(sorted(known))}); fix "
                f"data.sources / data.ood or prepare it with `nexus-megatron prepare-data --sources ...`")
        info = known[name]
        is_train = name in names
        if is_train and info.get("kind") == "ood":
            raise DataError(f"source {name!r} was prepared as held-out (OOD, no train split): move it to data.ood")
        train = None
        if is_train:
            tshard = shard(name, info, "train")
            train = SourceSampler(tshard, seq_len, seed, i)
            if train.windows == 0:
                raise DataError(f"source {name!r} has {len(tshard)} training tokens, fewer than one sequence of "
                                f"data.seq_len+1={seq_len + 1}: prepare more data or lower data.seq_len")
        vshard = shard(name, info, "val")
        val = SourceSampler(vshard, seq_len, seed, i, shuffle=False)
        if val.windows == 0:
            raise DataError(f"source {name!r} has {len(vshard)} validation tokens, fewer than one sequence of "
                            f"{seq_len + 1}: prepare more validation data or lower data.seq_len")
        out[name] = SourceData(name, i, train, val)
    verifier.save()
    return manifest, out
