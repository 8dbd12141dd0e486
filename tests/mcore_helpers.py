"""Helpers for the megatron-core tests: a tiny GPTModel with a parallelism-independent initialization,
the micro-batches each rank reads, gathering of the logical (TP/PP-unsharded) parameters, a Nexus run on
Megatron, and a single-process reference written from ALGORITHMS.md §1.1 (same GPTModel on one rank,
each source's gradient on the concatenated micro-batches, the Nexus update, torch AdamW).

Every function that touches megatron-core runs inside a worker process that applied the CPU shim
(nexus_megatron/tools/mcore_cpu_shim.py) first; the shim never enters the package's runtime code."""
from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from nexus_megatron.layout import hash_seed

VOCAB, SEQ, HIDDEN, HEADS, LAYERS, MBS = 128, 16, 32, 4, 2, 2
SOURCES = ("web", "code", "math")


def init_megatron(tp=1, pp=1):
    from nexus_megatron.tools.mcore_cpu_shim import patch_megatron_for_cpu
    patch_megatron_for_cpu()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(123)
    torch.manual_seed(0)


def transformer_config(tp=1, pp=1, bf16=False):
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                             use_cpu_initialization=True, tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp, hidden_dropout=0.0, attention_dropout=0.0,
                             bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             pipeline_dtype=torch.bfloat16 if bf16 else torch.float32)


def build_model(tp=1, pp=1, bf16=False, seed=0, tied=False):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    cfg = transformer_config(tp, pp, bf16)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=tied)
    deterministic_init(model, seed)
    return model, cfg


def global_name(model, name: str) -> str:
    """The parameter's name in the unsharded (TP=1, PP=1) model."""
    m = getattr(model, "module", model)
    while hasattr(m, "module"):
        m = m.module
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith("decoder.layers."):
        rest = name[len("decoder.layers."):]
        i, tail = rest.split(".", 1)
        g = m.decoder.layers[int(i)].layer_number - 1
        return f"decoder.layers.{g}.{tail}"
    if name == "output_layer.weight" and getattr(m, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"
    return name


def _tp():
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


@torch.no_grad()
def deterministic_init(model, seed=0):
    """Every logical parameter is drawn from a generator seeded by its unsharded name, then sliced for
    this TP rank: any TP/PP split of the model holds the same logical weights."""
    tp_rank, tp_size = _tp()
    for name, p in model.named_parameters():
        gname = global_name(model, name)
        shape = list(p.shape)
        sharded = getattr(p, "tensor_model_parallel", False) and tp_size > 1
        if sharded:
            shape[p.partition_dim] *= tp_size
        g = torch.Generator().manual_seed(hash_seed(seed, zlib.crc32(gname.encode())))
        full = torch.randn(shape, generator=g, dtype=torch.float32)
        if gname.endswith("layer_norm_weight") or gname.endswith("final_layernorm.weight"):
            full = 1.0 + 0.1 * full
        else:
            full = 0.05 * full
        if sharded:
            full = full.chunk(tp_size, dim=p.partition_dim)[tp_rank]
        p.copy_(full.to(p.dtype))


@torch.no_grad()
def gather_full_params(model) -> dict:
    """{unsharded name: fp32 tensor} of this pipeline stage (collective over the TP group)."""
    from megatron.core import parallel_state as ps
    tp_rank, tp_size = _tp()
    m = model
    out = {}
    for name, p in m.named_parameters():
        gname = global_name(m, name)
        if "output_layer.weight" in name and gname != name.replace("module.", ""):
            continue  # the last stage's copy of the tied embedding
        t = p.detach().float()
        if getattr(p, "tensor_model_parallel", False) and tp_size > 1:
            parts = [torch.empty_like(t) for _ in range(tp_size)]
            dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
            t = torch.cat(parts, dim=p.partition_dim)
        out[gname] = t.clone()
    return out


def tokens_for(source: int, step: int, micro: int, reader: int, j: int, mbs: int = MBS) -> torch.Tensor:
    """[mbs, SEQ+1] token ids that reader ``reader`` of ``source`` reads as micro-batch ``j`` of pass
    ``micro`` of outer step ``step``. Sources are noisy arithmetic progressions with their own stride."""
    g = torch.Generator().manual_seed(hash_seed(23, source, step, micro, reader, j))
    start = torch.randint(0, VOCAB, (mbs, 1), generator=g)
    seq = (start + (source + 1) * torch.arange(SEQ + 1)) % VOCAB
    noise = torch.rand(seq.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, seq.shape, generator=g), seq)


