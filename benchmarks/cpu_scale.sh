#!/usr/bin/env bash
# The CPU rows of the README's scale table: every registered method on benchmarks/vitl14_image.json (ViT-L/14's image
# tower exactly) at MIT-States size (closed world) and C-GQA size (closed and open world), one process per row so each
# row's peak_anon_gb is its own. Real split sizes and full-size feature caches; the test split is scored on its first
# 512 images (64 for methods whose image tower trains, which encode every test image on 2 cores) and eval_s
# extrapolated to the whole split (the row says extrapolated=1 and eval_images=K/N). Pairs in chunks of 256.
#   bash benchmarks/cpu_scale.sh LOG [METHODS]       (default: every method; appends each row's last line to LOG)
set -uo pipefail
log=${1:-benchmarks/results/cpu_scale.log}
methods=${2:-$(python -c "from czsl_nb.methods import list_methods; print(' '.join(list_methods()))")}
for world in "mit-states" "cgqa" "cgqa --open-world"; do
  for method in $methods; do
    case $method in eva|sam) k=64 ;; *) k=512 ;; esac
    python benchmarks/bench_scale.py --method "$method" --shape $world --steps 2 --warmup 1 --batch-size 16 \
      --eval-images $k --pair-chunk-size 256 --memory-limit-gb 20 --drop-cache > /tmp/bench_scale_row.log 2>&1
    tail -n 1 /tmp/bench_scale_row.log | tee -a "$log"
  done
done
