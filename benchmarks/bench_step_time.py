"""Training step time of a method as a ratio to CSP's, measured in one run on the synthetic world.

    python benchmarks/bench_step_time.py eva [--set rank=4] [--steps 20] [--batch-size 128]

Both methods train on the batches the engine would give them (cached image features for methods
with a frozen image tower, images otherwise), steps interleaved one by one so that machine noise
hits both alike. Prints the median seconds per step of each, and the ratio.
"""
import argparse, os, statistics, sys, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import torch
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb.learner import Learner, TrainConfig, prepare_run_dir, run_params
from ablate import parse_assignments

class Stepper:
    "One method's learner, optimiser and batch stream, advanced one training step at a time."
    def __init__(self, method: str, method_params: dict, args):
        cfg = TrainConfig(method=method, backbone=args.backbone, batch_size=args.batch_size, epochs=1,
                          run=f"bench-{method}-{time.time_ns()}")
        run_dir = prepare_run_dir(cfg, run_params(cfg, method_params), tempfile.mkdtemp())
        start = time.perf_counter()
        self.learner = Learner(cfg, run_dir, method_params)
        self.learner.method.on_fit_start(self.learner)
        self.setup_s = time.perf_counter() - start
        acc = self.learner.acc
        self.opt = torch.optim.Adam(self.learner.method.param_groups(cfg.lr, cfg.weight_decay), lr=cfg.lr)
        self.model, self.opt, self.loader = acc.prepare(self.learner.method, self.opt, self.learner.loaders["train"])
        self.model.train(); self.learner.method.on_epoch_start(1, 1)
        self.batches, self.times = iter(self.loader), []

    def step(self) -> None:
        try: batch = next(self.batches)
        except StopIteration: self.batches = iter(self.loader); batch = next(self.batches)
        start = time.perf_counter()
        loss = sum(self.model(batch).values())
        self.learner.acc.backward(loss); self.opt.step(); self.opt.zero_grad()
        self.times.append(time.perf_counter() - start)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("method")
    ap.add_argument("--set", action="append", default=[], help="a hyper-parameter of the method, NAME=VALUE")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--backbone", default="mini-clip")
    args = ap.parse_args()
    params = {k: v for s in args.set for k, v in parse_assignments(s, "--set").items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backbone {args.backbone}, "
          f"batch {args.batch_size}")
    baseline, method = Stepper("csp", {}, args), Stepper(args.method, params, args)
    # the method's name gets a space when it is csp itself, so the two steppers keep separate keys
    steppers = {"csp": baseline, f"{args.method} " if args.method == "csp" else args.method: method}
    for i in range(args.warmup + args.steps):
        for s in steppers.values(): s.step()
    for name, s in steppers.items():
        times = s.times[args.warmup:]
        cached = "cached features" if s.learner.method.cache_image_features else "images"
        print(f"{name:>12}: {statistics.median(times) * 1000:8.1f} ms per step (median of {len(times)}, on {cached}); "
              f"set-up {s.setup_s:.1f} s")
    ratio = statistics.median(method.times[args.warmup:]) / statistics.median(baseline.times[args.warmup:])
    print(f"step time ratio {args.method} / csp: {ratio:.2f}x")

if __name__ == "__main__":
    main()
