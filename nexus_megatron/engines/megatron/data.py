"""Per-source data for Nexus on Megatron: each micro-step reads the source its layout assigns.

Megatron's own multi-source data (``--data-path w1 p1 w2 p2`` -> ``BlendedDataset``) interleaves the
sources inside every batch and ``get_batch`` drops the ``dataset_id``, so the per-source gradients that
Nexus normalizes cannot be recovered. Here every source is its own dataset and
:class:`SourceRoutedIterator` hands out micro-batches of one source per pass:

* sequential layout: all data-parallel ranks read the source drawn for the micro-step;
* source-parallel layout: source block i reads source i only.

A source is a flat token stream cut into windows of ``seq_length + 1`` tokens, read from either

* a prepared-data directory of this package (``<root>/manifest.json`` + ``<root>/<source>/{train,val}.bin``,
  written by ``nexus-megatron prepare-data``), or
* a Megatron indexed dataset prefix (``<prefix>.bin`` + ``<prefix>.idx``, the output of Megatron-LM's
  ``tools/preprocess_data.py``): documents are concatenated (with their end-of-document tokens) and cut
  into windows; ``--split`` selects contiguous window ranges for train / valid / test.

Which sample a rank reads is a pure function of (source, per-source sample counter, its position among
the source's readers), as in the plain trainer (:mod:`nexus_megatron.train`): a resumed run continues
from the counters alone (``state_dict`` / ``load_state_dict``). Every micro-batch carries
``source_id`` so the loss can be logged per source.
"""
from __future__ import annotations

import os
import struct
from typing import Optional, Sequence

import numpy as np
import torch

from ...data.shards import FlatTokens, SourceSampler, load_manifest, open_checked_shard
from ...errors import DataError

_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}


def open_indexed_tokens(prefix: str) -> np.ndarray:
    """All tokens of a Megatron indexed dataset (``prefix.bin`` / ``prefix.idx``) as one memmap."""
    idx, binf = prefix + ".idx", prefix + ".bin"
    if not (os.path.isfile(idx) and os.path.isfile(binf)):
        raise DataError(f"--data-path {prefix!r}: expected {idx} and {binf} (Megatron indexed dataset) or a "
                        "prepared source directory")
    with open(idx, "rb") as f:
        if f.read(9) != _IDX_HEADER:
            raise DataError(f"{idx} is not a Megatron index file (bad header)")
        struct.unpack("<Q", f.read(8))
        code = struct.unpack("<B", f.read(1))[0]
    if code not in _IDX_DTYPES:
        raise DataError(f"{idx}: unknown token dtype code {code}")
    return np.memmap(binf, dtype=_IDX_DTYPES[code], mode="r")


def parse_split(split: str) -> list:
    parts = [float(x) for x in str(split).replace("/", ",").split(",") if x.strip()]
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    total = sum(parts)
    if total <= 0:
        raise DataError(f"--split {split!r}: give three non-negative numbers, e.g. 969,30,1")
    return [p / total for p in parts]


