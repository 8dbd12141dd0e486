"""The ``report`` step of ``nexus-megatron experiment``: tables (mean and 95% t-interval over seeds,
and differences against the reference arm paired by seed) and PNG plots, from the run directories
alone. Writes ``<out>/report/results.md``, ``results.json`` and ``*.png``."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from .spec import MATCHED_SUFFIX, arm_config, arm_names, run_dir, selection_path
from .stats import paired_summary

PAPER_OOD_EFFECT = 0.012
"""The paper's OOD-loss gain at 3B (ALGORITHMS.md §1): the effect size the power analysis is read against."""

# two-sided 95% quantiles of Student's t (df = n - 1)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    return 1.959964 + 2.4 / df          # within 0.003 of the exact quantile for df > 30


def t_interval(xs: Sequence[float]):
    """(mean, half-width of the 95% t-interval, n) over the finite values; half-width nan for n < 2."""
    v = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(v) / n
    if n < 2:
        return mean, math.nan, 1
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n), n


def fmt_ci(xs: Sequence[float], digits: int = 4, signed: bool = False) -> str:
    mean, half, n = t_interval(xs)
    if n == 0:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    if n < 2:
        return f.format(mean) + " (n=1)"
    return f"{f.format(mean)} ± {half:.{digits}f}"


def paired(xs: Dict[int, float], ref: Dict[int, float]) -> List[float]:
    """Per-seed differences x - ref over the seeds both have."""
    return [xs[s] - ref[s] for s in sorted(set(xs) & set(ref))
            if xs[s] is not None and ref[s] is not None and math.isfinite(xs[s]) and math.isfinite(ref[s])]


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(c) -> str:
        return str(c).replace("|", "\\|")      # e.g. cos/code|math, ||theta||: not column separators
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# reading the run directories

def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _read_metrics(path: str) -> List[dict]:
    out = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        break
    return out


def collect(st) -> Dict[str, Dict[int, dict]]:
    """{arm: {seed: {"summary", "metrics", "analysis", "match", "sharpness"}}} for what exists."""
    data: Dict[str, Dict[int, dict]] = {}
    for arm in arm_names(st):
        for seed in st.study.seeds:
            rd = run_dir(st, arm, seed)
            matched = arm.endswith(MATCHED_SUFFIX)
            marker = os.path.join(rd, "match.json" if matched else "summary.json")
            if not os.path.isfile(marker):
                continue
            metrics = _read_metrics(os.path.join(rd, "metrics.jsonl"))
            sharp = [r for r in metrics if "sharpness/forward_passes" in r or "sharpness/lambda_c" in r]
            data.setdefault(arm, {})[seed] = {
                "summary": _read_json(os.path.join(rd, "summary.json")) or {},
                "metrics": metrics,
                "analysis": _read_json(os.path.join(rd, "analysis.json")) or {},
                "match": _read_json(os.path.join(rd, "match.json")) if matched else None,
                "sharpness": sharp[-1] if sharp else {},
                "sharpness_all": sharp,
                "mechanisms": _read_json(os.path.join(rd, "mechanisms.json")),
            }
    return data


def _final(d: dict, key: str):
    v = d["summary"].get("final", {}).get(key)
    return float(v) if v is not None else None


def _per_seed(data, arm, fn) -> Dict[int, float]:
    out = {}
    for seed, d in data.get(arm, {}).items():
        try:
            v = fn(d)
        except (KeyError, TypeError, ValueError):
            v = None
        if v is not None and math.isfinite(float(v)):
            out[seed] = float(v)
    return out


# ---------------------------------------------------------------------------------------------------
# tables

def _label(st, arm: str) -> str:
    if arm.endswith(MATCHED_SUFFIX):
        base = arm[: -len(MATCHED_SUFFIX)]
        return f"{_label(st, base)} @ matched loss"
    a = st.arms.get(arm)
    return (a.label if a is not None and a.label else arm)


