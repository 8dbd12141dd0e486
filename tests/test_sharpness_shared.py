"""The shared line search (one probe eta, every loss along u at once; ALGORITHMS.md §2.2, issue 18): on
quadratic oracles where lambda_c = lambda_dir, against the separate searches, and on a small LM through
SharpnessMeter (one forward per probe, per-sequence losses)."""
import math

import pytest
import torch

from nexus_megatron.sharpness import (PlainHost, SharpnessMeter, critical_step, fitted_slope, grid_steps,
                                      lm_loss_sum, shared_critical_steps, sharpness_metrics)

F64 = torch.float64


def _problem(k=6, n=24, seed=0):
    """k quadratic losses L_i = 1/2 th^T H_i th - b_i^T th sharing one direction u: the mixture's AdamW-like
    preconditioned gradient. Returns (theta, u, [(H_i, b_i)])."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(k):
        A = torch.randn(n, n, generator=g, dtype=F64)
        losses.append((A @ A.T / n + 0.05 * torch.eye(n, dtype=F64), torch.randn(n, generator=g, dtype=F64)))
    theta = torch.randn(n, generator=g, dtype=F64)
    G = sum(H @ theta - b for H, b in losses) / k
    u = G / (G.abs().sqrt() + 1e-3)
    return theta, u, losses


def _oracle(theta, u, H, b):
    """eta* = 2 g^T u / u^T H u: L(theta - eta u) > L(theta) iff eta > eta* (None: u ascends this loss)."""
    gtu, uhu = float((H @ theta - b) @ u), float(u @ H @ u)
    return 2 * gtu / uhu if gtu > 0 else None


def _loss_fn(H, b):
    return lambda th: float(0.5 * th @ H @ th - b @ th)


def _evaluator(theta, u, fns, calls):
    def losses_at(eta, keys):
        calls.append((eta, tuple(keys)))
        th = theta - eta * u
        return {k: fns[k](th) for k in keys}
    return losses_at


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [2 ** -3, 2 ** -4, 2 ** -6])
@pytest.mark.parametrize("start_factor", [1e-3, 0.7, 1.0, 40.0])
def test_shared_search_matches_the_quadratic_oracle_and_the_separate_searches(seed, eps, start_factor):
    theta, u, losses = _problem(seed=seed)
    fns = {f"L{i}": _loss_fn(H, b) for i, (H, b) in enumerate(losses)}
    oracle = {f"L{i}": _oracle(theta, u, H, b) for i, (H, b) in enumerate(losses)}
    ref = next(v for v in oracle.values() if v is not None)
    starts = {k: start_factor * (v if v is not None else ref) for k, v in oracle.items()}
    calls = []
    res, search = shared_critical_steps(_evaluator(theta, u, fns, calls), starts, eps=eps, max_doublings=30)
    assert search.passes == len(calls) and calls[0] == (0.0, tuple(fns))          # L0 of every loss in pass 1
    assert [c[0] for c in calls] == search.etas
    separate = 1
    for k, fn in fns.items():
        r, want = res[k], oracle[k]
        alone = critical_step(lambda e: fn(theta - e * u), starts[k], loss0=fn(theta), eps=eps, max_doublings=30)
        separate += alone.forward_passes
        if want is None:                      # u ascends this loss: a rise at every step down to the cap
            assert r.cap_hit and r.bound == "upper" and alone.cap_hit and alone.bound == "upper"
            assert r.eta_c == pytest.approx(alone.eta_c, rel=eps)
            continue
        fp = 1e-9 * want
        assert not r.cap_hit and r.bound is None
        assert r.eta_lo - fp <= want <= r.eta_hi + fp and (r.eta_hi - r.eta_lo) <= eps * r.eta_lo * (1 + 1e-12)
        assert abs(r.eta_c - want) <= eps / 2 * want + fp                        # the tolerance of today's search
        assert abs(r.eta_c - alone.eta_c) <= eps * min(r.eta_c, alone.eta_c) * (1 + 1e-9) + 2 * fp
        assert r.lambda_c == pytest.approx(2 / r.eta_c)
        # every probe the loss saw is in its trace, with its value
        assert r.trace[0] == (0.0, fn(theta)) and r.forward_passes == len(r.trace)
    assert search.passes < separate


def test_grid_cells_are_within_eps():
    for eps in (0.5, 2 ** -2, 2 ** -4, 2 ** -6, 0.01, 0.99):
        m = grid_steps(eps)
        assert 2 ** (1 / m) - 1 <= eps * (1 + 1e-12) and (m == 1 or 2 ** (1 / (m - 1)) - 1 > eps)
    assert grid_steps(2 ** -4) == 12


def test_warm_started_quadratics_need_few_passes():
    """Warm starts within 30% of every crossing: on a quadratic the crossing predicted from two probes is exact,
    so after the first probes each loss needs only its two bracket ends (shared between neighbours)."""
    counts = []
    for seed in range(6):
        theta, u, losses = _problem(seed=seed)
        fns = {f"L{i}": _loss_fn(H, b) for i, (H, b) in enumerate(losses)}
        oracle = {k: _oracle(theta, u, H, b) for k, (H, b) in zip(fns, losses)}
        keep = {k: v for k, v in oracle.items() if v is not None}
        g = torch.Generator().manual_seed(100 + seed)
        starts = {k: v * float(0.7 + 0.6 * torch.rand(1, generator=g)) for k, v in keep.items()}
        res, search = shared_critical_steps(_evaluator(theta, u, fns, []), starts)
        ends = {x for r in res.values() for x in (r.eta_lo, r.eta_hi)}
        separate = 1 + sum(critical_step(lambda e, f=fns[k]: f(theta - e * u), s, loss0=fns[k](theta)).forward_passes - 0
                           for k, s in starts.items())
        counts.append((len(keep), search.passes, 1 + len(ends), separate))
        assert search.passes <= 1 + len(ends) + 3, counts[-1]      # L0 + the bracket ends + a few first probes
        assert search.passes <= separate / 2, counts[-1]
    print(counts)


@pytest.mark.parametrize("cliff", [0.3, 1.0])
def test_a_prediction_that_keeps_missing_is_bisected(cliff, monkeypatch):
    """A loss that falls slowly, then jumps and keeps rising steeply (a cliff at eta = cliff): the parabola
    through the bracket ends and the probe nearest them predicts the crossing just above lo every time, so a
    search that only followed its predictions would gain one grid cell per probe (regula falsi's stall). After
    MISSES_BEFORE_BISECT such probes the bracket is bisected: at most MISSES_BEFORE_BISECT + 1 probes per
    halving of a bracket of at most 4 m cells."""
    import nexus_megatron.sharpness as sharpness

    def search():
        return shared_critical_steps(lambda eta, keys: {k: -1e-3 * eta if eta < cliff else 10.0 + 100 * (eta - cliff)
                                                        for k in keys},
                                     {"cliff": 1e-3}, eps=eps)
    eps = 2 ** -6
    m = grid_steps(eps)
    res, shared = search()
    r = res["cliff"]
    assert not r.cap_hit and r.eta_lo < cliff <= r.eta_hi and (r.eta_hi - r.eta_lo) / r.eta_lo <= eps
    # L0 + exploring up from the start (steps of m/4 cells, doubling, at most 4 m: 7 probes to the cap) + halvings
    bound = 1 + 7 + (sharpness.MISSES_BEFORE_BISECT + 1) * math.ceil(math.log2(4 * m))
    assert shared.passes <= bound, (shared.passes, bound)
    # the safeguard is what keeps it there: following the predictions alone stalls
    monkeypatch.setattr(sharpness, "MISSES_BEFORE_BISECT", 10 ** 6)
    _, stalled = search()
    assert stalled.passes > bound, (stalled.passes, bound)


def test_caps_bounds_and_non_finite_losses():
    # one loss falls forever (cap up: a lower bound on eta_c), one rises at every step (cap down: an upper
    # bound), one is NaN beyond eta = 3 and crosses at 2, one has a NaN L0
    fns = {"falls": lambda e: -e, "ascent": lambda e: e, "nan_far": lambda e: math.nan if e > 3 else (e - 1) ** 2 - 1,
           "bad": lambda e: math.nan}
    res, search = shared_critical_steps(lambda eta, keys: {k: fns[k](eta) for k in keys},
                                        {k: 0.5 for k in fns}, eps=2 ** -10, max_doublings=5)
    assert res["falls"].cap_hit and res["falls"].bound == "lower" and res["falls"].eta_hi == math.inf
    assert res["falls"].eta_c == pytest.approx(0.5 * 32, rel=2 ** -10)
    assert res["ascent"].cap_hit and res["ascent"].bound == "upper" and res["ascent"].eta_c == pytest.approx(0.5 / 32)
    assert not res["nan_far"].cap_hit and res["nan_far"].eta_c == pytest.approx(2.0, rel=2 ** -10)
    assert math.isnan(res["bad"].eta_c) and not res["bad"].cap_hit and res["bad"].forward_passes == 1
    # the cap of the ascent: checked directly once two probes predict an ascent, not halving 5 times
    alone = critical_step(lambda e: e, 0.5, loss0=0.0, max_doublings=5)
    assert res["ascent"].forward_passes < alone.forward_passes + 1
    with pytest.raises(ValueError):
        shared_critical_steps(lambda eta, keys: {}, {"a": 0.0})


def test_metrics_report_bounds_apart_from_measurements():
    res, search = shared_critical_steps(lambda eta, keys: {k: {"mixture": (eta - 1) ** 2 - 1, "web": -eta,
                                                               "ood": eta}[k] for k in keys},
                                        {"mixture": 1.0, "web": 1.0, "ood": 1.0}, max_doublings=3)
    m = sharpness_metrics(res, lr=0.1, beta1=0.9, weight_decay=0.0, cost={"passes": search.passes, "gathers": 0,
                                                                          "probe_tokens": 10})
    assert m["sharpness/lambda_c"] == pytest.approx(1.0, rel=2 ** -4) and m["sharpness/cap_hit"] == 0
    assert "sharpness/lambda_c/web" not in m and "sharpness/lambda_c/ood" not in m
    assert m["sharpness/lambda_c_at_most/web"] == pytest.approx(2 / 8)          # never rose up to eta = 8
    assert m["sharpness/lambda_c_at_least/ood"] == pytest.approx(2 / (1 / 8))   # rose at every eta down to 1/8
    assert m["sharpness/cap_hits"] == 2 and m["sharpness/relative_cap_hits"] == 2
    assert m["sharpness/forward_passes"] == search.passes and m["sharpness/probe_tokens"] == 10


# ---------------------------------------------------------------------------------------------------
# a small LM: the shared search through SharpnessMeter against the separate searches

def test_small_lm_shared_search_equals_separate_searches(synthetic_data):
    from tests.test_sharpness import _probe_setup
    torch.set_num_threads(1)
    model, params, probe, u = _probe_setup(synthetic_data, 0, 1)
    theta = [p.detach().clone() for p in params]
    host = PlainHost(params)
    eps = 2 ** -4
    meter = SharpnessMeter(model, probe, host, eps=eps)
    res = meter.measure(u, eta0=1e-2)
    assert all(torch.equal(p, t) for p, t in zip(params, theta))              # restored bitwise
    cost = meter.last_cost
    assert cost["passes"] == cost["forward_calls"] and cost["gathers"] == 0    # one forward per probe eta
    per_pass = sum(b.shape[0] * (b.shape[1] - 1) for bs in probe.batches.values() for b in bs)
    assert per_pass < cost["probe_tokens"] <= per_pass * cost["passes"]

    # the separate searches (today's algorithm), one forward per batch
    def loss_of(names):
        s = c = 0.0
        for n in names:
            for b in probe.batches[n]:
                a, k = lm_loss_sum(model, b)
                s, c = s + a, c + k
        return s / c

    groups = {"mixture": None, **{n: [n] for n in probe.sources}, "ood": list(probe.ood)}
    total = 1
    with torch.no_grad():
        model.eval()
        host.begin(u)
        try:
            def value(key):
                if key == "mixture":
                    return sum(w * loss_of([n]) for n, w in probe.mixture.items())
                return sum(loss_of([n]) for n in groups[key]) / len(groups[key])
            host.move(0.0)
            base = {k: value(k) for k in groups}
            for key in groups:
                def at(eta, key=key):
                    host.move(eta)
                    return value(key)
                alone = critical_step(at, 1e-2, loss0=base[key], eps=eps)
                total += alone.forward_passes
                got = res[key]
                assert got.cap_hit == alone.cap_hit, key
                if got.cap_hit:
                    assert got.bound == alone.bound
                else:
                    assert abs(got.eta_c - alone.eta_c) <= eps * min(got.eta_c, alone.eta_c) * 1.001, \
                        (key, got.eta_c, alone.eta_c)
                    assert (got.eta_hi - got.eta_lo) <= eps * got.eta_lo * (1 + 1e-12)
        finally:
            host.end()
    assert cost["passes"] < total, (cost["passes"], total)


def test_study_sharpness_table_uses_medians_of_measured_values_and_cap_counts():
    """The study report: a capped search is counted, never averaged with measurements (issue 18)."""
    from types import SimpleNamespace

    from nexus_megatron.study_report import _sharpness_summary, sharpness_table

    def run(values):     # one run's measurements: (mixture lambda_c, ood lambda_c or ("at_most"/"at_least", bound))
        rows = []
        for mix, ood in values:
            r = {"sharpness/forward_passes": 9, "sharpness/lambda_c": mix, "sharpness/threshold": 1000.0}
            if isinstance(ood, tuple):
                r[f"sharpness/lambda_c_{ood[0]}/ood"] = ood[1]
            else:
                r["sharpness/lambda_c/ood"] = ood
            rows.append(r)
        return {"sharpness_all": rows, "sharpness": rows[-1]}

    data = {"adamw": {0: run([(100.0, 10.0), (1000.0, ("at_least", 1e9))]),
                      1: run([(10.0, 100.0), (100.0, ("at_most", 1e-3))])}}
    st = SimpleNamespace(arms={})
    table = sharpness_table(st, data, ["adamw"], ["mixture", "ood"])
    row = table.splitlines()[2].split(" | ")
    # mixture: log10 of 100, 1000, 10, 100 -> median 2.00; per-seed medians 2.5 and 1.5
    assert row[2] == "2.00 [1.50, 2.50]; 0/4 capped"
    # ood: measured 10 and 100 only (the bounds 1e9 and 1e-3 would drag any mean), 2 of 4 capped
    assert row[3] == "1.50 [1.00, 2.00]; 2/4 capped"
    s = _sharpness_summary(data["adamw"][0])
    assert s["ood"] == {"median_log10": 1.0, "measured": 1, "capped": 1}


def test_passes_script_reports_counts_above_the_lower_bound():
    """launch/sharpness_passes.py (the docs' "What it costs" table) runs through the real trainer; every
    measurement's passes are at least the lower bound of any bracketing search for its brackets."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, os.path.join(root, "launch", "sharpness_passes.py"), "--steps", "4",
                          "--optim", "nexus"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["optim"] == "nexus" and rows[0]["measurements"] == 3
    for passes, bound in zip(rows[0]["passes"], rows[0]["lower_bounds"]):
        assert bound <= passes <= 30, rows[0]
    assert rows[0]["start_error_doublings"]["median"] >= 0


def test_passes_script_reads_a_runs_metrics(tmp_path):
    """``--metrics``: the same figures from a run's metrics.jsonl (e.g. configs/tiny.yaml trained with
    sharpness.every=1); how far each warm start was off is |log2| of consecutive eta_c = 2 / lambda_c."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    recs = [{"step": 1, "sharpness/forward_passes": 20, "sharpness/probe_tokens": 64,
             "sharpness/lambda_c": 2.0, "sharpness/lambda_c/a": 1.0},
            {"step": 2, "loss": 1.0},                                         # no measurement: skipped
            {"step": 3, "sharpness/forward_passes": 9, "sharpness/probe_tokens": 64,
             "sharpness/lambda_c": 1.0, "sharpness/lambda_c/a": 4.0},         # eta_c x2 and /4
            {"step": 4, "sharpness/forward_passes": 7, "sharpness/probe_tokens": 64,
             "sharpness/lambda_c": 1.0, "sharpness/lambda_c_at_most/a": 1e-3}]  # a capped: a bound, no error
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = subprocess.run([sys.executable, os.path.join(root, "launch", "sharpness_passes.py"), "--metrics", str(path)],
                         cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["measurements"] == 2 and row["passes"] == [9, 7]             # the first (cold) one left out
    # errors: mixture 1 (2 -> 1) and 0 (1 -> 1); a: 2 (1 -> 4)
    assert row["start_error_doublings"] == {"median": 1.0, "p90": 1.0, "share_over_1": round(1 / 3, 2)}
    # lower bounds: 1 + two bracket ends (+ 1 for the capped loss in the last)
    assert row["lower_bounds"] == [1 + 4, 1 + 2 + 1]


def _slope(theta, u, H, b):
    """d/d eta of L(theta - eta u) at 0: -g^T u."""
    return -float((H @ theta - b) @ u)


def test_fitted_slope_is_the_slope_along_u():
    """The prior the next measurement starts from: on a quadratic the parabola through L0 and the two bracket
    ends is the loss itself, so its slope at 0 is -g^T u; none for a capped search."""
    theta, u, losses = _problem(seed=3)
    fns = {f"L{i}": _loss_fn(H, b) for i, (H, b) in enumerate(losses)}
    res, _ = shared_critical_steps(_evaluator(theta, u, fns, []), {k: 1e-2 for k in fns}, max_doublings=30)
    for (k, r), (H, b) in zip(res.items(), losses):
        if _oracle(theta, u, H, b) is None:
            assert r.cap_hit and fitted_slope(r) is None
        else:
            assert fitted_slope(r) == pytest.approx(_slope(theta, u, H, b), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("off", [1 / 6, 5.0])
def test_a_slope_prior_predicts_the_crossing_from_one_probe(seed, off):
    """With the previous slope along u as a prior, the crossing of a parabola is predicted from L0 and one probe:
    one loss alone takes L0, its start and its two bracket ends (4 passes) from a start 2.6 doublings off, one
    more without the prior; with six losses the prior never costs passes, and the brackets are the same cells."""
    theta, u, losses = _problem(seed=seed)
    fns = {f"L{i}": _loss_fn(H, b) for i, (H, b) in enumerate(losses)}
    oracle = {k: _oracle(theta, u, H, b) for k, (H, b) in zip(fns, losses)}
    keep = [k for k, v in oracle.items() if v is not None]
    slopes = {k: _slope(theta, u, H, b) for k, (H, b) in zip(fns, losses) if k in keep}
    k0 = keep[0]
    one = {k0: fns[k0]}
    with_prior, s1 = shared_critical_steps(_evaluator(theta, u, one, []), {k0: off * oracle[k0]}, slopes=slopes)
    without, s0 = shared_critical_steps(_evaluator(theta, u, one, []), {k0: off * oracle[k0]})
    assert s1.passes == 4 and s0.passes >= 5, (s1.passes, s0.passes)
    assert (with_prior[k0].eta_lo, with_prior[k0].eta_hi) == (without[k0].eta_lo, without[k0].eta_hi)
    starts = {k: off * oracle[k] for k in keep}
    all_prior, a1 = shared_critical_steps(_evaluator(theta, u, fns, []), starts, slopes=slopes)
    all_without, a0 = shared_critical_steps(_evaluator(theta, u, fns, []), starts)
    assert a1.passes <= a0.passes, (a1.passes, a0.passes)
    for k in keep:
        assert (all_prior[k].eta_lo, all_prior[k].eta_hi) == (all_without[k].eta_lo, all_without[k].eta_hi)
        assert all_prior[k].eta_lo <= oracle[k] <= all_prior[k].eta_hi


def test_the_first_probe_is_the_median_warm_start():
    """Every loss is unbracketed before the first probe, so it informs all of them: it goes to the (lower)
    median of the warm starts, not to one extreme."""
    calls = []
    starts = {"a": 0.01, "b": 0.02, "c": 0.04, "d": 0.08, "e": 0.32}
    shared_critical_steps(lambda eta, keys: (calls.append(eta), {k: (eta - 1.5 * starts[k]) * eta for k in keys})[1],
                          starts, anchor=0.01)
    assert calls[0] == 0.0 and calls[1] == pytest.approx(0.04)


def test_a_far_loss_probes_its_warm_start_before_extrapolating(monkeypatch):
    """Five losses cross near eta = 0.01 and one (like the step-batch mixture of configs/tiny.yaml) near 0.14,
    every warm start within 5%: the first probes serve the cluster; the far loss then probes its own warm start
    instead of extrapolating a crossing from probes 4 doublings away (which creeps up on a loss that is not a
    parabola), and is done with its two bracket ends."""
    import nexus_megatron.sharpness as sharpness
    cluster = {"a": 0.010, "b": 0.0105, "c": 0.011, "d": 0.0115, "e": 0.012}
    crossing = (math.sqrt(1 + 32 * 0.3) - 1) / 16           # of eta (eta - 0.3) + 8 eta^3

    def losses_at(eta, keys):
        return {k: 5.0 + (eta * (eta - 0.3) + 8 * eta ** 3 if k == "far" else eta * (eta - cluster[k]) * (1 + 50 * eta))
                for k in keys}
    starts = {**{k: 1.03 * v for k, v in cluster.items()}, "far": 1.05 * crossing}

    def far_probes():
        res, search = shared_critical_steps(losses_at, starts)
        r = res["far"]
        assert not r.cap_hit and r.eta_lo <= crossing <= r.eta_hi
        return sum(eta > 0.05 for eta, _ in r.trace), search.passes
    assert far_probes() == (2, 9)
    monkeypatch.setattr(sharpness._LossSearch, "_near_start", lambda self: True)   # extrapolate at once
    probes, passes = far_probes()
    assert probes >= 4 and passes >= 11
