"""Feature caching speed-up: one CSP training epoch on cached image features vs. re-encoding every
image each epoch (what the papers' code does with a frozen image tower), measured in one run.

    python benchmarks/bench_feature_cache.py [--backbone mini-clip] [--epochs 2]

Prints seconds per epoch both ways and the ratio. Use --backbone ViT-B-32 (random weights) to see
the effect at real size; the ratio grows with the image tower's cost.
"""
import argparse, os, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb.learner import Learner, TrainConfig, prepare_run_dir, run_params
from czsl_nb.csp import CSP

class CSPWithoutCache(CSP):
    "CSP that asks the engine for images, so every epoch re-encodes them with the frozen tower."
    cache_image_features = False

def epoch_seconds(cfg: TrainConfig, method_cls, epochs: int) -> tuple[float, float]:
    "(seconds to build the learner incl. any feature caching, mean seconds per training epoch)."
    from czsl_nb import core
    core.METHODS["_bench"] = method_cls
    try:
        start = time.perf_counter()
        run = f"bench-{method_cls.__name__}-{time.time_ns()}"
        cfg = TrainConfig(**{**cfg.__dict__, "method": "_bench", "run": run})
        run_dir = prepare_run_dir(cfg, run_params(cfg, {}), tempfile.mkdtemp())
        learner = Learner(cfg, run_dir)
        setup = time.perf_counter() - start
        opt = torch.optim.Adam(learner.method.param_groups(cfg.lr), lr=cfg.lr)
        model, opt, loader = learner.acc.prepare(learner.method, opt, learner.loaders["train"])
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # CSP's constant learning rate
        times = []
        for epoch in range(1, epochs + 1):
            loader.set_epoch(epoch)
            t = time.perf_counter()
            learner._train_epoch(model, opt, schedule, loader, epoch)
            times.append(time.perf_counter() - t)
        return setup, sum(times) / len(times)
    finally:
        del core.METHODS["_bench"]

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="mini-clip")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    cfg = TrainConfig(backbone=args.backbone, batch_size=args.batch_size, epochs=args.epochs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CSP on the synthetic world, "
          f"backbone {args.backbone}")
    setup_c, cached = epoch_seconds(cfg, CSP, args.epochs)
    setup_u, uncached = epoch_seconds(cfg, CSPWithoutCache, args.epochs)
    print(f"cached features:   setup {setup_c:6.1f} s (encodes train/val/test once), {cached:7.2f} s per epoch")
    print(f"re-encoded images: setup {setup_u:6.1f} s,                              {uncached:7.2f} s per epoch")
    print(f"speed-up per epoch: {uncached / cached:.1f}x")
    print(f"20 epochs (CSP's schedule): {setup_c + 20 * cached:.0f} s cached vs "
          f"{setup_u + 20 * uncached:.0f} s re-encoded ({(setup_u + 20 * uncached) / (setup_c + 20 * cached):.1f}x)")

if __name__ == "__main__":
    main()
