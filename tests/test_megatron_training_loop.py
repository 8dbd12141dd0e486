"""Nexus inside Megatron-LM's own training loop (``megatron.training``, shipped by megatron-core >= 0.17):
``pretrain()`` from the wheel, Megatron's own argument parsing and validation, ``--optimizer nexus``.

Runs on CPU (gloo, the test-only shim nexus_megatron/tools/mcore_cpu_shim.py). The launcher runs on ranks forked
with torchrun's environment variables from a server that imported megatron.training once (tests/distributed.py
run_script); two tests run it under torchrun itself, and the data-parallel one compares the two. megatron-core
0.16 does not ship ``megatron.training``; there the hook-in recipe of docs/megatron.md §2 applies
(test_megatron.py)."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")
try:
    import importlib.util
    HAVE_TRAINING = importlib.util.find_spec("megatron.training") is not None
except (ImportError, ValueError):
    HAVE_TRAINING = False
pytestmark = pytest.mark.skipif(not HAVE_TRAINING, reason="megatron-core < 0.17 ships no megatron.training "
                                "(the 0.16 path is tested in test_megatron.py)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launch", "pretrain_gpt_nexus.py")
ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?lm loss: ([0-9.E+-]+) .*?grad norm: ([0-9.]+)")


def tiny_gpt(data, iters=3):  # noqa: D401
    """A tiny GPT modelled on Megatron-LM's examples/gpt3/train_gpt3_175b_distributed.sh (shapes cut, fp8 and
    bf16 removed: bf16 is ~20x slower on this CPU)."""
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
            "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
            "--init-method-std", "0.006", "--train-iters", str(iters),
            "--data-path", "0.6", os.path.join(data, "web"), "0.4", os.path.join(data, "code"),
            "--split", "969,30,1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "255",
            "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000",
            "--hidden-dropout", "0", "--attention-dropout", "0",
            "--optimizer", "nexus", "--nexus-gamma", "1.0"] + CPU_FLAGS


CPU_FLAGS = ["--distributed-backend", "gloo", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
             "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
             "--use-cpu-initialization", "--no-persist-layer-norm"]


def _run(argv, nproc, port, tmp_path, expect_ok=True, torchrun=False):
    """The launcher on ``nproc`` ranks, in ``tmp_path``. ``torchrun=True``: under torchrun itself, as a user runs
    it; otherwise on ranks forked by tests/distributed.py's run_script with torchrun's environment variables (the
    same launcher code, without importing megatron.training again in each rank: ~10 s a rank on this CPU).
    ``port`` only names the call: the rendezvous takes a free port (a fixed one collides when two suites run at
    once on one machine)."""
    from tests.distributed import run_script
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TORCHDYNAMO_DISABLE="1", CUDA_DEVICE_MAX_CONNECTIONS="1")    # as Megatron-LM's example scripts
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               LAUNCHER, "--cpu-test-shim"] + argv
        r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    else:
        r = run_script(LAUNCHER, ["--cpu-test-shim"] + argv, nproc, cwd=tmp_path, env=env, timeout=900)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _iterations(out: str):
    return [(int(i), float(loss), float(g)) for i, loss, g in ITER.findall(out)]


LOG = re.compile(r"iteration\s+(\d+)/\s*(\d+) \| consumed samples:\s+(\d+) .*?learning rate: ([0-9.E+-]+) \| "
                 r"global batch size:\s+(\d+) \| lm loss: ([0-9.E+-]+) .*?grad norm: ([0-9.]+)")


def _log(out: str):
    """(iteration, of, consumed samples, learning rate, global batch, lm loss, grad norm) per logged iteration."""
    return [(int(a), int(b), int(c), float(d), int(e), float(f), float(g)) for a, b, c, d, e, f, g in LOG.findall(out)]


def _without(args, *flags):
    out = list(args)
    for f in flags:
        i = out.index(f)
        del out[i:i + 2]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.conftest import write_synthetic_data
    return write_synthetic_data(str(tmp_path_factory.mktemp("mlm") / "d"))


@pytest.fixture(scope="module")
def one_process_stdout(data, tmp_path_factory):
    """The log of the 1-process run of tiny_gpt with K = 2."""
    return _run(tiny_gpt(data) + ["--nexus-micro-steps", "2"], 1, 29632, tmp_path_factory.mktemp("one")).stdout


@pytest.fixture(scope="module")
def one_process(one_process_stdout):
    """The 1-process run of tiny_gpt with K = 2: the reference of the data-, tensor-parallel runs."""
    return _iterations(one_process_stdout)


NEXUS_LINE = re.compile(r"\[nexus\] iteration\s+(\d+) \| (.*)")


def _nexus_stats(out: str) -> dict:
    """{iteration: {metric: value}} from the ``[nexus]`` lines Nexus prints after Megatron's own."""
    stats = {}
    for it, rest in NEXUS_LINE.findall(out):
        stats[int(it)] = {k: float(v) for k, v in (kv.split(": ") for kv in rest.strip().split(" | "))}
    return stats


