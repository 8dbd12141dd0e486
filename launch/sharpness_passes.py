"""Forward passes per critical-sharpness measurement, through the real trainer (``nexus_megatron.train.train``).

Runs ``--steps`` outer steps of a small model with ``sharpness.every=1`` for Nexus and for the AdamW baseline on
synthetic data with 4 training sources + 1 OOD set (6 losses per measurement: the mixture, each source, the OOD
set), reads ``sharpness/forward_passes`` and every loss's lambda_c from ``metrics.jsonl``, and prints, over the
warm-started measurements (all but the first): the median (min-max) passes, how many took <= 12, the lower
bound of any bracketing search for the same brackets (1 + the distinct bracket ends + one probe per capped
loss; a loss's bracket is the grid cell of relative width 2**(1/m) - 1 centred on its eta_c = 2 / lambda_c),
and how far the warm starts were off (|log2(eta_c / previous eta_c)|, in doublings, over every loss measured
in two consecutive measurements).
The hook never changes the trajectory, so two versions of the search see the same losses::

    OMP_NUM_THREADS=1 PYTHONPATH=. python launch/sharpness_passes.py --steps 20
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/other/checkout python launch/sharpness_passes.py --steps 20
    OMP_NUM_THREADS=1 PYTHONPATH=. python launch/sharpness_passes.py --steps 30 --hidden 32 --layers 2

(``docs/sharpness.md``: "What it costs".)
"""
import argparse
import json
import math
import os
import statistics
import tempfile

from nexus_megatron.config import load_config
from nexus_megatron.data.synthetic import write_synthetic_data
from nexus_megatron.sharpness import grid_steps
from nexus_megatron.train import train

SOURCES, OOD = ["web", "code", "math", "prose"], ["poetry"]
BASE = {
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"sources": SOURCES, "ood": OOD, "seq_len": 16, "micro_batch_size": 2},
    "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
    "train": {"micro_steps": 2, "progress": False, "eval_every": 0, "probe_every": 0},
    "sharpness": {"enabled": True, "every": 1},
}


def lower_bound(rec: dict, m: int) -> int:
    """1 (L0) + distinct bracket ends of the measured losses + 1 per capped loss."""
    ends, capped = set(), 0
    for key, value in rec.items():
        if key == "sharpness/lambda_c" or key.startswith("sharpness/lambda_c/"):
            lo = 2 * (2.0 / value) / (1 + 2.0 ** (1.0 / m))     # eta_c is the midpoint of [lo, lo 2**(1/m)]
            j = round(math.log2(lo) * m, 3)
            ends.update({j, round(j + 1, 3)})
        elif key.startswith("sharpness/lambda_c_at_"):
            capped += 1
    return 1 + len(ends) + capped


def start_errors(recs: list) -> list:
    """|log2(eta_c / warm start)| in doublings for every loss measured in two consecutive measurements (its
    warm start is the previous eta_c = 2 / lambda_c; a capped value is no warm start)."""
    out = []
    for prev, rec in zip(recs, recs[1:]):
        for key, value in rec.items():
            if (key == "sharpness/lambda_c" or key.startswith("sharpness/lambda_c/")) and key in prev:
                out.append(abs(math.log2(prev[key] / value)))
    return out


def run(optim: str, steps: int, data: str, out_dir: str, hidden: int = 16, layers: int = 1) -> list:
    cfg = load_config(None, [f"data.path={data}", f"optim.name={optim}", f"train.steps={steps}",
                             f"train.run_dir={os.path.join(out_dir, optim)}", f"model.hidden_size={hidden}",
                             f"model.num_layers={layers}"],
                      base=json.loads(json.dumps(BASE)))
    train(cfg)
    with open(os.path.join(out_dir, optim, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if "sharpness/forward_passes" in r]


def summary(name: str, every: list, m: int) -> dict:
    """The figures of one run's measurements (``every``: the metrics records with a measurement, in order)."""
    recs = every[1:]
    err = sorted(start_errors(every))
    passes = [int(r["sharpness/forward_passes"]) for r in recs]
    bounds = [lower_bound(r, m) for r in recs]
    return {
        "optim": name, "measurements": len(passes),
        "passes_median": statistics.median(passes), "passes_min": min(passes), "passes_max": max(passes),
        "passes_mean": round(statistics.mean(passes), 2), "at_most_12": sum(p <= 12 for p in passes),
        "lower_bound_median": statistics.median(bounds), "lower_bound_max": max(bounds),
        "over_bound_median": statistics.median(p - b for p, b in zip(passes, bounds)),
        "over_bound_min": min(p - b for p, b in zip(passes, bounds)),
        "over_bound_max": max(p - b for p, b in zip(passes, bounds)),
        "probe_tokens_median": statistics.median(int(r["sharpness/probe_tokens"]) for r in recs),
        "start_error_doublings": {"median": round(statistics.median(err), 2),
                                  "p90": round(err[int(0.9 * (len(err) - 1))], 2),
                                  "share_over_1": round(sum(e > 1 for e in err) / len(err), 2)},
        "passes": passes, "lower_bounds": bounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--optim", nargs="+", default=["nexus", "adamw"], choices=["nexus", "adamw"])
    ap.add_argument("--hidden", type=int, default=16, help="model.hidden_size (default 16)")
    ap.add_argument("--layers", type=int, default=1, help="model.num_layers (default 1)")
    ap.add_argument("--metrics", nargs="+", metavar="FILE",
                    help="read these runs' metrics.jsonl (trained with sharpness.every=1 and the default "
                         "sharpness.eps) instead of training the small model")
    args = ap.parse_args()
    m = grid_steps(BASE.get("sharpness", {}).get("eps", 2.0 ** -4))
    if args.metrics:
        for path in args.metrics:
            with open(path) as f:
                every = [r for r in map(json.loads, f) if "sharpness/forward_passes" in r]
            print(json.dumps(summary(path, every, m)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_data(os.path.join(tmp, "data"), sources=tuple(SOURCES), ood=tuple(OOD))
        for optim in args.optim:
            print(json.dumps(summary(optim, run(optim, args.steps, data, tmp, args.hidden, args.layers), m)))


if __name__ == "__main__":
    main()
