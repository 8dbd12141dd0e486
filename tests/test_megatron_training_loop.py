"""Nexus inside Megatron-LM's own training loop (``megatron.training``, shipped by megatron-core >= 0.17):
``pretrain()`` from the wheel, Megatron's own argument parsing and validation, ``--optimizer nexus``.

Runs with torchrun on CPU (gloo, the test-only shim of tests/mcore_cpu_shim.py). megatron-core 0.16 does not
ship ``megatron.training``; there the hook-in recipe of docs/megatron.md §2 applies (test_megatron.py)."""
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


def _run(argv, nproc, port, tmp_path, expect_ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TORCHDYNAMO_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           LAUNCHER, "--cpu-test-shim"] + argv
    r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def _iterations(out: str):
    return [(int(i), float(loss), float(g)) for i, loss, g in ITER.findall(out)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.conftest import write_synthetic_data
    return write_synthetic_data(str(tmp_path_factory.mktemp("mlm") / "d"))


def test_dp2_through_megatron_loop_equals_single_process(data, tmp_path):
    """--optimizer nexus, sequential layout, K=2: two data-parallel ranks (each 1 micro-batch per inner step)
    give the same losses and G norms as one process (2 micro-batches per inner step) on the same samples; a
    different K gives a different run (the --nexus-* flags reach the optimizer)."""
    args = tiny_gpt(data) + ["--nexus-micro-steps", "2"]
    two = _iterations(_run(args, 2, 29631, tmp_path).stdout)
    one = _iterations(_run(args, 1, 29632, tmp_path).stdout)
    assert [i for i, _, _ in two] == [1, 2, 3] == [i for i, _, _ in one], (two, one)
    for (_, l2, g2), (_, l1, g1) in zip(two, one):      # printed with 7 significant digits; the DP mean of the
        assert abs(l2 - l1) <= 2e-6 * abs(l1) and g2 == g1, (two, one)     # loss rounds in the last one
    k4 = _iterations(_run(tiny_gpt(data) + ["--nexus-micro-steps", "4"], 1, 29633, tmp_path).stdout)
    assert k4[0][1] == one[0][1] and abs(k4[1][1] - one[1][1]) > 1e-4    # same start, K changes the trajectory


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


@pytest.mark.parametrize("extra,flag", [
    (["--rampup-batch-size", "4", "4", "16"], "--rampup-batch-size"),
    (["--num-experts", "4", "--moe-router-topk", "2"], "--num-experts"),      # Mixtral-style MoE
    (["--mtp-num-layers", "1", "--position-embedding-type", "rope"], "--mtp-num-layers"),
    (["--fp16"], "--fp16"),
    (["--eval-iters", "2"], "--eval-iters"),
])
def test_unsupported_flags_stop_before_training(data, tmp_path, extra, flag):
    r = _run(tiny_gpt(data) + extra, 1, 29635, tmp_path, expect_ok=False)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert f"NexusConfigError: {flag}" in out, out[-3000:]
    assert " iteration " not in r.stdout
