"""Run a function on N real processes (gloo, CPU) and collect what each rank returns.

The ranks are forked from a multiprocessing forkserver that has imported the heavy libraries once
(tests/worker_preload.py): spawned ranks re-imported them in every job, 3 s (torch) to 9 s (megatron-core) per
rank on this CPU, most of a small job's time. ``preload`` says which server: "base" (torch, nexus_megatron,
DeepSpeed) or "megatron" (the same and megatron-core, whose import changes torch's global state: it adds numpy
types to ``torch.serialization``'s safe globals, so only Megatron workers get it); the server is restarted when
the kind changes; ``preload=None`` spawns (nothing shared with any other job). Each rank is still a process of
its own with its own gloo group, and it runs with the environment, working directory, stdout and stderr the
test has at that moment (a forkserver child would otherwise keep the server's)."""
import multiprocessing.forkserver
import os
import runpy
import socket
import subprocess
import sys
import time
import traceback
import uuid

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _detach(obj, to_numpy=True):
    """Tensors cross the process boundary as numpy arrays (a torch tensor in a Queue lives in shared
    memory that dies with the worker)."""
    import torch
    if to_numpy and isinstance(obj, torch.Tensor):
        return ("__tensor__", obj.detach().cpu().numpy().copy())
    if not to_numpy and isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__tensor__":
        return torch.from_numpy(obj[1])
    if isinstance(obj, dict):
        return {k: _detach(v, to_numpy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v, to_numpy) for v in obj)
    return obj


def _follow_output_of(pid):
    """Write to the test process's stdout and stderr as they are now (pytest's capture of the running test), as
    a spawned rank did; a forkserver child would otherwise write to the server's."""
    for fd in (1, 2):
        try:
            new = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_APPEND)
        except OSError:   # not Linux, or gone: keep the server's
            continue
        os.dup2(new, fd)
        os.close(new)


def _enter(parent: dict) -> None:
    """A rank's working directory and environment: the test's at the start of the job (not the server's)."""
    os.chdir(parent["cwd"])
    os.environ.clear()
    os.environ.update(parent["environ"])


def _parent_state() -> dict:
    return {"pid": os.getpid(), "cwd": os.getcwd(), "environ": dict(os.environ)}


def _worker(rank, world, port, fn, args, queue, parent):
    """One rank: first the test process's output, working directory and environment as they are now."""
    _follow_output_of(parent["pid"])
    _enter(parent)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    try:
        import torch
        torch.set_num_threads(1)
        try:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        except Exception as e:   # before fn ran: the caller may retry on another port
            queue.put((rank, "init-error", f"{type(e).__name__}: {e}"))
            return
        out = fn(rank, world, *args)
        queue.put((rank, "ok", _detach(out)))
    except BaseException as e:  # report the failure to the parent
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 120.0, preload: str = "base"):
    """fn(rank, world, *args) on `world` processes; returns [result of rank 0, rank 1, ...].
    fn must be importable (defined at module level). ``preload``: "base", "megatron" or None (see above).
    A failed rendezvous (a port taken between choosing it and binding it by another job on this machine, or
    gloo's connect dropped under load) is retried on a new port, at most twice: no rank has run fn then."""
    for attempt in range(3):
        try:
            return _run_once(fn, world, args, timeout, preload)
        except _PortTaken:
            if attempt == 2:
                raise


class _PortTaken(RuntimeError):
    pass


_SERVER = {}   # {"kind": the preload of the running forkserver}


def _context(preload):
    """The context whose processes start with ``preload``'s libraries imported."""
    if preload is None:
        return mp.get_context("spawn")
    from tests.worker_preload import KIND_ENV, KINDS
    if preload not in KINDS:
        raise ValueError(f"preload={preload!r}: use one of {sorted(KINDS)} or None")
    ctx = mp.get_context("forkserver")
    if _SERVER.get("kind") != preload:
        server = multiprocessing.forkserver._forkserver
        if "kind" in _SERVER:
            if not hasattr(server, "_stop"):   # no way to restart it on this Python: spawn instead
                return mp.get_context("spawn")
            server._stop()
        ctx.set_forkserver_preload(["tests.worker_preload"])
        os.environ[KIND_ENV] = preload   # read by tests/worker_preload.py in the server, which starts now
        try:
            server.ensure_running()
        finally:
            del os.environ[KIND_ENV]
        _SERVER["kind"] = preload
    return ctx


