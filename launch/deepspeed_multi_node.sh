#!/usr/bin/env bash
# Nexus on DeepSpeed over several machines with DeepSpeed's launcher (pdsh/ssh by default).
#
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node-0 \
#     launch/deepspeed_multi_node.sh configs/130m.yaml configs/ds_config_zero3_bf16.json [--set key=value ...]
#
# Requirements: passwordless ssh from this machine to every host, the same checkout and Python environment at
# the same path on every host, data reachable from every host (train.run_dir on shared storage for checkpoints).
#
# Environment:
#   HOSTFILE     MPI-style hostfile, one "hostname slots=N" line per node (default launch/hostfile.example)
#   NUM_NODES    use the first NUM_NODES hosts of the hostfile (default: all)
#   GPUS_PER_NODE  processes per node (default: the slots of the hostfile)
#   MASTER_ADDR  address of the first node, reachable from all nodes (default: first host of the hostfile)
#   MASTER_PORT  rendezvous port (default 29500)
# Variables to forward to the remote processes go into ./.deepspeed_env (one NAME=value per line); DeepSpeed's
# launcher exports them on every node. This script writes the usual NCCL ones there if the file does not exist:
#   NCCL_DEBUG=WARN, NCCL_ASYNC_ERROR_HANDLING=1, NCCL_SOCKET_IFNAME / NCCL_IB_HCA (set them for your fabric),
#   OMP_NUM_THREADS.
set -euo pipefail
CONFIG=${1:?usage: $0 <run.yaml> [ds_config.json] [--set key=value ...]}
shift
DS_ARGS=()
if [[ $# -gt 0 && "$1" != --* ]]; then
  DS_ARGS=(--set "train.deepspeed_config=$1")
  shift
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOSTFILE=${HOSTFILE:-$HERE/hostfile.example}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^#/ && NF {print $1; exit}' "$HOSTFILE")}
if [[ ! -f .deepspeed_env ]]; then
  {
    echo "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
    echo "NCCL_ASYNC_ERROR_HANDLING=1"
    [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && echo "NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"
    [[ -n "${NCCL_IB_HCA:-}" ]] && echo "NCCL_IB_HCA=$NCCL_IB_HCA"
    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}"
  } > .deepspeed_env
fi
ARGS=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
[[ -n "${NUM_NODES:-}" ]] && ARGS+=(--num_nodes "$NUM_NODES")
[[ -n "${GPUS_PER_NODE:-}" ]] && ARGS+=(--num_gpus "$GPUS_PER_NODE")
exec deepspeed "${ARGS[@]}" "$HERE/train_deepspeed.py" --config "$CONFIG" ${DS_ARGS[@]+"${DS_ARGS[@]}"} "$@"
