"""Reading prepared token shards, and per-source samplers that are a pure function of
(seed, source, sample index): a run resumes mid-way from the per-source sample counters alone."""
from __future__ import annotations

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

    def __init__(self, path: str, dtype: str, name: str):
        self.path = path
        if not os.path.isfile(path):
            raise DataError(f"source {name!r}: {path} is missing; re-run `nexus-megatron prepare-data`")
        size = os.path.getsize(path)
        itemsize = np.dtype(dtype).itemsize
        if size == 0 or size % itemsize:
            raise DataError(f"source {name!r}: {path} is empty or truncated ({size} bytes); re-run prepare-data")
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
    out = {}
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
            shard = TokenShard(os.path.join(path, name, "train.bin"), info["dtype"], name)
            if vocab:
                shard.check_vocab(int(vocab))
            train = SourceSampler(shard, seq_len, seed, i)
            if train.windows == 0:
                raise DataError(f"source {name!r} has {len(shard)} training tokens, fewer than one sequence of "
                                f"data.seq_len+1={seq_len + 1}: prepare more data or lower data.seq_len")
        vshard = TokenShard(os.path.join(path, name, "val.bin"), info["dtype"], name)
        if vocab:
            vshard.check_vocab(int(vocab))
        val = SourceSampler(vshard, seq_len, seed, i, shuffle=False)
        if val.windows == 0:
            raise DataError(f"source {name!r} has {len(vshard)} validation tokens, fewer than one sequence of "
                            f"{seq_len + 1}: prepare more validation data or lower data.seq_len")
        out[name] = SourceData(name, i, train, val)
    return manifest, out
