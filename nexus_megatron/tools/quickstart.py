"""The README's main job: a small real Nexus-vs-AdamW pretraining comparison on the CPU."""
from __future__ import annotations

import os
import time

from ..config import load_config
from ..launcher import launch_torchrun
from .launch import launch_deepspeed

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def quickstart(args) -> int:
    from ..data.prepare import SIZE_PRESETS, prepare_data
    from .compare import compare_runs

    config = args.config or os.path.join(REPO_CONFIGS, "quickstart.yaml")
    common = [f"data.path={args.data}", "train.resume=false"]
    if args.engine == "deepspeed":
        common += ["train.engine=deepspeed",
                   f"train.deepspeed_config={args.ds_config or os.path.join(REPO_CONFIGS, 'ds_config_zero2.json')}"]
    common += list(args.set)
    cfg = load_config(config, common)      # validate before spending anything
    t0 = time.time()
    print(f"[1/4] preparing a small real mixture in {args.data} "
          f"(sources: {', '.join(cfg.data.sources)}; held out: {', '.join(cfg.data.ood)})", flush=True)
    train_tokens, val_tokens = SIZE_PRESETS["small"]
    prepare_data(args.data, sources=tuple(cfg.data.sources), ood=tuple(cfg.data.ood),
                 train_tokens_per_source=train_tokens, val_tokens_per_source=val_tokens)
    runs = []
    for i, name in enumerate(("adamw", "nexus")):
        run_dir = os.path.join(args.out, name)
        how = "the deepspeed launcher (ZeRO-2)" if args.engine == "deepspeed" else "torchrun"
        print(f"[{i + 2}/4] training {name} on {args.nproc} processes with {how} -> {run_dir}", flush=True)
        argv = ["train", "--config", config]
        for s in common + [f"optim.name={name}", f"train.run_dir={run_dir}"]:
            argv += ["--set", s]
        rc = launch_deepspeed(args.nproc, argv) if args.engine == "deepspeed" else launch_torchrun(args.nproc, argv)
        if rc:
            print(f"quickstart: training {name} failed (exit {rc})")
            return rc
        runs.append(run_dir)
    print(f"[4/4] comparison after {time.time() - t0:.0f}s", flush=True)
    compare_runs(runs, plot=os.path.join(args.out, "quickstart.png"))
    return 0
