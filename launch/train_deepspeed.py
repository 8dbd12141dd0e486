#!/usr/bin/env python
"""Trainer entry point for the ``deepspeed`` launcher (and for srun / torchrun).

    deepspeed --num_gpus 2 launch/train_deepspeed.py --config configs/tiny.yaml \
        --set train.deepspeed_config=configs/ds_config_zero2.json

is ``nexus-megatron train --set train.engine=deepspeed --config ... --set ...``: the launcher's
``--local_rank=N`` argument is taken off the command line (the rank comes from the LOCAL_RANK / RANK /
WORLD_SIZE environment the launcher sets) and every other argument goes to ``nexus-megatron train``.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def strip_local_rank(argv):
    """Remove ``--local_rank=N`` / ``--local_rank N`` (also ``--local-rank``); export LOCAL_RANK if unset."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def main(argv=None) -> int:
    argv = strip_local_rank(sys.argv[1:] if argv is None else list(argv))
    if not os.environ.get("DS_ACCELERATOR"):
        try:
            import torch
            if not torch.cuda.is_available():
                os.environ["DS_ACCELERATOR"] = "cpu"
        except ImportError:
            pass
    from nexus_megatron.cli import main as cli_main

    return cli_main(["train", "--set", "train.engine=deepspeed", *argv])


if __name__ == "__main__":
    sys.exit(main())
