"""What ``bench`` measures, engine by engine: the collectives a process issues (calls, payload and bus bytes
per op and group size, counted by wrapping ``torch.distributed``), the bytes of the training state by
category (:class:`StateAccount`), and the peak memory of a run. Shared by :mod:`.bench` (plain, DeepSpeed)
and :mod:`.bench_megatron`."""
from __future__ import annotations

import ctypes
import gc
import math
import statistics
import time
import threading
import types
from typing import Optional

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------------
# counting collectives
# ---------------------------------------------------------------------------------------------------

_COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_gather", "reduce_scatter",
                "broadcast", "reduce", "all_reduce_coalesced", "all_to_all_single", "all_to_all", "_reduce_scatter_base",
                "_all_gather_base", "gather", "scatter", "send", "recv", "isend", "irecv")


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def payload_bytes(op: str, bound: dict) -> int:
    """The payload of one call, from its bound arguments (the convention of plan.bus_factor)."""
    a = bound
    if op in ("all_reduce", "broadcast", "reduce", "send", "recv", "isend", "irecv"):
        return _nbytes(a.get("tensor"))
    if op == "all_reduce_coalesced":
        return _nbytes(a.get("tensors"))
    if op in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return _nbytes(a.get("input"))
    if op in ("all_gather_into_tensor", "_all_gather_base"):
        return _nbytes(a.get("output_tensor"))
    if op == "all_gather":
        return _nbytes(a.get("tensor_list"))
    if op == "reduce_scatter":
        return _nbytes(a.get("input_list"))
    if op == "all_to_all_single":
        return _nbytes(a.get("input"))
    if op == "all_to_all":
        return _nbytes(a.get("input_tensor_list"))
    if op == "gather":
        return _nbytes(a.get("tensor")) * _group_size(a.get("group"))
    if op == "scatter":
        return _nbytes(a.get("tensor")) * _group_size(a.get("group"))
    return 0


def _group_size(group) -> int:
    try:
        return dist.get_world_size(group) if group is not None else dist.get_world_size()
    except Exception:   # a group this rank is not in
        return 1


class CommCounter:
    """Counts the collectives this process issues while ``active``: per (op, group size): calls, payload
    bytes and bus bytes. Installed once per process, before any engine exists; nested calls (a collective
    implemented with another) count once."""

    def __init__(self):
        self.active = False
        self.records: dict = {}
        self._local = threading.local()
        self._installed = False

    def install(self) -> "CommCounter":
        if self._installed:
            return self
        c10d = dist.distributed_c10d
        for name in _COLLECTIVES:
            orig = getattr(c10d, name, None) or getattr(dist, name, None)
            if orig is None or getattr(orig, "_nexus_counted", False):
                continue
            wrapper = _counting(self, name, orig)
            for mod in (dist, c10d):
                if getattr(mod, name, None) is orig:
                    setattr(mod, name, wrapper)
        self._installed = True
        return self

    def record(self, name: str, args, kwargs, sig) -> None:
        from .plan import bus_factor
        try:
            b = sig.bind(*args, **kwargs)
        except TypeError:
            return
        b.apply_defaults()
        n = _group_size(b.arguments.get("group"))
        pay = payload_bytes(name, b.arguments)
        r = self.records.setdefault((name, n), [0, 0, 0.0])
        r[0] += 1
        r[1] += pay
        r[2] += pay * bus_factor(name, n)

    def take(self) -> dict:
        """The records since the last take() (and reset)."""
        out, self.records = self.records, {}
        return out


def _counting(counter: CommCounter, name: str, orig):
    import functools
    import inspect

    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        depth = getattr(counter._local, "depth", 0)
        if counter.active and depth == 0:
            counter.record(name, args, kwargs, sig)
        counter._local.depth = depth + 1
        try:
            return orig(*args, **kwargs)
        finally:
            counter._local.depth = depth

    wrapper._nexus_counted = True
    return wrapper


COUNTER = CommCounter()


def summarize_comm(records: dict, steps: int, k: int) -> dict:
    """Per outer step: {op@group: {calls, payload, bus}} and totals; per micro-step = per step / k."""
    ops = {}
    for (op, n), (calls, pay, bus) in sorted(records.items()):
        ops[f"{op}@{n}"] = {"calls": calls / steps, "payload": pay / steps, "bus": bus / steps}
    pay = sum(v["payload"] for v in ops.values())
    bus = sum(v["bus"] for v in ops.values())
    return {"ops": ops, "payload_per_step": pay, "bus_per_step": bus, "bus_per_micro": bus / k,
            "calls_per_step": sum(v["calls"] for v in ops.values())}


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------

_SKIP = (str, bytes, int, float, bool, complex, type(None), types.ModuleType, type, types.FunctionType,
         types.BuiltinFunctionType, types.MethodType, threading.Thread)


