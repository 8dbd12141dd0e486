"""Source layouts (ALGORITHMS.md §1.2): which data-parallel rank computes which source's gradient,
the process groups that follow from it, and the collectives of one micro-step.

Every function takes its process groups explicitly (``dp_group``: the data-parallel ranks that hold
replicas of the same parameters; ``norm_group``: the model-parallel ranks whose shards together make
up one logical parameter vector, e.g. Megatron's tensor/pipeline-parallel group). ``None`` means
"no such group" (a single rank).

Two layouts:

* ``sequential`` (the paper): micro-step ``m`` of outer step ``t`` draws one source ``s_m`` from a
  generator seeded by ``(seed, t, m)``, identical on every rank; all data-parallel ranks read ``s_m``
  and all-reduce one gradient.
* ``source-parallel``: the ``D`` data-parallel ranks are split into ``K`` contiguous source groups
  of ``S = D / K`` ranks; group ``i`` reads only source ``i``. Per micro-step: reduce-scatter inside
  the source group, square-norm of the shard, one all-reduce of a ``K``-vector of squared norms,
  scale the shard by ``w_i / n_i``, all-reduce the shard across groups ("cross" group: the ranks at
  the same position of every source group), all-gather inside the source group. That moves about
  the bytes of one plain all-reduce of the gradient.

Each micro-step's reduction has two phases (:class:`Reduction`): the bulk collective on the raw
gradient (sequential: the all-reduce; source-parallel: the reduce-scatter inside the source group),
which can run bucket by bucket, and the rest (norm exchange, scaling, cross-group all-reduce,
all-gather), which needs the full norm. :class:`GradBuckets` starts the first phase of each bucket
from per-parameter post-accumulate-grad hooks while backward is still running (as DDP and Megatron's
DDP do); ``reduce_normalized`` / ``reduce_mean`` run both phases with one bucket.
"""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .errors import NexusConfigError
from .functional import hash_seed, segments_sq, source_coefficients

LAYOUTS = ("sequential", "source-parallel")


@dataclass(frozen=True)
class LayoutConfig:
    """Which layout, which sources, with which weights."""

    mode: str = "sequential"
    """``sequential`` (one source per micro-step, all ranks) or ``source-parallel`` (one source per group)."""
    sources: tuple = ()
    """Source names, in order. Source ``i`` is read by source group ``i`` in the source-parallel layout."""
    weights: Optional[tuple] = None
    """Source weights (normalized to sum 1; default uniform). Sequential: sampling probabilities.
    Source-parallel: the weights ``w_i`` of ``d = sum_i w_i g_i / n_i``."""
    seed: int = 0
    """Seed of the sequential layout's source draws (every rank draws the same sequence)."""

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        validate_layout_config(self)

    def normalized_weights(self) -> list:
        if self.weights is None:
            return [1.0 / len(self.sources)] * len(self.sources)
        s = sum(self.weights)
        return [w / s for w in self.weights]


def validate_layout_config(cfg: LayoutConfig) -> None:
    if cfg.mode not in LAYOUTS:
        raise NexusConfigError(
            f"nexus.layout={cfg.mode!r} is not a layout: use one of {', '.join(LAYOUTS)}")
    if not cfg.sources:
        raise NexusConfigError("data.sources is empty: list at least one training source")
    if len(set(cfg.sources)) != len(cfg.sources):
        dup = sorted({s for s in cfg.sources if cfg.sources.count(s) > 1})
        raise NexusConfigError(f"data.sources names {dup} more than once: list each source once")
    if cfg.weights is not None:
        if len(cfg.weights) != len(cfg.sources):
            raise NexusConfigError(
                f"data.weights has {len(cfg.weights)} entries but data.sources has {len(cfg.sources)}: "
                "give one weight per source")
        for name, w in zip(cfg.sources, cfg.weights):
            if not math.isfinite(w) or w <= 0:
                raise NexusConfigError(
                    f"data.weights: source {name!r} has weight {w}; weights must be finite and > 0 "
                    "(remove the source from data.sources instead of giving it weight 0)")


