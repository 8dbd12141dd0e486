"""launch/gpu_check.py --dry-run: the one-command GPU check runs end to end on the CPU at tiny size."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "launch", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = mod.main(["--dry-run", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and res["errors"] == {} and res["dry_run"]
    st = res["step"]
    for optim in ("adamw", "nexus"):
        r = st["runs"][optim]
        assert r["step_s"] > 0 and len(r["step_times"]) == mod.DRY["steps"] and all(map(math.isfinite, r["losses"]))
    assert st["nexus_over_adamw"]["step_time"] > 0
    sh = st["sharpness"]
    assert len(sh["measurements"]) == mod.DRY["measure"]
    w = sh["warm_median"]
    assert w["forward_passes"] >= 3 and w["param_gathers"] == 0 and w["probe_tokens"] > 0 and w["time_s"] > 0
    for optim in ("adamw", "nexus"):
        c = res["conformance"][optim]
        assert len(c["loss_fp32"]) == len(c["loss_bf16"]) == mod.DRY["small_steps"]
        assert 0 <= c["max_rel_loss_diff"] < 0.05 and math.isfinite(c["param_distance_over_fp32_move"])
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "Critical-sharpness hook" in md and "bf16 against fp32" in md


# The packages of the GPU machine's image (the device tool's KINDS.md, "nvidia-h200", as read on 2026-11-17):
# nothing else is there, and nothing can be installed from a registry. gpu_check.py must run with these alone.
GPU_IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())

# Run in a fresh interpreter: every installed module whose distributions are all outside the image is made absent
# (its import raises ModuleNotFoundError, importlib.util.find_spec gives None, as when it is not installed), except
# what the image's packages themselves require in the versions installed here (the image has its own versions and
# their own requirements); the dry run runs as `python3 launch/gpu_check.py --dry-run`, then the distributions of
# every module it imported are printed.
_IMAGE_RUN = r"""
import importlib.machinery, importlib.metadata as md, json, re, runpy, sys
image, script, out = set(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]
norm = lambda d: re.sub(r"[-_.]+", "-", d).lower()
dists = md.packages_distributions()
# what the image's packages need, in the versions installed here (the image brings its own versions of these)
from packaging.requirements import Requirement
allowed, todo = {"nexus-megatron"}, sorted(image)
while todo:
    name = todo.pop()
    if name in allowed:
        continue
    allowed.add(name)
    try:
        reqs = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    for r in map(Requirement, reqs):
        if (r.marker is None or r.marker.evaluate({"extra": ""})) and norm(r.name) not in allowed:
            todo.append(norm(r.name))
hidden = {top for top, ds in dists.items()
          if top not in sys.stdlib_module_names and not any(norm(d) in allowed for d in ds)}

class Absent(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = [script, "--dry-run", "--out", out]
try:
    runpy.run_path(script, run_name="__main__")
    rc = 0
except SystemExit as e:
    rc = e.code
used = {top: sorted(map(norm, dists.get(top, []))) for top in {m.partition(".")[0] for m in list(sys.modules)}
        if top not in sys.stdlib_module_names and not top.startswith("_") and dists.get(top)}
print("IMAGE_RUN " + json.dumps({"rc": rc, "hidden": sorted(hidden), "used": used, "allowed": sorted(allowed)}))
"""


def test_gpu_check_runs_with_only_the_gpu_images_packages(tmp_path):
    """The GPU machine has no DeepSpeed, no megatron-core, no wandb and no registry: the dry run, with every package
    outside the image's list made absent, still runs end to end, and every module it imports comes from the image."""
    script = os.path.join(ROOT, "launch", "gpu_check.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    p = subprocess.run([sys.executable, "-c", _IMAGE_RUN, json.dumps(sorted(GPU_IMAGE)), script, str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    lines = [x for x in p.stdout.splitlines() if x.startswith("IMAGE_RUN ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(lines[-1][len("IMAGE_RUN "):])
    assert res["rc"] == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # the environment is the one that would break it: these are installed here and hidden in the run
    assert {"deepspeed", "megatron", "wandb"} <= set(res["hidden"]), res["hidden"]
    outside = {top: ds for top, ds in res["used"].items() if not any(d in res["allowed"] for d in ds)}
    assert not outside, outside
    assert json.loads((tmp_path / "gpu_check.json").read_text())["errors"] == {}
