"""Nexus with Megatron's ``--overlap-param-gather`` (distributed optimizer): real processes (2 ranks, gloo, the
CPU shim in the workers only).

* The same run with the overlap on and off gives bitwise the same losses and parameters (sequential and
  source-parallel layouts, DP=2, the distributed optimizer; the gather only copies shards, so nothing rounds
  differently).
* The gather after an inner step is really left to the next forward pass: no all-gather is started inside
  ``inner_step``; the next pass's forward pre-hooks dispatch it asynchronously (a pending handle) and wait for
  it; and right after ``inner_step`` the model params outside this rank's shard still hold the previous point.
* A checkpoint saved right after an outer step holds the complete parameters (the save finishes the gather).

One spawn runs everything; the tests assert on what it returns.
"""
import pytest
import torch

from tests import mcore_helpers as H
from tests.distributed import run_distributed

pytest.importorskip("megatron.core")

STEPS, K = 3, 2


def _build(mode, overlap):
    """H.build_nexus with Megatron's ``overlap_param_gather`` on the DDP or not; ``overlap_grad_reduce`` and
    small buckets in both cases, so both runs have the same buckets (several bucket groups) and the same
    shard ranges, and only the param gather differs."""
    model, tcfg = H.build_model()
    ddp, opt, sched, groups = H.build_nexus(
        model, tcfg, mode=mode, num_sources=3 if mode == "sequential" else 2, distopt=True, k=K,
        ddp_kwargs=dict(overlap_param_gather=overlap, overlap_grad_reduce=True, bucket_size=2000))
    assert ddp.ddp_config.overlap_param_gather is overlap
    return model, ddp, opt, sched, groups


def _flat_model(model):
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


class Probe:
    """Records, per bucket group, every start/finish of the parameter all-gather with the phase it ran in
    (``inner``: inside ``inner_step``; ``sync``: the test's own sync_model_params; ``run``: anything else, i.e.
    the forward pre-hooks and the outer step), and snapshots of the model params right after ``inner_step``
    and right after each forward pass."""

    def __init__(self, model, ddp, opt):
        self.events, self.phase = [], "run"
        self.after_inner, self.after_forward = [], []
        for i, bg in enumerate(ddp.bucket_groups):
            self._wrap(i, bg)
        inner = opt.inner_step

        def inner_step(*a, **k):
            self.phase = "inner"
            try:
                return inner(*a, **k)
            finally:
                self.phase = "run"
                self.after_inner.append(_flat_model(model))
        opt.inner_step = inner_step
        model.register_forward_hook(lambda *a: self.after_forward.append(_flat_model(model)))

    def _wrap(self, i, bg):
        start, finish = bg.start_param_sync, bg.finish_param_sync

        def start_param_sync(force_sync=False):
            start(force_sync=force_sync)
            self.events.append(("start", i, self.phase, bool(force_sync), bg.param_gather_handle is not None))

        def finish_param_sync(skip_next_bucket_dispatch=False):
            self.events.append(("finish", i, self.phase, bg.param_gather_dispatched,
                                bg.param_gather_handle is not None))
            finish(skip_next_bucket_dispatch=skip_next_bucket_dispatch)
        bg.start_param_sync, bg.finish_param_sync = start_param_sync, finish_param_sync


def _one_step(ddp, opt, sched, groups):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from nexus_megatron.engines.megatron import nexus_forward_backward
    fb = nexus_forward_backward(opt, get_forward_backward_func())
    ddp.zero_grad_buffer()
    opt.zero_grad()
    out = fb(forward_step_func=H.forward_step, data_iterator=H.TestIterator(groups.layout), model=[ddp],
             num_microbatches=K, seq_length=H.SEQ, micro_batch_size=H.MBS, forward_only=False)
    ok, _, _ = opt.step()
    assert ok
    sched.step(1)
    return [float(d["lm loss"]) for d in out]


def _run(model, ddp, opt, sched, groups, probe=None, steps=STEPS):
    losses, hist = [], []
    for _ in range(steps):
        losses += _one_step(ddp, opt, sched, groups)
        if probe is not None:
            probe.phase = "sync"
        opt.sync_model_params()          # complete the params before reading them (no-op without the overlap)
        if probe is not None:
            probe.phase = "run"
        hist.append(H.gather_full_params(model))
    return losses, hist


