"""Nexus's update rule on problems with known derivatives, the gamma -> 0 / k = 1 limits, and the
degenerate cases of ALGORITHMS.md §1.4 (single process)."""
import math

import pytest
import torch

from nexus_megatron.errors import NexusConfigError, NexusNonFiniteError
from nexus_megatron.layout import LayoutConfig, build_layout
from nexus_megatron.nexus import Nexus, NexusConfig, combine_normalized, pseudo_gradient


class Quadratics(torch.nn.Module):
    """K quadratic losses L_i(theta) = 1/2 (theta - a_i)^T H_i (theta - a_i) over one parameter vector."""

    def __init__(self, K=3, dim=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(0.3 * torch.randn(dim, generator=g))
        Ms = torch.randn(K, dim, dim, generator=g)
        self.H = (Ms @ Ms.transpose(1, 2) / dim + 0.2 * torch.eye(dim)).double()
        self.a = torch.randn(K, dim, generator=g).double()

    def loss(self, i):
        d = self.theta.double() - self.a[i]
        return 0.5 * d @ self.H[i] @ d

    def grad(self, i, theta):
        return self.H[i] @ (theta - self.a[i])


def nexus_for(model, sources, gamma, k, outer=None, mode="absolute", **cfg):
    layout = build_layout(LayoutConfig(mode="sequential", sources=tuple(sources)))
    outer = outer or torch.optim.SGD(model.parameters(), lr=0.1)
    return Nexus(model.parameters(), outer, layout, NexusConfig(gamma=gamma, gamma_mode=mode, **cfg), micro_steps=k)


def run_inner(model, opt, k, step=0):
    seq = []
    for m in range(k):
        s = opt.layout.source_for(step, m)
        seq.append(s)
        model.loss(s).backward()
        opt.inner_step(s)
    return seq


def test_displacement_matches_second_order_prediction():
    """Delta = -gamma sum_m n_m + gamma^2 sum_m J_{s_m} sum_{l<m} n_l + O(gamma^3), with n_i the
    normalized gradient at theta_0 and J_i = (I - n_i n_i^T) H_i / ||g_i|| (§1.1)."""
    names = ("a", "b", "c")
    for gamma in (2e-2, 1e-2):
        model = Quadratics()
        theta0 = model.theta.detach().double().clone()
        opt = nexus_for(model, names, gamma, k=6)
        seq = run_inner(model, opt, 6)
        assert len(set(seq)) > 1, "the draw should mix sources"
        delta = opt.delta.double()
        n = {}
        J = {}
        for i in set(seq):
            g = model.grad(i, theta0)
            n[i] = g / g.norm()
            J[i] = (torch.eye(6, dtype=torch.float64) - torch.outer(n[i], n[i])) @ model.H[i] / g.norm()
        first = -gamma * sum(n[s] for s in seq)
        second = gamma ** 2 * sum(J[seq[m]] @ sum((n[seq[l]] for l in range(m)), torch.zeros(6, dtype=torch.float64))
                                  for m in range(len(seq)))
        resid = (delta - first - second).norm()
        assert (delta - first).norm() > 0.5 * second.norm()      # the second-order term is really there
        assert resid < 0.1 * second.norm(), (gamma, float(resid), float(second.norm()))


def test_gamma_to_zero_and_k1_give_adamw_on_normalized_gradients():
    """k = 1: G = g/||g|| exactly, so Nexus+AdamW == AdamW fed the normalized gradient."""
    a, b = Quadratics(), Quadratics()
    opt = nexus_for(a, ["x"], 0.5, k=1, outer=torch.optim.AdamW(a.parameters(), lr=0.05))
    ref = torch.optim.AdamW(b.parameters(), lr=0.05)
    for t in range(5):
        run_inner(a, opt, 1, step=t)
        opt.step()
        ref.zero_grad()
        b.loss(0).backward()
        b.theta.grad /= b.theta.grad.norm()
        ref.step()
        assert torch.allclose(a.theta, b.theta, rtol=1e-6, atol=1e-7)
    # gamma -> 0 with k micro-steps: G -> the mean of the normalized gradients at theta_0
    m = Quadratics()
    opt = nexus_for(m, ("a", "b", "c"), 1e-7, k=4)
    seq = run_inner(m, opt, 4)
    G = pseudo_gradient(opt.delta.double(), 4, 1e-7)
    th = m.theta.detach().double()
    want = sum(m.grad(s, th) / m.grad(s, th).norm() for s in seq) / 4
    assert torch.allclose(G, want, atol=1e-4)


class TwoTaskNet(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        g = torch.Generator().manual_seed(100 + seed)
        self.x = torch.randn(2, 32, 4, generator=g)
        w = torch.randn(2, 4, 1, generator=g)
        self.y = torch.tanh(self.x @ w)

    def loss(self, i):
        return ((self.net(self.x[i]) - self.y[i]) ** 2).mean()

    def cosine(self):
        gs = []
        for i in range(2):
            g = torch.autograd.grad(self.loss(i), list(self.parameters()))
            gs.append(torch.cat([t.reshape(-1) for t in g]))
        return float(torch.nn.functional.cosine_similarity(gs[0], gs[1], dim=0))


def _train_two_task(gamma, seed, steps=60):
    model = TwoTaskNet(seed)
    outer = torch.optim.SGD(model.parameters(), lr=0.05)
    layout = build_layout(LayoutConfig(mode="sequential", sources=("p", "q"), seed=seed))
    opt = Nexus(model.parameters(), outer, layout, NexusConfig(gamma=gamma, gamma_mode="absolute"), micro_steps=4)
    for t in range(steps):
        for m in range(4):
            s = layout.source_for(t, m)
            model.loss(s).backward()
            opt.inner_step(s)
        opt.step()
    return model.cosine()


def test_nexus_raises_gradient_cosine_over_gamma_to_zero_control():
    seeds = range(6)
    nexus = [_train_two_task(0.3, s) for s in seeds]
    control = [_train_two_task(1e-6, s) for s in seeds]
    gains = [a - b for a, b in zip(nexus, control)]
    assert sum(gains) / len(gains) > 0.02, gains
    assert sum(g > 0 for g in gains) >= 5, gains


# ------------------------------------------------------------------------------------------- §1.4

def test_vanishing_source_is_dropped_and_weights_renormalized():
    grads = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-12, 0.0]])
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    d, norms, active = combine_normalized(grads, w, min_grad_norm=1e-8)
    assert active.tolist() == [True, False, False]
    assert torch.allclose(d, torch.tensor([0.6, 0.8]))            # only source 0, weight renormalized to 1
    assert torch.isfinite(d).all()


