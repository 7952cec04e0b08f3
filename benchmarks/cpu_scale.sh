#!/usr/bin/env bash
# The CPU rows of the README's scale table: every registered method on benchmarks/vitl14_image.json (ViT-L/14's image
# tower exactly) at MIT-States size (closed world) and C-GQA size (closed and open world from one training phase),
# one process per method and shape, so each row's peak_anon_gb is its own process's. Real split sizes and full-size
# feature caches; the test split is scored on its first 512 images (64 for methods whose image tower trains, which
# encode every test image on 2 cores) and eval_s extrapolated to the whole split (the row says extrapolated=1 and
# eval_images=K/N). Pairs in chunks of 256. TRIDENT takes its auxiliary attributes from CLIP text neighbours here:
# its default (clip_images) ranks them over every training image's cached tokens in on_fit_start, which runs the
# remaining image-tower blocks on each (about 25 images/s on these 2 cores: some 20 minutes at MIT-States size).
#   bash benchmarks/cpu_scale.sh LOG [METHODS] [SHAPES] [CGQA_WORLDS]
#       (default: every method; mit-states and cgqa; closed,open; appends each row's line to LOG)
set -uo pipefail
log=${1:-benchmarks/results/cpu_scale.log}
methods=${2:-$(python -c "from czsl_nb.methods import list_methods; print(' '.join(list_methods()))")}
shapes=${3:-"mit-states cgqa"}
cgqa_worlds=${4:-closed,open}
for shape in $shapes; do
  case $shape in cgqa) worlds=$cgqa_worlds ;; *) worlds=closed ;; esac
  for method in $methods; do
    case $method in eva|sam) k=64 ;; *) k=512 ;; esac
    case $method in trident) extra=(--set aux_attributes=clip_neighbours) ;; *) extra=() ;; esac
    python benchmarks/bench_scale.py --method "$method" --shape "$shape" --worlds $worlds --steps 2 --warmup 1 \
      --batch-size 16 --eval-images $k --pair-chunk-size 256 --memory-limit-gb 20 --drop-cache "${extra[@]}" \
      > /tmp/bench_scale_row.log 2>&1
    grep "^bench_scale " /tmp/bench_scale_row.log | tee -a "$log"
  done
done
