"""A descriptive reading of a finished study that was **not** pre-registered (docs/results.md): each arm's
final OOD loss against AdamW's OOD loss at the same ID loss on AdamW's own *training* curve (its evaluations
every ``train.eval_every`` steps, interpolated at the first crossing with
:func:`~.stats.value_at_first_crossing`), i.e. where AdamW first reached the arm's final ID loss, usually with
fewer tokens and at a higher learning rate. A seed whose AdamW run never reaches the target during training is
left out (the pre-registered endpoint uses the continuation there instead).

    python -m nexus_megatron.study.sensitivity runs/study [--arms nexus_seq gamma0] [--reference adamw]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .stats import paired_summary, value_at_first_crossing


def evaluations(metrics_path: str) -> list:
    """[(step, ID validation loss, OOD loss)] of a run's metrics.jsonl, in step order."""
    out = []
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "eval/loss" in r and "eval/ood_loss" in r:
                out.append((float(r["step"]), float(r["eval/loss"]), float(r["eval/ood_loss"])))
    return out


def on_training_curve(out_dir: str, arm: str, reference: str, seeds) -> dict:
    """Per seed: the arm's final ID and OOD loss, where the reference's training curve first reaches that ID loss
    (step, OOD there) and the difference; then the paired summary of the seeds that reached it."""
    rows, diffs = [], []
    for s in seeds:
        ref = evaluations(os.path.join(out_dir, reference, f"seed{s}", "metrics.jsonl"))
        run = evaluations(os.path.join(out_dir, arm, f"seed{s}", "metrics.jsonl"))
        _, target, ood = run[-1]
        hit = value_at_first_crossing(ref, target)
        row = {"seed": s, "target_id": target, "arm_ood": ood, "reached": hit is not None}
        if hit is not None:
            row.update(step=hit["step"], ref_ood=hit["value"], diff=ood - hit["value"])
            diffs.append(row["diff"])
        rows.append(row)
    return {"arm": arm, "reference": reference, "rows": rows, "summary": paired_summary(diffs) if len(diffs) > 1 else None}


def format_result(res: dict) -> str:
    lines = [f"{res['arm']} - {res['reference']} at the arm's final ID loss on {res['reference']}'s training curve",
             "| seed | target ID loss | reference reaches it at step | reference OOD there | arm OOD | Δ OOD |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["reached"]:
            lines.append(f"| {r['seed']} | {r['target_id']:.4f} | {r['step']:.1f} | {r['ref_ood']:.4f} | "
                         f"{r['arm_ood']:.4f} | {r['diff']:+.4f} |")
        else:
            lines.append(f"| {r['seed']} | {r['target_id']:.4f} | not reached in training (left out) | | "
                         f"{r['arm_ood']:.4f} | |")
    s = res["summary"]
    if s is not None:
        lines.append(f"mean {s['mean']:+.4f}, 95% CI [{s['lo']:+.4f}, {s['hi']:+.4f}], sd {s['sd']:.4f}, n = {s['n']}, "
                     f"{s['lower']}/{s['n']} lower")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nexus_megatron.study.sensitivity", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the study's output directory (study.out, e.g. runs/study)")
    ap.add_argument("--arms", nargs="+", default=["nexus_seq", "gamma0"])
    ap.add_argument("--reference", default="adamw")
    args = ap.parse_args(argv)
    with open(os.path.join(args.out, "study.json")) as f:
        seeds = json.load(f)["study"]["seeds"]
    for arm in args.arms:
        print(format_result(on_training_curve(args.out, arm, args.reference, seeds)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
