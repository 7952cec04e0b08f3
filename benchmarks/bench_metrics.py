"""Benchmark `czsl_nb.metrics.evaluate` (a script, not a test).

1. Open-world C-GQA size: 5,098 images x 278,362 pairs (413 x 674, 5,592 seen), float32 (5.7 GB).
   Reports the wall time of `evaluate` and its peak extra memory (RSS sampled in a thread, minus the RSS
   before the call), PASS/FAIL against the targets (<= 30 s, <= 1 GB beyond the score matrix).
2. Speed ratio against an original-style evaluator (czsl / CSP `Evaluator`: clone, bias and re-rank the
   whole matrix for every bias) on 5,000 x 15,000, both measured in this run, plus a check that the two
   agree.

    python benchmarks/bench_metrics.py            # full run (needs ~6 GB of RAM for the matrix)
    python benchmarks/bench_metrics.py --quick    # small sizes, a few seconds
"""
from __future__ import annotations
import argparse, gc, math, resource, sys, threading, time

import numpy as np
import psutil
import torch

from czsl_nb.metrics import evaluate

GB = 1024 ** 3


class PeakRSS:
    "Samples this process's resident set size in a background thread; `extra` = peak minus the RSS at entry."
    def __init__(self, interval: float = 0.002):
        self.interval, self.proc = interval, psutil.Process()

    def __enter__(self):
        gc.collect()
        self.before = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set(); self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.extra = self.peak - self.before


def grid_shape(n_pairs: int) -> tuple[int, int]:
    "An attrs x objs grid with the C-GQA aspect ratio (413 x 674) holding at least n_pairs pairs."
    if n_pairs == 413 * 674: return 413, 674
    n_attrs = max(1, round(math.sqrt(n_pairs * 413 / 674)))
    return n_attrs, math.ceil(n_pairs / n_attrs)


def make_problem(n_images: int, n_pairs: int, n_seen: int, seed: int, seen_boost: float = 0.5, gt_boost: float = 4.5):
    """Random open-world problem: standard-normal float32 scores, seen columns +`seen_boost`, ground truth
    +`gt_boost`; test pairs drawn like C-GQA's (888 seen / 923 unseen test pairs, scaled)."""
    rng = np.random.default_rng(seed)
    n_attrs, n_objs = grid_shape(n_pairs)
    pairs = np.stack(np.divmod(np.arange(n_attrs * n_objs), n_objs), 1)[:n_pairs]
    is_seen = np.zeros(n_pairs, bool)
    is_seen[rng.choice(n_pairs, min(n_seen, n_pairs - 1), replace=False)] = True
    n_test_seen = max(1, round(888 / 5592 * is_seen.sum()))
    n_test_unseen = max(1, round(923 / 5592 * is_seen.sum()))
    test_pairs = np.concatenate([rng.choice(np.flatnonzero(is_seen), n_test_seen, replace=False),
                                 rng.choice(np.flatnonzero(~is_seen), min(n_test_unseen, (~is_seen).sum()),
                                            replace=False)])
    gt = rng.choice(test_pairs, n_images)
    torch.manual_seed(seed)
    scores = torch.randn(n_images, n_pairs).numpy()   # float32, generated with torch's threads
    seen_cols = np.flatnonzero(is_seen)
    for start in range(0, n_images, 256):   # in row blocks: no full-size temporary
        block = scores[start:start + 256]
        block[:, seen_cols] += seen_boost
    scores[np.arange(n_images), gt] += gt_boost
    return dict(scores=scores, attr_labels=pairs[gt, 0], obj_labels=pairs[gt, 1], pairs=pairs,
                seen_pairs=pairs[is_seen]), gt, is_seen


