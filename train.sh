#!/usr/bin/env bash
# The paper's recipe (preset "paper": G 10, 480 prompts/step, mini-batch 120, lr 1e-6, ...) with
# torchrun on all local GPUs. Flags only; anything you add overrides the preset and the model, e.g.
#   ./train.sh --data train.parquet --eval-data val.parquet --output-dir runs/calibrl-3b
#   ./train.sh --model OpenGVLab/InternVL3-8B-hf --data train.parquet --output-dir runs/calibrl-internvl3-8b
set -euo pipefail
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
exec torchrun --standalone --nproc_per_node="$NGPU" "$(dirname "$0")/calibrl.py" \
    --model Qwen/Qwen2.5-VL-3B-Instruct --preset paper --algo calibrl "$@"
