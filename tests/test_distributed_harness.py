"""The test harness itself: a rendezvous port taken by another job between choosing and binding it is retried."""
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
