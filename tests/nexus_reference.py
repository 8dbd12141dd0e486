"""A single-process reference of Nexus (ALGORITHMS.md §1.1), written straight from the spec, and the
toy problem the distributed tests share with it. Every source gradient is computed here in one process
on exactly the micro-batches the ranks read."""

import torch

from nexus_megatron.layout import hash_seed

SOURCES = ("web", "code", "math")
IN, HID, OUT = 6, 12, 3


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, OUT))


def batch(source: int, step: int, micro: int, reader: int, n: int = 5):
    """The micro-batch that reader `reader` of `source` sees at (step, micro): sources differ in their
    targets, so their gradients point in different directions."""
    g = torch.Generator().manual_seed(hash_seed(17, source, step, micro, reader))
    x = torch.randn(n, IN, generator=g)
    w = torch.Generator().manual_seed(1000 + source)
    target_map = torch.randn(IN, OUT, generator=w)
    y = torch.sin(x @ target_map) + 0.1 * torch.randn(n, OUT, generator=g)
    return x, y


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def source_grad(model, source, step, micro, readers, batch_fn=None, loss=None):
    """Mean over the readers' micro-batches of the gradient of each reader's mean loss
    (``batch_fn``/``loss`` default to this module's toy problem)."""
    batch_fn, loss = batch_fn or batch, loss or loss_fn
    params = list(model.parameters())
    total = None
    for r in range(readers):
        x, y = batch_fn(source, step, micro, r)
        gs = torch.autograd.grad(loss(model, x, y), params)
        g = torch.cat([t.reshape(-1) for t in gs])
        total = g if total is None else total + g
    return total / readers


def set_flat(model, flat):
    off = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[off:off + n].view_as(p))
            off += n


def reference_run(mode, num_sources, world, steps, k, gamma, lr=1e-2, weights=None, layout_seed=0, wd=0.1):
    """Returns (list of flat params after each outer step, list of per-step source norms)."""
    from nexus_megatron.layout import LayoutConfig, SequentialLayout

    model = make_model()
    outer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    w = torch.tensor(weights or [1.0] * num_sources, dtype=torch.float64)
    w = w / w.sum()
    seq = SequentialLayout(LayoutConfig(mode="sequential", sources=SOURCES[:num_sources], weights=weights,
                                        seed=layout_seed)) if mode == "sequential" else None
    history, norms_hist = [], []
    for t in range(steps):
        theta = flat_params(model)
        delta = torch.zeros_like(theta)
        for m in range(k):
            set_flat(model, theta + delta)
            if mode == "sequential":
                present = [seq.source_for(t, m)]
                readers = world
            else:
                present = list(range(num_sources))
                readers = world // num_sources
            grads = {i: source_grad(model, i, t, m, readers) for i in present}
            norms = {i: grads[i].double().norm() for i in present}
            wsum = sum(w[i] for i in present)
            d = torch.zeros_like(theta)
            for i in present:
                d += (w[i] / wsum / norms[i]).float() * grads[i]
            delta = delta - gamma * d
            norms_hist.append({i: float(norms[i]) for i in present})
        G = -delta / (k * gamma)
        set_flat(model, theta)
        off = 0
        for p in model.parameters():
            n = p.numel()
            p.grad = G[off:off + n].view_as(p).clone()
            off += n
        outer.step()
        history.append(flat_params(model))
    return history, norms_hist