def test_vanishing_source_counted_in_nexus():
    model = Quadratics()
    opt = nexus_for(model, ("a",), 0.1, k=2)
    model.loss(0).backward()
    opt.inner_step(0)
    model.theta.grad = torch.zeros_like(model.theta)               # a source whose gradient vanished
    before = opt.delta.clone()
    opt.inner_step(0)
    assert opt.stats.skipped_sources == 1
    assert torch.equal(opt.delta, before)                            # that micro-step moved nothing
    info = opt.step()
    assert not info["skipped"] and math.isfinite(info["pseudo_grad_norm"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_the_whole_outer_step(bad):
    model = Quadratics()
    outer = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt = nexus_for(model, ("a", "b", "c"), 0.1, k=3, outer=outer)
    run_inner(model, opt, 3, step=0)
    opt.step()                                                      # one good step: AdamW has state
    theta = model.theta.detach().clone()
    state = {k: v.clone() for k, v in outer.state[model.theta].items()}
    anchor = opt.anchor.clone()
    s = opt.layout.source_for(1, 0)
    model.loss(s).backward()
    model.theta.grad[2] = bad
    opt.inner_step(s)
    assert opt.poisoned
    for m in (1, 2):
        s = opt.layout.source_for(1, m)
        model.loss(s).backward()
        opt.inner_step(s)
    info = opt.step()
    assert info["skipped"] and opt.stats.skipped_steps == 1
    assert torch.equal(model.theta.detach(), theta) and torch.equal(opt.anchor, anchor)
    for k, v in outer.state[model.theta].items():
        assert torch.equal(v, state[k]), k                           # outer state untouched, step count too
    assert torch.count_nonzero(opt.delta) == 0 and not opt.poisoned
    run_inner(model, opt, 3, step=2)                                 # training continues
    assert not opt.step()["skipped"] and opt.stats.consecutive_skips == 0


def test_consecutive_nonfinite_steps_abort_with_message():
    model = Quadratics()
    opt = nexus_for(model, ("a",), 0.1, k=1, max_consecutive_skips=3)
    for t in range(3):
        model.theta.grad = torch.full_like(model.theta, float("nan"))
        opt.inner_step(0)
        if t < 2:
            assert opt.step()["skipped"]
        else:
            with pytest.raises(NexusNonFiniteError, match="max_consecutive_skips=3"):
                opt.step()


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=-1.0), "nexus.gamma"), (dict(gamma=0.0), "nexus.gamma"), (dict(gamma=float("nan")), "nexus.gamma"),
    (dict(gamma_mode="fixed"), "nexus.gamma_mode"), (dict(min_grad_norm=-1.0), "nexus.min_grad_norm"),
    (dict(max_consecutive_skips=-2), "max_consecutive_skips"),
])
def test_bad_nexus_settings(kwargs, match):
    with pytest.raises(NexusConfigError, match=match):
        NexusConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="parallel", sources=("a",)), "nexus.layout"),
    (dict(sources=()), "data.sources is empty"),
    (dict(sources=("a", "a")), "more than once"),
    (dict(sources=("a", "b"), weights=(1.0,)), "one weight per source"),
    (dict(sources=("a", "b"), weights=(1.0, 0.0)), "weight 0"),
    (dict(sources=("a", "b"), weights=(1.0, -2.0)), "finite and > 0"),
])
def test_bad_layout_settings(kwargs, match):
    with pytest.raises(NexusConfigError, match=match):
        LayoutConfig(**kwargs)


