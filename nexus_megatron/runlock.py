"""One live run per run directory: ``<run_dir>/run.lock`` names the process holding the run (pid, host, the
process's start time, when it started and its command). It is created exclusively (``O_CREAT|O_EXCL``);
a second run finds it and stops with a one-line error naming the file, the pid and the host. A lock whose
process is gone (same host; the pid no longer exists or now belongs to a process started at another time)
is stale: it is taken over with a note on stderr. A lock from another host cannot be checked from here:
the error says to delete the file if that run is over. Released (deleted) when the run ends."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Optional

from .errors import RunLockError

LOCK_NAME = "run.lock"
HELD_ENV = "NEXUS_RUN_LOCK_HELD"
"""Set by ``nexus-megatron train --nproc N`` for its workers: the run directory whose lock it holds."""


def process_start_time(pid: int) -> Optional[int]:
    """The start time of process ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start: Optional[int]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, another user's
        pass
    now = process_start_time(pid)
    return start is None or now is None or now == start


class RunLock:
    def __init__(self, path: str, info: dict):
        self.path, self.info = path, info

    def release(self) -> None:
        """Delete the lock if it is still ours."""
        try:
            with open(self.path) as f:
                held = json.load(f)
        except (OSError, ValueError):
            return
        if held.get("pid") == self.info["pid"] and held.get("host") == self.info["host"]:
            try:
                os.remove(self.path)
            except OSError:
                pass


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            info = json.load(f)
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def acquire(run_dir: str, command: Optional[list] = None) -> RunLock:
    """Take ``run_dir``'s lock for this process (the directory must exist); RunLockError if a live run holds it."""
    path = os.path.join(run_dir, LOCK_NAME)
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "proc_start": process_start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(command if command else sys.argv)}
    for attempt in range(20):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = _read(path)
            if held is None:   # being written right now, or damaged
                if attempt < 10:
                    time.sleep(0.05)
                    continue
                _take_over(path, f"{path} is not a lock this version wrote (unreadable)")
                continue
            if held.get("host") == host and not process_alive(held["pid"], held.get("proc_start")):
                _take_over(path, f"pid {held['pid']} on {host}, which holds {path} since {held.get('started')}, "
                                 "is no longer running")
                continue
            raise RunLockError(
                f"train.run_dir={run_dir!r} is in use by pid {held['pid']} on {held.get('host')} (since "
                f"{held.get('started')}; lock file {path}): wait for that run to end or stop it, or use another "
                f"train.run_dir; if that run is over (e.g. its machine crashed), delete {path}")
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return RunLock(path, info)
    raise RunLockError(f"{path}: could not take the run lock (other runs keep taking it); retry")


def _take_over(path: str, why: str) -> None:
    print(f"nexus-megatron: note: taking over a stale run lock: {why}", file=sys.stderr)
    aside = f"{path}.stale-{os.getpid()}"
    try:
        os.rename(path, aside)   # only one of several racing runs moves it; the others retry
        os.remove(aside)
    except OSError:
        pass


def held_by_launcher(run_dir: str) -> bool:
    """True in a worker of ``nexus-megatron train --nproc N``, whose command holds this run_dir's lock."""
    held = os.environ.get(HELD_ENV)
    return bool(held) and os.path.abspath(held) == os.path.abspath(run_dir) and \
        os.path.exists(os.path.join(run_dir, LOCK_NAME))
