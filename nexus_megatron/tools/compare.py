"""Side-by-side comparison of finished runs: a table on stdout and a PNG plot."""
from __future__ import annotations

import os

from ..errors import NexusConfigError
from ..faults import read_json_file, read_jsonl


def load_run(run_dir: str):
    sp, mp = os.path.join(run_dir, "summary.json"), os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(sp):
        raise NexusConfigError(f"{run_dir} has no summary.json: is it a finished run directory?")
    fix = f"is {run_dir} a finished run directory? (rerun the run, or leave it out of the comparison)"
    summary = read_json_file(sp, fix, NexusConfigError)
    need = ("optimizer", "final", "tokens", "wall_s", "skipped_steps", "skipped_sources")
    missing = [k for k in need if not isinstance(summary, dict) or k not in summary]
    if missing or not isinstance(summary["final"], dict):
        raise NexusConfigError(f"{sp} is not a run summary (missing {', '.join(missing) or 'final'}): {fix}")
    metrics = read_jsonl(mp, fix, NexusConfigError) if os.path.isfile(mp) else []
    return summary, metrics


def run_label(run_dir: str, summary: dict) -> str:
    name = os.path.basename(os.path.normpath(run_dir))
    return name if summary["optimizer"] in name else f"{name} ({summary['optimizer']})"


def comparison_table(runs) -> str:
    """runs: list of (label, summary). Rows: per-source eval loss, mean, OOD loss, gradient cosine."""
    keys = []
    for _, s in runs:
        for k in s["final"]:
            if k.startswith("eval/loss/") and k not in keys:
                keys.append(k)
    rows = [(k.replace("eval/loss/", "val loss "), k) for k in keys]
    rows += [("val loss (mean of sources)", "eval/loss"), ("OOD loss", "eval/ood_loss"),
             ("mean pairwise grad cosine", "cos/mean")]
    labels = [l for l, _ in runs]
    w0 = max(len(r[0]) for r in rows) + 2
    w = max(max(len(l) for l in labels) + 2, 12)
    lines = ["".ljust(w0) + "".join(l.rjust(w) for l in labels)]
    if len(runs) == 2:
        lines[0] += "delta".rjust(12)
    for title, key in rows:
        vals = [s["final"].get(key) for _, s in runs]
        if all(v is None for v in vals):
            continue
        line = title.ljust(w0) + "".join((f"{v:.4f}" if v is not None else "-").rjust(w) for v in vals)
        if len(runs) == 2 and None not in vals:
            line += f"{vals[1] - vals[0]:+.4f}".rjust(12)
        lines.append(line)
    lines.append("tokens".ljust(w0) + "".join(f"{s['tokens']:,}".rjust(w) for _, s in runs))
    lines.append("wall time (s)".ljust(w0) + "".join(f"{s['wall_s']:.0f}".rjust(w) for _, s in runs))
    lines.append("skipped steps / sources".ljust(w0)
                 + "".join(f"{s['skipped_steps']}/{s['skipped_sources']}".rjust(w) for _, s in runs))
    return "\n".join(lines)


def plot_runs(runs_metrics, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss"), ("eval/loss", "validation loss (mean of sources)"),
              ("eval/ood_loss", "OOD loss (held-out source)"), ("cos/mean", "mean pairwise gradient cosine")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, title) in zip(axes.flat, panels):
        for label, metrics in runs_metrics:
            pts = [(m["step"], m[key]) for m in metrics if key in m]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("outer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(run_dirs, plot=None) -> str:
    loaded = [(d, *load_run(d)) for d in run_dirs]
    table = comparison_table([(run_label(d, s), s) for d, s, _ in loaded])
    print(table)
    if plot:
        plot_runs([(run_label(d, s), m) for d, s, m in loaded], plot)
        print(f"plot: {plot}")
    return table