def test_dp2_through_megatron_loop_equals_single_process(data, tmp_path, one_process, one_process_stdout):
    """--optimizer nexus, sequential layout, K=2: two data-parallel ranks (each 1 micro-batch per inner step)
    give the same losses and G norms as one process (2 micro-batches per inner step) on the same samples; a
    different K gives a different run (the --nexus-* flags reach the optimizer)."""
    args = tiny_gpt(data) + ["--nexus-micro-steps", "2"]
    out2 = _run(args, 2, 29631, tmp_path, torchrun=True).stdout   # torchrun itself: the forked ranks agree
    two = _iterations(out2)
    one = one_process
    assert [i for i, _, _ in two] == [1, 2, 3] == [i for i, _, _ in one], (two, one)
    for (_, l2, g2), (_, l1, g1) in zip(two, one):      # printed with 7 significant digits; the DP mean of the
        assert abs(l2 - l1) <= 2e-6 * abs(l1) and g2 == g1, (two, one)     # loss rounds in the last one
    # Nexus's own statistics after Megatron's log line (and to its TensorBoard / W&B writers): every source's
    # mean inner gradient norm, gamma_t, the skip counters; the same on 2 ranks as in 1 process
    s1, s2 = _nexus_stats(one_process_stdout), _nexus_stats(out2)
    assert sorted(s2) == [1, 2, 3] == sorted(s1), (s1, s2)
    assert {k for i in s1 for k in s1[i] if k.startswith("nexus/gnorm/")} == {"nexus/gnorm/web", "nexus/gnorm/code"}
    for i in s1:        # a step's norms: the sources its K = 2 inner steps drew (by weight)
        assert set(s1[i]) >= {"nexus/gamma", "nexus/skipped_steps"} and set(s2[i]) == set(s1[i]), (i, s1, s2)
        assert s1[i]["nexus/skipped_steps"] == 0, s1
        assert (s1[i]["nexus/gamma"] == 0) == (i == 1), s1      # lr 0 at the first warmup iteration: gamma_t = 0
        for k in (k for k in s1[i] if k.startswith("nexus/gnorm/")):
            assert s1[i][k] > 0 and abs(s2[i][k] - s1[i][k]) <= 1e-5 * s1[i][k], (i, k, s1, s2)
    k4 = _iterations(_run(tiny_gpt(data) + ["--nexus-micro-steps", "4"], 1, 29633, tmp_path).stdout)
    assert k4[0][1] == one[0][1] and abs(k4[1][1] - one[1][1]) > 1e-4    # same start, K changes the trajectory


def test_bf16_through_megatron_loop_equals_single_process(data, tmp_path, one_process):
    """--bf16 (as every Megatron-LM example script trains): bf16 parameters and activations, Megatron's fp32 main
    params, which Nexus's anchor and inner steps work on. 2 data-parallel ranks give the losses and G norms of 1
    process; the run is a bf16 run (its first loss differs from the fp32 run's) and stays within bf16 rounding of
    it."""
    args = tiny_gpt(data) + ["--nexus-micro-steps", "2", "--bf16"]
    one = _iterations(_run(args, 1, 29656, tmp_path).stdout)
    two = _iterations(_run(args, 2, 29657, tmp_path).stdout)
    assert [i for i, _, _ in two] == [1, 2, 3] == [i for i, _, _ in one], (two, one)
    for (_, l2, g2), (_, l1, g1) in zip(two, one):
        assert abs(l2 - l1) <= 2e-6 * abs(l1) and g2 == g1, (two, one)
    assert one[0][1] != one_process[0][1], (one, one_process)
    for (_, lb, _), (_, lf, _) in zip(one, one_process):
        assert abs(lb - lf) <= 1e-3 * abs(lf), (one, one_process)


