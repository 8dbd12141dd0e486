"""Single-process Nexus reference for the DeepSpeed tests: a 4-layer MLP whose outer AdamW has two param
groups (weight decay on matrices, none on biases), so DeepSpeed's one-group-at-a-time path is exercised.
Written from ALGORITHMS.md §1.1 like tests/nexus_reference.py (whose toy problem is reused for the data)."""
import torch

from nexus_megatron.layout import LayoutConfig, SequentialLayout, hash_seed
from tests.nexus_reference import set_flat, source_grad

SOURCES = ("web", "code", "math")
IN, HID, OUT = 6, 16, 3


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(), torch.nn.Linear(HID, HID), torch.nn.Tanh(),
                               torch.nn.Linear(HID, HID), torch.nn.Tanh(), torch.nn.Linear(HID, OUT))


def param_groups(params, wd):
    params = list(params)
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def batch(source: int, step: int, micro: int, reader: int, n: int = 4):
    """Reader ``reader``'s micro-batch of ``source`` at (step, micro); sources differ in their targets."""
    g = torch.Generator().manual_seed(hash_seed(23, source, step, micro, reader))
    x = torch.randn(n, IN, generator=g)
    target_map = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(2000 + source))
    y = torch.sin(x @ target_map) + 0.1 * torch.randn(n, OUT, generator=g)
    return x, y


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def flat_params(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def _source_grad(model, source, step, micro, readers):
    return source_grad(model, source, step, micro, readers, batch_fn=batch, loss=loss_fn)


def reference_run(mode, num_sources, world, steps, k, gamma, lr=1e-2, weights=None, layout_seed=0, wd=0.1,
                  clip=0.0, lrs=None):
    """Flat parameters after each outer step (Nexus with an outer AdamW with two param groups).
    ``lrs``: the learning rate of each outer step (default ``lr`` throughout)."""
    model = make_model()
    outer = torch.optim.AdamW(param_groups(model.parameters(), wd), lr=lr)
    w = torch.tensor(weights or [1.0] * num_sources, dtype=torch.float64)
    w = w / w.sum()
    seq = SequentialLayout(LayoutConfig(mode="sequential", sources=SOURCES[:num_sources], weights=weights,
                                        seed=layout_seed)) if mode == "sequential" else None
    history = []
    for t in range(steps):
        theta = flat_params(model)
        delta = torch.zeros_like(theta)
        for m in range(k):
            set_flat(model, theta + delta)
            present = [seq.source_for(t, m)] if mode == "sequential" else list(range(num_sources))
            readers = world if mode == "sequential" else world // num_sources
            grads = {i: _source_grad(model, i, t, m, readers) for i in present}
            norms = {i: grads[i].double().norm() for i in present}
            wsum = sum(w[i] for i in present)
            d = torch.zeros_like(theta)
            for i in present:
                d += (w[i] / wsum / norms[i]).float() * grads[i]
            delta = delta - gamma * d
        G = -delta / (k * gamma)
        if clip:
            c = (float(G.double().norm()) + 1e-6) / clip
            if c > 1:
                G = G / c
        set_flat(model, theta)
        off = 0
        for p in model.parameters():
            n = p.numel()
            p.grad = G[off:off + n].view_as(p).clone()
            off += n
        if lrs is not None:
            for g in outer.param_groups:
                g["lr"] = lrs[t]
        outer.step()
        history.append(flat_params(model))
    return history