def metric_table(st, data, arms, cols, digits=4, ref: Optional[str] = None, diff_cols=()) -> str:
    """Rows: arms; columns: (title, fn(d) -> value); plus paired differences vs ``ref`` for diff_cols."""
    header = ["arm", "seeds"] + [t for t, _ in cols] + [f"Δ {t} vs {_label(st, ref)}" for t, _ in cols
                                                        if t in diff_cols and ref]
    rows = []
    for arm in arms:
        if arm not in data:
            continue
        row = [_label(st, arm), str(len(data[arm]))]
        for t, fn in cols:
            row.append(fmt_ci(list(_per_seed(data, arm, fn).values()), digits))
        for t, fn in cols:
            if t in diff_cols and ref:
                if arm == ref or ref not in data:
                    row.append("")
                    continue
                diffs = paired(_per_seed(data, arm, fn), _per_seed(data, ref, fn))
                lower = sum(1 for x in diffs if x < 0)
                row.append(f"{fmt_ci(diffs, digits, signed=True)} ({lower}/{len(diffs)} lower)" if diffs else "-")
        rows.append(row)
    return md_table(header, rows)


def _sources(st):
    cfg = arm_config(st, st.study.reference, st.study.seeds[0])
    return list(cfg.data.sources), list(cfg.data.ood)


def build_tables(st, data) -> Dict[str, str]:
    names, ood = _sources(st)
    ref = st.study.reference
    arms = [a for a in arm_names(st) if a in data]
    base_arms = [a for a in arms if not a.endswith(MATCHED_SUFFIX)]
    t = {}
    main_cols = [("ID val loss", lambda d: _final(d, "eval/loss")),
                 ("OOD loss", lambda d: _final(d, "eval/ood_loss")),
                 ("mean grad cosine", lambda d: _final(d, "cos/mean")),
                 ("log10 λ_c (mixture; median of the run's measured values)",
                  lambda d: _median_log10(d, "mixture")[0])]
    t["same_tokens"] = metric_table(st, data, base_arms, main_cols, ref=ref,
                                    diff_cols=("ID val loss", "OOD loss", "mean grad cosine"))
    if st.study.contrasts:
        rows = []
        for a, b in st.study.contrasts:
            if a not in data or b not in data:
                continue
            row = [f"{_label(st, a)} − {_label(st, b)}"]
            for _, fn in main_cols[:3]:
                diffs = paired(_per_seed(data, a, fn), _per_seed(data, b, fn))
                lower = sum(1 for x in diffs if x < 0)
                row.append(f"{fmt_ci(diffs, 4, signed=True)} ({lower}/{len(diffs)} lower)" if diffs else "-")
            rows.append(row)
        t["contrasts"] = md_table(["arm − control (paired by seed)", "Δ ID val loss", "Δ OOD loss",
                                   "Δ mean grad cosine"], rows)
    t["per_source_loss"] = metric_table(st, data, arms, [(n, (lambda d, n=n: _final(d, f"eval/loss/{n}")))
                                                         for n in names + ood])
    pairs = [k for k in next(iter(next(iter(data.values())).values()))["summary"].get("final", {})
             if k.startswith("cos/") and k != "cos/mean"] if data else []
    if pairs:          # the trainer's gradient probe (off in the pre-registered study: see the mechanisms)
        t["cosines"] = metric_table(st, data, arms, [(k[4:], (lambda d, k=k: _final(d, k))) for k in pairs])
    if any(d.get("sharpness_all") for a in arms for d in data[a].values()):
        t["sharpness"] = sharpness_table(st, data, arms, ["mixture"] + names + (["ood"] if ood else []))
    if st.downstream.enabled:
        cols, dcols = [], []
        for task in st.downstream.tasks:
            cols.append((f"{task} acc", (lambda d, task=task: d["analysis"]["downstream"][task]["accuracy"])))
            cols.append((f"{task} margin", (lambda d, task=task: d["analysis"]["downstream"][task]["margin"])))
            dcols += [f"{task} acc"]
        t["downstream"] = metric_table(st, data, arms, cols, digits=3, ref=ref, diff_cols=dcols)
        chance = []
        for task in st.downstream.tasks:
            for arm in arms:
                got = [d["analysis"].get("downstream", {}).get(task) for d in data[arm].values()]
                got = [g for g in got if g]
                if got:
                    chance.append([task, f"{got[0]['chance']:.3f}", str(got[0]["n"])])
                    break
        t["chance"] = md_table(["task", "chance accuracy", "items"], chance)
    if st.minima.enabled:
        mcols = [("mean pairwise L2", lambda d: d["analysis"]["minima"]["mean_l2"]),
                 ("L2 / ||θ0||", lambda d: d["analysis"]["minima"]["mean_rel"]),
                 ("L2 / mean fine-tune move", lambda d: d["analysis"]["minima"]["mean_l2"]
                  / d["analysis"]["minima"]["mean_moved"]),
                 ("spread", lambda d: d["analysis"]["minima"]["spread"]),
                 ("mean barrier", lambda d: d["analysis"]["minima"]["mean_barrier"]),
                 ("mid-path excess", lambda d: d["analysis"]["minima"]["mean_mid_excess"]),
                 ("max barrier", lambda d: d["analysis"]["minima"]["max_barrier"])]
        marms = [a for a in st.minima.arms if a in data]
        mref = ref if ref in marms else None
        t["minima"] = metric_table(st, data, marms, mcols, digits=4, ref=mref,
                                   diff_cols=["L2 / ||θ0||", "L2 / mean fine-tune move", "mean barrier",
                                              "mid-path excess"])
    m = st.matched
    prim = primary_endpoint(st, data)
    if prim:
        t["primary"] = primary_table(st, prim)
    sw = sweep_table(st)
    if sw:
        t["lr_sweep"] = sw
    t.update(mechanisms_tables(st, data))
    if m.enabled:
        marm = m.arm + MATCHED_SUFFIX
        rows = []
        for seed, d in sorted(data.get(marm, {}).items()):
            r = d["match"]
            rows.append([str(seed), f"{r['base_loss']:.4f}", f"{r['target_loss']:.4f}", f"{r['loss']:.4f}",
                         f"{r['extra_steps']} ({r.get('extra_steps_interpolated', r['extra_steps']):.0f})",
                         f"{r['extra_tokens']:,}", "yes" if r["reached"] else
                         f"no (bound {m.max_extra_steps} steps)"])
        t["match_runs"] = md_table(["seed", f"{_label(st, m.arm)} loss at same tokens", f"{_label(st, m.target)} loss",
                                    "loss reached", "extra steps (interpolated)", "extra tokens", "matched"], rows)
        cols = [("ID val loss", lambda d: _final(d, "eval/loss")), ("OOD loss", lambda d: _final(d, "eval/ood_loss")),
                ("mean grad cosine", lambda d: _final(d, "cos/mean"))]
        if st.downstream.enabled:
            cols += [(f"{task} acc", (lambda d, task=task: d["analysis"]["downstream"][task]["accuracy"]))
                     for task in st.downstream.tasks]
        t["matched"] = metric_table(st, data, [a for a in (marm, m.target) if a in data], cols, ref=marm,
                                    diff_cols=[c for c, _ in cols])
    return t


