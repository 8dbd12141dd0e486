"""Signals to `nexus-megatron train --nproc 2` (what a scheduler sends first: scancel, a preemption, Ctrl-C):
the command forwards them to torchrun and every worker, returns only when no process of the job is left, with
status 128 + signal, and the same command then resumes from the last checkpoint (nexus_megatron/launcher.py).
Real processes: a 2-rank job on CPU (gloo); a rank is parked with NEXUS_FAULT_INJECT (hang: it sleeps, as a
rank blocked in a collective; stop: SIGSTOP, a rank that cannot act on SIGTERM) so the signal arrives at a known
point. Every process of the job carries NEXUS_TEST_JOB (tests/fault_runs.py) to find leftovers."""
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from nexus_megatron.checkpoint import latest_checkpoint
from tests.conftest import ROOT, write_synthetic_data
from tests.distributed import free_port
from tests.fault_runs import LAST_JOB, cli_train, launch, stray_workers
from tests.test_faults import metrics, write_config


def start(cmd, fault=None, **env_extra):
    """Start ``cmd`` like fault_runs.launch, but return at once: (process, output lines, fault-fired event)."""
    LAST_JOB["id"] = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", NEXUS_TEST_JOB=LAST_JOB["id"], **env_extra)
    env.pop("MASTER_PORT", None)   # the command's torchrun runs --standalone
    env.pop("NEXUS_FAULT_INJECT", None)
    if fault:
        env["NEXUS_FAULT_INJECT"] = fault
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, fired = [], threading.Event()

    def pump():
        for line in proc.stdout:
            if "[NEXUS_FAULT_INJECT]" in line:
                fired.set()
            lines.append(line)
    threading.Thread(target=pump, daemon=True).start()
    return proc, lines, fired


def stop(proc, lines, fired, sig, timeout=120):
    """Send ``sig`` to the command's pid only (not its group) once the fault fired; returns (rc, output)."""
    assert fired.wait(timeout), "".join(lines[-60:])
    time.sleep(0.5)   # let the other rank reach its collective
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        for line in stray_workers(LAST_JOB["id"]):
            os.kill(int(line.split()[0]), signal.SIGKILL)
        raise AssertionError("the command did not return after the signal:\n" + "".join(lines[-60:]))
    time.sleep(0.2)
    return rc, "".join(lines)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_data(str(tmp_path_factory.mktemp("signals") / "data"))


def test_sigterm_stops_every_process_then_the_rerun_resumes(data, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run)
    proc, lines, fired = start(cli_train(config), "kill_rank=1,step=3,phase=step,action=hang")
    rc, out = stop(proc, lines, fired, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM; every process of the job has exited" in out
    assert not stray_workers(config), stray_workers(config)
    assert not (run / "run.lock").exists()                    # released once nothing of the job is left
    assert os.path.basename(latest_checkpoint(str(run / "checkpoints"))) == "step_00000002"
    # the same command again: resumes from step 2 and finishes (before: the port was taken by the orphans,
    # or they kept writing the run)
    rc, out, _ = launch(cli_train(config))
    assert rc == 0, out[-3000:]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_sigint_stops_every_process(data, tmp_path):
    config = write_config(tmp_path, data, tmp_path / "run")
    proc, lines, fired = start(cli_train(config), "kill_rank=0,step=2,phase=step,action=hang")
    rc, out = stop(proc, lines, fired, signal.SIGINT)
    assert rc == 128 + signal.SIGINT, out[-3000:]
    assert not stray_workers(config), stray_workers(config)


def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace(data, tmp_path):
    """Rank 1 is frozen (SIGSTOP: SIGTERM cannot end it): after NEXUS_KILL_GRACE_S the command SIGKILLs it and
    returns; nothing is left."""
    config = write_config(tmp_path, data, tmp_path / "run")
    proc, lines, fired = start(cli_train(config), "kill_rank=1,step=2,phase=step,action=stop",
                               NEXUS_KILL_GRACE_S="3")
    rc, out = stop(proc, lines, fired, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert not stray_workers(config), stray_workers(config)


def test_deepspeed_launcher_job_is_stopped_whole(tmp_path):
    """The deepspeed launcher path (`quickstart --engine deepspeed` runs it through the same launcher.run_job):
    two stand-in workers (tests/sleeper.py) under `deepspeed --num_gpus 2`; SIGTERM to the command leaves
    nothing of the job."""
    from tests.distributed import free_port as port
    ds = os.path.join(os.path.dirname(os.sys.executable), "deepspeed")
    script = ("import sys; from nexus_megatron.launcher import run_job; "
              f"sys.exit(run_job([{ds!r}, '--num_gpus', '2', '--master_port', '{port()}', '--module', 'tests.sleeper']))")
    proc, lines, fired = start([os.sys.executable, "-c", script], DS_ACCELERATOR="cpu")
    assert fired.wait(180), "".join(lines[-60:])
    deadline = time.time() + 180   # the deepspeed launcher imports DeepSpeed before it starts the workers
    # both workers write to the one pipe: count the markers, not the lines (two may share a line)
    up = lambda: "".join(lines).count("[NEXUS_FAULT_INJECT] worker rank")
    while up() < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert up() == 2, "".join(lines[-60:])
    rc, out = stop(proc, lines, fired, signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert not stray_workers(LAST_JOB["id"]), stray_workers(LAST_JOB["id"])


def test_a_successful_command_destroys_its_process_groups():
    """A worker whose command succeeded destroys torch.distributed's groups before the interpreter's teardown
    (left alive, gloo's worker threads can abort that teardown: SIGABRT, exit -6, after the run was saved; seen
    in CI on one rank of a 4-rank ZeRO-2 job). Here: a gloo group, a command through the CLI's main, the group
    gone when main returns; Megatron's launcher does the same (launch/pretrain_gpt_nexus.py)."""
    code = ("import torch.distributed as dist\n"
            f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)\n"
            "dist.new_group([0])\n"
            "from nexus_megatron.cli import main\n"
            "rc = main(['plan', '--params', '1e9'])\n"
            "print('RESULT', rc, dist.is_initialized())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "RESULT 0 False" in r.stdout, (r.stdout + r.stderr)[-3000:]