VALIDATION = re.compile(r"validation loss at (iteration \d+(?: on validation set)?) \| lm loss value: ([0-9.E+-]+)")


def test_validation_through_megatron_loop(data, tmp_path, one_process):
    """--eval-iters / --eval-interval, as every Megatron-LM example script passes them: Megatron's own evaluate()
    runs on the blended validation stream of the sources (engines/megatron/data.py, ValidationIterator) every
    --eval-interval iterations and after training. The training run is the one without validation (the
    forward-only passes leave the Nexus state alone); two data-parallel ranks report the validation losses of one
    process (the same validation samples whatever the data-parallel size); the second evaluation reads new
    samples, as Megatron's continues."""
    args = _without(tiny_gpt(data), "--eval-iters", "--eval-interval") + [
        "--nexus-micro-steps", "2", "--eval-iters", "2", "--eval-interval", "2"]
    r1 = _run(args, 1, 29651, tmp_path)
    assert _iterations(r1.stdout) == one_process
    v1 = [(p, float(v)) for p, v in VALIDATION.findall(r1.stdout)]
    assert [p for p, _ in v1] == ["iteration 2", "iteration 3 on validation set"], r1.stdout[-3000:]
    assert all(2.0 < v < 6.0 for _, v in v1) and v1[0][1] != v1[1][1], v1
    r2 = _run(args, 2, 29652, tmp_path)
    v2 = [(p, float(v)) for p, v in VALIDATION.findall(r2.stdout)]
    assert [p for p, _ in v2] == [p for p, _ in v1]
    for (_, a), (_, b) in zip(v2, v1):     # printed with 7 significant digits
        assert abs(a - b) <= 2e-6 * abs(b), (v2, v1)