# ---------------------------------------------------------------------------------------------------
# the pre-registered primary endpoint

def read_endpoint(summary: dict, reference_effect: float = PAPER_OOD_EFFECT) -> str:
    """The pre-registered reading of the primary endpoint (target minus reference, negative = target lower):
    an interval that excludes 0 is a difference; one that includes 0 but excludes +-reference_effect rules out
    an effect of that size; otherwise the study is inconclusive at its power."""
    n, lo, hi = summary.get("n", 0), summary.get("lo", math.nan), summary.get("hi", math.nan)
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"not enough matched seeds ({n}) for an interval"
    if hi < 0:
        return "lower OOD loss at matched ID loss (the interval excludes 0)"
    if lo > 0:
        return "higher OOD loss at matched ID loss (the interval excludes 0)"
    if lo > -reference_effect and hi < reference_effect:
        return (f"no difference, and the interval excludes an effect of ±{reference_effect} "
                "(the paper's 3B effect)")
    return (f"inconclusive at this power: the interval includes 0 and an effect of {reference_effect} "
            f"(minimum detectable effect at 80% power: {summary.get('mde', math.nan):.4f})")


def primary_endpoint(st, data) -> Optional[dict]:
    """Per seed: the target's final OOD loss minus the reference's OOD loss interpolated on its own ID -> OOD
    curve at the target's final ID loss (match.json ``ood_at_target``), and their paired summary."""
    m = st.matched
    if not m.enabled:
        return None
    marm = m.arm + MATCHED_SUFFIX
    rows, diffs = [], []
    for seed, d in sorted(data.get(marm, {}).items()):
        r = d["match"] or {}
        t = data.get(m.target, {}).get(seed)
        if t is None:
            continue
        t_ood = _final(t, "eval/ood_loss")
        at = r.get("ood_at_target")
        diff = t_ood - at if (at is not None and t_ood is not None) else None
        if diff is not None:
            diffs.append(diff)
        rows.append({"seed": seed, "target_id": r.get("target_loss"), "extra_steps": r.get("extra_steps_at_target"),
                     "ref_ood_at_target": at, "target_ood": t_ood, "diff": diff})
    if not rows:
        return None
    summ = paired_summary(diffs, reference_effect=PAPER_OOD_EFFECT)
    return {"rows": rows, "summary": summ, "reading": read_endpoint(summ), "not_matched": sum(r["diff"] is None
                                                                                         for r in rows)}


