"""TESTS AND CPU SMOKE RUNS ONLY: run megatron-core 0.16.x-0.19.x on a CPU-only torch build (gloo).

megatron-core hard-codes CUDA in a few places (``device='cuda'`` tensors, ``torch.cuda.current_device()``
buffers, the CUDA RNG tracker, ``param.type() == 'torch.cuda.FloatTensor'`` checks). This shim rewrites
them to CPU for the current process. From 0.17 the gradient reduction also asks for
``torch.cuda.current_stream()`` (to wait on CUDA-graph events) and Megatron-LM's loop creates CUDA events and
streams: those become no-op stand-ins (CPU work is synchronous). It patches torch globally, so:

* never import it from ``nexus_megatron`` runtime code (only tests, ``bench --engine megatron`` on CPU through
  the tests' wrapper, and ``launch/pretrain_gpt_nexus.py --cpu-test-shim`` smoke runs);
* never apply it in a process that also runs DeepSpeed (it fakes ``Tensor.type()`` strings).

Source: /work/shared/notes/feasibility.md §3 (verified there with TP=1/2, PP=2, DDP, DistributedOptimizer).
"""
import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda(d):
    return (isinstance(d, str) and d.startswith("cuda")) or (isinstance(d, torch.device) and d.type == "cuda")


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites device='cuda' / torch.device('cuda') args of every torch call to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if any(_is_cuda(a) for a in args):
            args = tuple(_CPU if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event on CPU: every wait, record and synchronize is a no-op."""

    def __init__(self, *a, **k):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def record_event(self, *a, **k):          # a stream's event (MoE's token dispatcher synchronizes on it)
        return _NullStream()

    def elapsed_time(self, other):
        return 0.0

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_MODE = None
_PATCHED = False


def _split_sizes_as_lists():
    """MoE's all-to-all token dispatcher passes its split sizes as numpy arrays (copied to the host on a side
    stream); torch's c10d binding accepts only sequences of ints there. Hand it lists."""
    import torch.distributed as dist
    real = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        def as_list(s):
            return None if s is None else [int(x) for x in s]
        return real(output, input, as_list(output_split_sizes), as_list(input_split_sizes), group=group,
                    async_op=async_op)
    dist.all_to_all_single = all_to_all_single


def patch_megatron_for_cpu(fake_cuda_tensor_type=True):
    """Idempotent. Call at the start of a worker process, before building megatron models."""
    global _MODE, _PATCHED
    if _PATCHED:
        return
    _PATCHED = True
    _split_sizes_as_lists()
    torch.cuda.current_device = lambda: _CPU            # buffers allocated on device=current_device()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()   # "CUDA" RNG := CPU RNG
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    # 0.17+: streams and events (gradient reduction, Megatron-LM's timers and loop)
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullStream
    torch.cuda.stream = lambda *a, **k: _NullStream()
    import megatron.core.tensor_parallel.random as mrandom
    mrandom._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    torch.Tensor.cuda = lambda self, *a, **k: self
    if _MODE is None:
        _MODE = CudaToCpuMode()
        _MODE.__enter__()                                 # process-wide, stays active
    torch._nexus_megatron_cpu_shim = True               # lets `bench --engine megatron` run without CUDA
    if fake_cuda_tensor_type:                             # optimizers compare p.type() to 'torch.cuda.FloatTensor'
        _orig = torch.Tensor.type

        def _type(self, dtype=None, non_blocking=False, **kw):
            if dtype is None:
                t = _orig(self)
                return t if t.startswith("torch.cuda.") else t.replace("torch.", "torch.cuda.", 1)
            return _orig(self, dtype, non_blocking, **kw)
        torch.Tensor.type = _type


def patch_megatron_training_for_cpu():
    """Also run Megatron-LM's loop (``megatron.training``, shipped in megatron-core >= 0.17) on CPU: it asserts
    ``torch.cuda.is_available()``, selects a device, reads memory statistics and times with CUDA events.
    Pass ``--distributed-backend gloo``. Call instead of :func:`patch_megatron_for_cpu`."""
    patch_megatron_for_cpu()
    import torch._dynamo
    torch._dynamo.config.disable = True     # the jit-fusion warm-up would trace through the CUDA->CPU mode
    torch.cuda.is_available = lambda: True
    torch.accelerator.current_stream = lambda *a, **k: _NullStream()   # torch.optim's graph-capture check
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.cuda.reset_max_memory_allocated = lambda *a, **k: None
    torch.cuda.memory_stats = lambda *a, **k: {}
    torch.cuda.mem_get_info = lambda *a, **k: (0, 0)
    torch.cuda.get_device_capability = lambda *a, **k: (0, 0)
    import types                     # validate_args reads the arch with TP/CP > 1 (CUDA_DEVICE_MAX_CONNECTIONS)
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        major=0, minor=0, name="cpu", total_memory=0, multi_processor_count=1)
    torch.cuda.get_device_name = lambda *a, **k: "cpu"