def _split_windows(tokens: np.ndarray, seq_len: int, split, which: int, name: str) -> FlatTokens:
    n_win = max((len(tokens) - 1) // seq_len, 0)
    bounds = np.cumsum([0.0] + list(split)) * n_win
    lo, hi = int(round(bounds[which])), int(round(bounds[which + 1]))
    return FlatTokens(tokens[lo * seq_len: hi * seq_len + 1], name)


class SourceSpec:
    """One training source: a name, a weight and where its tokens are."""

    def __init__(self, name: str, weight: float, path: str):
        self.name, self.weight, self.path = name, float(weight), path


def parse_data_path(data_path: Sequence[str]) -> list:
    """``--data-path`` as Megatron-LM spells it: ``P`` (one source) or ``W1 P1 W2 P2 ...``. A path is a
    prepared source directory (``<root>/<source>``), a prepared root (all its training sources, uniform
    weights) or an indexed-dataset prefix. Source names are the last path component."""
    items = list(data_path)
    if len(items) == 1:
        pairs = [(1.0, items[0])]
    else:
        if len(items) % 2:
            raise DataError("--data-path: give either one path or weight/path pairs (W1 P1 W2 P2 ...)")
        try:
            pairs = [(float(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
        except ValueError:
            raise DataError("--data-path: weights must be numbers: W1 P1 W2 P2 ...") from None
    specs = []
    for w, p in pairs:
        p = p.rstrip("/")
        if os.path.isfile(os.path.join(p, "manifest.json")):   # a prepared root: every training source
            man = load_manifest(p)
            names = [n for n, info in man["sources"].items() if info.get("kind") != "ood"]
            specs += [SourceSpec(n, w / len(names), os.path.join(p, n)) for n in names]
        else:
            specs.append(SourceSpec(os.path.basename(p), w, p))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataError(f"--data-path: two sources are named alike ({names}); source names are the last path "
                        "component and must be unique")
    return specs


def open_source(spec: SourceSpec, seq_len: int, split: str = "969,30,1", which: str = "train"):
    """A TokenShard-like object for ``which`` in train / valid of the source."""
    parent = os.path.dirname(spec.path)
    if os.path.isfile(os.path.join(parent, "manifest.json")) and os.path.isdir(spec.path):
        man = load_manifest(parent)
        info = man["sources"].get(spec.name)
        if info is None:
            raise DataError(f"source {spec.name!r} is not in {parent}/manifest.json")
        return open_checked_shard(parent, spec.name, info, "train" if which == "train" else "val")
    tokens = open_indexed_tokens(spec.path)
    return _split_windows(tokens, seq_len, parse_split(split), 0 if which == "train" else 1, spec.name)


def vocab_size_of(specs) -> Optional[int]:
    """The vocabulary size recorded in prepared-data manifests (None for indexed datasets)."""
    for s in specs:
        mf = os.path.join(os.path.dirname(s.path), "manifest.json")
        if os.path.isfile(mf):
            return int(load_manifest(os.path.dirname(s.path))["vocab_size"])
    return None


def make_megatron_batch(tokens: torch.Tensor, source: int, eod: Optional[int] = None,
                        mask_eod: bool = False) -> dict:
    """[b, s+1] token ids -> the batch dict of Megatron's GPT ``forward_step`` (+ ``source_id``), with the
    shapes of Megatron-LM's ``get_batch_on_this_tp_rank`` (causal mask [b, 1, s, s], True = masked)."""
    b, s1 = tokens.shape
    s = s1 - 1
    inp, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    loss_mask = torch.ones(b, s, dtype=torch.float32)
    if mask_eod and eod is not None:
        loss_mask[inp == eod] = 0.0
    return {"tokens": inp, "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
            "attention_mask": torch.triu(torch.ones(s, s, dtype=torch.bool), 1).expand(b, 1, s, s).contiguous(),
            "source_id": torch.full((b,), source, dtype=torch.long)}


class SourceRoutedIterator:
    """Micro-batches of the source assigned to this rank in the current pass.

    ``set_micro_step(source, step, micro)`` is called by :func:`~.schedule.nexus_forward_backward` before
    each pass; ``micro_batches_per_pass`` micro-batches of ``micro_batch_size`` samples are then drawn.
    Without ``set_micro_step`` (Adam baseline) every micro-batch ``j`` of iteration ``step`` picks its
    source with the layout's sequential draw ``layout.source_for(step, j)`` (a weighted mixture across
    micro-batches, every data-parallel rank on the same source), see :meth:`begin_iteration`.
    """

    def __init__(self, layout, samplers: Sequence, micro_batch_size: int, micro_batches_per_pass: int,
                 eod: Optional[int] = None, mask_eod: bool = False):
        if len(samplers) != layout.num_sources:
            raise DataError(f"{len(samplers)} data sources for a layout of {layout.num_sources} sources")
        self.layout, self.samplers = layout, list(samplers)
        self.mbs, self.per_pass = int(micro_batch_size), int(micro_batches_per_pass)
        self.eod, self.mask_eod = eod, mask_eod
        self.consumed = [0] * layout.num_sources
        self._src = None
        self._start = 0
        self._j = 0
        self._mixture_step = None

    # -- Nexus: one source per pass ----------------------------------------------------------------
    def set_pass_micro_batches(self, n: int):
        """Micro-batches per pass from now on: Megatron's batch-size schedules (``--step-batch-size-schedule``)
        change the number N of micro-batches per iteration while K stays fixed, so a pass reads N/K."""
        if int(n) < 1:
            raise DataError(f"SourceRoutedIterator: {n} micro-batches per pass")
        self.per_pass = int(n)

    def set_micro_step(self, source: int, step: int, micro: int):
        per = self.mbs * self.per_pass
        reader, _ = self.layout.readers(source, step, micro)
        self._src, self._start, self._j = source, self.consumed[source] + reader * per, 0
        self._mixture_step = None
        for s, readers in self.layout.present(step, micro):
            self.consumed[s] += readers * per

    # -- baseline: a source per micro-batch ---------------------------------------------------------
    def begin_iteration(self, step: int):
        """Adam baseline: micro-batch j of this iteration reads source ``layout.source_for(step, j)``."""
        self._mixture_step, self._j = step, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._mixture_step is not None:
            src = self.layout.source_for(self._mixture_step, self._j)
            reader, _ = self.layout.readers(src, self._mixture_step, self._j)
            start = self.consumed[src] + reader * self.mbs
            for s, readers in self.layout.present(self._mixture_step, self._j):   # same counters on every rank
                self.consumed[s] += readers * self.mbs
        else:
            if self._src is None:
                raise RuntimeError("SourceRoutedIterator: call set_micro_step() (nexus_forward_backward does) or "
                                   "begin_iteration() before reading")
            if self._j >= self.per_pass:
                raise RuntimeError(f"SourceRoutedIterator: more than {self.per_pass} micro-batches read in one pass")
            src, start = self._src, self._start + self._j * self.mbs
        self._j += 1
        tokens = self.samplers[src].batch(start, self.mbs)
        return make_megatron_batch(tokens, src, self.eod, self.mask_eod)

    def state_dict(self) -> dict:
        return {"consumed": list(self.consumed)}

    def load_state_dict(self, sd: dict):
        if len(sd["consumed"]) != len(self.consumed):
            raise DataError("data state of the checkpoint has a different number of sources")
        self.consumed = [int(x) for x in sd["consumed"]]


def build_source_iterator(layout, specs, seq_length: int, micro_batch_size: int, micro_batches_per_pass: int,
                          seed: int = 1234, split: str = "969,30,1", eod: Optional[int] = None,
                          mask_eod: bool = False) -> SourceRoutedIterator:
    """The training iterator for ``specs`` (in the layout's source order)."""
    samplers = []
    for i, spec in enumerate(specs):
        shard = open_source(spec, seq_length, split, "train")
        sampler = SourceSampler(shard, seq_length, seed, i)
        if sampler.windows == 0:
            raise DataError(f"source {spec.name!r} has fewer than {seq_length + 1} training tokens: give it more "
                            "data or lower --seq-length")
        samplers.append(sampler)
    return SourceRoutedIterator(layout, samplers, micro_batch_size, micro_batches_per_pass, eod, mask_eod)


def build_eval_samplers(specs, seq_length: int, seed: int = 1234, split: str = "969,30,1") -> list:
    """Validation samplers (no shuffling), one per source; None where a source has no validation data."""
    out = []
    for i, spec in enumerate(specs):
        try:
            shard = open_source(spec, seq_length, split, "valid")
        except DataError:
            out.append(None)
            continue
        sampler = SourceSampler(shard, seq_length, seed, i, shuffle=False)
        out.append(sampler if sampler.windows > 0 else None)
    return out


# ---------------------------------------------------------------------------------------------------
# validation inside Megatron-LM's loop (--eval-iters > 0)
# ---------------------------------------------------------------------------------------------------

def blend_samples(weights: Sequence[float], n: int) -> tuple:
    """The first ``n`` samples of a weighted blend of sources, as Megatron's ``BlendedDataset`` builds its index:
    sample g goes to the source whose count lags furthest behind ``weight x (g + 1)`` (ties to the lower index).
    Returns ``(source, index within the source)`` as two int arrays. Pure and deterministic."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    counts = np.zeros(len(w), dtype=np.int64)
    src, idx = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    for g in range(n):
        s = int(np.argmax(w * (g + 1) - counts))
        src[g], idx[g] = s, counts[s]
        counts[s] += 1
    return src, idx


class ValidationIterator:
    """Megatron-LM's validation data under ``--optimizer nexus``: one blended stream of every source's validation
    windows (weighted by the ``--data-path`` weights, :func:`blend_samples`), read the way Megatron reads its
    validation set: evaluation after evaluation it continues where the previous one stopped (from
    ``consumed_valid_samples`` on a resumed run), wrapping around a source's windows when they run out.

    Micro-batch m of data-parallel rank r holds global samples ``m * micro_batch_size * dp_size + r *
    micro_batch_size + j``, so an evaluation of ``eval_iters`` x global batch samples reads the same samples
    whatever the data-parallel size and micro-batch size: the reported loss does not depend on them. A
    micro-batch may mix sources (``source_id`` per row); the model's loss is the token mean, as for any batch."""

    def __init__(self, samplers: Sequence, weights: Sequence[float], micro_batch_size: int, dp_rank: int, dp_size: int,
                 start_sample: int = 0, eod: Optional[int] = None, mask_eod: bool = False):
        self.samplers, self.weights = list(samplers), [float(x) for x in weights]
        self.mbs, self.dp_rank, self.dp_size = int(micro_batch_size), int(dp_rank), int(dp_size)
        self.eod, self.mask_eod = eod, mask_eod
        per = self.mbs * self.dp_size
        self.micro = int(start_sample) // per          # Megatron advances consumed_valid_samples by whole batches
        self._src = np.empty(0, dtype=np.int64)
        self._idx = np.empty(0, dtype=np.int64)

    def _plan(self, n: int):
        if n > len(self._src):
            self._src, self._idx = blend_samples(self.weights, max(n, 2 * len(self._src)))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = self.micro * self.mbs * self.dp_size + self.dp_rank * self.mbs
        self.micro += 1
        self._plan(first + self.mbs)
        rows, sources = [], []
        for g in range(first, first + self.mbs):
            s, k = int(self._src[g]), int(self._idx[g])
            rows.append(self.samplers[s].batch(k, 1))
            sources.append(s)
        batch = make_megatron_batch(torch.cat(rows), sources[0], self.eod, self.mask_eod)
        batch["source_id"] = torch.tensor(sources, dtype=torch.long)
        return batch


def build_validation_iterator(specs, seq_length: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                              start_sample: int = 0, seed: int = 1234, split: str = "969,30,1",
                              eod: Optional[int] = None, mask_eod: bool = False) -> ValidationIterator:
    """The validation stream of ``specs`` (:class:`ValidationIterator`); a source with no validation window of
    ``seq_length + 1`` tokens is left out of the blend (its weight goes to the others); none at all is a
    DataError naming the flags, and so is a validation file that cannot be read."""
    kept = []
    for i, spec in enumerate(specs):
        sampler = SourceSampler(open_source(spec, seq_length, split, "valid"), seq_length, seed, i, shuffle=False)
        if sampler.windows > 0:
            kept.append((sampler, spec.weight))
    if not kept:
        raise DataError(f"--eval-iters: no source of --data-path has validation data of {seq_length + 1} tokens "
                        f"(prepared sources: val.bin; indexed datasets: the validation part of --split {split}); "
                        "give --eval-iters 0 or a --split with a validation part")
    return ValidationIterator([s for s, _ in kept], [w for _, w in kept], micro_batch_size, dp_rank, dp_size,
                              start_sample, eod, mask_eod)

