"""Closeness of minima: distances, spread and the interpolation barrier on cases where they are known."""
import math

import pytest
import torch

from nexus_megatron.study.minima import (closeness_of_minima, flat_params, interpolation_barrier, pairwise_distances,
                                   set_flat_params, spread)


def test_pairwise_distances_and_relative():
    pts = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([3.0, 4.0]), "c": torch.tensor([0.0, 1.0])}
    ref = torch.tensor([0.0, 2.0])                      # ||ref|| = 2
    d = pairwise_distances(pts, ref)
    assert list(d) == ["a|b", "a|c", "b|c"]
    assert d["a|b"]["l2"] == pytest.approx(5.0) and d["a|b"]["rel"] == pytest.approx(2.5)
    assert d["a|c"]["l2"] == pytest.approx(1.0)
    assert d["b|c"]["l2"] == pytest.approx(math.sqrt(9 + 9))


def test_spread_is_mean_squared_distance_to_centroid():
    pts = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.0, -2.0])]
    assert spread(pts) == pytest.approx((1 + 1 + 4 + 4) / 4)
    assert spread([torch.ones(3)] * 3) == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_barrier_on_quadratics(sign):
    """L(theta) = sign * ||theta||^2: along the line a -> b, L(alpha) - chord = -sign * alpha (1 - alpha) ||a - b||^2.
    Concave (sign -1): barrier ||a - b||^2 / 4 at alpha = 1/2. Convex: barrier 0, midpoint excess -||a - b||^2 / 4."""
    a = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    b = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    gap = float(((a - b) ** 2).sum())

    def loss_at(alpha):
        th = (1 - alpha) * a + alpha * b
        return sign * float((th ** 2).sum())

    r = interpolation_barrier(loss_at, 11)
    assert r["alphas"][0] == 0.0 and r["alphas"][-1] == 1.0 and len(r["losses"]) == 11
    for al, ex in zip(r["alphas"], r["excess"]):
        assert ex == pytest.approx(-sign * al * (1 - al) * gap, abs=1e-9)
    if sign < 0:
        assert r["barrier"] == pytest.approx(gap / 4) and r["argmax"] == pytest.approx(0.5)
    else:
        assert r["barrier"] == pytest.approx(0.0, abs=1e-12)
        assert r["excess"][5] == pytest.approx(-gap / 4)
    with pytest.raises(ValueError):
        interpolation_barrier(loss_at, 2)


class TwoParam(torch.nn.Module):
    """A model with a tied (shared) parameter, to check each parameter counts once."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = torch.nn.Parameter(torch.tensor([0.5]))
        self.alias = self.w


def test_flat_params_roundtrip_counts_shared_once():
    m = TwoParam()
    f = flat_params(m)
    assert f.tolist() == [1.0, 2.0, 0.5]
    set_flat_params(m, torch.tensor([3.0, 4.0, 5.0]))
    assert m.w.tolist() == [3.0, 4.0] and m.alias.tolist() == [3.0, 4.0] and m.b.tolist() == [5.0]
    with pytest.raises(ValueError):
        set_flat_params(m, torch.zeros(4))


def _quad_loss(model, batch):
    """Source s pulls the 2-vector w to target[s] (batch = tensor([s]))."""
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    return ((model.w - targets[int(batch[0])]) ** 2).sum() + model.b.pow(2).sum()


def test_closeness_of_minima_end_to_end_on_a_toy():
    torch.manual_seed(0)
    m = TwoParam()
    with torch.no_grad():
        m.w.zero_()
    before = flat_params(m).clone()
    train = {f"s{i}": [torch.tensor([i])] * 200 for i in range(3)}
    val = {f"s{i}": [torch.tensor([i])] for i in range(3)}
    r = closeness_of_minima(m, train, val, _quad_loss, lr=0.05, points=5)
    assert torch.equal(flat_params(m), before)          # the pretrained model is untouched
    # each fine-tune converges to its own target (b -> 0): distances between targets
    assert r["pairs"]["s0|s1"]["l2"] == pytest.approx(math.sqrt(2), abs=0.05)
    assert r["pairs"]["s0|s2"]["l2"] == pytest.approx(2.0, abs=0.05)
    assert r["mean_moved"] == pytest.approx(math.sqrt(1 + 0.25), abs=0.05)
    # mixture loss is a convex quadratic in w: no barrier, the path dips below the chord
    assert r["mean_barrier"] == pytest.approx(0.0, abs=1e-6) and r["mean_mid_excess"] < 0
    assert set(r["own_source_val_loss"]) == {"s0", "s1", "s2"} and r["own_source_val_loss"]["s0"] < 0.01
    assert len(r["alphas"]) == 5 and r["spread"] > 0
