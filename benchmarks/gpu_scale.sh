#!/usr/bin/env bash
# The GPU figures of the README's scale table: the real open_clip ViT-L-14 (random weights; nothing is downloaded) at
# batch 128 in bf16, every registered method at MIT-States and C-GQA label-space size (closed world). Splits are capped at 1,024 images each (`--split-images`): step time and peak GPU memory do not grow
# with the number of images, and the cap keeps the whole sweep inside a few minutes of a lent GPU.
#   bash benchmarks/gpu_scale.sh OUT_DIR [METHODS] [SHAPES]   (default all, mit-states,cgqa; logs land in OUT_DIR)
set -uo pipefail
out=${1:-.}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)" | tee -a "$out/gpu.txt"
common=(--backbone ViT-L-14 --device cuda --precision bf16 --batch-size 128 --steps 3 --warmup 1
        --split-images 1024 --num-workers 12 --cache-dir /tmp/bench_scale)
python3 benchmarks/bench_scale.py sweep --method "${2:-all}" --shape "${3:-mit-states,cgqa}" "${common[@]}" 2>&1 |
  tee "$out/gpu_closed.log"
