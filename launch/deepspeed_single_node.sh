#!/usr/bin/env bash
# Nexus (or the AdamW baseline) on DeepSpeed, one machine, NPROC processes (GPUs, or CPU processes with gloo).
#
#   launch/deepspeed_single_node.sh configs/quickstart.yaml configs/ds_config_zero2.json [--set key=value ...]
#
# Environment:
#   NPROC        processes (default: number of GPUs, or 2 without a GPU)
#   MASTER_PORT  rendezvous port (default 29500)
#   DS_ACCELERATOR=cpu is set automatically when there is no CUDA (gloo backend, no DeepSpeed JIT builds).
#   NCCL_DEBUG=WARN, NCCL_ASYNC_ERROR_HANDLING=1 are good defaults on GPUs.
set -euo pipefail
CONFIG=${1:?usage: $0 <run.yaml> [ds_config.json] [--set key=value ...]}
shift
DS_ARGS=()
if [[ $# -gt 0 && "$1" != --* ]]; then
  DS_ARGS=(--set "train.deepspeed_config=$1")
  shift
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python}
if ! $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  NPROC=${NPROC:-2}
else
  NPROC=${NPROC:-$($PY -c "import torch; print(torch.cuda.device_count())")}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
fi
# --num_gpus works for CPU processes too (--include localhost:0,1 does not: the CPU accelerator has one slot)
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
  "$HERE/train_deepspeed.py" --config "$CONFIG" ${DS_ARGS[@]+"${DS_ARGS[@]}"} "$@"