@dataclass
class Reduced:
    """What one micro-step's reduction produced (identical on every rank)."""

    norms: torch.Tensor
    """fp64 [K]: the L2 norm of each source's full logical gradient (0 for sources not in this micro-step)."""
    present: torch.Tensor
    """bool [K]: the sources that had a gradient in this micro-step."""
    active: torch.Tensor
    """bool [K]: present and with norm >= min_grad_norm (the sources that moved the parameters)."""
    nonfinite: bool
    """NaN/Inf somewhere in the micro-step's gradients: the outer step must be skipped."""
    scale: float = 1.0
    """d = ``scale`` * the reduced buffer. 1 unless the caller asked ``defer_scale=True`` and the layout
    could leave the scaling (w_i / n_i, one pass over the buffer) to the caller's update (sequential)."""
    gathers: list = field(default_factory=list)
    """``(lo, hi, work)``: all-gathers of d into ``flat[lo:hi]`` still in flight, in launch order
    (source-parallel with S > 1 and ``finish_normalized(..., defer_gather=True)``): wait for each before
    reading its range, or call :meth:`wait_gathers`."""

    def wait_gathers(self) -> None:
        for _ in self.arrived(0):
            pass

    def arrived(self, numel: int):
        """The ranges ``(lo, hi)`` of d, each yielded once its all-gather is in (launch order), or
        ``(0, numel)`` once when nothing is in flight."""
        gathers, self.gathers = self.gathers, []
        if not gathers:
            yield 0, numel
        for lo, hi, w in gathers:
            w.wait()
            yield lo, hi


def _group_size(group) -> int:
    if group is None:
        return 1
    return dist.get_world_size(group)


