"""DeepSpeed's runtime as Nexus uses it: importing and initialising DeepSpeed (CPU: gloo, no JIT builds), and
torch AdamW's state created eagerly so DeepSpeed links it. Shared by the adapter and the sharpness host."""
from __future__ import annotations

import importlib
import os
import socket

import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------------
# DeepSpeed runtime (CPU: gloo, no JIT builds)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_deepspeed_runtime():
    """Import DeepSpeed and initialise its communication layer. On a machine without CUDA the CPU
    accelerator is selected (``DS_ACCELERATOR=cpu``) and the JIT build of DeepSpeed's shared-memory
    all-reduce op is skipped (it only serves inference; training uses gloo). A single process without a
    launcher gets a one-rank rendezvous. Returns the ``deepspeed`` module."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not (dist.is_available() and dist.is_initialized()) and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # `import deepspeed.comm.torch as m` would bind the real torch (attribute shadowing in deepspeed.comm)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return deepspeed


# ---------------------------------------------------------------------------------------------------
# the client optimizer's state

def init_adamw_state(opt, p, group) -> None:
    """torch's lazy AdamW state for ``p`` (identical values), created now so DeepSpeed links it at its first
    step. No-op when the state exists."""
    from torch.optim.optimizer import _get_scalar_dtype

    st = opt.state[p]
    if st:
        return
    fused, capturable = bool(group.get("fused")), bool(group.get("capturable"))
    st["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=p.device)
                  if capturable or fused else torch.tensor(0.0, dtype=_get_scalar_dtype()))
    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if group.get("amsgrad"):
        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
