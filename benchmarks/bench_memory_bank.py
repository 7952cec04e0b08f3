"""Cost of SAM's dynamic memory bank per test image: retrieval alone (seen_only) and predict-then-update (online).

    python benchmarks/bench_memory_bank.py [--compositions 93 1962] [--slots 3] [--dim 128 768] [--images 512]

Times `DynamicMemoryBank.logits` over a batch (the seen_only path, per image) and
`DynamicMemoryBank.predict_then_update` (the online path: one retrieval and one entropy-gated
update per image, sequential) on random unit features, for each bank size. Prints milliseconds per
test image; the rest of SAM's scoring (the image tower) is not included.
"""
import argparse, os, statistics, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import torch.nn.functional as F
import czsl_nb  # noqa: F401  (torchvision fix first)
from czsl_nb.memory_bank import DynamicMemoryBank

def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compositions", type=int, nargs="+", default=[93, 1962])  # synthetic closed world; MIT-States closed world
    ap.add_argument("--dim", type=int, nargs="+", default=[128, 768])  # mini-CLIP; ViT-L/14
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {args.slots} slots per composition, {args.images} images")
    g = torch.Generator().manual_seed(0)
    for dim in args.dim:
        for n_comp in args.compositions:
            text = F.normalize(torch.randn(n_comp, dim, generator=g), dim=-1)
            query = F.normalize(torch.randn(args.images, dim, generator=g), dim=-1)
            probs = torch.softmax(10 * query @ text.T, -1)
            fresh = lambda: DynamicMemoryBank.from_text(text, args.slots)
            retrieval = timed(lambda: fresh().logits(query, 100.0), args.repeats)
            updated = []
            def online():
                bank = fresh(); bank.predict_then_update(query, probs, 100.0)
                updated.append(int((~torch.isinf(bank.slot_entropy)).sum()))
            online_s = timed(online, args.repeats)
            print(f"|C| = {n_comp:5d}, D = {dim:4d}: seen_only {1e3 * retrieval / args.images:7.3f} ms/image (batched), "
                  f"online {1e3 * online_s / args.images:7.3f} ms/image (predict then update, sequential); "
                  f"{updated[-1]} slots replaced in the stream")

if __name__ == "__main__":
    main()
