"""One live run per run_dir (nexus_megatron/runlock.py): ``run_dir/run.lock`` names the pid, host and start
time of the run holding it; a second run stops with one line naming the file, the pid and the host; a stale
lock (its process gone on this host) is taken over with a note; the lock is released when the run ends."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from nexus_megatron.errors import RunLockError
from nexus_megatron.runlock import LOCK_NAME, acquire, process_start_time
from tests.conftest import write_synthetic_data
from tests.fault_runs import cli_train, stray_workers
from tests.test_faults import metrics, write_config
from tests.test_signals import start, stop


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(run_dir, **info):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, LOCK_NAME), "w") as f:
        json.dump({"host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000", **info}, f)


def test_second_lock_is_refused_with_one_line(tmp_path):
    lock = acquire(str(tmp_path))
    path = os.path.join(str(tmp_path), LOCK_NAME)
    held = json.load(open(path))
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert held["proc_start"] == process_start_time(os.getpid())
    with pytest.raises(RunLockError) as e:
        acquire(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"train.run_dir={str(tmp_path)!r} is in use by pid {os.getpid()} on "
                          f"{socket.gethostname()} (since {held['started']}; lock file {path})")
    lock.release()
    assert not os.path.exists(path)
    acquire(str(tmp_path)).release()


@pytest.mark.parametrize("why", ["dead-pid", "pid-reused"])
def test_stale_lock_is_taken_over_with_a_note(tmp_path, capsys, why):
    if why == "dead-pid":
        write_lock(tmp_path, pid=dead_pid(), proc_start=None)
    else:   # this very pid, but a process started at another time: the pid was reused
        write_lock(tmp_path, pid=os.getpid(), proc_start=process_start_time(os.getpid()) - 1)
    lock = acquire(str(tmp_path))
    assert "note: taking over a stale run lock" in capsys.readouterr().err
    assert json.load(open(tmp_path / LOCK_NAME))["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_is_not_taken(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), host="other-node-7")
    with pytest.raises(RunLockError, match=r"in use by pid \d+ on other-node-7 .*if that run is over .*delete "):
        acquire(str(tmp_path))


def test_release_leaves_another_runs_lock(tmp_path):
    lock = acquire(str(tmp_path))
    write_lock(tmp_path, pid=1, proc_start=process_start_time(1))   # someone else's now
    lock.release()
    assert os.path.exists(tmp_path / LOCK_NAME)


# -- through the CLI -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_data(str(tmp_path_factory.mktemp("lock") / "data"))


def test_two_runs_in_one_run_dir(data, tmp_path, capsys):
    """A 2-rank run holds the run_dir (parked mid-step 3); a second `--nproc 2` run and a single-process run of
    the same run_dir stop with one line naming the lock; the first run's metrics.jsonl has only its own steps."""
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run)
    first, lines, fired = start(cli_train(config), "kill_rank=1,step=3,phase=step,action=hang")
    try:
        assert fired.wait(120), "".join(lines[-60:])
        holder = json.load(open(run / LOCK_NAME))
        assert holder["pid"] == first.pid                      # the command holds it for its workers
        second = subprocess.run(cli_train(config), capture_output=True, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert err[0].startswith(f"nexus-megatron: error: train.run_dir={str(run)!r} is in use by pid {first.pid} "
                                 f"on {socket.gethostname()}")
        assert str(run / LOCK_NAME) in err[0]
        from nexus_megatron.cli import main
        assert main(["train", "--config", config]) == 2          # single process: the trainer's rank 0 checks
        assert f"is in use by pid {first.pid}" in capsys.readouterr().err
        assert [r["step"] for r in metrics(run)] == [1, 2]
    finally:
        rc, out = stop(first, lines, fired, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and not stray_workers(config)
    assert not (run / LOCK_NAME).exists()


def test_stale_lock_run_proceeds(data, tmp_path, capsys):
    from nexus_megatron.cli import main
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run, steps=2, eval_every=0, probe_every=0)
    write_lock(run, pid=dead_pid(), proc_start=None)
    assert main(["train", "--config", config]) == 0
    assert "note: taking over a stale run lock" in capsys.readouterr().err
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert not (run / LOCK_NAME).exists()