def make_batch(tokens: torch.Tensor, source: int = 0) -> dict:
    b, s1 = tokens.shape
    s = s1 - 1
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous(),
            "attention_mask": torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s),
            "source_id": torch.full((b,), source, dtype=torch.long)}


class TestIterator:
    """Micro-batches of the current pass for this rank (reader position from the layout)."""

    def __init__(self, layout, mbs=MBS):
        self.layout, self.mbs = layout, mbs
        self.src = self.step = self.micro = None
        self.j = 0

    def set_micro_step(self, source, step, micro):
        self.src, self.step, self.micro, self.j = source, step, micro, 0

    def __iter__(self):
        return self

    def __next__(self):
        reader, _ = self.layout.readers(self.src, self.step, self.micro)
        b = make_batch(tokens_for(self.src, self.step, self.micro, reader, self.j, self.mbs), self.src)
        self.j += 1
        return b


def forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])

    def loss_func(output):
        mask = b["loss_mask"]
        loss = (output.float() * mask).sum() / mask.sum()
        return loss, {"lm loss": loss.detach().clone()}
    return out, loss_func


def scheduler(opt, lr):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    return OptimizerParamScheduler(opt, init_lr=lr, max_lr=lr, min_lr=lr, lr_warmup_steps=0, lr_decay_steps=1000,
                                   lr_decay_style="constant", start_wd=WD, end_wd=WD, wd_incr_steps=1000,
                                   wd_incr_style="constant")


LR, WD, GAMMA = 1e-2, 0.1, 0.05
# Note: Adam's first steps map gradient entries that are zero in exact arithmetic (e.g. the attention key
# bias: softmax is shift invariant) to +-lr whatever their rounding noise. The reference therefore
# evaluates the per-source gradient with the ranks' micro-batch shapes (see reference_run), so the noise
# is the same on both sides.
EPS = 1e-8


def build_nexus(model, cfg, *, mode, num_sources, weights=None, distopt=False, k=2, clip=0.0, bf16=False,
                gamma=GAMMA, exact=False, ddp_kwargs=None):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from nexus_megatron.engines.megatron import (build_nexus_groups, get_nexus_megatron_optimizer,
                                                 nexus_finalize_model_grads)
    from nexus_megatron.layout import LayoutConfig
    from nexus_megatron.nexus import NexusConfig
    groups = build_nexus_groups(LayoutConfig(mode=mode, sources=SOURCES[:num_sources], weights=weights))
    ddp = DistributedDataParallel(config=cfg, module=model, pg_collection=groups.pg_collection,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distopt,
                                                                           grad_reduce_in_fp32=True,
                                                                           **(ddp_kwargs or {})))
    cfg.finalize_model_grads_func = nexus_finalize_model_grads(groups)
    ocfg = OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR, weight_decay=WD, adam_beta1=0.9, adam_beta2=0.95,
                           adam_eps=EPS, clip_grad=clip, bf16=bf16, use_distributed_optimizer=distopt)
    opt = get_nexus_megatron_optimizer(ocfg, [ddp], groups, NexusConfig(gamma=gamma, gamma_mode="absolute"),
                                       micro_steps=k, exact_displacement=exact)
    return ddp, opt, scheduler(opt, LR), groups


def run_steps(ddp, opt, sched, groups, steps, M=1, record=None, fb=None, data=None):
    """``steps`` outer steps of M micro-batches per pass, driven as Megatron's ``train_step`` does: through
    ``fb`` (default: nexus_forward_backward over megatron-core's schedule) on ``data`` (default: the test
    iterator over ``groups.layout``)."""
    if fb is None:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from nexus_megatron.engines.megatron import nexus_forward_backward
        fb = nexus_forward_backward(opt, get_forward_backward_func())
    it = data if data is not None else TestIterator(groups.layout)
    history = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        fb(forward_step_func=forward_step, data_iterator=it, model=[ddp], num_microbatches=opt.micro_steps * M,
           seq_length=SEQ, micro_batch_size=MBS, forward_only=False)
        ok, gn, _ = opt.step()
        if ok:
            sched.step(1)
        history.append(gather_full_params(ddp.module))
        if record is not None:
            record.append({"ok": ok, "grad_norm": gn})
    return history


# ---------------------------------------------------------------------------------------------------
# single-process reference
# ---------------------------------------------------------------------------------------------------

