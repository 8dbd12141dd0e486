"""Fault handling helpers: one-line errors for unreadable or malformed JSON files (manifest.json, summary.json,
metrics.jsonl, with a partial last line tolerated), a token-range check for prepared data (an out-of-vocabulary id is an error
before compute, not an index error or a CUDA device-side assert mid-run), and a fault-injection hook
used only by the tests (tests/test_faults.py, tests/test_faults_engines.py, tests/test_bad_inputs.py).

The hook is driven by the environment variable ``NEXUS_FAULT_INJECT``, a comma-separated list of
``key=value``; unset (the normal case) it costs one dictionary lookup. Keys:

* ``kill_rank=R,step=S,phase=P[,action=A]``: the process of global rank ``R`` sends itself SIGKILL when it
  reaches the named point ``P`` of outer step ``S`` (1-based). ``phase=step`` is in the middle of the outer
  step (after its first inner step). ``phase=checkpoint`` is in the middle of writing checkpoint ``S``, in
  its temporary directory before it is published: plain engine, after ``state.pt``; DeepSpeed, after the
  first file this rank writes (rank 0: the model states, before its optimizer shard); Megatron, after
  rank 0's ``common.pt`` and before any rank writes its tensor shards. ``action=stop`` sends SIGSTOP
  instead (the process is frozen, as in an uninterruptible kernel wait); ``action=hang`` sleeps forever
  (a rank blocked for good, e.g. in a collective that never completes; it still dies on SIGTERM).
* ``nan_steps=S1:S2:...`` (optionally ``nan_rank=R``): the training loss of outer steps S1, S2, ... is
  replaced by NaN (on rank R only when given), so their gradients are NaN.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Optional

import numpy as np

from .errors import DataError

ENV = "NEXUS_FAULT_INJECT"


def parse_spec(spec: Optional[str]) -> dict:
    out = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"{ENV}={spec!r}: write key=value pairs separated by commas")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fault_point(phase: str, step: int) -> None:
    """Named point ``phase`` of outer step ``step``: SIGKILL this process if NEXUS_FAULT_INJECT asks for it."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    f = parse_spec(spec)
    if "kill_rank" not in f or f.get("phase") != phase or int(f.get("step", -1)) != int(step):
        return
    if int(f["kill_rank"]) != _rank():
        return
    action = f.get("action", "kill")
    if action not in ("kill", "stop", "hang"):
        raise ValueError(f"{ENV}: action={action!r}: use kill, stop or hang")
    what = {"kill": "SIGKILL", "stop": "SIGSTOP", "hang": "hang (sleep forever)"}[action]
    sys.stderr.write(f"[{ENV}] rank {_rank()} (pid {os.getpid()}): {what} at phase={phase} step={step}\n")
    sys.stderr.flush()
    if action == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)


def inject_loss(loss, step: int):
    """The training loss of outer step ``step`` (1-based), replaced by NaN if NEXUS_FAULT_INJECT asks."""
    spec = os.environ.get(ENV)
    if not spec:
        return loss
    f = parse_spec(spec)
    steps = {int(s) for s in f.get("nan_steps", "").split(":") if s}
    if int(step) in steps and ("nan_rank" not in f or int(f["nan_rank"]) == _rank()):
        return loss * float("nan")
    return loss


def check_token_range(path: str, tokens: np.ndarray, vocab_size: int, name: str, chunk: int = 1 << 24) -> None:
    """Every token id of ``tokens`` (a memmap) is below ``vocab_size``, else a DataError naming the file,
    the first offending position and id. Reads the file once, in chunks (about 1 s per GB)."""
    if np.iinfo(tokens.dtype).max < vocab_size:
        return   # the dtype cannot hold an out-of-range id
    for s in range(0, len(tokens), chunk):
        part = np.asarray(tokens[s:s + chunk])
        if part.size and int(part.max()) >= vocab_size:
            pos = int(np.argmax(part >= vocab_size))
            raise DataError(
                f"source {name!r}: {path} holds token id {int(part[pos])} at position {s + pos}, outside the "
                f"tokenizer vocabulary (manifest.json vocab_size={vocab_size}): the file is corrupted or was "
                "written with another tokenizer; re-run `nexus-megatron prepare-data`")


# ---------------------------------------------------------------------------------------------------
# files written by this package, read back with one-line errors (a file-system fault names the path and the fix)

def read_file_bytes(path: str, error, missing: str, unreadable: str) -> bytes:
    """The bytes of file ``path``. A missing file raises ``error(missing)``, one that cannot be read
    ``error(unreadable)`` with ``{reason}`` in it replaced by the OS's reason: one-line errors naming the file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise error(missing) from None
    except OSError as e:
        raise error(unreadable.replace("{reason}", str(e.strerror or e))) from None


def read_json_file(path: str, fix: str, error=DataError):
    """The JSON object in ``path``; an unreadable or malformed file is ``error`` naming the path and ``fix``."""
    raw = read_file_bytes(path, error, f"{path} does not exist: {fix}", f"{path} cannot be read ({{reason}}): {fix}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{path} is not valid JSON ({' '.join(str(e).split())}): {fix}") from None


def read_jsonl(path: str, fix: str, error=DataError) -> list:
    """The objects of a JSON-lines file such as metrics.jsonl. A partial last line (a run stopped while
    writing it) is dropped with a warning on stderr; a malformed line elsewhere is ``error`` naming the line."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").split("\n")
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e}): {fix}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                print(f"nexus-megatron: warning: {path}: the last line ({i + 1}) is incomplete (a run stopped while "
                      "writing it); ignored", file=sys.stderr)
                break
            raise error(f"{path} line {i + 1} is not a JSON object ({' '.join(str(e).split())}): {fix}") from None
        out.append(rec)
    return out
