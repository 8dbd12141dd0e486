"""The test harness itself: a rendezvous port taken by another job between choosing and binding it is retried."""
import json
import os
import socket
import subprocess
import sys
import time

import tests.distributed as D


def rank_and_world(rank, world):
    return rank, world


def test_port_taken_by_another_job_is_retried(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = iter([taken])
        real = D.free_port
        monkeypatch.setattr(D, "free_port", lambda: next(ports, None) or real())
        assert D.run_distributed(rank_and_world, 2, timeout=120) == [(0, 2), (1, 2)]
        assert next(ports, None) is None   # the taken port was tried first


def env_cwd_and_hello(rank, world, name):
    print(f"rank {rank} of {world} says hello", flush=True)
    return os.environ.get(name), os.getcwd(), os.getpid()


def test_ranks_run_with_the_tests_environment_directory_and_output(monkeypatch, tmp_path, capfd):
    """Ranks fork from a server started earlier (tests/distributed.py): they still get what the test has now."""
    assert D.run_distributed(rank_and_world, 2) == [(0, 2), (1, 2)]   # the server runs before the changes below
    monkeypatch.setenv("NEXUS_HARNESS_PROBE", "set-after-the-server-started")
    monkeypatch.chdir(tmp_path)
    got = D.run_distributed(env_cwd_and_hello, 2, "NEXUS_HARNESS_PROBE")
    assert [g[:2] for g in got] == [("set-after-the-server-started", str(tmp_path))] * 2
    assert len({g[2] for g in got} | {os.getpid()}) == 3   # two processes of their own
    out = capfd.readouterr().out
    assert "rank 0 of 2 says hello" in out and "rank 1 of 2 says hello" in out


SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
rank = int(os.environ["RANK"])
if sys.argv[1] == "env":
    base = json.loads(os.environ["BASE_ENV"])
    with open(f"{sys.argv[2]}-{rank}.json", "w") as f:
        json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(),
                   "env": {k: v for k, v in os.environ.items() if k not in base}}, f)
    dist.init_process_group("gloo")
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    print(f"rank {rank} sum {t.item()}")
    sys.stderr.write(f"rank {rank} err\\n")
    dist.destroy_process_group()
elif sys.argv[1] == "fail":
    dist.init_process_group("gloo")
    if rank == 1:
        sys.exit(3)
    dist.barrier()          # rank 1 never arrives: the job is stopped, not left to time out
"""


def test_run_script_runs_a_script_as_torchrun_does(tmp_path, monkeypatch):
    """tests/distributed.py's run_script (the Megatron-LM loop tests' ranks): the script as __main__ with its
    arguments, in the test's directory, with the environment torchrun gives a worker (compared with torchrun's
    own, less its error file), ranks that form a gloo group through a store the test process hosts, output in rank
    order, exit 0."""
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    monkeypatch.setenv("BASE_ENV", json.dumps(sorted(os.environ) + ["BASE_ENV"]))
    monkeypatch.chdir(tmp_path)
    got = D.run_script(str(script), ["env", "forked"], 2, timeout=120, preload="base")
    assert got.returncode == 0 and got.codes == [0, 0], got.stderr
    assert got.stdout == "rank 0 sum 3.0\nrank 1 sum 3.0\n" and got.stderr == "rank 0 err\nrank 1 err\n", got
    real = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",   # as the CLI
                           str(script), "env", "torchrun"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert real.returncode == 0, real.stderr
    for rank in (0, 1):
        forked, ref = (json.loads((tmp_path / f"{how}-{rank}.json").read_text()) for how in ("forked", "torchrun"))
        assert forked["argv"] == ["env", "forked"] and forked["cwd"] == str(tmp_path), forked
        env, want = forked["env"], ref["env"]
        for k in ("TORCHELASTIC_ERROR_FILE", "_", "PYTHONPATH"):   # torchrun's error file, the shell's, the test's
            want.pop(k, None)
            env.pop(k, None)
        assert env == dict(want, MASTER_PORT=env["MASTER_PORT"], TORCHELASTIC_RUN_ID=env["TORCHELASTIC_RUN_ID"])
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank) and env["WORLD_SIZE"] == "2"


def test_run_script_stops_the_job_when_a_rank_fails(tmp_path):
    """A rank that exits 3 while the other waits for it in a collective: a non-zero status, rank 1's 3, the job
    stopped (as torchrun stops it), well before the timeout."""
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    start = time.monotonic()
    got = D.run_script(str(script), ["fail"], 2, timeout=240, preload="base")
    assert got.returncode != 0 and got.codes[1] == 3 and time.monotonic() - start < 120, got