def reference_run(model, *, mode, num_sources, dp, steps, k, M=1, weights=None, clip=0.0, gamma=GAMMA,
                  layout_seed=0, one_buffer=False, concat_check=False, concat_errors=None, pre_outer_step=None):
    """Nexus written from the spec on one unsharded GPTModel (``one_buffer=False``, the default: delta
    accumulated separately, the spec's arithmetic; ``one_buffer=True``: the point ``theta + delta`` is the only
    state and delta = point - theta, the imprecise recovery ALGORITHMS.md §1.5 rules out, kept for comparison).
    ``pre_outer_step(t, outer, params)`` is called with G in ``p.grad`` right before each AdamW step. Returns (params after each outer step as
    {name: tensor}, per-micro-step source norms [{source: norm}])."""
    from nexus_megatron.layout import LayoutConfig, SequentialLayout
    from nexus_megatron.nexus import source_coefficients
    deterministic_init(model)
    named = [(n, p) for n, p in model.named_parameters()]
    params = [p for _, p in named]
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(".bias")]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and not n.endswith(".bias"))]
    outer = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=LR, betas=(0.9, 0.95), eps=EPS)
    w = torch.tensor(weights or [1.0] * num_sources, dtype=torch.float64)
    w = w / w.sum()
    seq = SequentialLayout(LayoutConfig(mode="sequential", sources=SOURCES[:num_sources], weights=weights,
                                        seed=layout_seed))
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in params])  # noqa: E731

    def set_flat(v):
        off = 0
        with torch.no_grad():
            for p in params:
                p.copy_(v[off:off + p.numel()].view_as(p))
                off += p.numel()

    history, norms_hist = [], []
    for t in range(steps):
        theta = flat()
        delta = torch.zeros_like(theta)
        cur = theta.clone()
        for m in range(k):
            set_flat(cur)
            if mode == "sequential":
                present, readers = [seq.source_for(t, m)], dp
            else:
                present, readers = list(range(num_sources)), dp // num_sources
            grads, norms = {}, torch.zeros(num_sources, dtype=torch.float64)
            for i in present:
                # The gradient of the mean loss over the concatenated micro-batches of all readers, computed
                # as the mean of the per-micro-batch gradients (equal in exact arithmetic; evaluated with the
                # ranks' batch shapes, so both sides round alike and agreement is at the rounding level).
                parts = []
                for r in range(readers):
                    for j in range(M):
                        b = make_batch(tokens_for(i, t, m, r, j), i)
                        out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
                        gs = torch.autograd.grad(out.float().mean(), params)
                        parts.append(torch.cat([g.reshape(-1) for g in gs]))
                if concat_check:
                    toks = torch.cat([tokens_for(i, t, m, r, j) for r in range(readers) for j in range(M)])
                    b = make_batch(toks, i)
                    out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
                    gs = torch.autograd.grad(out.float().mean(), params)
                    whole = torch.cat([g.reshape(-1) for g in gs])
                grads[i] = torch.stack(parts).mean(0)
                if concat_check:
                    concat_errors.append(float((whole - grads[i]).norm() / whole.norm()))
                norms[i] = grads[i].double().norm()
            pres = torch.zeros(num_sources, dtype=torch.bool)
            pres[present] = True
            coef, active, _ = source_coefficients(norms, pres, w, 1e-8)
            if one_buffer:   # the adapter's default arithmetic: the point itself is the only fp32 state
                if len(present) == 1:
                    cur = cur.add(grads[present[0]], alpha=-gamma * float(coef[present[0]]))
                else:
                    d = torch.zeros_like(theta)
                    for i in present:
                        d += grads[i] * float(coef[i])
                    cur = cur.add(d, alpha=-gamma)
                delta = cur - theta
            else:
                d = torch.zeros_like(theta)
                for i in present:
                    d += coef[i].float() * grads[i]
                delta = delta - gamma * d
                cur = theta + delta
            norms_hist.append({i: float(norms[i]) for i in present})
        G = -delta / (k * gamma)
        if clip > 0:
            gn = float(G.double().norm())
            c = clip / (gn + 1e-6)
            if c < 1.0:
                G = G * c
        set_flat(theta)
        off = 0
        for p in params:
            p.grad = G[off:off + p.numel()].view_as(p).clone()
            off += p.numel()
        if pre_outer_step is not None:
            pre_outer_step(t, outer, params)
        outer.step()
        for p in params:
            p.grad = None
        history.append({n: p.detach().clone() for n, p in named})
    return history, norms_hist


def rel_error(got: dict, want: dict) -> float:
    assert set(got) == set(want), f"parameter names differ: {sorted(set(got) ^ set(want))}"
    num = sum(float((got[n].double() - want[n].double()).pow(2).sum()) for n in want)
    den = sum(float(want[n].double().pow(2).sum()) for n in want)
    return (num / den) ** 0.5