def primary_table(st, prim: dict) -> str:
    def f(v, fmt="{:.4f}"):
        return "-" if v is None else fmt.format(v)
    rows = [[str(r["seed"]), f(r["target_id"]), f(r["extra_steps"], "{:.1f}"), f(r["ref_ood_at_target"]),
             f(r["target_ood"]), f(r["diff"], "{:+.4f}") if r["diff"] is not None else "not matched"]
            for r in prim["rows"]]
    s = prim["summary"]
    rows.append(["all", "", "", "", "", f"{s['mean']:+.4f}, 95% CI [{s['lo']:+.4f}, {s['hi']:+.4f}], sd {s['sd']:.4f}, "
                 f"n = {s['n']}, {s['lower']}/{s['n']} lower; MDE (80% power) {s['mde']:.4f}; seeds for "
                 f"{PAPER_OOD_EFFECT}: {s.get('seeds_for_reference_effect', '-')}" if s["n"] >= 2 else "-"])
    m = st.matched
    return md_table(["seed", f"{_label(st, m.target)} ID loss (target)", f"{_label(st, m.arm)} extra steps to it",
                     f"{_label(st, m.arm)} OOD at it (interpolated)", f"{_label(st, m.target)} OOD",
                     "Δ OOD (target − reference)"], rows) + f"\n\nReading (pre-registered rule): **{prim['reading']}**."


def sweep_table(st) -> Optional[str]:
    sel = _read_json(selection_path(st)) if st.lr_sweep.enabled else None
    if not sel:
        return None
    rows = [[k, ", ".join(f"{x:.4f}" for x in sel["id_loss"][k]), f"{sel['mean_id_loss'][k]:.4f}",
             "**selected**" if float(k) == sel["selected"] else ""] for k in sel["id_loss"]]
    note = ("\n\nThe best lr is at the edge of the sweep: the optimum may lie outside it." if sel.get("at_edge")
            else "")
    return md_table(["lr", f"final ID loss per selection seed {sel['seeds']}", "mean", ""], rows) + note


def _mech(d, *path):
    v = d.get("mechanisms")
    for p in path:
        v = v[p]
    return v


def _offdiag_log10(d, capped=False):
    """Median log10 lambda_c(i -> j) over the measured (or the count of capped) pairs i != j of training sources."""
    sh = d["mechanisms"]["relative_sharpness"]
    names = d["mechanisms"]["sources"]
    vals, cap = [], 0
    for i in names:
        for j in names:
            if i == j:
                continue
            r = sh[i][j]
            if r["capped"]:
                cap += 1
            elif r["log10"] is not None:
                vals.append(r["log10"])
    return cap if capped else _median(vals)


def mechanisms_tables(st, data) -> Dict[str, str]:
    arms = [a for a in st.mechanisms.arms if any(d.get("mechanisms") for d in data.get(a, {}).values())]
    if not arms:
        return {}
    ref = st.study.reference if st.study.reference in arms else None
    sub = {a: {s: d for s, d in data[a].items() if d.get("mechanisms")} for a in arms}
    cols = [("corrected cross-source cosine", lambda d: _mech(d, "cosine", "mean_corrected")),
            ("naive cosine", lambda d: _mech(d, "cosine", "mean_naive")),
            ("split-half reliability", lambda d: sum(_mech(d, "cosine", "reliability").values())
             / len(_mech(d, "cosine", "reliability"))),
            ("interference, own source", lambda d: _mech(d, "interference", "self")),
            ("interference, other sources", lambda d: _mech(d, "interference", "cross")),
            ("barrier (mean over pairs)", lambda d: _mech(d, "barriers", "mean")),
            ("barrier (max)", lambda d: _mech(d, "barriers", "max")),
            ("log10 λ_c(i→j), i≠j (median of measured)", lambda d: _offdiag_log10(d)),
            ("capped λ_c(i→j) searches", lambda d: _offdiag_log10(d, capped=True))]
    t = {"mechanisms": metric_table(st, sub, arms, cols, digits=4, ref=ref,
                                    diff_cols=("corrected cross-source cosine", "interference, other sources",
                                               "barrier (mean over pairs)"))}
    # the interference matrix, mean over seeds, per arm
    parts = []
    for a in arms:
        ds = list(sub[a].values())
        names = ds[0]["mechanisms"]["sources"]
        evals = ds[0]["mechanisms"]["eval"]
        rows = []
        for i in names:
            row = [i]
            for j in evals:
                row.append(fmt_ci([d["mechanisms"]["interference"]["matrix"][i][j] for d in ds], 4))
            rows.append(row)
        parts.append(f"**{_label(st, a)}**: L_j(θ_i) − L_j(θ_0), rows i (fine-tuned on), columns j (evaluated on)\n\n"
                     + md_table(["fine-tuned on"] + evals, rows))
    t["interference"] = "\n\n".join(parts)
    return t


