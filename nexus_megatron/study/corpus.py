"""A user's own multi-domain corpus as the study's prepared data (configs/study_gpu_*.yaml).

``study.prepare.indexed`` maps every training source and every OOD source to a Megatron indexed dataset prefix
(``<prefix>.bin`` / ``<prefix>.idx``, the output of Megatron-LM's ``tools/preprocess_data.py``, one per source,
all with the same tokenizer). :func:`import_indexed_corpus` writes the layout every run of the study reads
(``manifest.json`` + ``<source>/{train,val}.bin``, docs/data.md): a training source's LAST ``val_tokens`` tokens
become its validation split and the rest (up to ``train_tokens``) its training split; an OOD source keeps only
``val_tokens`` tokens of validation. Tokens are copied as they are (documents concatenated with their
end-of-document tokens, as the Megatron engine reads them). A prepared root of this package can be used
directly instead: set ``run.data.path`` to it and ``study.prepare.enabled: false``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np

from ..errors import DataError

__all__ = ["import_indexed_corpus"]


def _write(path: str, tokens: np.ndarray, dtype) -> None:
    tmp = path + ".tmp"
    np.asarray(tokens, dtype=dtype).tofile(tmp)
    os.replace(tmp, path)


def import_indexed_corpus(out: str, indexed: Dict[str, str], sources, ood, *, val_tokens: int,
                          train_tokens: Optional[int], vocab_size: int, eot_id: int = 0, log=print) -> str:
    """Write the prepared-data layout under ``out`` from one Megatron indexed dataset per source (see the
    module docstring). A no-op when ``out/manifest.json`` records the same inputs."""
    from ..engines.megatron.data import open_indexed_tokens   # megatron-core: only on this path

    missing = [n for n in list(sources) + list(ood) if n not in indexed]
    if missing:
        raise DataError(f"study.prepare.indexed has no prefix for {missing}: map every source of run.data.sources "
                        "and run.data.ood to its Megatron indexed dataset prefix")
    key = {"indexed": {n: os.path.abspath(indexed[n]) for n in list(sources) + list(ood)},
           "val_tokens": val_tokens, "train_tokens": train_tokens, "vocab_size": vocab_size, "eot_id": eot_id}
    mf = os.path.join(out, "manifest.json")
    if os.path.isfile(mf):
        with open(mf) as f:
            if json.load(f).get("imported") == key:
                log(f"data: {out} is up to date (imported from the indexed datasets)")
                return out
    dtype = "uint16" if vocab_size <= 65535 else "uint32"
    manifest = {"format": 1, "tokenizer": "imported", "vocab_size": int(vocab_size), "eot_id": int(eot_id),
                "sources": {}, "imported": key}
    for name in list(sources) + list(ood):
        toks = open_indexed_tokens(indexed[name])
        if len(toks) and int(toks.max()) >= vocab_size:
            raise DataError(f"{indexed[name]}: token id {int(toks.max())} >= study.prepare.vocab_size={vocab_size}: "
                            "give the tokenizer's vocabulary size")
        os.makedirs(os.path.join(out, name), exist_ok=True)
        if name in ood:
            if len(toks) < val_tokens:
                raise DataError(f"OOD source {name!r} has {len(toks)} tokens < study.prepare.val_tokens={val_tokens}")
            _write(os.path.join(out, name, "val.bin"), toks[:val_tokens], dtype)
            manifest["sources"][name] = {"kind": "ood", "dtype": dtype, "train_tokens": 0, "val_tokens": val_tokens}
            continue
        n_train = len(toks) - val_tokens if train_tokens is None else min(train_tokens, len(toks) - val_tokens)
        if n_train <= 0:
            raise DataError(f"source {name!r} has {len(toks)} tokens, not more than study.prepare.val_tokens="
                            f"{val_tokens}: a source needs training tokens")
        _write(os.path.join(out, name, "train.bin"), toks[:n_train], dtype)
        _write(os.path.join(out, name, "val.bin"), toks[len(toks) - val_tokens:], dtype)
        manifest["sources"][name] = {"kind": "train", "dtype": dtype, "train_tokens": int(n_train),
                                     "val_tokens": val_tokens}
        log(f"data: {name}: {n_train:,} training and {val_tokens:,} validation tokens from {indexed[name]}")
    tmp = mf + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, mf)
    return out