class StateAccount:
    """Tensor storages reachable from given roots, each counted once, in the first category that reaches
    it (so a parameter that is a view into DeepSpeed's flat buffer counts as a parameter)."""

    def __init__(self):
        self.storages: dict = {}
        self._seen: set = set()

    def add(self, category: str, roots, depth: int = 8) -> None:
        stack = [(r, 0) for r in roots]
        while stack:
            o, d = stack.pop()
            if o is None or isinstance(o, _SKIP) or id(o) in self._seen:
                continue
            self._seen.add(id(o))
            if isinstance(o, torch.Tensor):
                if o.device.type != "meta":
                    st = o.untyped_storage()
                    key = (str(st.device), st.data_ptr())
                    if st.nbytes() and key not in self.storages:
                        self.storages[key] = (category, st.nbytes())
                continue   # attributes of tensors are not followed (roots name ds_tensor explicitly)
            if d >= depth:
                continue
            if isinstance(o, dict):
                stack.extend((v, d + 1) for v in o.values())
                stack.extend((key, d + 1) for key in o if isinstance(key, torch.Tensor))
            elif isinstance(o, (list, tuple, set, frozenset)):
                stack.extend((v, d + 1) for v in o)
            elif isinstance(o, torch.nn.Module):
                stack.extend((v, d + 1) for v in o._parameters.values())
                stack.extend((v, d + 1) for v in o._buffers.values())
                stack.extend((v, d + 1) for v in o._modules.values())
            elif isinstance(o, (dist.ProcessGroup, torch.Generator, torch.device, torch.dtype)):
                continue
            elif hasattr(o, "__dict__"):
                try:
                    stack.extend((v, d + 1) for v in vars(o).values())
                except TypeError:
                    pass

    def totals(self) -> dict:
        out: dict = {}
        for cat, n in self.storages.values():
            out[cat] = out.get(cat, 0) + n
        out["total"] = sum(n for _, n in self.storages.values())
        return out


def moments(opt) -> list:
    return [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor) and t.dim() > 0]


def account_engine(engine) -> dict:
    """Bytes of the training state held by a trainer engine (see :class:`StateAccount`)."""
    acc = StateAccount()
    if engine.name == "plain":
        opt, module = engine.opt, engine.module
        params = list(module.parameters())
        acc.add("params", params)
        grads = [p.grad for p in params] + [getattr(opt, "flat_grad", None), getattr(opt, "acc", None)]
        acc.add("grads", grads)
        acc.add("optimizer", moments(engine.outer))
        buckets = getattr(opt, "buckets", None)
        acc.add("nexus", [getattr(opt, "anchor", None), getattr(opt, "d_sum", None),
                          getattr(buckets, "_shard", None)])
        acc.add("other", [module, opt, engine.outer, engine])
        return acc.totals()
    # DeepSpeed (Nexus or AdamW engine)
    nx = getattr(engine, "nexus", None)
    ds = nx.ds_engine if nx is not None else engine.ds
    module = ds.module
    params = list(module.parameters())
    acc.add("params", params + [getattr(p, "ds_tensor", None) for p in params])
    dsopt = ds.optimizer
    client = nx.client if nx is not None else getattr(dsopt, "optimizer", dsopt)
    acc.add("optimizer", moments(client))
    masters = []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                 "fp32_groups"):
        masters.append(getattr(dsopt, name, None))
    if nx is not None:
        masters.append([p for p, _ in nx._core.parts])
        acc.add("master", masters)
        acc.add("nexus", list(nx._core.anchors) + list(nx._core.d_sums))
    else:
        acc.add("master", masters)
    acc.add("grads", [p.grad for p in params])
    acc.add("other", [dsopt, client, ds])
    return acc.totals()


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of one run above its start: CUDA allocator peak on a GPU, resident-set peak on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()
        _malloc_trim()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            self.what = "cuda max_memory_allocated"
        else:
            self.base = _proc_status("VmRSS")
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")          # resets VmHWM to the current RSS
                self.what = "peak RSS growth"
            except OSError:
                self.base = None
                self.what = "n/a"

    def reset_peak(self) -> None:
        """Forget the peak so far (e.g. the warm-up steps); the base stays the start of the run."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.base is not None:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self.base = None

    def peak(self) -> Optional[int]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.base is None:
            return None
        hwm = _proc_status("VmHWM")
        return None if hwm is None else hwm - self.base


# ---------------------------------------------------------------------------------------------------
# timing and reductions across ranks

def sync_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet_barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        was, COUNTER.active = COUNTER.active, False
        try:
            dist.barrier()
        finally:
            COUNTER.active = was


def max_over_ranks(values: list, device) -> list:
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


class HookFigures:
    """A bench loop's per-step figures (bench.py, bench_megatron.py): wall and CPU time of each timed step
    (:attr:`times`, :attr:`cpu_times`) and the critical-sharpness hook's figures. :meth:`start` before a step,
    :meth:`stop` after it, :meth:`summarize` the hook's figures into the result row."""

    METRICS = {"s": "sharpness/time_s", "passes": "sharpness/forward_passes", "gathers": "sharpness/param_gathers",
               "probe_tokens": "sharpness/probe_tokens"}

    def __init__(self):
        self.values = {k: [] for k in self.METRICS}
        self.times, self.cpu_times = [], []
        self._t0 = self._c0 = 0.0

    def start(self, timed: bool) -> None:
        """Start a step (``timed``: counted, communication included)."""
        COUNTER.active = timed
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def stop(self, timed: bool, hook, device) -> None:
        """End the step: wait for the device, keep its times (and the hook's figures) if it is ``timed``."""
        sync_device(device)
        dt, dc = time.perf_counter() - self._t0, time.process_time() - self._c0
        COUNTER.active = False
        if timed:
            self.times.append(dt)
            self.cpu_times.append(dc)
            if hook is not None:
                self.record(hook)

    def record(self, hook) -> None:
        mm = hook.pop_metrics()
        for k, name in self.METRICS.items():
            self.values[k].append(mm.get(name, math.nan))

    def summarize(self, row: dict, times: list, device) -> None:
        """``sharpness_s`` (slowest rank), ``sharpness_passes`` / ``_gathers`` / ``_probe_tokens`` and the step time
        without the hook (``train_step_s``), medians over the timed steps."""
        h = max_over_ranks(self.values["s"], device)
        row["sharpness_s"] = statistics.median(h)
        for k in ("passes", "gathers", "probe_tokens"):
            row[f"sharpness_{k}"] = statistics.median(self.values[k])
        row["train_step_s"] = statistics.median([t - x for t, x in zip(times, h)])