def _worker(rank, world, ckpt_root):
    from nexus_megatron.engines.megatron.checkpoint import load_checkpoint, save_checkpoint
    H.init_megatron()
    out = {}
    for mode in ("sequential", "source-parallel"):
        for overlap in (False, True):
            model, ddp, opt, sched, groups = _build(mode, overlap)
            probe = Probe(model, ddp, opt)
            losses, hist = _run(model, ddp, opt, sched, groups, probe)
            n = sum(p.numel() for p in model.parameters())
            # this rank's shard of the (single) param buffer, in model.parameters() order
            local = torch.zeros(n, dtype=torch.bool)
            off = 0
            for p in model.parameters():
                ranges = opt.children[0].model_param_gbuf_map   # only params with a part in this rank's shard
                if p in ranges:
                    r = opt.children[0]._get_model_param_range_map(p)["param"]
                    local[off + r.start: off + r.end] = True
                off += p.numel()
            # after inner_step m of each step, vs after the next pass's forward (the one right after)
            stale = []
            for s in range(STEPS):
                a = probe.after_inner[s * K]               # after inner step 0 of outer step s
                f = probe.after_forward[s * K + 1]         # after the forward of pass 1 (same point)
                stale.append({"remote_changed": bool((a[~local] != f[~local]).any()),
                              "local_same": bool(torch.equal(a[local], f[local]))})
            out[(mode, overlap)] = {"losses": losses, "hist": hist, "events": probe.events, "stale": stale,
                                    "n_buckets": len(ddp.bucket_groups)}

    # checkpoint right after an outer step with the overlap on (the last gather not done yet), loaded into a
    # run without the overlap (nothing gathers before its first forward): the loaded params are complete.
    model, ddp, opt, sched, groups = _build("sequential", True)
    _run(model, ddp, opt, sched, groups, steps=1)
    _one_step(ddp, opt, sched, groups)               # no sync after it: the gather waits for a forward
    stale_before_save = H.gather_full_params(model)
    save_checkpoint(ckpt_root, 2, [ddp], opt, sched)
    saved = H.gather_full_params(model)
    model2, ddp2, opt2, sched2, _ = _build("sequential", False)
    load_checkpoint(ckpt_root, [ddp2], opt2, sched2)
    out["ckpt"] = {"stale_differs": H.rel_error(stale_before_save, saved) > 0,
                   "loaded_err": H.rel_error(H.gather_full_params(model2), saved)}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("mcore_ov")), timeout=600, preload="megatron")


@pytest.mark.parametrize("mode", ["sequential", "source-parallel"])
def test_overlap_gives_bitwise_the_same_run(runs, mode):
    for r in runs:
        off, on = r[(mode, False)], r[(mode, True)]
        assert len(on["losses"]) == STEPS * K and on["losses"] == off["losses"]
        assert H.rel_error(on["hist"][-1], off["hist"][0]) > 1e-3           # the params moved
        for a, b in zip(on["hist"], off["hist"]):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0][(mode, True)]["n_buckets"] >= 2                         # the chained per-bucket dispatch


def test_inner_step_leaves_the_gather_to_the_next_forward(runs):
    """Sequential layout (the gather runs over both ranks)."""
    for r in runs:
        on, off = r[("sequential", True)], r[("sequential", False)]
        nb = on["n_buckets"]
        starts = [e for e in on["events"] if e[0] == "start"]
        assert not [e for e in starts if e[2] == "inner"]                   # nothing started inside inner_step
        fwd = [e for e in starts if e[2] == "run"]
        assert fwd and all(not e[3] and e[4] for e in fwd)                  # async: a pending handle each
        # the forward pre-hooks gather after every inner step (pass 1 of each outer step) and for the very
        # first pass; after each outer step the test's sync_model_params gathered already (synchronously)
        assert len(fwd) == nb * (STEPS * (K - 1) + 1)
        assert len([e for e in starts if e[2] == "sync" and e[3]]) == nb * STEPS
        # each of them waited for by a pre-hook: the first bucket of a pass is dispatched by its own pre-hook
        # (not dispatched on entry) and waited at once, each later one was dispatched by the previous bucket's
        # pre-hook and is pending on entry
        first = [e for e in on["events"] if e[0] == "finish" and not e[3]]
        pending = [e for e in on["events"] if e[0] == "finish" and e[4]]
        assert len(first) == STEPS * (K - 1) + 1 and len(first) + len(pending) == len(fwd)
        assert all(e[2] == "run" for e in first + pending)
        for s in on["stale"]:
            assert s["remote_changed"] and s["local_same"]                  # remote part gathered in the forward
        # control: without the overlap the gather is synchronous inside inner_step, nothing is stale
        off_starts = [e for e in off["events"] if e[0] == "start"]
        # (every inner step but the last of each outer step: step() publishes right after it)
        assert len([e for e in off_starts if e[2] == "inner"]) == off["n_buckets"] * STEPS * (K - 1)
        for s in off["stale"]:
            assert not s["remote_changed"] and s["local_same"]


def test_checkpoint_after_a_step_holds_the_gathered_params(runs):
    for r in runs:
        assert r["ckpt"]["stale_differs"]                # the gather was still pending when save was called
        assert r["ckpt"]["loaded_err"] == 0.0
