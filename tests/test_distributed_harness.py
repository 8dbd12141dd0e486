"""The test harness itself: a rendezvous port taken by another job between choosing and binding it is retried."""
import os
import socket

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
