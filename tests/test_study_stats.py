"""The study's pure statistics and mechanism estimators (nexus_megatron/study/stats.py) on cases whose answer
is known: t quantiles against the printed tables, the MDE against a hand computation, interpolation exactness on
a known curve, the split-half cosine on synthetic gradients with a known true cosine, the signed barrier on a
1-D loss."""
import math

import pytest
import torch

from nexus_megatron.study.stats import (excess_over_chord, interference_matrix, minimum_detectable_effect,
                                        paired_summary, seeds_needed, select_by_mean, split_half_cosine, t_cdf,
                                        t_quantile, value_at_first_crossing)


@pytest.mark.parametrize("df,q975,q80", [(1, 12.706, 1.376), (2, 4.303, 1.061), (4, 2.776, 0.941),
                                         (9, 2.262, 0.883), (19, 2.093, 0.861), (30, 2.042, 0.854)])
def test_t_quantiles_match_the_printed_tables(df, q975, q80):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=6e-4)
    assert t_quantile(0.80, df) == pytest.approx(q80, abs=6e-4)
    assert t_cdf(0.0, df) == 0.5 and t_cdf(-t_quantile(0.9, df), df) == pytest.approx(0.1, abs=1e-9)


def test_mde_against_a_hand_value():
    # sd 0.012 over 10 seeds: (t_.975,9 + t_.80,9) * 0.012 / sqrt(10) = (2.2622 + 0.8834) * 0.012 / 3.1623
    assert minimum_detectable_effect(0.012, 10) == pytest.approx(3.1456 * 0.012 / math.sqrt(10), rel=2e-4)
    assert minimum_detectable_effect(0.012, 10) == pytest.approx(0.011937, abs=2e-6)
    # the reading: an effect of the paper's size (0.012) at that spread needs about 10 seeds
    assert seeds_needed(0.012, 0.012) == 10
    assert seeds_needed(0.012, 0.024) < 10 < seeds_needed(0.012, 0.006)
    assert math.isnan(minimum_detectable_effect(0.01, 1))


def test_paired_summary_interval_and_mde():
    d = [0.01, -0.02, 0.03, 0.0, -0.01]
    s = paired_summary(d, reference_effect=0.012)
    mean, sd = 0.002, math.sqrt(sum((x - 0.002) ** 2 for x in d) / 4)
    assert s["n"] == 5 and s["mean"] == pytest.approx(mean) and s["sd"] == pytest.approx(sd)
    assert s["half_width"] == pytest.approx(2.7764 * sd / math.sqrt(5), rel=1e-4)
    assert s["lo"] < 0 < s["hi"] and s["lower"] == 2
    assert s["mde"] == pytest.approx((2.7764 + 0.9410) * sd / math.sqrt(5), rel=1e-3)
    assert s["seeds_for_reference_effect"] == seeds_needed(sd, 0.012)
    assert math.isnan(paired_summary([0.1])["half_width"]) and paired_summary([])["n"] == 0


def test_interpolation_is_exact_on_a_known_curve():
    # ID loss falls linearly in the step, OOD = 2 * ID + 1 (a known ID -> OOD curve): the value at any target
    # between two evaluations is exact, and the crossing step too
    curve = [(s, 5.0 - 0.01 * s, 2 * (5.0 - 0.01 * s) + 1) for s in range(0, 101, 4)]
    for target in (4.777, 4.5, 4.1234):
        r = value_at_first_crossing(curve, target)
        assert r["value"] == pytest.approx(2 * target + 1, abs=1e-12)
        assert r["step"] == pytest.approx((5.0 - target) / 0.01, abs=1e-9)
    # a target on an evaluation point is that point; a target not reached is None (never a value)
    assert value_at_first_crossing(curve, 4.8)["value"] == pytest.approx(10.6)
    assert value_at_first_crossing(curve, 3.0) is None
    assert value_at_first_crossing(curve, 9.0)["f"] == 0.0
    # the FIRST crossing counts, also when the noisy curve comes back above the target later
    noisy = [(0, 5.0, 0.0), (2, 4.0, 1.0), (4, 4.6, 9.0), (6, 3.9, 9.0)]
    assert value_at_first_crossing(noisy, 4.5) == {"step": 1.0, "value": 0.5, "f": 0.5, "index": 1}


def test_lr_selection_rule():
    r = select_by_mean({1e-3: [5.0, 5.2], 3e-3: [4.9, 5.0], 1e-2: [5.5, float("nan"), 5.4]})
    assert r["selected"] == 3e-3 and not r["at_edge"] and r["means"][1e-2] == pytest.approx(5.45)
    assert select_by_mean({1e-3: [4.0], 3e-3: [4.5], 1e-2: [4.8]})["at_edge"]
    assert select_by_mean({1e-3: [4.0], 3e-3: [4.0]})["selected"] == 1e-3    # ties: the smaller lr


