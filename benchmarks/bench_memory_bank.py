"""Cost of SAM's memory bank per test image: the static bank (retrieval only) and the dynamic one
(predict-then-update), up to C-GQA's open world.

    python benchmarks/bench_memory_bank.py [--compositions 93 1962 278362] [--seen 5592] [--slots 3]
                                           [--dim 128 768] [--images 256] [--chunk 1024]

For each bank size, the bank starts as SAM's does: `--seen` compositions (C-GQA's 5,592 seen pairs, or
half the compositions when there are fewer) hold N stored training features each, and every other
composition is represented by its text feature alone. The script times `DynamicMemoryBank.logits`
over a batch (the static path) and `DynamicMemoryBank.predict_then_update` (the dynamic path: one
retrieval and one entropy-gated update per image, in order) on random unit features. It prints
milliseconds per test image, the rows the bank stores and the dense [C, N, D] bank it avoids, and
the process's peak resident memory. SAM's image tower and the rest of its scoring are not included.
"""
import argparse, os, resource, statistics, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import torch.nn.functional as F
from czsl_nb.memory_bank import DynamicMemoryBank

CGQA_SEEN_PAIRS = 5592  # C-GQA's training (seen) compositions in the standard split

def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)

def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: kilobytes

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # synthetic closed world; MIT-States closed world; C-GQA open world
    ap.add_argument("--compositions", type=int, nargs="+", default=[93, 1962, 278362])
    ap.add_argument("--seen", type=int, default=None, help="compositions holding stored features at the start")
    ap.add_argument("--dim", type=int, nargs="+", default=[128, 768])  # mini-CLIP; ViT-L/14
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024, help="pair_chunk_size: compositions scored at once")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {args.slots} slots per composition, "
          f"{args.images} images, chunk {args.chunk}")
    g = torch.Generator().manual_seed(0)
    for dim in args.dim:
        for n_comp in args.compositions:
            n_seen = args.seen if args.seen is not None else min(CGQA_SEEN_PAIRS, n_comp // 2)
            text = F.normalize(torch.randn(n_comp, dim, generator=g), dim=-1)
            seen_slots = torch.randn(n_seen, args.slots, dim, generator=g)
            seen_h = torch.rand(n_seen, args.slots, generator=g)
            filled = torch.ones(n_seen, args.slots, dtype=torch.bool)
            seen = torch.randperm(n_comp, generator=g)[:n_seen]
            query = F.normalize(torch.randn(args.images, dim, generator=g), dim=-1)
            probs = torch.softmax(10 * query @ text.T, -1)
            fresh = lambda: DynamicMemoryBank.from_text(text, args.slots, seen_slots, seen_h, filled, seen, args.chunk)
            static_s = timed(lambda: fresh().logits(query, 100.0), args.repeats)
            rows = []
            def dynamic():
                bank = fresh(); bank.predict_then_update(query, probs, 100.0)
                rows.append(bank.n_rows)
            dynamic_s = timed(dynamic, args.repeats)
            dense_gb = n_comp * args.slots * dim * 4 / 2**30
            print(f"|C| = {n_comp:6d}, D = {dim:4d}: static {1e3 * static_s / args.images:7.3f} ms/image (batched), "
                  f"dynamic {1e3 * dynamic_s / args.images:7.3f} ms/image (predict then update, sequential); "
                  f"stored rows {n_seen} -> {rows[-1]} (dense bank would be {dense_gb:.2f} GB); "
                  f"peak RSS so far {peak_rss_gb():.2f} GB")

if __name__ == "__main__":
    main()
