"""Helpers of the process-fault tests (tests/test_faults.py: plain engine; tests/test_faults_engines.py:
DeepSpeed and Megatron-core): launch a 2-rank job as a subprocess, time its exit after an injected fault,
read torchrun's failure summary, compare checkpoints."""
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import torch

from tests.conftest import ROOT

EXIT_BOUND_S = 60.0
"""Every process of a job must be gone this long after the fault (a "does not hang" bound, not a benchmark:
measured exits are 1-2 s, see docs/reliability.md)."""


def cli_train(config, *sets):
    """`nexus-megatron train --nproc 2 --config CONFIG [--set ...]`: the CLI re-runs itself under torchrun."""
    return [sys.executable, "-m", "nexus_megatron.cli", "train", "--nproc", "2", "--config", str(config),
            *[a for s in sets for a in ("--set", s)]]


def torchrun(*target):
    """`torchrun --standalone --nproc_per_node 2 TARGET...` (TARGET: a script and its arguments, or -m ...). Standalone:
    the rendezvous store binds a port the OS picks, in one step (a port chosen here and bound seconds later can be
    taken meanwhile by another job on the machine)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target]


def recorded(log_dir, kind, target, *args):
    """TARGET run under tests/record_publish.py (fsyncs and renames recorded in log_dir)."""
    return ["-m", "tests.record_publish", str(log_dir), kind, target, *args]


LAST_JOB = {"id": None}
"""The ``NEXUS_TEST_JOB`` of the last :func:`launch`: every process the job starts inherits it."""


def launch(cmd, fault=None, timeout=300):
    """Run ``cmd``; returns (rc, output, seconds from the injected fault to the exit of the command)."""
    LAST_JOB["id"] = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", NEXUS_TEST_JOB=LAST_JOB["id"])
    env.pop("MASTER_PORT", None)   # the command's torchrun runs --standalone (see torchrun above)
    env.pop("NEXUS_FAULT_INJECT", None)
    if fault:
        env["NEXUS_FAULT_INJECT"] = fault
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, fault_at = [], []

    def pump():
        for line in proc.stdout:
            if "[NEXUS_FAULT_INJECT]" in line and not fault_at:
                fault_at.append(time.time())
            lines.append(line)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        raise AssertionError("the run hung:\n" + "".join(lines[-60:]))
    end = time.time()
    reader.join(timeout=10)
    return rc, "".join(lines), (end - fault_at[0]) if fault_at else None


def stray_workers(marker):
    """Processes still running whose command line contains ``marker`` (torchrun should have taken its workers
    down), and any process left by the last :func:`launch`'s job, found by the ``NEXUS_TEST_JOB`` its
    processes inherit (children of the workers too, e.g. a library's helper processes)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    found = [line for line in out.splitlines() if str(marker) in line and "ps -eo" not in line]
    job = LAST_JOB["id"]
    if job:
        tag = f"NEXUS_TEST_JOB={job}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:   # gone meanwhile, or not ours to read
                continue
            if tag in env.split(b"\0"):
                found.append(f"{pid} {cmd}")
    return found


def failed_rank_named(out, rank, exitcode):
    """torchrun's failure summary names the rank and its exit code (-9: SIGKILL) as the root cause."""
    root = out.split("Root Cause")[-1]
    return re.search(rf"rank\s*:\s*{rank} \(local_rank: {rank}\)\s*\n\s*exitcode\s*:\s*{exitcode}\b", root)


def assert_crashed(rc, out, exit_s, rank, marker, what):
    print(f"{what}: all processes exited {exit_s:.1f}s after the fault, rc={rc}")
    assert rc != 0 and exit_s is not None and exit_s < EXIT_BOUND_S, (rc, exit_s, out[-3000:])
    assert failed_rank_named(out, rank, -9), out[-3000:]
    assert not stray_workers(marker)


def tensors(obj, prefix=""):
    """Every tensor in a nested dict/list, by path."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def assert_tensors_equal(got, want, what):
    got, want = dict(tensors(got)), dict(tensors(want))
    assert got.keys() == want.keys(), what
    for k, v in want.items():
        assert torch.equal(got[k], v), f"{what}: {k} differs"
    return len(want)


def jsonl(path, drop_prefix="time"):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(drop_prefix)} for line in f]