def test_source_parallel_needs_a_group_per_source():
    with pytest.raises(NexusConfigError, match="more than .*|only 1 data-parallel"):
        build_layout(LayoutConfig(mode="source-parallel", sources=("a", "b")))


def test_plain_adapter_rejects_misuse():
    model = Quadratics()
    with pytest.raises(NexusConfigError, match="fp32"):
        m2 = torch.nn.Linear(2, 2).to(torch.bfloat16)
        Nexus(m2.parameters(), torch.optim.AdamW(m2.parameters()), build_layout(LayoutConfig(sources=("a",))), micro_steps=1)
    with pytest.raises(NexusConfigError, match="exactly the parameters"):
        Nexus(model.parameters(), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()),
              build_layout(LayoutConfig(sources=("a",))), micro_steps=1)
    opt = nexus_for(model, ("a",), 0.1, k=2)
    model.loss(0).backward()
    opt.inner_step(0)
    with pytest.raises(RuntimeError, match="micro_steps=2"):
        opt.step()


def test_sequential_draw_follows_weights_and_is_shared():
    layout = build_layout(LayoutConfig(mode="sequential", sources=("a", "b", "c"), weights=(0.6, 0.3, 0.1), seed=3))
    draws = [layout.source_for(t, m) for t in range(2000) for m in range(4)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert abs(freq[0] - 0.6) < 0.03 and abs(freq[1] - 0.3) < 0.03 and abs(freq[2] - 0.1) < 0.03
    again = build_layout(LayoutConfig(mode="sequential", sources=("a", "b", "c"), weights=(0.6, 0.3, 0.1), seed=3))
    assert draws[:100] == [again.source_for(t, m) for t in range(25) for m in range(4)]


def test_sum_sq_is_fp64_accurate_shard_invariant_and_as_finite_as_fp64():
    from nexus_megatron.nexus import SQ_CHUNK, sum_sq
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3 * SQ_CHUNK * 37 + 123, generator=g) * torch.logspace(-3, 3, 3 * SQ_CHUNK * 37 + 123)
    exact = float((x.double() ** 2).sum())
    got = sum_sq(x)
    assert got.dtype == torch.float64
    assert abs(float(got) - exact) <= 2e-7 * exact        # fp32 chunks; one fp32 reduction is off by ~1e-4 here
    # shards cut anywhere, each told where it starts: the same chunks except the ones a cut splits
    cuts = [0, 5, SQ_CHUNK + 17, 40 * SQ_CHUNK, 40 * SQ_CHUNK + 1, x.numel()]
    pieces = [x[a:b] for a, b in zip(cuts, cuts[1:])]
    sharded = sum(float(sum_sq(p, a)) for p, a in zip(pieces, cuts))
    assert abs(sharded - exact) <= 2e-7 * exact
    assert float(sum_sq(pieces, cuts[:-1])) == pytest.approx(sharded, rel=1e-14)
    # a list of tensors, bf16 input (accumulated in fp32), empty input
    assert float(sum_sq([x[:10], x[10:]])) == pytest.approx(exact, rel=2e-7)
    assert float(sum_sq(x.bfloat16())) == pytest.approx(float((x.bfloat16().double() ** 2).sum()), rel=1e-6)
    assert float(sum_sq([])) == 0.0 and float(sum_sq(torch.zeros(0))) == 0.0
    # values whose squares overflow fp32 are finite in fp64: recomputed, not reported as Inf
    big = torch.full((2 * SQ_CHUNK,), 1e20)
    assert float(sum_sq(big)) == pytest.approx(2 * SQ_CHUNK * float(big[0]) ** 2, rel=1e-12)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[7] = bad
        assert not math.isfinite(float(sum_sq(y)))