def _run_once(fn, world, args, timeout, preload):
    ctx = _context(preload)
    queue = ctx.Queue()
    port = free_port()
    parent = _parent_state()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, parent)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors, port_taken = {}, [], False
    try:
        for _ in range(world):
            rank, status, out = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = _detach(out, to_numpy=False)
            else:
                # the rendezvous failed before any rank ran fn: a port another job took (EADDRINUSE), or gloo's
                # mesh connect dropped under heavy load ("Connection closed by peer", seen once with five suites
                # on 2 cores): safe to retry on a new port, no test code has run
                port_taken = status == "init-error"
                errors.append(f"rank {rank}: {out}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if port_taken:
        raise _PortTaken(errors[0])
    if errors:
        raise RuntimeError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]


# ---------------------------------------------------------------------------------------------------
# a script on N ranks, as torchrun runs it

def _torchrun_environ(rank: int, world: int, port: int, run_id: str) -> dict:
    """What ``torchrun --standalone`` (one node, as ``nexus-megatron train --nproc`` runs it) puts in each worker's
    environment, less its error file (tests/test_distributed_harness.py compares the two). As under torchrun, the
    ranks join a rendezvous store that the launching process hosts (TORCHELASTIC_USE_AGENT_STORE), on a port the OS
    picked when it bound it."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "ROLE_NAME": "default", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(world), "MASTER_ADDR": "localhost",
            "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1"}


def _script_worker(rank, world, port, run_id, script, module, argv, out_path, err_path, parent):
    """One rank of :func:`run_script`: the test's directory and environment, torchrun's variables, its output in
    files, then the script as ``__main__`` (an exit status from SystemExit is the process's, as under torchrun)."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    _enter(parent)
    os.environ.update(_torchrun_environ(rank, world, port, run_id))
    import torch
    torch.set_num_threads(1)
    sys.argv = [script] + list(argv)
    if module:
        runpy.run_module(script, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(script, run_name="__main__")


def run_script(script: str, argv, world: int, *, module: bool = False, cwd=None, env=None, timeout: float = 900.0,
               preload: str = "megatron-loop"):
    """Run ``script argv`` (``module=True``: ``-m script argv``) on ``world`` ranks as ``torchrun --nproc_per_node
    world script argv`` does in ``cwd`` with ``env`` (default: the test's; the same
    environment variables; each rank a process of its own), but forked from the preloaded server of ``preload``
    instead of started afresh: each rank skips the ~10 s import of megatron.training. Returns a
    CompletedProcess whose stdout / stderr are the ranks' in rank order and whose returncode is that of the rank
    that failed first (0 if all succeeded; ``.codes`` has each rank's). When a rank fails the others are stopped after 10 s, as torchrun stops a job."""
    import tempfile
    from torch.distributed import TCPStore
    ctx = _context(preload)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)   # torchrun's agent store: port 0, bound
    port = store.port                                                          # here, so no other job can take it
    run_id = str(uuid.uuid4())
    parent = _parent_state()
    parent.update(cwd=str(cwd or parent["cwd"]), environ=dict(env if env is not None else parent["environ"]))
    with tempfile.TemporaryDirectory(prefix="nexus-ranks-") as logs:
        files = [(os.path.join(logs, f"{r}.out"), os.path.join(logs, f"{r}.err")) for r in range(world)]
        procs = [ctx.Process(target=_script_worker, args=(r, world, port, run_id, script, module, list(argv), o, e, parent))
                 for r, (o, e) in enumerate(files)]
        for p in procs:
            p.start()
        deadline, failed_at, first_code = time.monotonic() + timeout, None, 0
        try:
            while any(p.is_alive() for p in procs):
                now = time.monotonic()
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed_at is None and failed:
                    failed_at, first_code = now, failed[0]
                if now > deadline or (failed_at is not None and now - failed_at > 10):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        codes = [p.exitcode for p in procs]
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired([script] + list(argv), timeout)

        def read(path):
            with open(path, errors="replace") as f:
                return f.read()
        done = subprocess.CompletedProcess([script] + list(argv), first_code or next((c for c in codes if c), 0),
                                           "".join(read(o) for o, _ in files), "".join(read(e) for _, e in files))
        done.codes = codes   # each rank's exit status (None: stopped)
        del store
        return done
