"""The plain engine's gradients live in the flat buffer (issue 18 item 3): ``p.grad`` are views into
``Nexus.flat_grad`` (backward accumulates there, no copy per micro-step), they survive micro-steps and
outer steps, and anything that replaces them (torch's ``zero_grad(set_to_none=True)`` default, an
assignment) gives bitwise the same training as leaving them alone. Single process, ~2 s."""
import pytest
import torch

from nexus_megatron.engines.plain import OverlappedNexus
from nexus_megatron.layout import LayoutConfig, build_layout
from nexus_megatron.nexus import Nexus, NexusConfig

K_MICRO = 3


class Net(torch.nn.Module):
    """Two sources on a small MLP; ``unused`` never takes part in the loss (its gradient stays None/zero)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))
        self.unused = torch.nn.Parameter(torch.randn(3))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(2, 16, 5, generator=g)
        self.y = torch.randn(2, 16, 2, generator=g)

    def loss(self, i):
        return ((self.net(self.x[i]) - self.y[i]) ** 2).mean()


def _build(overlap=False, gamma_mode="update", lr=1e-2):
    model = Net()
    outer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    layout = build_layout(LayoutConfig(mode="sequential", sources=("a", "b"), seed=3))
    cfg = NexusConfig(gamma=0.5, gamma_mode=gamma_mode)
    if overlap:
        opt = OverlappedNexus(model.parameters(), outer, layout, cfg, micro_steps=K_MICRO, bucket_size=40)
    else:
        opt = Nexus(model.parameters(), outer, layout, cfg, micro_steps=K_MICRO)
    return model, opt


def _is_view(p, opt):
    lo, hi = opt.flat_grad.data_ptr(), opt.flat_grad.data_ptr() + 4 * opt.flat_grad.numel()
    return p.grad is not None and lo <= p.grad.data_ptr() < hi


def _train(model, opt, steps=3, before_backward=None):
    copies = []
    for t in range(steps):
        for m in range(K_MICRO):
            if before_backward is not None:
                before_backward(model, opt, m)
            s = opt.layout.source_for(t, m)
            if hasattr(opt, "before_backward"):
                opt.before_backward()
            model.loss(s).backward()
            opt.inner_step(s)
            copies.append(opt.grad_copies)
            assert all(_is_view(p, opt) for p in opt.params)          # views (re-)attached
            assert torch.count_nonzero(opt.flat_grad) == 0               # and zero for the next backward
        opt.step()
        assert all(_is_view(p, opt) for p in opt.params) and torch.count_nonzero(opt.flat_grad) == 0
    return [p.detach().clone() for p in model.parameters()], copies


def test_backward_accumulates_into_the_flat_buffer():
    model, opt = _build()
    assert all(_is_view(p, opt) for p in opt.params)
    s = opt.layout.source_for(0, 0)
    model.loss(s).backward()
    ps = list(model.parameters())
    want = torch.autograd.grad(model.loss(s), ps, allow_unused=True)
    want = torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(want, ps)])
    assert torch.equal(opt.flat_grad, want)          # backward wrote it there (the unused parameter: zeros)
    _, copies = _train(model, opt)
    assert copies[0] == 0 and set(copies) == {0}                       # never a copy on the usual path


@pytest.mark.parametrize("overlap", [False, True])
def test_replaced_gradients_train_bitwise_the_same(overlap):
    ref, copies = _train(*_build(overlap))
    assert set(copies) == {0}

    def torch_default(model, opt, m):   # model.zero_grad(): set_to_none=True
        model.zero_grad()

    def outer_zero_grad(model, opt, m):
        opt.outer.zero_grad()

    def nexus_zero_grad(model, opt, m):
        opt.zero_grad()

    for hook, copied in ((torch_default, True), (outer_zero_grad, True), (nexus_zero_grad, False)):
        got, copies = _train(*_build(overlap), before_backward=hook)
        for a, b in zip(ref, got):
            assert torch.equal(a, b), hook.__name__
        assert (max(copies) > 0) == copied, (hook.__name__, copies)

    def assign(model, opt, m):          # a gradient assigned by hand, then backward adds to it
        for p in model.parameters():
            p.grad = torch.zeros_like(p)

    got, copies = _train(*_build(overlap), before_backward=assign)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert min(copies) == len(list(_build()[0].parameters()))          # every tensor copied back


def test_lr_zero_first_step_with_views_is_exact():
    """gamma_t = 0 (lr 0): the inner steps do not move and G = (1/k) sum_m d_m, with the views in place."""
    model, opt = _build(lr=0.0)
    theta = [p.detach().clone() for p in model.parameters()]
    seq = []
    for m in range(K_MICRO):
        s = opt.layout.source_for(0, m)
        seq.append(s)
        model.loss(s).backward()
        opt.inner_step(s)
    for a, p in zip(theta, model.parameters()):
        assert torch.equal(a, p.detach())
    want = []
    for s in seq:
        gs = torch.autograd.grad(model.loss(s), list(model.parameters()), allow_unused=True)
        g = torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1).double()
                       for t, p in zip(gs, model.parameters())])
        want.append(g / g.norm())
    G = sum(want) / K_MICRO
    assert torch.allclose(opt.d_sum.double() / K_MICRO, G, rtol=1e-5, atol=1e-7)


def test_a_gradient_present_when_the_optimizer_is_built_is_kept():
    model = Net()
    model.loss(0).backward()
    want = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in model.parameters()])
    outer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = Nexus(model.parameters(), outer, build_layout(LayoutConfig(mode="sequential", sources=("a",))),
                NexusConfig(gamma=0.5, gamma_mode="update"), micro_steps=1)
    assert torch.equal(opt.flat_grad, want) and all(_is_view(p, opt) for p in opt.params)