def test_lr_zero_is_the_gamma_to_zero_limit():
    """gamma_mode=update at lr 0 (the first step of a warmup from 0): gamma_t = 0, the inner steps do not
    move, G = (1/k) sum_m d_m (every d_m at theta_0), no division by zero (ALGORITHMS.md §1.4)."""
    m = Quadratics()
    outer = torch.optim.AdamW(m.parameters(), lr=0.0, weight_decay=0.0)
    opt = nexus_for(m, ("a", "b", "c"), 0.25, k=4, outer=outer, mode="update")
    th = m.theta.detach().clone()
    seq = run_inner(m, opt, 4)
    assert opt.gamma_t == 0.0 and torch.equal(m.theta.detach(), th)        # the inner steps did not move
    info = opt.step()
    assert not info["skipped"] and torch.equal(m.theta.detach(), th)      # AdamW at lr 0: theta stays
    t64 = th.double()
    want = sum(m.grad(s, t64) / m.grad(s, t64).norm() for s in seq) / 4
    # AdamW's first moment after one step is (1 - beta1) G: the limit reached the outer optimizer
    got = outer.state[m.theta]["exp_avg"].double() / (1 - 0.9)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-8)
    assert info["pseudo_grad_norm"] == pytest.approx(float(want.norm()), rel=1e-6)


@pytest.mark.parametrize("gamma", [1e-8, 1e-6, 1e-4])
def test_pseudo_gradient_is_exact_at_small_gamma_on_large_weights(gamma):
    """Weights of size ~100 (ulp 8e-6) and tiny gamma: G is still the mean of the d_m to fp32 precision
    (recovering delta as theta - anchor would lose everything below ulp(theta))."""
    m = Quadratics()
    with torch.no_grad():
        m.theta.add_(100.0)
    opt = nexus_for(m, ("a", "b", "c"), gamma, k=4)
    th = m.theta.detach().double().clone()
    seq = run_inner(m, opt, 4)
    want = sum(m.grad(s, th) / m.grad(s, th).norm() for s in seq) / 4
    G = opt.d_sum.double() / 4
    assert torch.allclose(G, want, rtol=1e-5, atol=1e-7), float((G - want).norm() / want.norm())
