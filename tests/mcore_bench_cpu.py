"""TEST-ONLY entry: ``nexus-megatron bench --engine megatron`` on a CPU-only machine, under the megatron CPU shim.

    PYTHONPATH=. python -m tests.mcore_bench_cpu --nproc 2 [bench arguments]

megatron-core needs CUDA; nexus_megatron/tools/mcore_cpu_shim.py rewrites its CUDA calls to CPU (device='cuda' tensors,
``torch.cuda.current_device()``, the CUDA RNG tracker, ``Tensor.type()`` strings). The package never imports
that shim, so this entry installs it in the launcher and in every torchrun worker, then runs the package's own
``bench`` command (same arguments, ``--engine megatron`` implied). Figures taken this way are CPU smoke figures
(gloo, fp32), see docs/performance.md.
"""
import os
import subprocess
import sys


def main(argv=None) -> int:
    from nexus_megatron.tools.measure import COUNTER
    COUNTER.install()     # before the shim imports megatron-core (it binds torch.distributed's collectives)
    from nexus_megatron.tools.mcore_cpu_shim import patch_megatron_for_cpu
    patch_megatron_for_cpu()
    from nexus_megatron.cli import build_parser
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--engine" not in argv:
        argv = ["--engine", "megatron"] + argv
    args = build_parser().parse_args(["bench"] + argv)
    from nexus_megatron.tools.bench import bench_argv, check_bench_args, run_bench
    check_bench_args(args)
    under = "LOCAL_RANK" in os.environ or "RANK" in os.environ
    if args.nproc > 1 and not under:
        port = ["--master_port", os.environ["MASTER_PORT"]] if os.environ.get("MASTER_PORT") else ["--standalone"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), *port,
               "-m", "tests.mcore_bench_cpu",
               *bench_argv(args)[1:]]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        return subprocess.call(cmd, env=env)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
