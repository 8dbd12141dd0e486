"""CPU cost of the plain optimizer around backward, per micro-step, in one process (no collectives).

On the bench's default model (4-layer Llama, hidden 256, vocab 8192: 5.31M parameters), k = 4, 4 x 128
tokens per micro-step: the CPU milliseconds (medians over the micro-steps after the first outer step) of
``loss.backward()`` + ``opt.inner_step()`` (``bwd_opt_cpu``), of ``inner_step`` alone (``opt_cpu``, and its
wall time ``opt_wall``), and of the outer ``step()`` (``step_cpu``), for Nexus or the AdamW baseline
(``MixtureAdamW``). Run it with a checkout first on PYTHONPATH to compare two versions of the code, e.g.::

    OMP_NUM_THREADS=1 PYTHONPATH=. python launch/inner_step_cost.py nexus 4
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/other/checkout python launch/inner_step_cost.py nexus 4

(``docs/performance.md``: the inner step's cost before and after issue 18.)
"""
import json
import statistics
import sys
import time

import torch

from nexus_megatron.baseline import MixtureAdamW
from nexus_megatron.config import load_config
from nexus_megatron.layout import LayoutConfig, build_layout
from nexus_megatron.models import build_model, lm_loss
from nexus_megatron.nexus import Nexus, NexusConfig


def main(which: str, steps: int) -> dict:
    torch.set_num_threads(1)
    cfg = load_config(None, [], base={"model": {"hidden_size": 256, "num_layers": 4, "num_heads": 4,
                                                "vocab_size": 8192},
                                      "data": {"seq_len": 128, "micro_batch_size": 4, "sources": ["a", "b"]}})
    model = build_model(cfg.model, 8192, 128, seed=0)
    model.train()
    outer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    layout = build_layout(LayoutConfig(mode="sequential", sources=("a", "b")))
    k = 4
    if which == "nexus":
        opt = Nexus(model.parameters(), outer, layout, NexusConfig(), micro_steps=k)
    else:
        opt = MixtureAdamW(model.parameters(), outer, layout, micro_steps=k)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 8192, (4, 129), generator=g) for _ in range(k)]
    res = {"bwd_opt_cpu": [], "opt_cpu": [], "opt_wall": [], "step_cpu": []}
    for t in range(steps):
        for m in range(k):
            loss = lm_loss(model, batches[m])
            c0 = time.process_time()
            loss.backward()
            c1, w1 = time.process_time(), time.perf_counter()
            opt.inner_step(layout.source_for(t, m))
            c2, w2 = time.process_time(), time.perf_counter()
            if t:
                res["bwd_opt_cpu"].append(c2 - c0)
                res["opt_cpu"].append(c2 - c1)
                res["opt_wall"].append(w2 - w1)
        c0 = time.process_time()
        opt.step()
        if t:
            res["step_cpu"].append(time.process_time() - c0)
    return {key: round(statistics.median(v) * 1e3, 2) for key, v in res.items()}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("nexus", "adamw") or not sys.argv[2].isdigit() or int(sys.argv[2]) < 2:
        sys.exit("usage: python launch/inner_step_cost.py nexus|adamw STEPS (STEPS >= 2: the first is warm-up)")
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