class SourceLayout:
    """Base class: holds the groups, the weights and the mapping rank -> source."""

    mode = ""

    def __init__(self, cfg: LayoutConfig, dp_group=None, norm_group=None):
        self.cfg = cfg
        self.sources = cfg.sources
        self.num_sources = len(cfg.sources)
        self.weights = torch.tensor(cfg.normalized_weights(), dtype=torch.float64)
        self.dp_group = dp_group
        self.norm_group = norm_group
        if dist.is_available() and dist.is_initialized():
            self.dp_group = dp_group = dp_group or dist.group.WORLD
            self.dp_ranks = dist.get_process_group_ranks(dp_group)
            self.dp_rank = self.dp_ranks.index(dist.get_rank())
        else:
            self.dp_ranks, self.dp_rank = [0], 0
        self.dp_size = len(self.dp_ranks)
        self.norm_size = _group_size(norm_group)

    # -- data assignment ---------------------------------------------------------------------
    def source_for(self, step: int, micro: int) -> int:
        """Index of the source this rank reads in micro-step ``micro`` of outer step ``step``."""
        raise NotImplementedError

    def present(self, step: int, micro: int) -> list:
        """[(source, number of ranks reading it)] for every source of micro-step ``micro`` of step ``step``."""
        raise NotImplementedError

    def readers(self, source: int, step: int, micro: int) -> tuple:
        """(position of this rank among the readers of ``source`` in that micro-step, number of readers)."""
        raise NotImplementedError

    def padded_numel(self, numel: int) -> int:
        return numel

    bucket_align = 1
    """Bucket lengths (and offsets) are multiples of this (the source group size: a bucket is
    reduce-scattered inside the source group)."""

    def bucket_ranges(self, numel: int, bucket_numel: int, *, mean: bool = False) -> list:
        """Contiguous [lo, hi) ranges covering a flat buffer of ``numel`` elements (``padded_numel``), from
        its end to its start: backward produces the gradients of the last parameters first. ``mean``: for
        ``reduce_mean`` (all-reduces only: any length)."""
        a = 1 if mean else self.bucket_align
        if numel % a:
            raise ValueError(f"flat buffer of {numel} elements is not a multiple of {a}: allocate it with padded_numel()")
        size = max(a, int(bucket_numel) // a * a)
        out, hi = [], numel
        while hi > 0:
            lo = max(0, hi - size)
            out.append((lo, hi))
            hi = lo
        return out

    def reduction(self, flat: torch.Tensor, ranges=None, *, mean: bool = False) -> "Reduction":
        """The two-phase reduction of ``flat`` over ``ranges`` (default one bucket); nothing started yet."""
        return Reduction(self, flat, ranges if ranges is not None else [(0, flat.numel())], mean=mean)

    def _start_bucket(self, red: "Reduction", lo: int, hi: int):
        """Start phase 1 on ``red.flat[lo:hi]``; returns a work handle or None."""
        raise NotImplementedError

    def finish_normalized(self, red: "Reduction", source: int, *, min_grad_norm: float, segments=None,
                          defer_gather: bool = False, defer_scale: bool = False) -> Reduced:
        """Phase 2 of ``reduce_normalized`` after ``red`` (started with ``mean=False``) has run.
        ``defer_gather``: return with the source-parallel per-bucket all-gathers of d still in flight
        (``Reduced.gathers``), so that the caller can update bucket b while the later ones arrive.
        ``defer_scale``: where the layout allows it (sequential), leave the buffer unscaled and return the
        scale in ``Reduced.scale`` (the caller folds it into its update: one pass less)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"mode": self.mode, "sources": list(self.sources), "weights": self.weights.tolist(),
                "dp_size": self.dp_size, "norm_size": self.norm_size, "seed": self.cfg.seed}

    # -- collectives -----------------------------------------------------------------------------
    def reduce_normalized(self, flat: torch.Tensor, source: int, *, min_grad_norm: float,
                          segments=None, defer_scale: bool = False) -> Reduced:
        """In place: turn this rank's local gradient ``flat`` (of source ``source``) into
        d = sum_i w_i g_i / n_i over the active sources (weights renormalized over them); with
        ``defer_scale``, possibly into d / ``Reduced.scale`` (see :meth:`finish_normalized`)."""
        red = self.reduction(flat)
        red.launch_all()
        return self.finish_normalized(red, source, min_grad_norm=min_grad_norm, segments=segments,
                                      defer_scale=defer_scale)

    def reduce_mean(self, flat: torch.Tensor, source: Optional[int] = None) -> None:
        """In place: the plain (unnormalized) gradient of the weighted mixture, as a data-parallel
        optimizer would see it. Used for the AdamW baseline on the same data."""
        self.reduction(flat, mean=True).wait()

    def present_mask(self, source: int) -> torch.Tensor:
        """bool [K]: the sources with a gradient in a micro-step in which this rank reads ``source``."""
        if self.mode == "source-parallel":
            return torch.ones(self.num_sources, dtype=torch.bool)
        m = torch.zeros(self.num_sources, dtype=torch.bool)
        m[source] = True
        return m

    def exchange_norms(self, sq, source: int, *, groups=(), contribute: bool = True, nonfinite: bool = False,
                       min_grad_norm: float, device=None):
        """The per-source norm exchange of one micro-step, the same for every engine (§1.3, §1.4).

        ``sq``: this rank's contribution to the squared norm of source ``source``'s gradient (a partial sum
        over its shard, or the full squared norm on one designated rank: ``contribute=False`` on the others);
        ``nonfinite``: this rank saw NaN/Inf (or its framework skipped the step). One all-reduce per group in
        ``groups`` of ``[sq per source..., non-finite flag]`` (fp64), so every rank gets the same norms and the
        same verdict. Returns ``(Reduced, coef)``: ``coef`` fp64 [K] from
        :func:`~nexus_megatron.functional.source_coefficients` (w_i / n_i, renormalized over the active sources)."""
        K = self.num_sources
        vec = torch.zeros(K + 1, dtype=torch.float64, device=device)
        sq = float(sq) if sq is not None else float("nan")
        if nonfinite or not math.isfinite(sq):
            vec[K] = 1.0
        elif contribute:
            vec[source] = sq
        for g in groups:
            if g is not None and _group_size(g) > 1:
                dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=g)
        vec = vec.cpu()
        present = self.present_mask(source)
        norms = vec[:K].clamp_min(0).sqrt()
        bad = bool(vec[K] != 0) or not bool(torch.isfinite(vec).all())
        coef, active, nf = source_coefficients(norms, present, self.weights, min_grad_norm)
        if bad or nf:
            return Reduced(norms, present, torch.zeros(K, dtype=torch.bool), True), torch.zeros(K, dtype=torch.float64)
        return Reduced(norms, present, active, False), coef

class SequentialLayout(SourceLayout):
    mode = "sequential"

    def __init__(self, cfg, dp_group=None, norm_group=None):
        super().__init__(cfg, dp_group, norm_group)
        self._cum = list(itertools.accumulate(self.weights.tolist()))

    def source_for(self, step: int, micro: int) -> int:
        if self.num_sources == 1:
            return 0
        u = hash_seed(self.cfg.seed, step, micro) / float(1 << 63)   # uniform in [0, 1), same on every rank
        return min(bisect.bisect_right(self._cum, u), self.num_sources - 1)

    def present(self, step, micro):
        return [(self.source_for(step, micro), self.dp_size)]

    def readers(self, source, step, micro):
        return self.dp_rank, self.dp_size

    def _start_bucket(self, red, lo, hi):
        if self.dp_size > 1:   # normalized and mean alike: the data-parallel average of the bucket
            return dist.all_reduce(red.flat[lo:hi], op=dist.ReduceOp.AVG, group=self.dp_group, async_op=True)
        return None

    def finish_normalized(self, red, source, *, min_grad_norm, segments=None, defer_gather=False,
                          defer_scale=False) -> Reduced:
        red.wait()
        flat = red.flat
        # flat is replicated over dp: sum over the model-parallel shards only
        out, coef = self.exchange_norms(segments_sq(flat, segments), source, groups=(self.norm_group,),
                                        min_grad_norm=min_grad_norm, device=flat.device)
        if defer_scale:   # d = coef * flat: the caller folds the scale into its update
            out.scale = float(coef[source])
        else:
            flat.mul_(float(coef[source]))
        return out


def source_parallel_group_size(K: int, D: int, sources=()) -> int:
    """Ranks per source group of the source-parallel layout with ``K`` sources on ``D`` data-parallel ranks,
    or the error saying why the ranks cannot be split (pure: the launcher checks it before any worker starts)."""
    if K > D:
        raise NexusConfigError(
            f"nexus.layout=source-parallel: {K} sources ({', '.join(sources)}) but only {D} "
            f"data-parallel rank(s); each source needs its own group of ranks. Use at least {K} "
            "data-parallel ranks, fewer data.sources, or nexus.layout=sequential")
    if D % K:
        lo, hi = (D // K) * K, (D // K + 1) * K
        raise NexusConfigError(
            f"nexus.layout=source-parallel: the data-parallel size {D} is not a multiple of the number "
            f"of sources {K}, so the ranks cannot be split into equal source groups. Use {lo} or {hi} "
            "data-parallel ranks, change data.sources, or use nexus.layout=sequential")
    return D // K


class SourceParallelLayout(SourceLayout):
    mode = "source-parallel"

    def __init__(self, cfg, dp_group=None, norm_group=None):
        super().__init__(cfg, dp_group, norm_group)
        self.group_size = source_parallel_group_size(self.num_sources, self.dp_size, self.sources)
        self.my_source = self.dp_rank // self.group_size
        self.pos_in_group = self.dp_rank % self.group_size
        self.source_group, self.cross_group = _build_source_groups(self.dp_ranks, self.num_sources, self.group_size)

    def source_for(self, step, micro):
        return self.my_source

    def readers(self, source, step, micro):
        return self.pos_in_group, self.group_size

    def present(self, step, micro):
        return [(i, self.group_size) for i in range(self.num_sources)]

    def padded_numel(self, numel):
        S = self.group_size
        return -(-numel // S) * S

    def describe(self):
        d = super().describe()
        d["group_size"] = self.group_size
        return d

    @property
    def bucket_align(self):
        return self.group_size

    def _start_bucket(self, red, lo, hi):
        S = self.group_size
        if red.mean:
            if self.dp_size > 1:
                red.flat[lo:hi].mul_(float(self.weights[self.my_source]) / S)
                return dist.all_reduce(red.flat[lo:hi], op=dist.ReduceOp.SUM, group=self.dp_group, async_op=True)
            return None
        if S > 1:   # this rank's piece of the bucket: shard[lo/S : hi/S] (= flat[lo + pos L/S : lo + (pos+1) L/S])
            return dist.reduce_scatter_tensor(red.shard[lo // S:hi // S], red.flat[lo:hi], op=dist.ReduceOp.SUM,
                                              group=self.source_group, async_op=True)
        return None

    def finish_normalized(self, red, source, *, min_grad_norm, segments=None, defer_gather=False,
                          defer_scale=False) -> Reduced:
        # (defer_scale: the shard is scaled before the cross-group sum, so d comes back scaled: scale 1)
        assert source == self.my_source, "source-parallel: a rank only computes its own source"
        red.wait()
        S, K = self.group_size, self.num_sources
        flat = red.flat
        if S > 1:
            shard = red.shard
            shard.div_(S)
        else:
            shard = flat
        if S == 1:   # the whole vector: the same sum however it was bucketed
            sq = segments_sq(flat, segments)
        else:
            sq = torch.zeros((), dtype=torch.float64, device=flat.device)
            for lo, hi in red.ranges:   # the flat-vector position of this rank's piece of each bucket
                piece = (hi - lo) // S
                sq = sq + segments_sq(shard[lo // S:hi // S], segments, lo + self.pos_in_group * piece)
        out, coef = self.exchange_norms(sq, self.my_source, groups=(self.dp_group, self.norm_group),
                                        min_grad_norm=min_grad_norm, device=flat.device)
        shard.mul_(float(coef[self.my_source]))
        if K > 1:
            dist.all_reduce(shard, op=dist.ReduceOp.SUM, group=self.cross_group)
        if S > 1:
            out.gathers = [(lo, hi, dist.all_gather_into_tensor(flat[lo:hi], shard[lo // S:hi // S],
                                                                group=self.source_group, async_op=True))
                           for lo, hi in red.ranges]
            if not defer_gather:
                out.wait_gathers()
        return out


class Reduction:
    """One micro-step's reduction of a flat gradient buffer, bucket by bucket.

    Phase 1 (``launch(b)``, in bucket order on every rank: collectives on a group must be issued in the
    same order everywhere) starts the layout's bulk collective on ``flat[lo:hi]`` asynchronously:
    sequential, the data-parallel all-reduce (average); source-parallel, the reduce-scatter inside the
    source group into this rank's piece of the bucket (``shard[lo/S:hi/S]``), or, for ``mean=True``
    (the AdamW baseline), the weighted all-reduce over all data-parallel ranks. ``wait()`` starts what
    is left and waits. Phase 2 is the layout's ``finish_normalized`` (it needs every bucket: the norm
    is over the whole vector)."""

    def __init__(self, layout: SourceLayout, flat: torch.Tensor, ranges, *, mean: bool = False,
                 shard: Optional[torch.Tensor] = None):
        self.layout, self.flat, self.ranges, self.mean = layout, flat, list(ranges), mean
        S = layout.bucket_align
        self.shard = None
        if not mean and S > 1:
            n = flat.numel() // S
            self.shard = shard if shard is not None and shard.numel() == n else \
                torch.empty(n, dtype=flat.dtype, device=flat.device)
        self.launched = 0
        self._works: list = []

    def launch(self, b: int) -> None:
        if b != self.launched:
            raise RuntimeError(f"bucket {b} launched out of order (next is {self.launched})")
        w = self.layout._start_bucket(self, *self.ranges[b])
        if w is not None:
            self._works.append(w)
        self.launched += 1

    def launch_all(self) -> None:
        while self.launched < len(self.ranges):
            self.launch(self.launched)

    def wait(self) -> None:
        self.launch_all()
        works, self._works = self._works, []
        for w in works:
            w.wait()


class GradBuckets:
    """Overlap of the gradient reduction with backward (``nexus.overlap_grad_reduce``).

    A post-accumulate-grad hook on every parameter moves its gradient into its view of the flat buffer
    and frees ``p.grad``: a copy (``accumulate=None``: Nexus, one micro-step's gradient, reduced with
    ``reduce_normalized``'s phase 1) or ``flat += accumulate * grad`` (the AdamW baseline accumulating
    its micro-steps, reduced with ``reduce_mean``). When every parameter overlapping a bucket has its
    gradient, and every earlier bucket has started, the bucket's collective starts (:class:`Reduction`)
    while backward goes on with the earlier layers. Buckets are contiguous ranges of the buffer taken
    from its end (:meth:`SourceLayout.bucket_ranges`), so the last layers, whose gradients come first,
    start first.

    ``arm()`` before each backward; ``finish()`` after it: parameters whose hook did not fire (unused in
    the forward, or no backward at all) take ``p.grad`` or, when copying, zero; every bucket not started
    yet starts, and the :class:`Reduction` is returned. Hooks are inert while not armed (and
    ``torch.autograd.grad`` never fires them), so other backward passes leave ``p.grad`` alone.

    ``grads_are_views`` (copy mode only: Nexus, whose ``p.grad`` are views into ``flat``): backward has
    accumulated the gradient into the buffer already, so a hook only marks its parameter ready; a ``.grad``
    that is not the view (replaced by someone) is copied in and the view re-attached, a None one is zero.
    ``views``: the owner's view objects (parameter order, into ``flat``), so that ``p.grad`` stays the same
    tensor object the owner attached."""

    def __init__(self, params, flat: torch.Tensor, layout: SourceLayout, *, bucket_numel: int,
                 accumulate: Optional[float] = None, grads_are_views: bool = False, views: Optional[list] = None):
        self.params = list(params)
        self.flat, self.layout, self.accumulate = flat, layout, accumulate
        self.grads_are_views = bool(grads_are_views) and accumulate is None
        self.mean = accumulate is not None
        self.ranges = layout.bucket_ranges(flat.numel(), bucket_numel, mean=self.mean)
        self.views, self.param_buckets, off = [], [], 0
        self.bucket_params = [0] * len(self.ranges)
        for i, p in enumerate(self.params):
            n = p.numel()
            self.views.append(views[i] if views is not None else flat[off:off + n].view_as(p))
            bs = [b for b, (lo, hi) in enumerate(self.ranges) if n and lo < off + n and off < hi]
            self.param_buckets.append(bs)
            for b in bs:
                self.bucket_params[b] += 1
            off += n
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._shard = None
        self.copies = 0
        self.last_copies = 0
        """Gradients copied into the buffer in the last micro-step (``grads_are_views``: ``.grad`` replaced)."""
        self.armed = False
        self.ready = [False] * len(self.params)
        self.missing = list(self.bucket_params)
        self.red: Optional[Reduction] = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _new_reduction(self) -> Reduction:
        red = Reduction(self.layout, self.flat, self.ranges, mean=self.mean, shard=self._shard)
        self._shard = red.shard
        return red

    def arm(self, launch: bool = True) -> None:
        """Before a backward. ``launch=False``: only move the gradients (no collective in this backward)."""
        if self.armed:
            raise RuntimeError("GradBuckets.arm() twice without finish(): with nexus.overlap_grad_reduce every "
                               "backward must be followed by the optimizer's micro-step")
        self.armed = True
        self.ready = [False] * len(self.params)
        self.missing = list(self.bucket_params)
        self.red = self._new_reduction() if launch else None
        self._launch_ready()

    def _launch_ready(self) -> None:
        red = self.red
        while red is not None and red.launched < len(self.ranges) and self.missing[red.launched] == 0:
            red.launch(red.launched)

    def _move(self, i: int, g: torch.Tensor) -> None:
        if self.accumulate is None:
            self.views[i].copy_(g)
        else:
            self.views[i].add_(g, alpha=self.accumulate)

    def _take(self, i: int, p) -> None:
        """Parameter i's gradient into the buffer; ``p.grad`` freed (or, with views, the view kept)."""
        g, v = p.grad, self.views[i]
        if self.grads_are_views:
            if g is not v:
                if g is None:
                    v.zero_()
                elif g.data_ptr() != v.data_ptr() or g.stride() != v.stride():
                    v.copy_(g)
                    self.copies += 1
                p.grad = v
            return
        if g is not None:
            self._move(i, g)
            p.grad = None
        elif self.accumulate is None:
            v.zero_()

    @torch.no_grad()
    def _hook(self, p) -> None:
        if not self.armed:
            return
        i = self._index[id(p)]
        if self.ready[i]:
            raise RuntimeError("a parameter's gradient was produced twice in one backward; with "
                               "nexus.overlap_grad_reduce run one backward per micro-step (or turn the overlap off)")
        self._take(i, p)
        self.ready[i] = True
        for b in self.param_buckets[i]:
            self.missing[b] -= 1
        self._launch_ready()

    @torch.no_grad()
    def finish(self, launch: bool = True) -> Optional[Reduction]:
        """After backward: complete the buffer and start every remaining bucket (``launch=False``: no
        reduction in this micro-step). Returns the started :class:`Reduction` (or None)."""
        for i, p in enumerate(self.params):
            if self.armed and self.ready[i]:
                continue
            self._take(i, p)
        self.last_copies, self.copies = self.copies, 0
        red = None
        if launch:
            red = self.red if self.red is not None else self._new_reduction()
            red.launch_all()
        self.armed, self.red = False, None
        return red