@pytest.mark.parametrize("split", [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_model_parallel_through_megatron_loop_equals_single_process(data, tmp_path_factory, split):
    """TP=2 (the norms count the TP-replicated parameters once) and PP=2 (one layer per stage, tied embeddings
    reduced over the embedding group, 2 micro-batches per pass) on 2 ranks: the losses and G norms of the 1-process
    run. All start from one dist_checkpointing checkpoint of a trained step (--load --finetune; resharded), as
    Megatron's initialization differs with the split."""
    ck = _trained_checkpoint(data, tmp_path_factory)
    args = tiny_gpt(data) + ["--nexus-micro-steps", "2", "--load", ck, "--finetune", "--no-load-optim",
                             "--no-load-rng"]
    tmp = tmp_path_factory.mktemp("mp")
    one = _CACHE.get("one_from_ckpt") or _CACHE.setdefault("one_from_ckpt", _iterations(_run(args, 1, 29648,
                                                                                           tmp).stdout))
    two = _iterations(_run(args + split, 2, 29647, tmp).stdout)
    assert [i for i, _, _ in two] == [1, 2, 3] == [i for i, _, _ in one], (two, one)
    for (_, l2, g2), (_, l1, g1) in zip(two, one):
        assert abs(l2 - l1) <= 2e-6 * abs(l1) and g2 == g1, (two, one)


def test_virtual_pipeline_through_megatron_loop_equals_single_process(data, tmp_path_factory):
    """Interleaved (virtual) pipeline: 4 layers, PP=2 x 2 virtual stages per rank (one layer per model chunk, a
    list of data iterators and model chunks in Megatron's interleaved schedule) on 2 ranks: the losses and G norms
    of the 1-process run, both loaded with --load --finetune from one trained 4-layer checkpoint."""
    four = lambda: _without(tiny_gpt(data), "--num-layers") + ["--num-layers", "4"]
    ck = str(tmp_path_factory.mktemp("ck4") / "ck")
    _run(_without(four(), "--train-iters", "--lr-warmup-iters") + [
        "--train-iters", "1", "--lr-warmup-iters", "0", "--lr-decay-iters", "3", "--save", ck, "--save-interval", "1"],
        1, 29653, tmp_path_factory.mktemp("ck4run"))
    args = four() + ["--nexus-micro-steps", "2", "--load", ck, "--finetune", "--no-load-optim", "--no-load-rng"]
    tmp = tmp_path_factory.mktemp("vpp")
    one = _iterations(_run(args, 1, 29654, tmp).stdout)
    r = _run(args + ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"], 2, 29655,
             tmp)
    assert re.search(r"virtual_pipeline_model_parallel_size \.+ 2\n", r.stdout), r.stdout[:3000]   # Megatron's dump
    vpp = _iterations(r.stdout)
    assert [i for i, _, _ in vpp] == [1, 2, 3] == [i for i, _, _ in one], (vpp, one)
    for (_, l2, g2), (_, l1, g1) in zip(vpp, one):
        assert abs(l2 - l1) <= 2e-6 * abs(l1) and g2 == g1, (vpp, one)


_CACHE: dict = {}


PARAMS = re.compile(r"number of parameters on \(tensor, [a-z_, ]*\) model parallel rank \([0, ]*\): (\d+)")


def test_mtp_through_megatron_loop_equals_single_process(data, tmp_path):
    """Multi-token prediction (--mtp-num-layers 1; Megatron-LM wants RoPE) with --clip-grad 0.05 below every G norm,
    so the outer step clips: two data-parallel ranks give the losses, G norms and Nexus's per-source norms of one
    process on the same samples. Megatron-LM's loop leaves the MTP parameters in the main grad-norm group (it has
    no --mtp-detach-heads); their share of n_i and the separate group's clipping are checked against a hand
    computation and Megatron's own Adam in test_megatron_mtp.py. The MTP layer takes part: without it the run
    differs."""
    clip = 0.05
    args = _without(tiny_gpt(data), "--clip-grad") + ["--clip-grad", str(clip), "--nexus-micro-steps", "2",
                                                      "--position-embedding-type", "rope"]
    mtp = args + ["--mtp-num-layers", "1"]
    out1 = _run(mtp, 1, 29661, tmp_path).stdout
    out2 = _run(mtp, 2, 29662, tmp_path).stdout
    assert re.search(r"mtp_num_layers \.+ 1\n", out1), "the MTP flag did not reach Megatron's arguments"
    assert "mtp_1 loss" in out1 and "mtp_1 loss" in out2, "Megatron reports no MTP loss"
    one, two = _iterations(out1), _iterations(out2)
    assert [i for i, _, _ in two] == [1, 2, 3] == [i for i, _, _ in one], (two, one)
    for (_, l2, g2), (_, l1, g1) in zip(two, one):      # printed with 7 significant digits
        assert abs(l2 - l1) <= 2e-6 * abs(l1) and g2 == g1, (two, one)
        assert g1 > clip, (clip, one)                   # the clipping acts on G
    s1, s2 = _nexus_stats(out1), _nexus_stats(out2)
    assert sorted(s2) == [1, 2, 3] == sorted(s1), (s1, s2)
    for i in s1:
        assert set(s2[i]) == set(s1[i]) and s1[i]["nexus/skipped_steps"] == 0, (i, s1, s2)
        gn = [k for k in s1[i] if k.startswith("nexus/gnorm/")]
        assert gn, s1
        for k in gn:
            assert s1[i][k] > 0 and abs(s2[i][k] - s1[i][k]) <= 1e-5 * s1[i][k], (i, k, s1, s2)
    plain_out = _run(args, 1, 29663, tmp_path).stdout                # the same run without MTP
    plain = _iterations(plain_out)
    n_mtp, n_plain = (int(PARAMS.search(o).group(1)) for o in (out1, plain_out))
    # the MTP block exists: one more transformer layer, the eh projection and its norms (GPTModel builds it only
    # from an MTP block spec; without one the model would split the decoder output instead)
    assert n_mtp > n_plain + 4 * 32 * 32, (n_mtp, n_plain)
    assert plain[0][1] == one[0][1], (plain, one)      # the same lm loss at the start (MTP's loss is extra) ...
    assert abs(plain[1][1] - one[1][1]) > 1e-5 * abs(one[1][1]), (plain, one)   # ... then MTP changed the training
    assert plain[0][2] != one[0][2], (plain, one)      # and the G norm (its parameters' gradients count in G)


def _trained_checkpoint(data, tmp_path_factory):
    if "ck" not in _CACHE:
        ck = str(tmp_path_factory.mktemp("ck") / "ck")
        args = _without(tiny_gpt(data), "--train-iters", "--lr-warmup-iters") + [
            "--train-iters", "1", "--lr-warmup-iters", "0", "--lr-decay-iters", "3", "--save", ck,
            "--save-interval", "1"]
        _run(args, 1, 29649, tmp_path_factory.mktemp("ckrun"))
        _CACHE["ck"] = ck
    return _CACHE["ck"]


def test_llama_style_arguments_train(data, tmp_path):
    """Modelled on examples/llama/train_llama3_8b*.sh (shapes cut, fp8 removed): RMSNorm, SwiGLU, RoPE, GQA,
    untied embeddings, no biases, sample-based schedule, the distributed optimizer; every flag is Megatron's own."""
    args = [a for a in tiny_gpt(data) if a not in ()]
    i = args.index("--train-iters")
    del args[i:i + 2]
    i = args.index("--lr-warmup-iters")
    del args[i:i + 2]
    args += ["--train-samples", "24", "--lr-warmup-samples", "8", "--lr-decay-samples", "24",
             "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
             "--group-query-attention", "--num-query-groups", "2", "--untie-embeddings-and-output-weights",
             "--disable-bias-linear", "--use-distributed-optimizer", "--calculate-per-token-loss",
             "--ffn-hidden-size", "64", "--nexus-micro-steps", "2"]
    its = _iterations(_run(args, 2, 29634, tmp_path).stdout)
    assert [i for i, _, _ in its] == [1, 2, 3]
    assert all(loss == loss and loss < 6.0 for _, loss, _ in its)


def test_sample_based_schedule_equals_iteration_based(data, tmp_path):
    """--train-samples / --lr-warmup-samples / --lr-decay-samples: one outer step (K inner steps) consumes one
    global batch, so Megatron's sample counts map to outer steps as samples / global batch: the sample-based run
    (24 samples, warmup 8, decay 24, global batch 8) is the iteration-based run (3 iterations, warmup 1, decay 3)
    step for step: consumed samples, learning rates, losses and G norms."""
    iters = tiny_gpt(data) + ["--lr-decay-iters", "3", "--nexus-micro-steps", "2"]
    samples = _without(iters, "--train-iters", "--lr-warmup-iters", "--lr-decay-iters") + [
        "--train-samples", "24", "--lr-warmup-samples", "8", "--lr-decay-samples", "24"]
    a = _log(_run(iters, 1, 29636, tmp_path).stdout)
    b = _log(_run(samples, 1, 29637, tmp_path).stdout)
    assert [r[:3] for r in a] == [(1, 3, 8), (2, 3, 16), (3, 3, 24)], a
    assert a == b, (a, b)
    assert a[0][3] == 3e-3 and a[1][3] < a[0][3]        # warmup over 8 samples, then the cosine decay


def test_step_batch_size_schedule_keeps_k(data, tmp_path):
    """--step-batch-size-schedule (Megatron-LM's successor of --rampup-batch-size): K = 2 inner steps per iteration
    throughout; the iterations of global batch 4 (2 micro-batches) run passes of 1 micro-batch, those of batch 8
    (4 micro-batches, from 256 tokens = 8 samples on) passes of 2 (the per-source iterator refuses to read more
    than a pass's share): thresholds count tokens."""
    args = _without(tiny_gpt(data), "--global-batch-size", "--train-iters", "--lr-warmup-iters") + [
        "--step-batch-size-schedule", "0:4 256:8", "--train-samples", "24", "--lr-warmup-samples", "4"]
    log = _log(_run(args, 1, 29638, tmp_path).stdout)
    assert [(r[0], r[2], r[4]) for r in log] == [(1, 4, 4), (2, 8, 4), (3, 16, 8), (4, 24, 8)], log
    assert all(r[5] == r[5] and r[5] < 6.0 for r in log)


def test_resume_through_megatron_loop_continues_the_run(data, tmp_path):
    """--save / --load through Megatron's loop (dist_checkpointing, the distributed optimizer): 2 iterations,
    save, resume for the third; the third iteration is the uninterrupted run's, to the printed digits (model,
    Adam and Nexus state restored, and the per-source data positions, which Megatron's checkpoint does not hold,
    replayed from the iteration count)."""
    ck = str(tmp_path / "ck")
    args = tiny_gpt(data) + ["--lr-decay-iters", "3", "--nexus-micro-steps", "2", "--use-distributed-optimizer"]
    full = _log(_run(args, 1, 29644, tmp_path).stdout)
    first = _log(_run(args + ["--exit-interval", "2", "--save", ck, "--save-interval", "2"], 1, 29645,
                      tmp_path).stdout)           # the same schedules (Megatron checks them on load), stop at 2
    rest = _log(_run(args + ["--load", ck], 1, 29646, tmp_path).stdout)
    assert [r[0] for r in full] == [1, 2, 3] and [r[0] for r in first] == [1, 2] and [r[0] for r in rest] == [3]
    def strip(log):                                  # without "of N iterations"
        return [r[:1] + r[2:] for r in log]
    assert strip(first) == strip(full[:2]) and strip(rest) == strip(full[2:]), (full, first, rest)


def tiny_mixtral(data, iters=2):
    """Modelled on Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh (shapes cut; bf16 and
    --moe-grouped-gemm removed: the grouped GEMM kernels need a GPU): RMSNorm, SwiGLU, RoPE, GQA, untied
    embeddings, no biases, 4 experts, top-2 routing with the auxiliary load-balancing loss, the all-to-all token
    dispatcher, the distributed optimizer with overlapped grad reduce / param gather."""
    return _without(tiny_gpt(data, iters), "--init-method-std") + [
        "--init-method-std", "0.01", "--ffn-hidden-size", "64", "--normalization", "RMSNorm", "--swiglu",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--group-query-attention", "--num-query-groups", "2", "--lr-decay-iters", "3",
        "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--nexus-micro-steps", "2"]


MOE_SPLITS = {"ep2": (2, ["--expert-model-parallel-size", "2"]),
              # expert tensor parallelism: each expert's weights cut over 2 ranks, the attention data-parallel.
              # (MoE with TP > 1 needs --sequence-parallel, which needs Transformer Engine's LayerNorm: GPU only.)
              "etp2": (2, ["--expert-tensor-parallel-size", "2"])}


@pytest.mark.parametrize("split", list(MOE_SPLITS))
def test_moe_ep2_through_megatron_loop_equals_single_process(data, tmp_path_factory, split):
    """Mixture of experts with expert parallelism 2 on 2 ranks (each rank holds 2 of the 4 experts, the dense
    parameters are data-parallel over both) trains exactly like 1 process holding every expert: same losses, G
    norms (every parameter counted once: Megatron's dense and expert optimizers reduce their norms over their own
    model-parallel groups) and so the same P and gamma. Both start from one dist_checkpointing checkpoint of a
    trained step (Megatron's --load --finetune; the expert weights are resharded from EP=1 to EP=2), which is
    also what makes the initial weights equal: Megatron draws expert weights per EP rank."""
    if "moe" not in _CACHE:
        tmp = tmp_path_factory.mktemp("moe")
        ck = str(tmp / "ck")
        first = _without(tiny_mixtral(data), "--train-iters", "--lr-warmup-iters") + [
            "--train-iters", "1", "--lr-warmup-iters", "0", "--save", ck, "--save-interval", "1"]   # lr > 0 at step 1
        a = _log(_run(first, 1, 29641, tmp).stdout)
        resume = tiny_mixtral(data) + ["--load", ck, "--finetune", "--no-load-optim", "--no-load-rng"]
        _CACHE["moe"] = (a, resume, _log(_run(resume, 1, 29642, tmp).stdout))
    a, resume, one = _CACHE["moe"]
    nproc, flags = MOE_SPLITS[split]
    r = _run(resume + flags, nproc, 29643, tmp_path_factory.mktemp(split))
    for flag, value in zip(flags[::2], flags[1::2]):        # Megatron's argument dump: the split took effect
        assert re.search(rf"{flag[2:].replace('-', '_')} \.+ {value}\n", r.stdout), flag
    two = _log(r.stdout)
    assert [r[0] for r in one] == [1, 2] == [r[0] for r in two], (one, two)
    assert abs(one[0][5] - a[0][5]) > 1e-4          # the checkpoint's weights were loaded (same batches)
    for r1, r2 in zip(one, two):                    # the DP mean of the loss rounds in the 7th digit
        assert r1[:5] == r2[:5] and abs(r1[5] - r2[5]) <= 2e-6 * abs(r1[5]) and r1[6] == r2[6], (one, two)


REFUSED = [
    (["--rampup-batch-size", "4", "4", "16"], "--rampup-batch-size"),
    (["--fp16"], "--fp16"),
    (["--full-validation"], "--full-validation"),
    (["--step-batch-size-schedule", "0:4 256:6"], "--step-batch-size-schedule"),   # 3 micro-batches, K = 2
    (["--nexus-layout", "source-parallel"], "--nexus-layout source-parallel"),
]


def _parsed(argv):
    """Megatron's own parse + validate of ``argv`` (in this process; no globals set, no distributed init)."""
    from megatron.training.arguments import parse_args, validate_args
    from nexus_megatron.engines.megatron.megatron_training import add_nexus_megatron_args
    old = sys.argv
    sys.argv = ["pretrain_gpt_nexus.py"] + list(argv)
    try:
        args = parse_args(add_nexus_megatron_args)
    finally:
        sys.argv = old
    validate_args(args, {"tokenizer_type": "NullTokenizer"})
    return args


@pytest.mark.parametrize("extra,flag", REFUSED, ids=[f for _, f in REFUSED])
def test_unsupported_flags_refused_naming_the_flag(extra, flag):
    """What Nexus cannot run, parsed and validated by Megatron, is refused by the check the launcher runs before
    any model is built (check_nexus_args), with an error that starts with the flag."""
    from nexus_megatron.engines.megatron.megatron_training import check_nexus_args
    from nexus_megatron.errors import NexusConfigError
    base = tiny_gpt("/nonexistent")
    if "--step-batch-size-schedule" in extra:                    # Megatron: not with --global-batch-size
        base = _without(base, "--global-batch-size")
    args = _parsed(base + extra)
    with pytest.raises(NexusConfigError, match="^" + re.escape(flag)):
        check_nexus_args(args)
    check_nexus_args(_parsed(base + ["--step-batch-size-schedule", "0:4 256:8"] if "--step-batch-size-schedule"
                             in extra else tiny_gpt("/nonexistent")))   # the same list without the flag passes


def test_mtp_with_pipeline_parallelism_refused():
    """--mtp-num-layers is accepted (Megatron's parse + validate, then check_nexus_args), but not with pipeline
    parallelism (untested there). Megatron's validation of PP 2 needs 2 ranks: the parsed arguments of the 1-rank
    list get the pipeline size set afterwards."""
    from nexus_megatron.engines.megatron.megatron_training import check_nexus_args
    from nexus_megatron.errors import NexusConfigError
    args = _parsed(tiny_gpt("/nonexistent") + ["--mtp-num-layers", "1", "--position-embedding-type", "rope"])
    assert args.mtp_num_layers == 1
    check_nexus_args(args)
    args.pipeline_model_parallel_size = 2
    with pytest.raises(NexusConfigError, match="^" + re.escape("--mtp-num-layers with --pipeline-model-parallel-size")):
        check_nexus_args(args)


def test_refused_flag_stops_the_launcher_before_training(data, tmp_path):
    r = _run(tiny_gpt(data) + ["--rampup-batch-size", "4", "4", "16"], 1, 29635, tmp_path, expect_ok=False,
             torchrun=True)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "NexusConfigError: --rampup-batch-size" in out, out[-3000:]
    assert " iteration " not in r.stdout


def test_optimizer_nexus_is_adam_to_megatrons_validation():
    """Megatron's validate_args treats an optimizer other than sgd/adam as an "emerging" one and swaps
    --use-distributed-optimizer for its layer-wise distributed optimizer: --optimizer nexus must reach it as the
    outer optimizer, adam, with the distributed optimizer left as asked."""
    args = _parsed(tiny_gpt("/nonexistent") + ["--use-distributed-optimizer"])
    assert args.nexus_optimizer and args.optimizer == "adam"
    assert args.use_distributed_optimizer and not getattr(args, "use_layer_wise_distributed_optimizer", False)
    plain = _parsed(_without(tiny_gpt("/nonexistent"), "--optimizer") + ["--optimizer", "adam"])
    assert not plain.nexus_optimizer and plain.optimizer == "adam"
