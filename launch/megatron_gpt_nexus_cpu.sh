#!/bin/bash
# CPU smoke run of the Megatron launcher (2 processes, gloo). FOR SMOKE TESTS ONLY: --cpu-test-shim applies
# the test-only monkeypatch nexus_megatron/tools/mcore_cpu_shim.py, which fakes CUDA for megatron-core 0.16-0.19 on a CPU torch.
#   bash launch/megatron_gpt_nexus_cpu.sh [prepared-data-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${1:-/tmp/nexus_megatron_smoke_data}
if [ ! -f "$DATA/manifest.json" ]; then
  $PY -c "import sys; sys.path.insert(0, '.'); from nexus_megatron.data.synthetic import write_synthetic_data; write_synthetic_data('$DATA')"
fi
# megatron-core >= 0.17 (Python 3.12): the launcher runs Megatron-LM's own loop; on CPU it needs gloo, the local
# layer implementation and no fused kernels, and (no tokenizer files here) Megatron's NullTokenizer.
EXTRA=()
if $PY -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('megatron.training') is None)"; then
  EXTRA=(--distributed-backend gloo --transformer-impl local --no-gradient-accumulation-fusion
         --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-rope-fusion
         --use-cpu-initialization --no-persist-layer-norm --tokenizer-type NullTokenizer --vocab-size 255 --eval-iters 0)
fi
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --nproc_per_node 2 launch/pretrain_gpt_nexus.py --cpu-test-shim \
  --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --max-position-embeddings 64 \
  --micro-batch-size 2 --global-batch-size 8 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2 \
  --train-iters 20 --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 --use-distributed-optimizer \
  --data-path 0.5 "$DATA/web" 0.3 "$DATA/code" 0.2 "$DATA/math" \
  --optimizer nexus --nexus-layout sequential --nexus-gamma 0.25 \
  --hidden-dropout 0 --attention-dropout 0 --log-interval 5 --eval-interval 10 --eval-iters 4 \
  --save /tmp/nexus_megatron_smoke_ckpt --save-interval 10 "${EXTRA[@]}"
