#!/bin/bash
# GPT pretraining with Nexus on megatron-core, 8 GPUs on one node (Megatron-LM style arguments).
# Compared with a Megatron-LM GPT script the diff is one line (--optimizer adam -> --optimizer nexus) plus
# the data: one --data-path entry per source (the weights become the Nexus source weights).
#   bash launch/megatron_gpt_nexus.sh /data/web_text_document /data/code_text_document /data/math_text_document
set -euo pipefail
WEB=${1:?web prefix}; CODE=${2:?code prefix}; MATH=${3:?math prefix}
GPUS=${GPUS:-8}
CKPT=${CKPT:-checkpoints/gpt_nexus}

GPT_ARGS=(
  --num-layers 24 --hidden-size 1024 --num-attention-heads 16
  --seq-length 2048 --max-position-embeddings 2048
  --micro-batch-size 4 --global-batch-size 256
  --lr 3.0e-4 --min-lr 3.0e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --train-iters 100000
  --weight-decay 0.1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
  --bf16 --accumulate-allreduce-grads-in-fp32
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --use-distributed-optimizer
  --attention-dropout 0.0 --hidden-dropout 0.0
  --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt
)
DATA_ARGS=(--data-path 0.5 "$WEB" 0.3 "$CODE" 0.2 "$MATH" --split 969,30,1)
NEXUS_ARGS=(
  --optimizer nexus                     # was: --optimizer adam
  --nexus-layout source-parallel        # or sequential (the paper's layout); source-parallel needs DP % 3 == 0
  --nexus-gamma 0.25 --nexus-gamma-mode update
)
# source-parallel with 3 sources needs a data-parallel size divisible by 3: use 6 of the 8 GPUs, or sequential.
if [ "${NEXUS_LAYOUT:-}" = sequential ] || [ $((GPUS % 3)) -ne 0 ]; then NEXUS_ARGS[3]=sequential; fi

torchrun --nproc_per_node "$GPUS" launch/pretrain_gpt_nexus.py \
  "${GPT_ARGS[@]}" "${DATA_ARGS[@]}" "${NEXUS_ARGS[@]}" \
  --save "$CKPT" --load "$CKPT" --save-interval 1000 --log-interval 10 --eval-interval 1000 --eval-iters 20