# ---------------------------------------------------------------------------------------------------
# plots

def _log10(v):
    return math.log10(v) if v is not None and v > 0 and math.isfinite(v) else None


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return None
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def sharpness_values(d: dict, key: str):
    """(measured log10 lambda_c values, number of capped searches) of one run over all its measurements.
    ``key``: "mixture" or a relative loss. A capped search is a bound (``lambda_c_at_most`` / ``_at_least``),
    never a value (runs logged before bounds were split off have only values: all counted as measured)."""
    suffix = "" if key == "mixture" else f"/{key}"
    vals, capped = [], 0
    for r in d.get("sharpness_all", []):
        if f"sharpness/lambda_c_at_most{suffix}" in r or f"sharpness/lambda_c_at_least{suffix}" in r:
            capped += 1
            continue
        v = _log10(r.get(f"sharpness/lambda_c{suffix}"))
        if v is not None:
            vals.append(v)
    return vals, capped


def _median_log10(d: dict, key: str):
    vals, capped = sharpness_values(d, key)
    return _median(vals), capped


def _sharpness_summary(d: dict) -> dict:
    """{loss: {"median_log10": median of the measured values, "measured": n, "capped": n}} of one run."""
    keys = {"mixture"}
    for r in d.get("sharpness_all", []):
        for k in r:
            for pre in ("sharpness/lambda_c/", "sharpness/lambda_c_at_most/", "sharpness/lambda_c_at_least/"):
                if k.startswith(pre):
                    keys.add(k[len(pre):])
    out = {}
    for key in sorted(keys):
        vals, capped = sharpness_values(d, key)
        out[key] = {"median_log10": _median(vals), "measured": len(vals), "capped": capped}
    return out


def sharpness_table(st, data, arms, keys) -> str:
    """Critical sharpness per arm: for each loss the median of the measured log10 lambda_c over every
    measurement of every seed, the range of the per-seed medians, and how many searches hit the cap (bounds,
    left out of the medians, never averaged with measurements)."""
    header = ["arm", "seeds"] + list(keys) + ["Adam threshold (last)"]
    rows = []
    for arm in arms:
        if arm not in data:
            continue
        row = [_label(st, arm), str(len(data[arm]))]
        for key in keys:
            pooled, per_seed, capped, total = [], [], 0, 0
            for d in data[arm].values():
                vals, c = sharpness_values(d, key)
                pooled += vals
                capped += c
                total += len(vals) + c
                if vals:
                    per_seed.append(_median(vals))
            if not total:
                row.append("-")
                continue
            cell = f"{_median(pooled):.2f}" if pooled else "all capped"
            if len(per_seed) > 1:
                cell += f" [{min(per_seed):.2f}, {max(per_seed):.2f}]"
            row.append(cell + f"; {capped}/{total} capped")
        thr = [_log10(d["sharpness"].get("sharpness/threshold")) for d in data[arm].values()]
        thr = [x for x in thr if x is not None]
        row.append(f"{_median(thr):.2f}" if thr else "-")
        rows.append(row)
    return md_table(header, rows)