def _noisy_halves(cos_true, noise, dim=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, generator=g, dtype=torch.float64)
    r = torch.randn(dim, generator=g, dtype=torch.float64)
    r -= torch.dot(r, a) / torch.dot(a, a) * a
    a, r = a / a.norm(), r / r.norm()
    b = cos_true * a + math.sqrt(1 - cos_true ** 2) * r      # unit vector with cos(a, b) = cos_true
    sig = noise / math.sqrt(dim)                             # noise norm ~ noise x the signal norm per half
    halves = {n: tuple(v + sig * torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(2))
              for n, v in (("a", a), ("b", 2.0 * b))}
    return halves


@pytest.mark.parametrize("cos_true", [0.3, -0.2, 0.0])
def test_split_half_cosine_recovers_the_true_cosine_under_noise(cos_true):
    out = split_half_cosine(_noisy_halves(cos_true, noise=2.0))
    naive = out["naive"]["a|b"]
    assert out["corrected"]["a|b"] == pytest.approx(cos_true, abs=0.03)
    if cos_true:
        # the naive cosine of the noisy means is shrunk toward 0 by the noise: here to about 1/3
        assert abs(naive) < 0.6 * abs(cos_true)
    assert 0.1 < out["reliability"]["a"] < 0.3       # 1 / (1 + 4) for noise 2x the signal per half
    # no noise: the correction is the identity (every estimate is the true gradient)
    clean = split_half_cosine(_noisy_halves(cos_true, noise=0.0))
    assert clean["corrected"]["a|b"] == pytest.approx(cos_true, abs=1e-9)
    assert clean["naive"]["a|b"] == pytest.approx(cos_true, abs=1e-9)


def test_split_half_cosine_is_nan_when_a_source_is_below_its_noise():
    g = torch.Generator().manual_seed(3)
    pure_noise = (torch.randn(100, generator=g), -torch.randn(100, generator=g).abs())
    halves = {"a": (torch.ones(100), torch.ones(100)), "b": (pure_noise[0].abs(), pure_noise[1])}
    out = split_half_cosine(halves)
    assert math.isnan(out["corrected"]["a|b"]) and math.isnan(out["mean_corrected"])


def test_interference_matrix():
    before = {"a": 3.0, "b": 4.0, "ood": 5.0}
    after = {"a": {"a": 2.5, "b": 4.2, "ood": 5.1}, "b": {"a": 2.9, "b": 3.0, "ood": 4.9}}
    r = interference_matrix(before, after)
    assert r["matrix"]["a"]["b"] == pytest.approx(0.2) and r["matrix"]["b"]["ood"] == pytest.approx(-0.1)
    assert r["self"] == pytest.approx((-0.5 - 1.0) / 2) and r["cross"] == pytest.approx((0.2 - 0.1) / 2)


def test_barrier_is_signed_on_a_1d_loss():
    alphas = [i / 10 for i in range(11)]
    # convex path (x^2 from -1 to 1): below the chord everywhere inside, so the barrier is NEGATIVE
    convex = excess_over_chord(alphas, [(2 * a - 1) ** 2 for a in alphas])
    assert convex["barrier"] == pytest.approx(-0.36) and convex["mid"] == pytest.approx(-1.0)
    assert convex["argmax"] in (0.1, 0.9)
    # a bump between two equal minima: barrier = the height of the bump at alpha = 1/2
    bump = excess_over_chord(alphas, [1.0 + 0.5 * math.sin(math.pi * a) for a in alphas])
    assert bump["barrier"] == pytest.approx(0.5) and bump["argmax"] == 0.5
    # a tilted straight line: excess 0 everywhere (the chord itself)
    assert excess_over_chord(alphas, [2 - a for a in alphas])["barrier"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        excess_over_chord([0.0, 1.0], [1.0, 2.0])


def test_pre_registered_reading_of_the_primary_endpoint():
    from nexus_megatron.study.report import read_endpoint
    base = {"n": 10, "mde": 0.0119}
    assert read_endpoint({**base, "lo": -0.03, "hi": -0.001}).startswith("lower OOD loss")
    assert read_endpoint({**base, "lo": 0.002, "hi": 0.02}).startswith("higher OOD loss")
    assert read_endpoint({**base, "lo": -0.008, "hi": 0.006}).startswith("no difference, and the interval excludes")
    r = read_endpoint({**base, "lo": -0.042, "hi": 0.016})       # the previous study's -0.013 ± 0.029
    assert r.startswith("inconclusive at this power") and "0.0119" in r
    assert read_endpoint({"n": 1, "lo": float("nan"), "hi": float("nan")}).startswith("not enough")
