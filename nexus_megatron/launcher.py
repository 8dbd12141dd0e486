"""Running a multi-process job from ``nexus-megatron train --nproc N`` (torchrun) and ``quickstart --engine
deepspeed`` (the deepspeed launcher) so that the command behaves like one program:

* **Signals**: SIGTERM, SIGINT and SIGHUP sent to the command are forwarded to the whole job. The job is
  started in its own session and every process of it carries ``NEXUS_JOB_ID`` in its environment (torchrun
  starts each worker in a session of its own, so a process group does not reach them); the command signals
  the launcher's group and every tagged process, waits until none is left (``grace_s``, default 30 s,
  ``NEXUS_KILL_GRACE_S``), then SIGKILLs what remains, and exits with 128 + the signal number (143 for
  SIGTERM, 130 for SIGINT). A second signal while waiting SIGKILLs at once.
* **One error, once**: a worker that stops on an input error (a bad checkpoint, a data or settings error
  only a worker can find, the NaN abort) writes its one-line message into ``NEXUS_ERROR_DIR`` and exits 2;
  the command prints the lowest rank's message once, ``nexus-megatron: error: ...``, and exits 2, and the
  launcher's own failure report (torchrun's ChildFailedError traceback) is left out.
* **The master port**: ``MASTER_PORT`` if set (an error if it is in use). Unset, torchrun runs
  ``--standalone``: its rendezvous store binds a port the OS picks, in one step, so jobs started at the same
  moment on one machine never race for a port (a fixed default port, checked and then bound seconds later,
  let two such jobs both take it and one die with EADDRINUSE). The deepspeed launcher has no such mode: it gets
  a free port from the OS (:func:`master_port`).

``python -m nexus_megatron.launcher <torchrun arguments>`` is the torchrun agent used by the command: torchrun
itself, with a parent-death signal (it goes down with the command even if the command is SIGKILLed) and
without its failure report when a worker reported an input error.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Optional

from .errors import NexusConfigError, ReportedError

JOB_ENV = "NEXUS_JOB_ID"
ERROR_DIR_ENV = "NEXUS_ERROR_DIR"
PARENT_ENV = "NEXUS_LAUNCHER_PID"
GRACE_ENV = "NEXUS_KILL_GRACE_S"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# ---------------------------------------------------------------------------------------------------
# the master port

def under_launcher() -> bool:
    """True inside a process started by torchrun / the deepspeed launcher."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def master_port(env=os.environ) -> int:
    """The rendezvous port for a launcher that needs one: MASTER_PORT if set (an error if it is in use), else a
    free port the OS picks (not a fixed one: two jobs started together would both find it free)."""
    port = given_master_port(env)
    return free_port() if port is None else port


def given_master_port(env=os.environ) -> Optional[int]:
    """MASTER_PORT if set (checked: a port number, not in use), else None."""
    given = env.get("MASTER_PORT")
    if given:
        try:
            port = int(given)
            if not 1 <= port <= 65535:
                raise ValueError
        except ValueError:
            raise NexusConfigError(f"MASTER_PORT={given!r}: must be a port number (1-65535)") from None
        if port_in_use(port):
            raise NexusConfigError(
                f"MASTER_PORT={port} is in use on this machine (another job, or one still shutting down): set "
                "MASTER_PORT to a free port, or unset it to let nexus-megatron pick one")
        return port
    return None


# ---------------------------------------------------------------------------------------------------
# the processes of a job

def job_processes(job_id: str) -> list:
    """Live (not zombie) processes whose environment carries NEXUS_JOB_ID=job_id."""
    tag = f"{JOB_ENV}={job_id}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:   # gone meanwhile, or not ours
            continue
        if state not in (b"Z", b"X"):
            found.append(int(pid))
    return found


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def _wait_gone(proc, job_id: str, deadline: float) -> bool:
    while time.time() < deadline:
        proc.poll()
        if proc.returncode is not None and not job_processes(job_id):
            return True
        time.sleep(0.1)
    return False


def read_reported(error_dir: str) -> Optional[str]:
    """The one-line message of the lowest rank that reported an input error, or None."""
    try:
        names = [n for n in os.listdir(error_dir) if n.startswith("rank") and n[4:].isdigit()]
    except OSError:
        return None
    for name in sorted(names, key=lambda n: int(n[4:])):
        try:
            with open(os.path.join(error_dir, name)) as f:
                msg = f.read().strip()
        except OSError:
            continue
        if msg:
            return msg.splitlines()[0]
    return None