def _curve(data, arm, key):
    """(tokens, mean, lo, hi) over seeds at the steps every seed logged ``key`` (log10 for lambda_c)."""
    per = {}
    for seed, d in data.get(arm, {}).items():
        for r in d["metrics"]:
            v = r.get(key)
            if key.startswith("sharpness/lambda_c"):
                v = _log10(v)
            if v is not None and math.isfinite(float(v)):
                per.setdefault(r["tokens"], {})[seed] = float(v)
    n = len(data.get(arm, {}))
    xs, mean, lo, hi = [], [], [], []
    for tok in sorted(per):
        vals = list(per[tok].values())
        if len(vals) < n:
            continue
        m, h, _ = t_interval(vals)
        xs.append(tok)
        mean.append(m)
        lo.append(m - (h if math.isfinite(h) else 0.0))
        hi.append(m + (h if math.isfinite(h) else 0.0))
    return xs, mean, lo, hi


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(st, data, arms, panels, path, ncols=3) -> bool:
    """One panel per (metric, title); returns False (and writes nothing) when no arm logged any of them
    (e.g. the sharpness panels of a study with sharpness off)."""
    panels = [(k, t) for k, t in panels if any(_curve(data, a, k)[0] for a in arms)]
    if not panels:
        return False
    plt = _plt()
    rows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(rows, ncols, figsize=(5 * ncols, 3.6 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for arm in arms:
            xs, m, lo, hi = _curve(data, arm, key)
            if xs:
                line, = ax.plot(xs, m, label=_label(st, arm), marker="o" if len(xs) < 15 else None, ms=3)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_bars(st, data, arms, groups, path, title, chance=None):
    """groups: [(name, fn(d) -> value)]: one group of bars per entry, one bar per arm, 95% CI whiskers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(len(arms), 1) / 3), 4))
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        means, errs = [], []
        for _, fn in groups:
            m, h, _ = t_interval(list(_per_seed(data, arm, fn).values()))
            means.append(m)
            errs.append(h if math.isfinite(h) else 0.0)
        ax.bar([g + i * width for g in range(len(groups))], means, width, yerr=errs, capsize=3, label=_label(st, arm))
    if chance:
        for g, c in enumerate(chance):
            if c is not None:
                ax.hlines(c, g - 0.1, g + 0.9, colors="k", linestyles="dashed", lw=1)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([n for n, _ in groups], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_barrier_curves(st, data, arms, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        curves = []
        for d in data.get(arm, {}).values():
            mi = d["analysis"].get("minima")
            if mi:
                pairs = list(mi["pairs"].values())
                curves.append([sum(p["curve"][i] for p in pairs) / len(pairs) for i in range(len(mi["alphas"]))])
                alphas = mi["alphas"]
        if curves:
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(alphas))]
            ax.plot(alphas, mean, marker="o", ms=3, label=_label(st, arm))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("alpha (linear path between two per-source minima)")
    ax.set_ylabel("mixture val loss minus chord")
    ax.set_title("loss along the paths between per-source minima (mean over pairs and seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(st, data, out_dir) -> List[str]:
    names, ood = _sources(st)
    arms = [a for a in arm_names(st) if a in data]
    base = [a for a in arms if not a.endswith(MATCHED_SUFFIX)]
    files = []
    p = os.path.join(out_dir, "curves.png")
    if plot_curves(st, data, base, [("eval/loss", "in-distribution val loss (mean of sources)"),
                                    ("eval/ood_loss", "OOD val loss"), ("cos/mean", "mean pairwise gradient cosine"),
                                    ("sharpness/lambda_c", "log10 critical sharpness λ_c (mixture)"),
                                    ("loss", "training loss")], p):
        files.append(p)
    p = os.path.join(out_dir, "per_source.png")
    if plot_curves(st, data, base, [(f"eval/loss/{n}", f"val loss: {n}") for n in names + ood], p):
        files.append(p)
    p = os.path.join(out_dir, "sharpness_per_source.png")
    if plot_curves(st, data, base, [(f"sharpness/lambda_c/{n}", f"log10 λ_c(mixture → {n})")
                                    for n in names + (["ood"] if ood else [])], p):
        files.append(p)
    if st.matched.enabled:
        m = st.matched
        marm = m.arm + MATCHED_SUFFIX
        p = os.path.join(out_dir, "matched.png")
        if plot_curves(st, data, [a for a in (marm, m.target) if a in data],
                       [("eval/loss", "in-distribution val loss"), ("eval/ood_loss", "OOD val loss"),
                        ("cos/mean", "mean pairwise gradient cosine")], p):
            files.append(p)
    if st.downstream.enabled:
        groups, chance = [], []
        for task in st.downstream.tasks:
            groups.append((task, (lambda d, task=task: d["analysis"]["downstream"][task]["accuracy"])))
            c = None
            for arm in arms:
                for d in data[arm].values():
                    c = d["analysis"].get("downstream", {}).get(task, {}).get("chance", c)
            chance.append(c)
        p = os.path.join(out_dir, "downstream.png")
        plot_bars(st, data, arms, groups, p, "downstream accuracy (log-likelihood ranking; dashed: chance)", chance)
        files.append(p)
    if st.minima.enabled:
        marms = [a for a in st.minima.arms if a in data]
        p = os.path.join(out_dir, "minima.png")
        plot_bars(st, data, marms, [("L2 / ||θ0|| (x100)", lambda d: 100 * d["analysis"]["minima"]["mean_rel"]),
                                    ("L2 / fine-tune move", lambda d: d["analysis"]["minima"]["mean_l2"]
                                     / d["analysis"]["minima"]["mean_moved"]),
                                    ("mean barrier (x100)", lambda d: 100 * d["analysis"]["minima"]["mean_barrier"])],
                  p, "closeness of the per-source minima (lower = closer)")
        files.append(p)
        p = os.path.join(out_dir, "barrier_curves.png")
        plot_barrier_curves(st, data, marms, p)
        files.append(p)
    return files


# ---------------------------------------------------------------------------------------------------

_SECTIONS = [
    ("primary", "Primary endpoint (pre-registered): OOD loss at exactly matched ID loss, paired by seed"),
    ("lr_sweep", "The reference's learning rate (pre-registered sweep on separate seeds)"),
    ("same_tokens", "Same tokens: final losses, gradient cosine, sharpness (Δ = paired by seed)"),
    ("contrasts", "Nexus against its controls (same tokens, paired by seed)"),
    ("per_source_loss", "Per-source validation loss (final)"),
    ("cosines", "Pairwise gradient cosine between sources (final probe)"),
    ("sharpness", "Critical sharpness, log10 λ_c: median of the measured values over every measurement and seed "
                  "[range of the per-seed medians]; capped searches (bounds) counted, not averaged"),
    ("match_runs", "Matched in-distribution loss: the reference continued at its final learning rate"),
    ("matched", "At the end of the continuation (the last chunk, past the matched loss: an overshoot; the primary "
                "endpoint above interpolates instead)"),
    ("downstream", "Downstream (log-likelihood ranking): accuracy and mean margin (nats)"),
    ("chance", "Chance level of each downstream task"),
    ("minima", "Closeness of per-source minima (fine-tuned from each final checkpoint)"),
    ("mechanisms", "Mechanism measures (final checkpoints; Δ paired by seed)"),
    ("interference", "Interference matrix (mean ± 95% t-interval over seeds)"),
]


def write_report(st, out_dir: str, say=print) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    data = collect(st)
    if not data:
        say(f"report: no finished runs under {st.study.out} yet")
        return {}
    tables = build_tables(st, data)
    files = write_plots(st, data, out_dir)
    lines = [f"# Study report: {st.study.out}", "",
             f"Seeds: {st.study.seeds}. Cells: mean ± half-width of the 95% t-interval over seeds; Δ columns: "
             f"per-seed differences against {_label(st, st.study.reference)} (k/n = seeds where the arm is lower).", ""]
    for key, title in _SECTIONS:
        if key in tables:
            lines += [f"## {title}", "", tables[key], ""]
    lines += ["## Plots", ""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in files]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    summary = {arm: {seed: {"final": d["summary"].get("final", {}), "sharpness": d["sharpness"],
                            "sharpness_log10_median": _sharpness_summary(d),
                            "downstream": d["analysis"].get("downstream"),
                            "minima": {k: v for k, v in (d["analysis"].get("minima") or {}).items()
                                       if k not in ("pairs",)} or None,
                            "match": d["match"], "mechanisms": d.get("mechanisms")}
                     for seed, d in seeds.items()} for arm, seeds in data.items()}
    prim = primary_endpoint(st, data)
    if prim:
        summary["_primary_endpoint"] = prim
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    say(f"report: {os.path.join(out_dir, 'results.md')} and {len(files)} plots")
    print(text)
    return tables
