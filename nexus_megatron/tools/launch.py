"""Starting a command on several processes of this machine: torchrun, or DeepSpeed's launcher, each run as
one job (signals reach every process, a worker's input error is printed once: nexus_megatron/launcher.py)."""
from __future__ import annotations

import os
import sys

from ..launcher import launch_torchrun, master_port, run_job, under_launcher

__all__ = ["launch_deepspeed", "launch_torchrun", "under_launcher"]


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
           "--master_port", str(master_port()), "--module", "nexus_megatron.cli", *argv]
    return run_job(cmd, env)
