#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the paper-size step benchmark for stage 2 and stage 1, live and from the
# frozen-feature cache, printing every number (one JSON line per mode plus the cached/live ratio per stage).
# Needs the project installed (`make test` once, or `pip install -e .` with a CUDA torch); no download: the
# models are built from their configs with random weights. About 3-5 minutes on an A100/H100-class GPU
# (model building dominates); each stage is capped at 4 minutes.
#   bash bench/gpu_check.sh              # batch 64
#   BATCH=128 bash bench/gpu_check.sh    # the reference logs' batch
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BATCH=${BATCH:-64}
STEPS=${STEPS:-10}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
for stage in llm qformer; do
  echo "== paper size, stage $stage, batch $BATCH: live then cached"
  timeout 240 "$PYTHON" bench/step_throughput.py --size paper --stage "$stage" --both --batch-size "$BATCH" \
      --steps "$STEPS" || echo "stage $stage: failed or timed out (exit $?)"
done
