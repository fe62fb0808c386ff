#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: paper-size training steps of stage 2 and stage 1 (EVA ViT-g/14, BERT-base
# Q-Former and P-Former, OPT-2.7B; random weights built from configs, nothing downloaded), live and from the
# frozen-feature cache, with the levers off (eager attention, plain AdamW, no TF32, no compile) and on (SDPA,
# fused AdamW, TF32, torch.compile of the Q-Former), plus the levers with activation checkpointing, at batch
# 64 and 128: samples/s, step time, peak memory, achieved TFLOP/s and MFU against the device's dense bf16 peak
# (looked up by name in bench/step_throughput.py; PEAK_TFLOPS=... to give it). One JSON line per measurement
# and a markdown table per stage. Imports torch and transformers only (no Ray, MLflow or pydantic), so it
# runs on a bare CUDA image with `pip install transformers`. Each stage is capped at 220 s (under 8 minutes in all).
#   bash bench/gpu_check.sh                    # batch 64 and 128
#   BATCHES="32 64" STEPS=5 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BATCHES=${BATCHES:-64 128}
STEPS=${STEPS:-6}
EXTRA=()
[ -n "${PEAK_TFLOPS:-}" ] && EXTRA+=(--peak-tflops "$PEAK_TFLOPS")
[ -n "${NO_COMPILE:-}" ] && EXTRA+=(--no-compile)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || { echo "no NVIDIA GPU"; exit 1; }
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
for stage in llm qformer; do
  echo "== paper size, stage $stage: batch $BATCHES, live and cached, levers off and on"
  # shellcheck disable=SC2086
  timeout 220 "$PYTHON" bench/step_throughput.py --size paper --stage "$stage" --grid --batch-sizes $BATCHES \
      --steps "$STEPS" --warmup 3 "${EXTRA[@]}" || echo "stage $stage: failed or timed out (exit $?)"
done