def report_error(message: str) -> bool:
    """In a worker of a job started by :func:`run_job`: write the one-line ``message`` for the command to
    print once; returns False outside such a job (the caller prints it itself)."""
    d = os.environ.get(ERROR_DIR_ENV)
    if not d or not os.path.isdir(d):
        return False
    rank = os.environ.get("RANK", "0")
    tmp = os.path.join(d, f".rank{rank}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(" ".join(str(message).split()) + "\n")
    os.replace(tmp, os.path.join(d, f"rank{rank}"))
    return True


def run_job(cmd: list, env: Optional[dict] = None, grace_s: Optional[float] = None) -> int:
    """Run ``cmd`` (a launcher: torchrun or deepspeed) as a job; see the module docstring. Returns its exit
    status, 128 + signal when the command was signalled; raises ReportedError when a worker reported an
    input error."""
    env = dict(os.environ if env is None else env)
    job_id = env[JOB_ENV] = uuid.uuid4().hex
    env[PARENT_ENV] = str(os.getpid())
    error_dir = tempfile.mkdtemp(prefix="nexus-errors-")
    env[ERROR_DIR_ENV] = error_dir
    grace = float(os.environ.get(GRACE_ENV, "30") if grace_s is None else grace_s)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(max(1, int(grace))))   # torchrun's own grace when signalled
    received = []
    proc = None

    def forward(sig, frame):
        first = not received
        received.append(sig)
        if proc is None:
            return
        kill = signal.SIGKILL if not first else sig   # a second signal: no more waiting
        _signal_group(proc.pid, kill)
        _signal_all(job_processes(job_id), kill)

    main_thread = threading.current_thread() is threading.main_thread()   # handlers can only be set there
    old = {s: signal.signal(s, forward) for s in FORWARDED} if main_thread else {}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        if received:   # a signal arrived while starting
            forward(received[-1], None)
        while proc.poll() is None and not received:
            time.sleep(0.2)
        if received:   # forwarded by `forward`; wait (bounded) until no process of the job is left
            if not _wait_gone(proc, job_id, time.time() + grace):
                _signal_group(proc.pid, signal.SIGKILL)
                _signal_all(job_processes(job_id), signal.SIGKILL)
                _wait_gone(proc, job_id, time.time() + 10)
            sig = received[0]
            print(f"nexus-megatron: stopped by {signal.Signals(sig).name}; every process of the job has exited "
                  "(rerun the same command to resume from the last checkpoint)", file=sys.stderr)
            return 128 + int(sig)
        rc = proc.returncode
        # a normal end: no process of the job may outlive it
        left = job_processes(job_id)
        if left:
            _signal_all(left, signal.SIGTERM)
            if not _wait_gone(proc, job_id, time.time() + grace):
                _signal_all(job_processes(job_id), signal.SIGKILL)
        msg = read_reported(error_dir) if rc else None
        if msg:
            raise ReportedError(msg)
        return rc
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for name in os.listdir(error_dir):
            try:
                os.remove(os.path.join(error_dir, name))
            except OSError:
                pass
        try:
            os.rmdir(error_dir)
        except OSError:
            pass


def close_process_groups() -> None:
    """Destroy torch.distributed's process groups at the end of a worker's successful command (as PyTorch asks
    of every program that creates them). A process that exits with gloo groups alive can abort in interpreter
    teardown: gloo's worker threads still hold work objects whose tensors need the GIL ("terminate called
    without an active exception", SIGABRT, exit -6 after the run was saved: seen once in CI, one rank of a
    4-rank ZeRO-2 job). No-op where torch.distributed was never imported or initialised."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch_torchrun(nproc: int, argv: list, env_extra: Optional[dict] = None) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine, as one job: signals to
    this process reach every process of it, a worker's input error is printed once (nexus_megatron/launcher.py)."""
    port = given_master_port()
    rendezvous = ["--standalone"] if port is None else ["--master_port", str(port)]
    cmd = [sys.executable, "-m", "nexus_megatron.launcher", "--nproc_per_node", str(nproc), *rendezvous,
           "-m", "nexus_megatron.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return run_job(cmd, env)


# ---------------------------------------------------------------------------------------------------
# the torchrun agent

def _set_parent_death_signal(sig: int) -> None:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: the command's signal forwarding still applies
        pass


class _QuietWhenReported(logging.Filter):
    """Drop torchrun's log records once a worker has reported an input error (the command prints it)."""

    def __init__(self, error_dir: str):
        super().__init__()
        self.error_dir = error_dir

    def filter(self, record) -> bool:
        return read_reported(self.error_dir) is None


def agent_main(argv: list) -> int:
    parent = os.environ.get(PARENT_ENV)
    _set_parent_death_signal(signal.SIGTERM)
    if parent and os.getppid() != int(parent):   # the command died before the death signal was set
        return 128 + int(signal.SIGTERM)
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    error_dir = os.environ.get(ERROR_DIR_ENV, "")
    quiet = _QuietWhenReported(error_dir)
    for name in [n for n in logging.Logger.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).addFilter(quiet)
    try:
        torchrun.main(argv)
    except ChildFailedError:
        if read_reported(error_dir):
            return 2
        raise
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
