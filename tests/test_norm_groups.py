"""Source norms over a model-parallel group: a parameter duplicated on every tensor-parallel rank
counts once (the hook the Megatron adapter uses with Megatron's own filters)."""
import torch
import torch.distributed as dist

from nexus_megatron.layout import LayoutConfig, build_layout
from nexus_megatron.nexus import Nexus, NexusConfig
from tests.distributed import run_distributed


def _tp_worker(rank, world):
    # two "tensor-parallel" ranks, each its own data-parallel group of size 1
    dp = [dist.new_group([r]) for r in range(world)][rank]
    tp = dist.new_group(list(range(world)))
    shard = torch.nn.Parameter(torch.zeros(3))           # rank r holds shard r of a split weight
    dup = torch.nn.Parameter(torch.zeros(2))             # replicated on both ranks (e.g. a layer norm)
    dup.tensor_model_parallel_duplicate = rank != 0       # what Megatron's filter looks at
    params = [shard, dup]
    layout = build_layout(LayoutConfig(sources=("a",)), dp_group=dp, norm_group=tp)
    opt = Nexus(params, torch.optim.SGD(params, lr=1.0), layout, NexusConfig(gamma=1.0, gamma_mode="absolute"),
                micro_steps=1, counts_in_norm=lambda p: not getattr(p, "tensor_model_parallel_duplicate", False))
    shard.grad = torch.tensor([1.0, 2.0, 2.0]) * (rank + 1)   # shards: [1,2,2] and [2,4,4]
    dup.grad = torch.tensor([4.0, 0.0])                       # the same on both ranks
    red = opt.inner_step(0)
    naive = Nexus(params, torch.optim.SGD(params, lr=1.0), layout, NexusConfig(gamma=1.0, gamma_mode="absolute"),
                  micro_steps=1)
    shard.grad = torch.tensor([1.0, 2.0, 2.0]) * (rank + 1)
    dup.grad = torch.tensor([4.0, 0.0])
    red_naive = naive.inner_step(0)
    return float(red.norms[0]), float(red_naive.norms[0]), opt.num_norm_params, opt.delta[:5].clone()


def test_tensor_parallel_duplicate_counted_once():
    (n0, naive0, p0, d0), (n1, naive1, p1, d1) = run_distributed(_tp_worker, 2)
    # logical vector: [1,2,2] ++ [2,4,4] ++ [4,0] -> ||.||^2 = 9 + 36 + 16 = 61
    assert abs(n0 - 61 ** 0.5) < 1e-6 and n0 == n1
    assert abs(naive0 - 77 ** 0.5) < 1e-6          # counting the duplicate twice would give 9 + 36 + 32
    assert p0 == p1 == 8                            # 3 + 3 shard elements + 2 once
    assert torch.allclose(d0[3:], d1[3:])           # the duplicate moves identically on both ranks
    assert torch.allclose(d0, -torch.tensor([1.0, 2.0, 2.0, 4.0, 0.0]) / 61 ** 0.5)
