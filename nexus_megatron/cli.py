"""``nexus-megatron``: prepare-data, train, compare, quickstart, sharpness, bench, plan, experiment (alias
study), convert-checkpoint."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import USER_ERRORS, NexusConfigError
from .launcher import close_process_groups, launch_torchrun, under_launcher


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise NexusConfigError(f"--nproc {nproc}: must be >= 1 (processes on this machine)")


def cmd_train(args) -> int:
    from .config import load_config

    if args.allow_changed:   # --allow-changed A,B -> --set train.allow_changed=[A, B]
        args.set = list(args.set) + [f"train.allow_changed=[{', '.join(k.strip() for k in args.allow_changed.split(',') if k.strip())}]"]
    check_nproc(args.nproc)
    cfg = load_config(args.config, args.set)   # bad settings fail here, before any process is spawned
    if args.nproc > 1 and not under_launcher():
        from .runlock import HELD_ENV, acquire
        from .train import preflight

        preflight(cfg, args.nproc)   # layout split, data, vocabulary, run_dir: before any worker starts
        argv = ["train", "--config", args.config] if args.config else ["train"]
        for s in args.set:
            argv += ["--set", s]
        lock = acquire(cfg.train.run_dir)   # one live run per run_dir, held until every worker has exited
        try:
            return launch_torchrun(args.nproc, argv, {HELD_ENV: os.path.abspath(cfg.train.run_dir)})
        finally:
            lock.release()
    from .train import train

    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        f = summary["final"]
        print(f"done: {summary['optimizer']} {summary['steps']} steps, {summary['tokens']:,} tokens, "
              f"{summary['wall_s']:.0f}s; eval/loss {f.get('eval/loss', float('nan')):.4f}"
              + (f", eval/ood_loss {f['eval/ood_loss']:.4f}" if "eval/ood_loss" in f else "")
              + f" -> {cfg.train.run_dir}")
    return 0


def cmd_prepare_data(args) -> int:
    from .data.prepare import run_prepare_data

    run_prepare_data(args)
    return 0


def cmd_compare(args) -> int:
    from .tools.compare import compare_runs

    compare_runs(args.runs, plot=args.plot)
    return 0


def cmd_sharpness(args) -> int:
    from .tools.sharpness_cli import run_sharpness

    run_sharpness(args)
    return 0


def cmd_quickstart(args) -> int:
    from .tools.quickstart import quickstart

    check_nproc(args.nproc)
    return quickstart(args)


def cmd_bench(args) -> int:
    from .tools.bench import bench_argv, check_bench_args, run_bench

    check_bench_args(args)            # bad settings fail here, before any process is spawned
    if args.nproc > 1 and not under_launcher():
        return launch_torchrun(args.nproc, bench_argv(args))
    return run_bench(args)


def cmd_plan(args) -> int:
    from .tools.plan import run_plan

    return run_plan(args)


def cmd_experiment(args) -> int:
    from .study.runner import experiment

    return experiment(args)


def cmd_convert_checkpoint(args) -> int:
    from .convert_checkpoint import run_convert

    return run_convert(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-megatron", description=__doc__)
    # the deepspeed launcher passes --local_rank (torchrun uses LOCAL_RANK in the environment)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train with Nexus or AdamW (plain PyTorch, torchrun)")
    t.add_argument("--config", help="YAML run config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set optim.name=adamw (repeatable)")
    t.add_argument("--nproc", type=int, default=1, help="processes on this machine (launches torchrun)")
    t.add_argument("--allow-changed", metavar="KEY,...", default="",
                   help="resume even though these settings changed (docs/training.md#resume; "
                        "same as --set train.allow_changed=[KEY,...])")
    t.set_defaults(fn=cmd_train)

    d = sub.add_parser("prepare-data", help="tokenize real multi-source text into shards")
    from .data.prepare import add_prepare_data_arguments
    add_prepare_data_arguments(d)
    d.set_defaults(fn=cmd_prepare_data)

    c = sub.add_parser("compare", help="side-by-side table (and plot) of finished runs")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--plot", help="write a PNG plot here")
    c.set_defaults(fn=cmd_compare)

    s = sub.add_parser("sharpness", help="critical sharpness of a pretrained checkpoint (transformers directory "
                                         "or GGUF) along an accumulated AdamW direction, per data source")
    from .tools.sharpness_cli import add_sharpness_arguments
    add_sharpness_arguments(s)
    s.set_defaults(fn=cmd_sharpness)

    q = sub.add_parser("quickstart", help="prepare a small real mixture, train AdamW and Nexus on 2 CPU "
                                          "processes, print the comparison and write a plot")
    q.add_argument("--out", default="runs/quickstart", help="where the runs and the plot go")
    q.add_argument("--data", default="data/quickstart", help="prepared data directory")
    q.add_argument("--config", default=None, help="run config (default: configs/quickstart.yaml)")
    q.add_argument("--nproc", type=int, default=2)
    q.add_argument("--engine", choices=("deepspeed", "plain"), default="deepspeed",
                   help="train through the deepspeed launcher (ZeRO-2, default) or plain torchrun")
    q.add_argument("--ds-config", default=None, help="ds_config.json (default: configs/ds_config_zero2.json)")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    q.set_defaults(fn=cmd_quickstart)

    b = sub.add_parser("bench", help="AdamW vs Nexus (both layouts) on the same model, batch and engine: step time, "
                                     "tokens/s, memory, bytes communicated, critical-sharpness hook cost")
    from .tools.bench import add_bench_arguments
    add_bench_arguments(b)
    b.set_defaults(fn=cmd_bench)

    pl = sub.add_parser("plan", help="memory per GPU and communication time per step for AdamW and Nexus "
                                     "(model size, nodes, TP/PP/DP, ZeRO or distributed optimizer, bandwidths)")
    from .tools.plan import add_plan_arguments
    add_plan_arguments(pl)
    pl.set_defaults(fn=cmd_plan)

    e = sub.add_parser("experiment", help="the multi-seed study: AdamW, Nexus and controls, matched-loss "
                                          "comparison, downstream, closeness of minima, report (docs/results.md)")
    from .study.runner import add_experiment_arguments
    add_experiment_arguments(e)
    e.set_defaults(fn=cmd_experiment)
    e2 = sub.add_parser("study", help="the same command as `experiment` (docs/results.md: the pre-registered study, "
                                      "its arms, the matched-loss endpoint and the mechanism measures)")
    add_experiment_arguments(e2)
    e2.set_defaults(fn=cmd_experiment)

    cc = sub.add_parser("convert-checkpoint", help="one-time: rewrite checkpoints written before checkpoint format 2 "
                                                   "(pickled objects) as tensors and plain data, so that they "
                                                   "resume; only for checkpoints you trust")
    from .convert_checkpoint import add_convert_arguments
    add_convert_arguments(cc)
    cc.set_defaults(fn=cmd_convert_checkpoint)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.fn(args)
        close_process_groups()
        return rc
    except USER_ERRORS as e:
        msg = " ".join(str(e).split())   # one line
        if under_launcher():
            from .launcher import report_error
            if report_error(msg):   # a worker of `--nproc N`: the command prints it once
                return 2
        print(f"nexus-megatron: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if under_launcher():   # Ctrl-C / SIGINT forwarded to the job: the command reports it
            return 128 + 2
        raise


if __name__ == "__main__":
    sys.exit(main())
