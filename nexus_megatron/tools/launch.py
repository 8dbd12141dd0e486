"""Starting a command on several processes of this machine: torchrun, or DeepSpeed's launcher."""
from __future__ import annotations

import os
import subprocess
import sys


def under_launcher() -> bool:
    """True inside a process started by torchrun / the deepspeed launcher."""
    return "LOCAL_RANK" in os.environ or "RANK" in os.environ


def launch_torchrun(nproc: int, argv: list) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", os.environ.get("MASTER_PORT", "29531"), "-m", "nexus_megatron.cli", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def launch_deepspeed(nproc: int, argv: list) -> int:
    """``deepspeed --num_gpus N --module nexus_megatron.cli ...`` (CPU processes with gloo when there is no GPU)."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")   # torch's all_gather_into_tensor deprecation, inside DeepSpeed
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher if os.path.exists(launcher) else "deepspeed", "--num_gpus", str(nproc),
           "--master_port", env.get("MASTER_PORT", "29533"), "--module", "nexus_megatron.cli", *argv]
    return subprocess.call(cmd, env=env)
