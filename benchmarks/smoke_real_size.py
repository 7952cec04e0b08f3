"""Smoke run at real size: one training epoch of a method with an open_clip ViT (random weights, nothing
downloaded) on a tiny dataset in the standard layout, then the full test (closed and open world).

    python benchmarks/smoke_real_size.py eva [--backbone ViT-B-32] [--set rank=4]

Shows that a method's shapes, hooks and scoring hold at a real backbone's widths and token counts
(ViT-B-32: 768-wide image tower, 50 tokens at 224 px, 512-d joint space). The numbers it prints are
those of random weights on 12 images: meaningless as accuracy, there to show the run completes.
"""
import argparse, os, sys, tempfile, time, warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from pathlib import Path
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb.data import make_toy_dataset
from czsl_nb.learner import TrainConfig, launch
from ablate import parse_assignments

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method")
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--set", action="append", default=[], help="a hyper-parameter of the method, NAME=VALUE")
    args = ap.parse_args()
    params = {k: v for s in args.set for k, v in parse_assignments(s, "--set").items()}
    warnings.filterwarnings("ignore", message=".*marked NA")
    scratch = Path(tempfile.mkdtemp())
    root = make_toy_dataset(scratch / "toy", image_size=32)
    cfg = TrainConfig(method=args.method, dataset=str(root), backbone=args.backbone, epochs=1, batch_size=4,
                      eval_batch_size=8, run="smoke", open_world=True)
    start = time.perf_counter()
    m = launch(cfg, params, runs_root=scratch / "runs")
    import torch
    state = torch.load(scratch / "runs" / "smoke" / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    n_saved = sum(v.numel() for v in state.values())
    print(f"{args.method} on {args.backbone} (random weights): 1 epoch + closed/open test in "
          f"{time.perf_counter() - start:.0f} s; checkpoint holds {n_saved:,} trained values in {len(state)} tensors")
    for world, r in m["test"].items():
        print(f"  {world:>17}: AUC {100 * r['auc']:.2f}, best HM {100 * r['best_hm']:.2f}, "
              f"attr acc {100 * r['attr_acc']:.1f}, obj acc {100 * r['obj_acc']:.1f}")

if __name__ == "__main__":
    main()