_GROUP_CACHE: dict = {}
"""The package's one cache of process groups: member ranks -> group (None for a group of one rank that no
caller asked to materialize)."""


def new_groups(member_lists, *, singletons: bool = False):
    """The process groups with these member lists, created in this order (``dist.new_group`` is collective
    over the world: every rank must call this with the same lists), each once per job; returns this rank's
    group (the first list holding it), or None when it is in none. A one-rank list gives None unless
    ``singletons`` (DeepSpeed and Megatron want a real group object even for one rank). Every engine builds
    its groups here (the layouts' source and cross groups, DeepSpeed's data-parallel and one-rank
    model-parallel groups, Megatron's optimizer instances)."""
    me = dist.get_rank()
    mine = None
    for members in member_lists:
        members = tuple(int(r) for r in members)
        if len(members) > 1 or singletons:
            if members not in _GROUP_CACHE:
                _GROUP_CACHE[members] = dist.new_group(list(members))
            g = _GROUP_CACHE[members]
        else:
            g = None
        if mine is None and me in members:
            mine = g
    return mine


def _all_dp_groups(dp_ranks: Sequence[int]) -> list:
    """The data-parallel rank lists of every data-parallel group of the job (collective)."""
    all_dp = [None] * dist.get_world_size()
    dist.all_gather_object(all_dp, list(dp_ranks))
    return sorted({tuple(r) for r in all_dp})


_SOURCE_GROUPS: dict = {}


def _build_source_groups(dp_ranks: Sequence[int], K: int, S: int):
    """The source groups and cross groups of every data-parallel group in the job (built through
    :func:`new_groups`, in the same order on every rank); returns this rank's two."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, None
    key = (tuple(dp_ranks), K, S)
    if key not in _SOURCE_GROUPS:
        unique = _all_dp_groups(dp_ranks)
        src = new_groups([ranks[i * S:(i + 1) * S] for ranks in unique for i in range(K)])
        cross = new_groups([[ranks[i * S + j] for i in range(K)] for ranks in unique for j in range(S)])
        _SOURCE_GROUPS[key] = (src, cross)
    return _SOURCE_GROUPS[key]


_LAYOUT_REGISTRY = {"sequential": SequentialLayout, "source-parallel": SourceParallelLayout}


def build_layout(cfg: LayoutConfig, dp_group=None, norm_group=None) -> SourceLayout:
    """The layout object for ``cfg`` on this rank (collective: every rank must call it)."""
    return _LAYOUT_REGISTRY[cfg.mode](cfg, dp_group=dp_group, norm_group=norm_group)