def original_style_evaluate(scores: torch.Tensor, pair_truth: torch.Tensor, pairs: torch.Tensor,
                            seen_mask: torch.Tensor, closed_mask: torch.Tensor, topk: int = 1) -> dict:
    """The czsl / CSP `Evaluator` logic (generate_predictions, score_fast_model, evaluate_predictions):
    clone the full matrix, add the bias to unseen columns through a repeated [N, P] mask, mask non-candidates
    with -1e10 and `topk`, once per bias. (The seen/unseen split of the images uses a set here; the original's
    list membership test would only make it slower.)"""
    n = scores.shape[0]
    attr_truth, obj_truth = pairs[pair_truth, 0], pairs[pair_truth, 1]

    def predict(base, bias):
        s = base.clone()
        mask = seen_mask.repeat(n, 1)
        s[~mask] += bias
        closed = s.clone()
        closed[~closed_mask.repeat(n, 1)] = -1e10
        _, pred = closed.topk(topk, dim=1)
        return pairs[pred.reshape(-1)][:, 0].view(-1, topk), pairs[pred.reshape(-1)][:, 1].view(-1, topk)

    seen_set = set(map(tuple, pairs[seen_mask].tolist()))
    truth = list(zip(attr_truth.tolist(), obj_truth.tolist()))
    seen_ind = torch.tensor([i for i, p in enumerate(truth) if p in seen_set], dtype=torch.long)
    unseen_ind = torch.tensor([i for i, p in enumerate(truth) if p not in seen_set], dtype=torch.long)

    def process(pred):
        attr_match = attr_truth[:, None].repeat(1, topk) == pred[0][:, :topk]
        obj_match = obj_truth[:, None].repeat(1, topk) == pred[1][:, :topk]
        match = (attr_match * obj_match).any(1).float()
        return attr_match.any(1).float(), obj_match.any(1).float(), match[seen_ind], match[unseen_ind]

    # generate_predictions at bias 1e3: biased and unbiased predictions, each from its own clones
    orig = scores.clone()
    biased_closed = process(predict(orig, 1e3))
    unbiased_closed = process(predict(orig, 0.0))
    correct_scores = scores[torch.arange(n), pair_truth][unseen_ind]
    max_seen_scores = scores[unseen_ind][:, seen_mask].topk(topk, dim=1)[0][:, topk - 1]
    diff = (max_seen_scores - correct_scores)[biased_closed[3].bool()] - 1e-4
    diff = torch.sort(diff)[0]
    biaslist = diff[::max(len(diff) // 20, 1)]
    seen_acc, unseen_acc = [], []
    for bias in biaslist:
        r = process(predict(scores.clone(), bias))
        seen_acc.append(float(r[2].mean())); unseen_acc.append(float(r[3].mean()))
    seen_acc.append(float(biased_closed[2].mean())); unseen_acc.append(float(biased_closed[3].mean()))
    seen_acc, unseen_acc = np.array(seen_acc), np.array(unseen_acc)
    auc = float(np.sum((unseen_acc[1:] - unseen_acc[:-1]) * (seen_acc[1:] + seen_acc[:-1]) / 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        hm = np.where((seen_acc > 0) & (unseen_acc > 0), 2 * seen_acc * unseen_acc / (seen_acc + unseen_acc), 0)
    return dict(auc=auc, best_hm=float(hm.max()), best_seen=float(seen_acc.max()),
                best_unseen=float(unseen_acc.max()), attr_acc=float(unbiased_closed[0].mean()),
                obj_acc=float(unbiased_closed[1].mean()), n_biases=len(seen_acc))


def fmt(result: dict) -> str:
    return (f"AUC {100 * result['auc']:.3f}  HM {100 * result['best_hm']:.3f}  S {100 * result['best_seen']:.2f}  "
            f"U {100 * result['best_unseen']:.2f}  attr {100 * result['attr_acc']:.2f}  "
            f"obj {100 * result['obj_acc']:.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5098, help="images in the scale run (C-GQA test: 5098)")
    ap.add_argument("--pairs", type=int, default=278362, help="open-world pairs in the scale run (C-GQA: 278362)")
    ap.add_argument("--seen", type=int, default=5592, help="seen (training) pairs in the scale run (C-GQA: 5592)")
    ap.add_argument("--ratio-images", type=int, default=5000, help="images in the speed-ratio run")
    ap.add_argument("--ratio-pairs", type=int, default=15000, help="pairs in the speed-ratio run")
    ap.add_argument("--topk", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time target of the scale run")
    ap.add_argument("--max-extra-gb", type=float, default=1.0, help="memory target beyond the score matrix")
    ap.add_argument("--quick", action="store_true", help="small sizes (500 x 20,000 and 500 x 3,000)")
    ap.add_argument("--skip-scale", action="store_true"); ap.add_argument("--skip-ratio", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.pairs, args.seen, args.ratio_images, args.ratio_pairs = 500, 20000, 400, 500, 3000

    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} torch threads, "
          f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / GB:.1f} GB RAM")
    ok = True
    if not args.skip_scale:
        print(f"\n[1] open world, {args.images:,} images x {args.pairs:,} pairs ({args.seen:,} seen), float32")
        t0 = time.perf_counter()
        problem, _, _ = make_problem(args.images, args.pairs, args.seen, args.seed)
        matrix_gb = problem["scores"].nbytes / GB
        print(f"    built the score matrix ({matrix_gb:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = evaluate(**problem, topk=args.topk)
            seconds = time.perf_counter() - t0
        extra_gb = mem.extra / GB
        print(f"    evaluate: {seconds:.2f} s, peak extra memory {extra_gb * 1024:.0f} MB "
              f"(RSS {mem.before / GB:.2f} GB before, peak {mem.peak / GB:.2f} GB; "
              f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB)")
        print(f"    {fmt(result)}  ({len(result['biases'])} biases, {result['n_seen_images']} seen / "
              f"{result['n_unseen_images']} unseen images)")
        time_ok, mem_ok = seconds <= args.max_seconds, extra_gb <= args.max_extra_gb
        print(f"    time   {'PASS' if time_ok else 'FAIL'}: {seconds:.2f} s  (target <= {args.max_seconds:g} s)")
        print(f"    memory {'PASS' if mem_ok else 'FAIL'}: {extra_gb * 1024:.0f} MB extra  "
              f"(target <= {args.max_extra_gb * 1024:.0f} MB)")
        ok &= time_ok and mem_ok
        del problem; gc.collect()

    if not args.skip_ratio:
        n, p = args.ratio_images, args.ratio_pairs
        print(f"\n[2] speed ratio, open world, {n:,} images x {p:,} pairs ({p // 10:,} seen), float32")
        problem, gt, is_seen = make_problem(n, p, p // 10, args.seed + 1)
        t0 = time.perf_counter()
        ours = evaluate(**problem, topk=args.topk)
        t_ours = time.perf_counter() - t0
        scores = torch.from_numpy(problem["scores"])
        pairs_t = torch.as_tensor(problem["pairs"])
        t0 = time.perf_counter()
        orig = original_style_evaluate(scores, torch.as_tensor(gt), pairs_t, torch.as_tensor(is_seen),
                                       torch.ones(p, dtype=torch.bool), topk=args.topk)
        t_orig = time.perf_counter() - t0
        print(f"    evaluate (one chunked pass):             {t_ours:8.2f} s   {fmt(ours)}")
        print(f"    original style (clone + re-rank x {orig['n_biases']:2d}):  {t_orig:8.2f} s   {fmt(orig)}")
        print(f"    speed-up: {t_orig / t_ours:.0f}x")
        keys = ("auc", "best_hm", "best_seen", "best_unseen", "attr_acc", "obj_acc")
        worst = max(abs(ours[key] - orig[key]) for key in keys)
        same = worst < 1e-6
        print(f"    same metrics as the original style: {'PASS' if same else 'FAIL'} (largest difference {worst:.2e})")
        ok &= same
    print(f"\n{'ALL PASS' if ok else 'SOME FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
