"""``nexus-megatron plan``: memory per GPU and communication per outer step, AdamW vs Nexus.

A closed-form model (every formula is in docs/performance.md, "The plan model"): from the model size,
the cluster (nodes x GPUs per node, link bandwidths), the parallel layout (TP, PP, DP; ZeRO stage or
Megatron's distributed optimizer) and the batch (micro batch, sequence length, k micro-steps), it gives
for AdamW and for Nexus in both source layouts

* the bytes per GPU of parameters, gradients, optimizer state, the Nexus state (the fp32 anchor and the
  fp32 exact displacement d_sum, sharded like the master weights: 8 bytes per element held), and an
  activation estimate;
* the collectives of one outer step, each as (operation, group size, payload bytes, calls) with the
  ring ("bus") bytes each rank sends, and their time on the group's link;
* the step time without and with overlap of the gradient reduction, the ratio Nexus / AdamW, and the
  compute-to-communication ratio above which the ratio is <= 1.05.

The same collective lists are what ``nexus-megatron bench`` counts: :func:`comm_ops` for
``engine='plain'`` is asserted equal to the bench's counted collectives (tests/test_bench.py), and
:func:`state_bytes` for ``engine='plain'`` to its accounting of the training state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional

from ..errors import NexusConfigError

ENGINES = ("plain", "deepspeed", "megatron")
OPTIMIZERS = (("adamw", "sequential"), ("nexus", "sequential"), ("nexus", "source-parallel"))


# ---------------------------------------------------------------------------------------------------
# collectives: payload and ring bytes
# ---------------------------------------------------------------------------------------------------

def bus_factor(op: str, n: int) -> float:
    """Bytes each rank sends over its link per payload byte, for a ring of ``n`` ranks (the "bus
    bandwidth" convention of nccl-tests; rooted collectives averaged over the ranks). Payload: the
    full vector (all-reduce: the tensor; reduce-scatter: the input; all-gather: the output;
    broadcast/reduce: the tensor)."""
    if n <= 1:
        return 0.0
    if op in ("all_reduce", "all_reduce_coalesced"):
        return 2.0 * (n - 1) / n
    if op in ("reduce_scatter_tensor", "reduce_scatter", "_reduce_scatter_base", "all_gather_into_tensor",
              "all_gather", "_all_gather_base", "all_to_all_single", "all_to_all"):
        return (n - 1) / n
    if op in ("broadcast", "reduce", "gather", "scatter"):
        return (n - 1) / n   # every rank but the root sends (or receives) the payload: averaged over the ranks
    return 1.0   # send/recv


@dataclass
class Op:
    """``calls`` collectives of type ``op`` over a group of ``group`` ranks per outer step, moving
    ``payload`` bytes in all (summed over the calls). ``overlap``: ``bwd`` (can run during backward:
    the reduction of the raw gradient), ``fwd`` (ZeRO-3's parameter prefetch: during forward and
    backward) or ``none`` (exposed: after the norm, or the parameter all-gather before the next pass)."""

    op: str
    group: int
    payload: float
    calls: int = 1
    what: str = ""
    overlap: str = "none"
    link: str = "intra"

    @property
    def bus(self) -> float:
        return self.payload * bus_factor(self.op, self.group)


# ---------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------

@dataclass
class PlanInput:
    params: int
    """P: logical parameters of the model."""
    hidden: int = 0
    layers: int = 0
    heads: int = 1
    vocab: int = 50257
    nodes: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None
    """Default: GPUs / (TP * PP)."""
    engine: str = "megatron"
    zero: Optional[int] = None
    """DeepSpeed's ZeRO stage (0-3; default 1)."""
    dist_opt: bool = True
    """Megatron's distributed optimizer."""
    dtype: str = "bf16"
    """Parameter dtype (``plain`` is fp32)."""
    micro_batch: int = 4
    seq_len: int = 2048
    k: int = 8
    accum: int = 1
    """Micro-batches per micro-step (Megatron: one Nexus micro-step is one pipeline pass over ``accum``
    micro-batches, reduced once): compute per micro-step grows, communication does not."""
    grad_dtype: Optional[str] = None
    """Megatron: dtype of the gradient reduction (default fp32, Megatron's ``grad_reduce_in_fp32`` for bf16)."""
    param_gather_overlap: bool = False
    """Model the parameter all-gather as overlapped with the next forward (Megatron's
    ``--overlap-param-gather`` with the distributed optimizer, supported by NexusMegatronOptimizer; DeepSpeed
    ZeRO-1/2 under Nexus: ds_config ``nexus.overlap_param_gather``)."""
    sources: int = 4
    intra_bw: float = 360.0
    """GB/s of bus bandwidth inside a node (NVLink; NCCL's measured all-reduce bus bandwidth)."""
    inter_bw: float = 40.0
    """GB/s of bus bandwidth per GPU between nodes (the NIC per GPU)."""
    latency_us: float = 20.0
    """Fixed cost of one collective call, microseconds."""
    gpu_tflops: float = 989.0
    """Peak dense TFLOP/s of one GPU in the compute dtype (H100 SXM bf16: 989)."""
    mfu: float = 0.4
    recompute: bool = False
    gpu_mem_gb: float = 80.0
    mem_bw: float = 3350.0
    """GB/s of memory bandwidth of one GPU (H100 SXM HBM3: 3350): the optimizer's elementwise passes."""
    ds_bucket_allreduce: Optional[bool] = None
    """DeepSpeed ZeRO-1/2: ``use_multi_rank_bucket_allreduce`` (true: all-reduce the gradient buckets; false:
    reduce each partition to its owner). None: what each optimizer gets without the key in its ds_config,
    true for AdamW (DeepSpeed's default), false for Nexus (the adapter's default)."""
    ds_reuse_distance: float = 1e9
    """DeepSpeed ZeRO-3: ``stage3_max_reuse_distance`` (elements)."""
    padded_params: Optional[int] = None
    """Plain engine: the flat buffer's length (P rounded up to the source group size); Megatron: the DDP
    param/grad buffers' length on this rank (Megatron pads each bucket for the distributed optimizer);
    default P (per TP x PP rank)."""

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def validate(p: PlanInput) -> PlanInput:
    """Check the inputs (NexusConfigError naming the setting); returns them with ``dp`` filled in."""
    for name in ("params", "nodes", "gpus_per_node", "tp", "pp", "micro_batch", "seq_len", "k", "sources", "vocab",
                 "heads", "accum"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise NexusConfigError(f"plan --{name.replace('_', '-')}={v!r}: must be an integer >= 1")
    for name in ("intra_bw", "inter_bw", "gpu_tflops", "mfu", "gpu_mem_gb", "mem_bw"):
        v = getattr(p, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise NexusConfigError(f"plan --{name.replace('_', '-')}={v!r}: must be a number > 0")
    if p.mfu > 1:
        raise NexusConfigError(f"plan --mfu={p.mfu}: the model FLOP utilization is a fraction in (0, 1]")
    if not (math.isfinite(p.latency_us) and p.latency_us >= 0):
        raise NexusConfigError(f"plan --latency-us={p.latency_us!r}: must be >= 0")
    if p.engine not in ENGINES:
        raise NexusConfigError(f"plan --engine={p.engine!r}: use one of {', '.join(ENGINES)}")
    if p.dtype not in ("bf16", "fp32"):
        raise NexusConfigError(f"plan --dtype={p.dtype!r}: use bf16 or fp32")
    if p.grad_dtype is not None:
        if p.grad_dtype not in ("bf16", "fp32"):
            raise NexusConfigError(f"plan --grad-dtype={p.grad_dtype!r}: use bf16 or fp32")
        if p.engine != "megatron":
            raise NexusConfigError("plan --grad-dtype: only Megatron reduces in a dtype of its own "
                                   "(DeepSpeed reduces in the parameter dtype, the plain engine in fp32)")
    if p.engine == "deepspeed":
        if p.zero is None:
            p = replace(p, zero=1)
        if p.zero not in (0, 1, 2, 3) or isinstance(p.zero, bool):
            raise NexusConfigError(f"plan --zero={p.zero!r}: DeepSpeed's ZeRO stage is 0, 1, 2 or 3")
    elif p.zero is not None:
        raise NexusConfigError(f"plan --zero={p.zero}: ZeRO stages are DeepSpeed's; use --engine deepspeed "
                               "(Megatron: --dist-opt / --no-dist-opt)")
    if p.engine == "plain":
        if p.tp != 1 or p.pp != 1:
            raise NexusConfigError(f"plan --engine plain: the plain engine is data-parallel only (got --tp {p.tp} "
                                   f"--pp {p.pp}); use --engine megatron for tensor/pipeline parallelism")
        if p.dtype != "fp32":
            p = replace(p, dtype="fp32")   # the plain engine keeps fp32 parameters
    if p.engine == "deepspeed" and (p.tp != 1 or p.pp != 1):
        raise NexusConfigError(f"plan --engine deepspeed: the DeepSpeed adapter has no tensor/pipeline parallelism "
                               f"(got --tp {p.tp} --pp {p.pp}); use --engine megatron")
    gpus = p.gpus
    dp = p.dp if p.dp is not None else gpus // (p.tp * p.pp)
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise NexusConfigError(f"plan --dp={p.dp!r}: must be an integer >= 1")
    if p.tp * p.pp * dp != gpus:
        raise NexusConfigError(
            f"plan: TP * PP * DP = {p.tp} * {p.pp} * {dp} = {p.tp * p.pp * dp} but --nodes * --gpus-per-node = "
            f"{p.nodes} * {p.gpus_per_node} = {gpus}: every GPU must hold one (TP, PP, DP) position")
    if p.hidden:
        if p.hidden % p.heads:
            raise NexusConfigError(f"plan --hidden={p.hidden} is not a multiple of --heads={p.heads}")
        if p.heads % p.tp:
            raise NexusConfigError(f"plan --tp={p.tp}: the {p.heads} attention heads cannot be split over {p.tp} "
                                   "tensor-parallel ranks; use a TP size that divides the number of heads")
    if p.layers and p.layers % p.pp:
        raise NexusConfigError(f"plan --pp={p.pp}: the {p.layers} layers cannot be split into {p.pp} equal "
                               "pipeline stages; use a PP size that divides the number of layers")
    return replace(p, dp=dp)


def source_parallel_problem(p: PlanInput) -> Optional[str]:
    """Why the source-parallel layout is impossible for these inputs (None if it is possible)."""
    if p.sources > p.dp:
        return f"{p.sources} sources > DP {p.dp}"
    if p.dp % p.sources:
        return f"DP {p.dp} is not a multiple of {p.sources} sources"
    return None


# ---------------------------------------------------------------------------------------------------
# model size
# ---------------------------------------------------------------------------------------------------

def llama_params(hidden: int, layers: int, heads: int, kv_heads: Optional[int], intermediate: int, vocab: int,
                 tie_embeddings: bool) -> int:
    """Parameters of transformers' LlamaForCausalLM (what nexus_megatron.models.build_model builds)."""
    kv = kv_heads or heads
    hd = hidden // heads
    attn = hidden * hidden * 2 + 2 * hidden * kv * hd       # q, o; k, v (no biases)
    mlp = 3 * hidden * intermediate                          # gate, up, down
    per_layer = attn + mlp + 2 * hidden                      # two RMSNorms
    emb = vocab * hidden * (1 if tie_embeddings else 2)
    return layers * per_layer + emb + hidden                 # + final norm


def params_from_model_config(m, vocab: int) -> int:
    from ..models import default_intermediate
    return llama_params(m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads,
                        m.intermediate_size or default_intermediate(m.hidden_size), vocab, m.tie_embeddings)


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------

def _bytes(p: PlanInput):
    """(parameter bytes, gradient bytes, master copy bytes) per element."""
    pb = 2 if p.dtype == "bf16" else 4
    if p.engine == "megatron":
        gb = 2 if p.grad_dtype == "bf16" else 4    # fp32 main_grad buffer (grad_reduce_in_fp32, default for bf16)
    else:
        gb = pb
    master = 4 if pb == 2 else 0                   # fp32 copy of bf16 parameters
    if p.engine == "deepspeed" and p.zero >= 1:
        master = 4                                 # ZeRO-1/2/3 keep an fp32 master partition even in fp32
    return pb, gb, master


def state_bytes(p: PlanInput, optim: str, layout: str, overlap: bool = False) -> dict:
    """Bytes per GPU of the training state, by category (``params``, ``grads``, ``optimizer`` (fp32 master
    and AdamW's two moments), ``nexus`` (the fp32 anchor and the fp32 exact displacement d_sum, on every
    engine: 8 bytes per element of the rank's master shard, ALGORITHMS.md §1.5)). Sharded terms
    are divided by the DP size, or by the source group size DP/K in the source-parallel layout (each
    group holds the whole sharded state). ``overlap``: the plain engine's overlapped source-parallel
    reduction keeps its shard buffer (4 bytes x padded P / group size) between micro-steps."""
    P_local = p.params / (p.tp * p.pp)
    pb, gb, master = _bytes(p)
    d = p.dp
    if optim == "nexus" and layout == "source-parallel":
        d = p.dp // p.sources
    if p.engine == "plain":
        n = p.padded_params if (optim == "nexus" and p.padded_params) else p.params
        S = p.dp // p.sources if layout == "source-parallel" else 1
        extra = 4 * n // S if (optim == "nexus" and overlap and S > 1) else 0
        out = {"params": 4 * p.params, "grads": 4 * n, "optimizer": 8 * p.params,
               "nexus": 8 * n + extra if optim == "nexus" else 0}
        return {k: float(v) for k, v in out.items()}
    opt = (master + 8) * P_local
    if p.engine == "deepspeed":
        z = p.zero
        params = pb * P_local / (d if z >= 3 else 1)
        grads = gb * P_local / (d if z >= 2 else 1)
        optimizer = opt / (d if z >= 1 else 1)
        anchor = 8 * P_local / (d if z >= 1 else 1)           # anchor + d_sum per master-partition element
    else:
        buf = p.padded_params or P_local          # Megatron's DDP buffers (bucket padding included)
        params, grads = pb * buf, gb * buf
        optimizer = opt / (d if p.dist_opt else 1)
        anchor = 8 * P_local / (d if p.dist_opt else 1)       # anchor + d_sum per main-param (shard) element
    return {"params": params, "grads": grads, "optimizer": optimizer, "nexus": anchor if optim == "nexus" else 0.0}


def activation_bytes(p: PlanInput) -> float:
    """Estimate of the activations one GPU holds at its peak (Korthikanti et al. 2022, with flash
    attention and sequence parallelism: 34 s b h / TP bytes per layer in bf16, 2 s b h / TP with full
    recomputation; doubled in fp32; times PP micro-batches in flight on the first stage of a 1F1B
    schedule), plus the fp32 logits of the loss (4 s b V / TP). 0 when the model shape is unknown."""
    if not (p.hidden and p.layers):
        return 0.0
    s, b, h = p.seq_len, p.micro_batch, p.hidden
    per_layer = (2.0 if p.recompute else 34.0) * s * b * h / p.tp
    if p.dtype == "fp32":
        per_layer *= 2
    layers_here = p.layers / p.pp
    in_flight = p.pp
    return per_layer * layers_here * in_flight + 4.0 * s * b * p.vocab / p.tp


# ---------------------------------------------------------------------------------------------------
# communication
# ---------------------------------------------------------------------------------------------------

def _link(p: PlanInput, n: int, stride: int) -> str:
    """``intra`` if a group of ``n`` ranks spaced ``stride`` apart fits in one node, else ``inter``
    (ranks are numbered TP fastest, then DP, then PP, as Megatron's default order)."""
    return "intra" if n * stride <= p.gpus_per_node else "inter"


def _ds_reduce_op(p: PlanInput, nexus: bool) -> str:
    """DeepSpeed ZeRO-1/2 reduce their gradient buckets with all-reduces by default
    (``zero_optimization.use_multi_rank_bucket_allreduce: true``, DeepSpeed 0.19), else with one
    ``reduce`` per partition owner (the bytes of a reduce-scatter). The Nexus adapter sets it to false
    unless the ds_config sets it."""
    on = (not nexus) if p.ds_bucket_allreduce is None else p.ds_bucket_allreduce
    return "all_reduce" if on else "reduce"


def _zero3_gathers(p: PlanInput) -> float:
    """Parameter all-gathers per micro-step under ZeRO-3: one for the forward, and again in backward for
    the parameters whose next use is further than ``stage3_max_reuse_distance`` elements away (roughly
    the fraction 1 - distance / P of them; all of them are kept when the model is below the distance)."""
    P_local = p.params / (p.tp * p.pp)
    return 1.0 + max(0.0, 1.0 - p.ds_reuse_distance / P_local)


def comm_ops(p: PlanInput, optim: str, layout: str, overlap: bool = False, buckets: int = 1) -> List[Op]:
    """The collectives of one outer step on one GPU (data-parallel traffic; tensor/pipeline-parallel
    traffic is the same for both optimizers and left out), as the engines issue them (scalar collectives
    of the engines' own bookkeeping, e.g. DeepSpeed's overflow check, are left out: latency only).
    ``overlap``/``buckets``: the plain engine with ``nexus.overlap_grad_reduce`` splits its bulk
    collectives into ``buckets`` calls."""
    P_local = p.params / (p.tp * p.pp)
    pb, gb, _ = _bytes(p)
    k, K, D = p.k, p.sources, p.dp
    G, W = gb * P_local, pb * P_local
    sp = optim == "nexus" and layout == "source-parallel"
    S = D // K if sp else D                    # the group that reduces one source's gradient
    link = _link(p, S, p.tp)
    all_link = _link(p, D, p.tp)
    cross_link = _link(p, K, p.tp * S)
    nb = buckets if overlap else 1
    nexus = optim == "nexus"
    reps = k if nexus else 1                   # Nexus reduces and republishes the parameters every micro-step
    ops: List[Op] = []
    if p.engine == "plain":
        n = p.padded_params or p.params
        Gp = 4 * (n if nexus else p.params)
        if not sp:
            ops.append(Op("all_reduce", D, reps * Gp, reps * nb, "gradient all-reduce", "bwd", all_link))
            return ops
        if S > 1:
            ops.append(Op("reduce_scatter_tensor", S, k * Gp, k * nb, "reduce-scatter in the source group", "bwd", link))
        ops.append(Op("all_reduce", D, k * 8 * (K + 1), k, "squared norms + non-finite flag (fp64 K+1-vector)",
                      "none", all_link))
        if K > 1:
            ops.append(Op("all_reduce", K, k * Gp / S, k, "normalized shard across source groups", "none", cross_link))
        if S > 1:
            ops.append(Op("all_gather_into_tensor", S, k * Gp, k * nb, "all-gather of d in the source group", "none",
                          link))
        return ops
    sharded = (p.engine == "deepspeed" and p.zero >= 1) or (p.engine == "megatron" and p.dist_opt)
    if p.engine == "deepspeed" and p.zero == 3:
        g = _zero3_gathers(p)
        ops += [Op("all_gather_into_tensor", S, k * g * W, k, "parameter all-gathers (forward; backward)", "fwd", link),
                Op("reduce_scatter_tensor", S, k * G, k, "gradient reduce-scatter", "bwd", link)]
    elif p.engine == "deepspeed" and p.zero in (1, 2):
        red = _ds_reduce_op(p, nexus)
        r = k if (nexus or p.zero == 2) else 1  # ZeRO-2 reduces every micro-step, ZeRO-1 at the boundary
        ops += [Op(red, S, r * G, r, f"gradient bucket {red.replace('_', '-')}", "bwd", link),
                Op("all_gather_into_tensor", S, reps * W, reps, "parameter all-gather", "none", link)]
    elif sharded:   # Megatron's distributed optimizer (buffers padded per bucket; one call per bucket group)
        buf = p.padded_params or P_local
        ops += [Op("reduce_scatter_tensor", S, reps * gb * buf, reps * nb, "gradient reduce-scatter", "bwd", link),
                Op("all_gather_into_tensor", S, reps * pb * buf, reps * nb, "parameter all-gather", "none", link)]
    else:           # DeepSpeed ZeRO-0, Megatron DDP without the distributed optimizer
        buf = (p.padded_params or P_local) if p.engine == "megatron" else P_local
        ops.append(Op("all_reduce", S, reps * gb * buf, reps * (nb if p.engine == "megatron" else 1),
                      "gradient all-reduce", "bwd", link))
    if p.engine == "megatron":
        # Megatron's get_grad_norm: one fp32 scalar over the ranks holding the gradient (AdamW: once, for the
        # clipping; Nexus: every micro-step, the source's norm, and once for the clipping of G); Nexus's
        # source-parallel layout exchanges the K norms and the inf flag (fp64) across the source groups.
        ops.append(Op("all_reduce", S, 4 * (k + 1 if nexus else 1), k + 1 if nexus else 1,
                      "gradient norm (fp32 scalar)", "none", link))
        if sp and K > 1:
            ops.append(Op("all_reduce", K, k * 8 * (K + 1), k, "per-source norms + inf flag across source groups",
                          "none", cross_link))
            elems = P_local / S if sharded else P_local
            ops.append(Op("all_reduce", K, k * 4 * elems, k, "normalized gradient (shard) across source groups",
                          "none", cross_link))
        return ops
    if nexus:
        norm = 8 * (K + 1)    # the one norm exchange of every engine: K squared norms + a non-finite flag
        ops.append(Op("all_reduce", D, k * norm, k, "squared norms", "none", all_link))
        if sp and K > 1:   # the fp32 gradient partition (DeepSpeed) / main-grad shard (Megatron), scaled
            elems = P_local / S if sharded else P_local
            ops.append(Op("all_reduce", K, k * 4 * elems, k, "normalized gradient (shard) across source groups",
                          "none", cross_link))
    return ops


def _op_time(p: PlanInput, o: Op) -> float:
    bw = (p.intra_bw if o.link == "intra" else p.inter_bw) * 1e9
    return o.bus / bw + (o.calls * p.latency_us * 1e-6 if o.group > 1 else 0.0)


def compute_time(p: PlanInput) -> float:
    """Seconds of forward + backward for one micro-step on one GPU: 6 P b s accum / (TP PP) / (peak * MFU)
    (pipeline bubbles left out: the same for both optimizers at accum >= PP)."""
    return 6.0 * p.params * p.micro_batch * p.seq_len * p.accum / (p.tp * p.pp) / (p.gpu_tflops * 1e12 * p.mfu)


@dataclass(frozen=True)
class Pass:
    """One elementwise pass of an optimizer over the flat fp32 vector: bytes read and written per parameter,
    ``per`` = ``micro`` (every micro-step) or ``step`` (once per outer step), ``times`` the fraction of
    those it runs in."""

    name: str
    read: int
    write: int
    per: str = "micro"
    times: float = 1.0


ADAMW_STEP = Pass("AdamW step (foreach: read param, grad, m, v; write param, m, v)", 16, 12, "step")
"""The outer optimizer's own pass: the same for both (Nexus's outer optimizer is AdamW)."""


def inner_step_passes(optim: str, layout: str, k: int) -> List[Pass]:
    """The plain engine's elementwise passes (fp32), as the code makes them (``Nexus.inner_step`` /
    ``Nexus.step``; ``MixtureAdamW``), each counted as DRAM traffic (no cache reuse between passes).

    Nexus: backward accumulates into ``p.grad``, a view of the zeroed flat buffer (``+=``: read the buffer
    and the fresh gradient, write the buffer); after the collective, one read for the norm; the source's
    scale w_i / n_i folded into ``d_sum += scale * g`` (source-parallel: the shard is scaled in place
    before the cross-group sum, one more pass); the parameters written as ``anchor - gamma_t d_sum``
    after every micro-step but the k-th; the buffer re-zeroed. AdamW (the baseline): ``acc += grad / k``
    per micro-step; one norm (clipping) per step. Both: the AdamW step."""
    k = int(k)
    if optim == "adamw":
        return [Pass("accumulate (acc += grad / k)", 8, 4),
                Pass("norm of the reduced gradient", 4, 0, "step"),
                ADAMW_STEP,
                Pass("zero acc", 0, 4, "step")]
    out = [Pass("backward accumulates into the view (buffer += grad)", 8, 4),
           Pass("norm (sum of squares)", 4, 0)]
    if layout == "source-parallel":
        out.append(Pass("scale the shard by w_i / n_i (before the cross-group sum)", 4, 4))
    out += [Pass("d_sum += scale * g", 8, 4),
            Pass("params = anchor - gamma_t * d_sum (not after the k-th micro-step)", 8, 4, "micro", (k - 1) / k),
            Pass("zero the buffer (for the next backward)", 0, 4),
            Pass("params = anchor", 4, 4, "step"),
            Pass("G = d_sum / k (into the buffer)", 4, 4, "step"),
            Pass("norm of G (logged)", 4, 0, "step"),
            ADAMW_STEP,
            Pass("anchor = params", 4, 4, "step"),
            Pass("zero d_sum", 0, 4, "step"),
            Pass("zero the buffer", 0, 4, "step")]
    return out


def bytes_per_micro_step(passes: List[Pass], k: int) -> dict:
    """Bytes per parameter per micro-step of a pass list: ``inner`` (the micro-step passes), ``step`` (the
    outer step's passes / k), ``total``."""
    inner = sum((q.read + q.write) * q.times for q in passes if q.per == "micro")
    step = sum((q.read + q.write) * q.times for q in passes if q.per == "step") / int(k)
    return {"inner": inner, "step": step, "total": inner + step}


def optimizer_bytes(p: PlanInput, optim: str, layout: str) -> float:
    """Memory traffic of the optimizer's elementwise passes in one outer step on one GPU (bytes), counted
    from the tensor passes in the code, fp32. Plain engine: :func:`inner_step_passes` (per parameter,
    k = 4, sequential: Nexus 41 per micro-step + 64 per step; AdamW 12 per micro-step + 36 per step).
    Sharded engines: Nexus 44 per micro-step and element of this GPU's master shard + 60 per step;
    AdamW 40 per step (gradient accumulation happens in backward for both)."""
    P_l = p.params / (p.tp * p.pp)
    nexus = optim == "nexus"
    if p.engine == "plain":
        return bytes_per_micro_step(inner_step_passes(optim, layout, p.k), p.k)["total"] * p.k * p.params
    S = (p.dp // p.sources) if (nexus and layout == "source-parallel") else p.dp
    sharded = (p.engine == "deepspeed" and p.zero >= 1) or (p.engine == "megatron" and p.dist_opt)
    shard = P_l / S if sharded else P_l
    return (44 * p.k + 60) * shard if nexus else 40 * shard


def step_time(p: PlanInput, ops: List[Op], overlap: bool, compute_scale: float = 1.0,
              elementwise: float = 0.0) -> dict:
    """Step time of one outer step (k micro-steps). Without overlap every collective is exposed. With
    overlap, per micro-step: what can run during backward (2/3 of the micro-step's compute) is hidden
    up to that time (``fwd``: up to the whole micro-step's compute), the rest is exposed."""
    C = compute_time(p) * compute_scale
    k = p.k
    t = {"bwd": 0.0, "fwd": 0.0, "none": 0.0}
    for o in ops:
        kind = o.overlap
        if kind == "none" and p.param_gather_overlap and o.op == "all_gather_into_tensor":
            kind = "fwd"
        t[kind] += _op_time(p, o)
    comm = sum(t.values())
    if not overlap:
        exposed = comm
    else:   # the traffic is spread evenly over the k micro-steps
        per = {key: v / k for key, v in t.items()}
        hidden_b = min(per["bwd"], 2.0 / 3.0 * C)
        hidden_f = min(per["fwd"], C - hidden_b)
        exposed = k * ((per["bwd"] - hidden_b) + (per["fwd"] - hidden_f) + per["none"])
    return {"compute": k * C, "comm": comm, "exposed": exposed, "optimizer": elementwise,
            "step": k * C + exposed + elementwise}


def _adamw_bwd_is_last_micro(p: PlanInput) -> bool:
    return not (p.engine == "deepspeed" and p.zero >= 2)


def step_times(p: PlanInput, optim: str, layout: str, compute_scale: float = 1.0) -> dict:
    """Step time without and with overlap: compute + exposed communication + the optimizer's elementwise
    passes (:func:`optimizer_bytes` / ``mem_bw``; never overlapped)."""
    ops = comm_ops(p, optim, layout)
    el = optimizer_bytes(p, optim, layout) / (p.mem_bw * 1e9)
    no = step_time(p, ops, False, compute_scale, el)
    if optim == "adamw" and _adamw_bwd_is_last_micro(p):
        # one reduction per step, hidden in the last micro-step's backward
        C = compute_time(p) * compute_scale
        bwd = sum(_op_time(p, o) for o in ops if o.overlap == "bwd")
        ag = sum(_op_time(p, o) for o in ops if o.overlap == "none" and o.op == "all_gather_into_tensor")
        rest = sum(_op_time(p, o) for o in ops if o.overlap != "bwd") - ag
        if p.param_gather_overlap:
            ag = max(0.0, ag - C)
        ov = {"compute": p.k * C, "comm": no["comm"], "exposed": max(0.0, bwd - 2.0 / 3.0 * C) + rest + ag,
              "optimizer": el}
        ov["step"] = ov["compute"] + ov["exposed"] + el
    else:
        ov = step_time(p, ops, True, compute_scale, el)
    return {"no_overlap": no, "overlap": ov}


def one_allreduce_time(p: PlanInput) -> float:
    """Time of one data-parallel all-reduce of the gradients (the issue's unit of communication)."""
    _, gb, _ = _bytes(p)
    G = gb * p.params / (p.tp * p.pp)
    return _op_time(p, Op("all_reduce", p.dp, G, 1, link=_link(p, p.dp, p.tp)))


def ratio_threshold(p: PlanInput, layout: str, overlap: bool, target: float = 1.05) -> Optional[float]:
    """The ratio (compute of one micro-step) / (one DP gradient all-reduce) above which the step-time
    ratio Nexus/AdamW is <= ``target`` (None if never, inf if no communication)."""
    c = one_allreduce_time(p)
    if c == 0:
        return 0.0
    key = "overlap" if overlap else "no_overlap"

    def ratio(scale):
        a = step_times(p, "adamw", "sequential", scale)[key]["step"]
        n = step_times(p, "nexus", layout, scale)[key]["step"]
        return n / a

    lo, hi = 1e-4, 1e7
    base = compute_time(p)
    if ratio(hi / (base / c)) > target:
        return None
    if ratio(lo / (base / c)) <= target:
        return lo
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if ratio(mid / (base / c)) <= target:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1.0001:
            break
    return hi


# ---------------------------------------------------------------------------------------------------
# the whole plan
# ---------------------------------------------------------------------------------------------------

@dataclass
class PlanRow:
    optim: str
    layout: str
    memory: dict = field(default_factory=dict)
    ops: list = field(default_factory=list)
    times: dict = field(default_factory=dict)
    problem: Optional[str] = None

    @property
    def bus_bytes(self) -> float:
        return sum(o.bus for o in self.ops)


def plan(p: PlanInput) -> dict:
    p = validate(p)
    rows = []
    act = activation_bytes(p)
    for optim, layout in OPTIMIZERS:
        row = PlanRow(optim, layout)
        if layout == "source-parallel":
            row.problem = source_parallel_problem(p)
        if row.problem is None:
            mem = state_bytes(p, optim, layout)
            mem["activations"] = act
            mem["total"] = sum(mem.values())
            row.memory = mem
            row.ops = comm_ops(p, optim, layout)
            row.times = step_times(p, optim, layout)
        rows.append(row)
    c = one_allreduce_time(p)
    C = compute_time(p)
    out = {"input": p, "rows": rows, "allreduce_s": c, "compute_micro_s": C,
           "compute_over_comm": C / c if c else math.inf}
    out["thresholds"] = {
        (layout, ov): ratio_threshold(p, layout, ov)
        for layout in ("sequential", "source-parallel") if (layout == "sequential" or source_parallel_problem(p) is None)
        for ov in (False, True)}
    return out


def global_batch_tokens(p: PlanInput) -> int:
    """Tokens per outer step over the whole job: DP x k x accum x micro batch x sequence length."""
    return p.dp * p.k * p.accum * p.micro_batch * p.seq_len


def _gb(x: float) -> str:
    return f"{x / 2**30:.2f}"


def format_plan(res: dict) -> str:
    p: PlanInput = res["input"]
    how = {"plain": "plain engine (fp32, replicated)",
           "deepspeed": f"DeepSpeed ZeRO-{p.zero}",
           "megatron": "Megatron " + ("distributed optimizer" if p.dist_opt else "DDP (no distributed optimizer)")}[p.engine]
    lines = [f"plan: {p.params / 1e9:.2f}B parameters on {p.nodes} node(s) x {p.gpus_per_node} GPUs = {p.gpus}; "
             f"TP {p.tp} x PP {p.pp} x DP {p.dp}; {how}, {p.dtype}; micro batch {p.micro_batch} x {p.seq_len} tokens"
             f"{f' x {p.accum} per micro-step' if p.accum > 1 else ''}, k = {p.k} (global batch "
             f"{global_batch_tokens(p) / 1e6:.2f}M tokens), {p.sources} sources; links {p.intra_bw:g} GB/s in a node, {p.inter_bw:g} GB/s per GPU between "
             f"nodes; {p.gpu_tflops:g} TFLOP/s x MFU {p.mfu:g}",
             "",
             "| optimizer | layout | params GB | grads GB | optimizer GB | nexus GB | activations GB | total GB "
             "| bus GB/step | comm s/step | step s (no overlap) | step s (overlap) | x AdamW (no ov.) | x AdamW (ov.) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = res["rows"][0]
    for r in res["rows"]:
        if r.problem:
            lines.append(f"| {r.optim} | {r.layout} | n/a: {r.problem} |" + " |" * 12)
            continue
        m, t = r.memory, r.times
        lines.append(
            f"| {r.optim} | {r.layout} | {_gb(m['params'])} | {_gb(m['grads'])} | {_gb(m['optimizer'])} | "
            f"{_gb(m['nexus'])} | {_gb(m['activations'])} | {_gb(m['total'])} | {r.bus_bytes / 1e9:.2f} | "
            f"{t['no_overlap']['comm']:.3f} | {t['no_overlap']['step']:.3f} | {t['overlap']['step']:.3f} | "
            f"{t['no_overlap']['step'] / base.times['no_overlap']['step']:.3f} | "
            f"{t['overlap']['step'] / base.times['overlap']['step']:.3f} |")
    over = [r for r in res["rows"] if not r.problem and r.memory["total"] > p.gpu_mem_gb * 2**30]
    lines.append("")
    lines.append(f"compute per micro-step {res['compute_micro_s'] * 1e3:.1f} ms; one DP gradient all-reduce "
                 f"{res['allreduce_s'] * 1e3:.1f} ms; compute/comm = {res['compute_over_comm']:.2f}")
    for (layout, ov), thr in res["thresholds"].items():
        what = "with overlap" if ov else "without overlap"
        val = "never" if thr is None else f">= {thr:.2f}"
        lines.append(f"Nexus {layout} / AdamW <= 1.05 {what} needs compute/comm {val}")
    for r in over:
        lines.append(f"warning: {r.optim} {r.layout} needs {_gb(r.memory['total'])} GB > --gpu-mem-gb {p.gpu_mem_gb:g}")
    lines.append("per outer step, per GPU, collectives (op, group, payload GB, calls, link):")
    for r in res["rows"]:
        if r.problem:
            continue
        desc = "; ".join(f"{o.what}: {o.op} over {o.group} ({o.payload / 1e9:.3f} GB, {o.calls}x, {o.link})"
                         for o in r.ops)
        lines.append(f"  {r.optim} {r.layout}: {desc}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def add_plan_arguments(a) -> None:
    a.add_argument("--config", help="a run config (configs/*.yaml): model shape, seq_len, micro batch, k, sources")
    a.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config setting")
    a.add_argument("--params", type=float, help="model size in parameters (e.g. 7e9) instead of --config")
    a.add_argument("--hidden", type=int, default=None)
    a.add_argument("--layers", type=int, default=None)
    a.add_argument("--heads", type=int, default=None)
    a.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the config's, else GPT-2's 50257)")
    a.add_argument("--nodes", type=int, default=1)
    a.add_argument("--gpus-per-node", type=int, default=8)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--dp", type=int, default=None, help="default: GPUs / (TP * PP)")
    a.add_argument("--engine", choices=ENGINES, default="megatron")
    a.add_argument("--zero", type=int, default=None, help="DeepSpeed ZeRO stage (default 1)")
    a.add_argument("--dist-opt", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="Megatron's distributed optimizer")
    a.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    a.add_argument("--micro-batch", type=int, default=None)
    a.add_argument("--seq-len", type=int, default=None)
    a.add_argument("--k", type=int, default=None, help="micro-steps per outer step")
    a.add_argument("--accum", type=int, default=1, help="micro-batches per micro-step (Megatron: N/K)")
    a.add_argument("--grad-dtype", choices=("bf16", "fp32"), default=None,
                   help="Megatron: dtype of the gradient reduction (default fp32)")
    a.add_argument("--param-gather-overlap", action="store_true",
                   help="the parameter all-gather overlapped with the next forward (Megatron's "
                        "--overlap-param-gather, supported by NexusMegatronOptimizer; DeepSpeed ZeRO-1/2 under Nexus: "
                        "ds_config nexus.overlap_param_gather; a what-if for DeepSpeed's AdamW)")
    a.add_argument("--sources", type=int, default=None)
    a.add_argument("--intra-bw", type=float, default=360.0, help="GB/s bus bandwidth inside a node")
    a.add_argument("--inter-bw", type=float, default=40.0, help="GB/s bus bandwidth per GPU between nodes")
    a.add_argument("--latency-us", type=float, default=20.0)
    a.add_argument("--gpu-tflops", type=float, default=989.0)
    a.add_argument("--mfu", type=float, default=0.4)
    a.add_argument("--recompute", action="store_true", help="full activation recomputation")
    a.add_argument("--gpu-mem-gb", type=float, default=80.0)
    a.add_argument("--mem-bw", type=float, default=3350.0, help="GB/s memory bandwidth of one GPU (optimizer passes)")
    a.add_argument("--table", action="store_true",
                   help="the docs/performance.md table: configs/3b.yaml and 7b.yaml on 8 to 1024 GPUs")


def input_from_args(args) -> PlanInput:
    from ..config import load_config

    kw = {}
    if args.config:
        cfg = load_config(args.config, args.set)
        vocab = args.vocab or cfg.model.vocab_size or 50257
        kw.update(params=params_from_model_config(cfg.model, vocab), hidden=cfg.model.hidden_size,
                  layers=cfg.model.num_layers, heads=cfg.model.num_heads, vocab=vocab,
                  micro_batch=cfg.data.micro_batch_size, seq_len=cfg.data.seq_len, k=cfg.train.micro_steps,
                  sources=len(cfg.data.sources))
    elif args.params is None:
        raise NexusConfigError("plan: give the model with --config configs/<size>.yaml or its size with --params "
                               "(e.g. --params 7e9)")
    if args.params is not None:
        if not (math.isfinite(args.params) and args.params >= 1):
            raise NexusConfigError(f"plan --params={args.params!r}: the number of parameters must be >= 1")
        kw["params"] = int(args.params)
    for name in ("hidden", "layers", "heads", "vocab", "micro_batch", "seq_len", "k", "sources"):
        v = getattr(args, name)
        if v is not None:
            kw[name] = v
    return PlanInput(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tp=args.tp, pp=args.pp, dp=args.dp,
                     engine=args.engine, zero=args.zero, dist_opt=args.dist_opt, dtype=args.dtype,
                     intra_bw=args.intra_bw, inter_bw=args.inter_bw, latency_us=args.latency_us,
                     gpu_tflops=args.gpu_tflops, mfu=args.mfu, recompute=args.recompute, gpu_mem_gb=args.gpu_mem_gb,
                     accum=args.accum, grad_dtype=args.grad_dtype, param_gather_overlap=args.param_gather_overlap,
                     mem_bw=args.mem_bw,
                     **kw)


def table(base: PlanInput, gpu_counts=(8, 64, 256, 1024)) -> str:
    """One line per (model, GPUs, optimizer/layout): the docs table."""
    lines = ["| model | GPUs | TP x PP x DP | tokens/step | optimizer | layout | GB/GPU | Nexus extra GB | bus GB/step "
             "| comm s | step s (no ov.) | x AdamW | step s (ov.) | x AdamW | compute/comm |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in gpu_counts:
        q = replace(base, nodes=max(1, n // base.gpus_per_node), gpus_per_node=min(n, base.gpus_per_node), dp=None)
        res = plan(q)
        q = res["input"]
        a = res["rows"][0]
        tok = f"{global_batch_tokens(q) / 1e6:.2f}M"
        for r in res["rows"]:
            name = f"{q.params / 1e9:.1f}B"
            if r.problem:
                lines.append(f"| {name} | {n} | {q.tp}x{q.pp}x{q.dp} | {tok} | {r.optim} | {r.layout} | "
                             f"n/a: {r.problem} |" + " |" * 8)
                continue
            t, ta = r.times, a.times
            lines.append(
                f"| {name} | {n} | {q.tp}x{q.pp}x{q.dp} | {tok} | {r.optim} | {r.layout} | {_gb(r.memory['total'])} | "
                f"{_gb(r.memory['total'] - a.memory['total'])} | {r.bus_bytes / 1e9:.1f} | {t['no_overlap']['comm']:.2f} | "
                f"{t['no_overlap']['step']:.2f} | {t['no_overlap']['step'] / ta['no_overlap']['step']:.3f} | "
                f"{t['overlap']['step']:.2f} | {t['overlap']['step'] / ta['overlap']['step']:.3f} | "
                f"{res['compute_over_comm']:.1f} |")
    return "\n".join(lines)


def run_plan(args) -> int:
    p = input_from_args(args)
    if args.table:
        print(table(p))
    else:
        print(format_plan(plan(p)))
    return 0
