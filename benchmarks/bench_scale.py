"""Memory and time of one method at a real benchmark's size, through the Learner's own code paths.

    python benchmarks/bench_scale.py --method csp --shape cgqa --backbone benchmarks/vitl14_image.json \\
        [--open-world] [--steps 3] [--batch-size 16] [--device cpu|cuda] [--precision no|fp16|bf16] \\
        [--eval-images K] [--pair-chunk-size 1024] [--memory-limit-gb 16] [--set NAME=VALUE] [--drop-cache]

What is real size and what is not:

* Label space and split sizes are the real benchmark's (synthetic names a000.., o000..). Source: methods.md
  §1.1 (TOMCAT App. C, Table 7; the CSP/DFSP `download_data.sh` splits):

  | shape      | attrs | objs | open pairs | train pairs | val seen/unseen | test seen/unseen | images train/val/test |
  |------------|-------|------|------------|-------------|-----------------|------------------|-----------------------|
  | ut-zappos  |    16 |   12 |        192 |          83 |         15 / 15 |          18 / 18 | 22,998/3,214/2,914    |
  | mit-states |   115 |  245 |     28,175 |       1,262 |       300 / 300 |        400 / 400 | 30,338/10,420/12,995  |
  | cgqa       |   413 |  674 |    278,362 |       5,592 |   1,252 / 1,040 |        888 / 923 | 26,920/7,280/5,098    |

  Unseen val and unseen test pairs are disjoint (MIT-States: 1,262 + 300 + 400 = 1,962 listed pairs, as the real
  split; UT-Zappos: 116). Every attribute and object occurs in a training pair. The layout is written once per
  shape under `<cache-dir>/data/<shape>` and reused.
* Images: every sample points at one of 8 small real image files (256 px JPEGs), so data loading and the image
  transform are real per sample, but the pixel content repeats.
* Feature caches (methods with a frozen, cached image tower) are full size, in the Learner's own format, spec
  and dtype: the 8 files are encoded once through the method's own `image_features` and their rows tiled into
  each split's cache through `FeatureCache.writer`, streaming. The Learner then opens a complete cache (the
  last line's `encoded_on_read=0` says it encoded no image while reading it).
* Training: `--steps` steps (after `--warmup` untimed ones) of every training epoch a minimal run has
  (`min_epochs`: SAM's stage I and stage II each), through `Learner._train_epoch` with the method's
  `on_fit_start` / `on_epoch_start` hooks first, as `Learner.fit` calls them. `step_s` is the mean over those
  epochs of the median step time (data loading included).
* Evaluation: `Learner.score_split` + `Learner.evaluate` of the test split against all listed pairs (closed) or
  all |A| x |O| pairs (open: `Learner.open_world_results("test", calibrate_on="test")`, the feasibility threshold
  calibrated on the test scores themselves, calibrated and raw metrics). `--open-eval learner` calibrates on the
  validation split, as a training run does, which also scores and holds that split.
  `on_fit_end` runs before it (its time is `fit_end_s`, not part of `eval_s`).
* `--eval-images K` scores only the first K test images (and, for methods without a cache, lets `on_fit_end`
  read only the first K training images): `eval_s` is then the full split's time extrapolated (the pairs'
  text features once, the rest linearly in images), `extrapolated=1`, and `score_matrix_gb` is the full
  split's [N, P] float32 matrix.
* `peak_anon_gb` is the peak RssAnon of the process (sampled every 20 ms; the page cache of the memory-mapped
  caches does not count). Above `--memory-limit-gb` the row is aborted (last line `status=aborted`), and the
  process's private writable memory is capped at that limit + 2 GB, so a bad method cannot take the machine.
* The backbone is built with random weights (nothing is downloaded); `benchmarks/vitl14_image.json` is
  ViT-L/14's image tower exactly with a 1-layer, 256-wide text tower (context 77), so prompt encoding, the
  dominant CPU cost of the text side, is far smaller than with ViT-L/14's real 12-layer, 768-wide text tower.

The last line printed is

    bench_scale method=M shape=S world=closed|open peak_anon_gb=X cache_gb=Y step_s=Z eval_s=W peak_gpu_gb=V ...

followed by extra key=value fields (goal_gb = 2 + score_matrix_gb, the issue's goal).
"""
from __future__ import annotations
import argparse, contextlib, copy, gc, json, math, os, resource, shutil, statistics, sys, tempfile, threading, time
import traceback, warnings
from dataclasses import dataclass, replace
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import numpy as np
import torch
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb.core import cache_dir, seed_everything
from czsl_nb.data import SPLITS, CompositionData, load_image, write_layout
from czsl_nb.learner import OPTIMIZERS, Learner, TrainConfig, git_commit, lr_factor, prepare_run_dir, run_params
from czsl_nb.methods import get_method, list_methods
from czsl_nb.mini_clip import load_backbone

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9
N_IMAGE_FILES = 8

@dataclass(frozen=True)
class Shape:
    attrs: int
    objs: int
    train_pairs: int
    val_pairs: tuple[int, int]   # seen, unseen
    test_pairs: tuple[int, int]  # seen, unseen
    images: tuple[int, int, int]  # train, val, test

SHAPES = {  # methods.md §1.1 (TOMCAT App. C, Table 7; CSP/DFSP download_data.sh)
    "ut-zappos": Shape(16, 12, 83, (15, 15), (18, 18), (22_998, 3_214, 2_914)),
    "mit-states": Shape(115, 245, 1_262, (300, 300), (400, 400), (30_338, 10_420, 12_995)),
    "cgqa": Shape(413, 674, 5_592, (1_252, 1_040), (888, 923), (26_920, 7_280, 5_098)),
}
HIDDEN_SHAPES = {"tiny": Shape(6, 5, 8, (3, 3), (3, 3), (40, 24, 24))}  # for the test

# -- the dataset -------------------------------------------------------------------------------------------
def shape_pairs(shape: Shape, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    "Pair lists of each split with the shape's sizes; every attribute and object in some training pair."
    rng = np.random.default_rng(seed)
    A, O = shape.attrs, shape.objs
    cover = [(i % A) * O + i % O for i in range(max(A, O))]  # distinct, and every attr and obj appears
    if shape.train_pairs < len(cover): raise ValueError("fewer training pairs than max(attrs, objs)")
    rest = rng.permutation(np.setdiff1d(np.arange(A * O), cover))
    n_extra = shape.train_pairs - len(cover)
    train = np.array(cover + rest[:n_extra].tolist())
    unseen = rest[n_extra:]
    (vs, vu), (ts, tu) = shape.val_pairs, shape.test_pairs
    keys = {"train": train,
            "val": np.concatenate([rng.choice(train, vs, replace=False), unseen[:vu]]),
            "test": np.concatenate([rng.choice(train, ts, replace=False), unseen[vu:vu + tu]])}
    width = max(3, len(str(max(A, O) - 1)))
    name = lambda k: (f"a{k // O:0{width}d}", f"o{k % O:0{width}d}")
    return {split: [name(int(k)) for k in sorted(v.tolist())] for split, v in keys.items()}

def write_image_files(images_dir: Path, n: int = N_IMAGE_FILES) -> list[str]:
    "n small, distinct 256 px JPEGs (smooth colour fields with noise)."
    from PIL import Image
    names, grid = [], np.linspace(0, 1, 256)
    for i in range(n):
        rng = np.random.default_rng(i)
        c = rng.random((3, 3))
        field = (c[:, 0, None, None] * grid[None, :, None] + c[:, 1, None, None] * grid[None, None, :]
                 + c[:, 2, None, None]) / 3
        img = np.clip(field.transpose(1, 2, 0) * 255 + rng.normal(0, 20, (256, 256, 3)), 0, 255).astype(np.uint8)
        names.append(f"img{i}.jpg")
        Image.fromarray(img).save(images_dir / names[-1], quality=90)
    return names

def make_dataset(shape_name: str, root: Path, split_images: int = 0) -> Path:
    """The shape's dataset in the standard layout at `root` (written once: built beside it, then renamed into place);
    `split_images` > 0 caps every split's image count (the label space stays the real one)."""
    if (root / "bench_scale.json").is_file(): return root
    shape = {**SHAPES, **HIDDEN_SHAPES}[shape_name]
    if split_images: shape = replace(shape, images=tuple(min(n, split_images) for n in shape.images))
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pairs = shape_pairs(shape)
    (tmp / "images").mkdir(parents=True)
    files = write_image_files(tmp / "images")
    metadata = [{"image": files[j % len(files)], "attr": pairs[split][j % len(pairs[split])][0],
                 "obj": pairs[split][j % len(pairs[split])][1], "set": split}
                for split, n in zip(SPLITS, shape.images) for j in range(n)]
    write_layout(tmp, pairs, metadata)
    (tmp / "bench_scale.json").write_text(json.dumps({"shape": shape_name, **shape.__dict__}))
    root.parent.mkdir(parents=True, exist_ok=True)
    try: os.replace(tmp, root)
    except OSError:  # another run wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root

# -- memory ------------------------------------------------------------------------------------------------
def rss_anon() -> float:
    "This process's anonymous resident memory in bytes (RssAnon: the page cache of mapped files is not in it)."
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"): return int(line.split()[1]) * 1024
    return 0.0

class AnonMonitor:
    "Samples RssAnon every `interval` s in a thread, keeping the peak of each phase; calls `on_exceed` above the limit."
    def __init__(self, limit_gb: float, on_exceed, interval: float = 0.02):
        self.limit, self.on_exceed, self.interval = limit_gb * GB, on_exceed, interval
        self.phase, self.peaks, self._stop = "setup", {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
    def start(self) -> "AnonMonitor": self.sample(); self.thread.start(); return self
    def sample(self) -> float:
        now = rss_anon()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), now)
        if now > self.limit: self.on_exceed(now)
        return now
    def enter(self, phase: str) -> None:
        "Start a new phase (the previous one's last sample first)."
        self.sample(); self.phase = phase; self.sample()
    def _run(self):
        while not self._stop.wait(self.interval): self.sample()
    def stop(self): self.sample(); self._stop.set(); self.thread.join()
    @property
    def peak(self) -> float: return max(self.peaks.values())

@contextlib.contextmanager
def counting_images(method):
    "Within the block, `method.image_features` counts the images it encodes (an instance attribute, removed after)."
    count, own = [0], method.image_features
    def counting(images):
        count[0] += len(images)
        return own(images)
    method.image_features = counting
    try: yield count
    finally: del method.image_features

# -- the learner -------------------------------------------------------------------------------------------
class BenchLearner(Learner):
    "A Learner whose missing feature caches are filled by tiling a few encoded image files, not encoding every image."
    def _cached_features(self, split: str):
        log = self.__dict__.setdefault("cache_log", [])
        cache = self.feature_cache(split)
        found = cache.open() is not None
        if not found: self._fill_by_tiling(split, cache)
        with counting_images(self.acc.unwrap_model(self.method)) as encoded:  # what the Learner encodes reading it
            out = super()._cached_features(split)
        log.append({"split": split, "rows": len(self.data.samples[split]), "found": found,
                    "encoded_on_read": encoded[0],
                    "path": str(cache.path), "bytes": cache.path.stat().st_size})
        return out

    @torch.no_grad()
    def _file_rows(self, files: list[str]) -> dict[str, torch.Tensor]:
        "Features of each distinct image file, encoded once per run by the method's own `image_features`."
        known = self.__dict__.setdefault("_tile_rows", {})
        todo = [f for f in files if f not in known]
        if todo:
            method = self.acc.unwrap_model(self.method); method.eval()
            images = torch.stack([self.backbone.preprocess(load_image(self.data.images_dir / f)) for f in todo])
            for start in range(0, len(todo), self.cfg.eval_batch_size):
                with self.acc.autocast():
                    rows = method.image_features(images[start:start + self.cfg.eval_batch_size].to(self.acc.device))
                for f, row in zip(todo[start:], rows.float().cpu()): known[f] = row
        return known

    def _fill_by_tiling(self, split: str, cache) -> None:
        samples = self.data.samples[split]
        files = sorted({s.image for s in samples})
        rows = self._file_rows(files)
        table = torch.stack([rows[f] for f in files])
        position = {f: i for i, f in enumerate(files)}
        which = torch.tensor([position[s.image] for s in samples])
        write = cache.writer(len(samples), self.cfg.feature_cache_dtype)
        chunk = max(1, int(64e6 // (table[0].numel() * 4)))  # about 64 MB of float32 rows at a time
        for start in range(0, len(samples), chunk):
            index = torch.arange(start, min(len(samples), start + chunk))
            write(index, table[which[index]])
        write.finish()
        self.__dict__["tiled_from"] = len(self._tile_rows)

def limit_split(learner: Learner, split: str, k: int, rebuild_loader: bool) -> None:
    "Keep only the first `k` samples of `split` (a shallow copy of the data), rebuilding its loaders if asked."
    data = copy.copy(learner.data)
    data.samples = {**data.samples, split: data.samples[split][:k]}
    learner.data, learner._context = data, None  # the hooks' context is rebuilt on the limited data
    if split == "train": learner.eval_loaders.pop(split, None)  # split_outputs rebuilds it from the limited data
    if rebuild_loader:
        learner.loaders[split] = learner._loader(split)
        if split in ("val", "test"): learner.eval_loaders[split] = learner._eval_loader(learner.loaders[split])

class TimedBatches:
    "At most `n` batches of `loader`, with the time each was handed out (and the end)."
    def __init__(self, loader, n: int): self.loader, self.n, self.marks = loader, n, []
    def __len__(self): return min(self.n, len(self.loader))
    def __iter__(self):
        self.marks, it = [], iter(self.loader)
        for _ in range(self.n):
            try: batch = next(it)
            except StopIteration: break
            self.marks.append(time.perf_counter())
            yield batch
        self.marks.append(time.perf_counter())
    def step_times(self) -> list[float]: return [b - a for a, b in zip(self.marks, self.marks[1:])]

# -- one row -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=list_methods())
    ap.add_argument("--shape", required=True, choices=[*SHAPES, *HIDDEN_SHAPES], metavar="{" + ",".join(SHAPES) + "}")
    ap.add_argument("--backbone", default=str(ROOT / "benchmarks" / "vitl14_image.json"),
                    help="an open_clip name (random weights) or config JSON; default benchmarks/vitl14_image.json")
    ap.add_argument("--open-world", action="store_true")
    ap.add_argument("--worlds", choices=("closed", "open", "closed,open"), default=None,
                    help="test in these worlds after one shared training phase (one line each; default: closed, "
                         "or open with --open-world)")
    ap.add_argument("--open-eval", choices=("test", "learner"), default="test",
                    help="test: the test split's open-world evaluation (threshold calibrated on test scores); "
                         "learner: Learner.open_world_results('test'), which also scores and holds the val split")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per training epoch")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps before them")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=TrainConfig.eval_batch_size)
    ap.add_argument("--pair-chunk-size", type=int, default=TrainConfig.pair_chunk_size)
    ap.add_argument("--eval-images", type=int, default=0, metavar="K",
                    help="score only the first K test images and extrapolate to the split (0: all)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("no", "fp16", "bf16"), default="no", help="mixed precision (CUDA only)")
    ap.add_argument("--feature-cache-dtype", choices=("auto", "float16", "float32"), default="auto")
    ap.add_argument("--memory-limit-gb", type=float, default=16.0, help="abort the row above this RssAnon")
    ap.add_argument("--cache-dir", default=str(cache_dir() / "bench_scale"),
                    help="datasets (data/<shape>) and feature caches (features/) live here")
    ap.add_argument("--drop-cache", action="store_true", help="delete this row's feature cache files at the end")
    ap.add_argument("--set", action="append", default=[], help="method hyper-parameters, NAME=VALUE[,NAME=VALUE]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image loading")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute each transformer block in backward (TrainConfig.grad_checkpointing)")
    ap.add_argument("--split-images", type=int, default=0, metavar="N",
                    help="cap every split at N images, label space unchanged (0: the real split sizes); for GPU step "
                         "time and peak GPU memory, which do not grow with the number of images")
    return ap.parse_args(argv)

def fmt(key: str, x) -> str:
    "GB with 2 decimals, seconds with 3 significant digits (whole seconds from 1000 on), the rest as they are."
    if not isinstance(x, float): return str(x)
    if key.endswith("_gb") or key == "auc": return f"{x:.2f}" if key != "auc" else f"{x:.4f}"
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"

_BACKBONES: dict = {}

def shared_backbone(cfg: TrainConfig):
    "A fresh copy of the backbone built once per process (a sweep of rows builds ViT-L/14 once, not per row)."
    if cfg.backbone not in _BACKBONES: _BACKBONES[cfg.backbone] = load_backbone(cfg.backbone, cfg.pretrained or None)
    return copy.deepcopy(_BACKBONES[cfg.backbone])

def evaluate_test(learner: Learner, world: str, open_eval: str):
    "The test split's results in `world` as the Learner computes them; the pairs scored and the bytes held."
    d = learner.data
    if world == "closed":
        scores = learner.score_split("test", d.pairs)
        return {"closed": learner.evaluate("test", scores=scores)}, d.pairs, scores.numel() * 4
    calibrate_on = "val" if open_eval == "learner" else "test"
    held_rows = (len(d.samples["val"]) if calibrate_on == "val" else 0) + 2 * len(d.samples["test"])
    results = learner.open_world_results("test", calibrate_on=calibrate_on)
    return results, d.open_pairs, held_rows * len(d.open_pairs) * 4

def worlds(args) -> list[str]:
    "The worlds a row tests in: --worlds, else open with --open-world, else closed."
    return args.worlds.split(",") if args.worlds else ["open" if args.open_world else "closed"]

def run(argv=None, **kw) -> dict:
    "One benchmark row (the last world's); its fields (the last line's, then extras) plus `cache`."
    return run_rows(argv, **kw)[-1]

def run_rows(argv=None, monitor: AnonMonitor | None = None, log=print, reuse_backbone: bool = False) -> list[dict]:
    "The rows of one process: one per world asked, sharing the set-up and the training steps."
    from ablate import parse_assignments
    args = parse_args(argv)
    params = {k: v for s in args.set for k, v in parse_assignments(s, "--set").items()}
    own_monitor = monitor is None
    if own_monitor: monitor = AnonMonitor(args.memory_limit_gb, lambda now: None).start()  # measures, never aborts
    cuda = args.device == "cuda"
    if cuda: torch.cuda.reset_peak_memory_stats()
    base = Path(args.cache_dir).expanduser()
    warnings.filterwarnings("ignore", message=".*marked NA")
    t0 = time.perf_counter()
    data_name = args.shape + (f"-n{args.split_images}" if args.split_images else "")
    root = make_dataset(args.shape, base / "data" / data_name, args.split_images)
    method_cls = get_method(args.method)
    epochs = max(1, method_cls.min_epochs(method_cls.resolve_hparams(params)))
    cfg = TrainConfig(method=args.method, dataset=str(root), backbone=args.backbone, epochs=epochs,
                      batch_size=args.batch_size,
                      eval_batch_size=args.eval_batch_size, pair_chunk_size=args.pair_chunk_size, seed=args.seed,
                      feature_cache=str(base / "features"), feature_cache_dtype=args.feature_cache_dtype,
                      device=args.device, precision=args.precision, open_world="open" in worlds(args), run="bench",
                      num_workers=args.num_workers, grad_checkpointing=args.grad_checkpointing)
    scratch = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    try:
        run_dir = prepare_run_dir(cfg, run_params(cfg, params), scratch)
        data = CompositionData(root, check_images="exists", warn=False)
        log(f"data {data!r} ready in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        backbone = shared_backbone(cfg) if reuse_backbone else None
        learner = BenchLearner(cfg, run_dir, params, data=data, backbone=backbone)
        method, acc = learner.method, learner.acc
        setup_s = time.perf_counter() - t0
        cache_log = list(getattr(learner, "cache_log", []))
        cache_bytes = sum(c["bytes"] for c in cache_log)
        log(f"learner built in {setup_s:.1f} s; caches: " + (", ".join(
            f"{c['split']} {'found' if c['found'] else 'tiled'} ({c['bytes'] / GB:.2f} GB)" for c in cache_log)
            or "none"))
        n_test = len(data.samples["test"])
        k = min(args.eval_images or n_test, n_test)
        limited = k < n_test
        n_train_full = len(data.samples["train"])

        # training, as Learner.fit does it
        monitor.enter("train")
        ctx = learner.context()
        t0 = time.perf_counter(); method.on_fit_start(ctx); fit_start_s = time.perf_counter() - t0
        step_medians = []
        if method.trainable:
            opt = OPTIMIZERS[cfg.optimizer](method.param_groups(cfg.lr, cfg.weight_decay), lr=cfg.lr)
            model, opt, train_loader = acc.prepare(method, opt, learner.loaders["train"])
            steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
            for epoch in range(1, cfg.epochs + 1):
                seed_everything(cfg.seed + epoch)
                train_loader.set_epoch(epoch)
                train_items = learner.loaders["train"].dataset
                if hasattr(train_items, "set_epoch"): train_items.set_epoch(epoch)
                acc.unwrap_model(model).on_epoch_start(epoch, cfg.epochs)
                timed = TimedBatches(train_loader, args.warmup + args.steps)
                learner._train_epoch(model, opt, schedule, timed, epoch)
                times = timed.step_times()[args.warmup:] or timed.step_times()
                step_medians.append(statistics.median(times))
                log(f"epoch {epoch}: step times " + ", ".join(f"{t:.2f}" for t in timed.step_times()) + " s")
            del opt, schedule
        step_s = statistics.mean(step_medians) if step_medians else 0.0

        # before the test, as Learner.fit does
        monitor.enter("fit_end")
        hook_train = None
        if limited and not method.cache_image_features:  # hooks read images through the tower: limit them too
            hook_train = min(k, n_train_full)
            limit_split(learner, "train", hook_train, rebuild_loader=False)
        if limited: limit_split(learner, "test", k, rebuild_loader=True)
        if limited and "open" in worlds(args) and args.open_eval == "learner":
            limit_split(learner, "val", min(k, len(data.samples["val"])), rebuild_loader=True)
        t0 = time.perf_counter()
        with counting_images(method) as hook_images: method.on_fit_end(learner.context())
        fit_end_s = time.perf_counter() - t0

        # the test, in each asked world (training and on_fit_end are shared)
        def test_in(world: str) -> dict:
            monitor.enter(f"eval_{world}")
            text_s, own_scorer = [0.0], method.scorer
            def timed_scorer(*a, **kw):
                start = time.perf_counter()
                try: return own_scorer(*a, **kw)
                finally: text_s[0] += time.perf_counter() - start
            method.scorer = timed_scorer
            t0 = time.perf_counter()
            try: result, pairs, held = evaluate_test(learner, world, args.open_eval)
            finally: del method.scorer
            eval_measured = time.perf_counter() - t0
            monitor.sample()
            n_pairs = len(pairs)
            score_matrix = n_test * n_pairs * 4
            eval_s = text_s[0] + (eval_measured - text_s[0]) * n_test / k if limited else eval_measured
            fields = {"method": args.method, "shape": args.shape, "world": world,
                      "peak_anon_gb": monitor.peak / GB, "cache_gb": cache_bytes / GB, "step_s": step_s,
                      "eval_s": eval_s, "peak_gpu_gb": torch.cuda.max_memory_allocated() / GB if cuda else 0.0}
            eval_peak = monitor.peaks.get(f"eval_{world}", 0.0)
            extra = {"goal_gb": 2 + score_matrix / GB, "score_matrix_gb": score_matrix / GB,
                     "eval_images": f"{k}/{n_test}", "extrapolated": int(limited), "eval_s_measured": eval_measured,
                     "text_s": text_s[0], "pairs": n_pairs, "fit_start_s": fit_start_s, "fit_end_s": fit_end_s,
                     "peak_setup_gb": monitor.peaks.get("setup", 0.0) / GB,
                     "peak_train_gb": monitor.peaks.get("train", 0.0) / GB,
                     "peak_fit_end_gb": monitor.peaks.get("fit_end", 0.0) / GB, "peak_eval_gb": eval_peak / GB}
            if limited:
                extra["peak_eval_full_est_gb"] = (eval_peak + held * (n_test / k - 1)) / GB
                if hook_images[0]:
                    extra["fit_end_images"] = hook_images[0]
                    extra["fit_end_full_est_s"] = fit_end_s * (n_train_full + n_test) / hook_images[0]
            if len(step_medians) > 1: extra["step_s_by_epoch"] = "/".join(f"{s:.2f}" for s in step_medians)
            if args.split_images: extra["split_images"] = args.split_images
            if args.grad_checkpointing: extra["grad_checkpointing"] = 1
            extra.update({"trainable": int(method.trainable), "batch": args.batch_size, "steps": args.steps,
                          "cached": int(method.cache_image_features),
                          "encoded_on_read": sum(c["encoded_on_read"] for c in cache_log),
                          "tiled_from": getattr(learner, "tiled_from", 0),
                          "caches_found": sum(c["found"] for c in cache_log), "caches": len(cache_log),
                          "auc": result[next(iter(result))]["auc"], "threads": torch.get_num_threads(),
                          "device": args.device, "commit": short_commit()})
            return {**fields, **extra, "cache": cache_log}

        rows = [test_in(world) for world in worlds(args)]
        if args.drop_cache:
            for c in getattr(learner, "cache_log", []):
                for p in (Path(c["path"]), Path(c["path"]).with_suffix(".json")): p.unlink(missing_ok=True)
        return rows
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if own_monitor: monitor.stop()

def short_commit() -> str:
    commit = git_commit() or "none"
    return commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")

def last_line(row: dict) -> str:
    keys = [k for k in row if k != "cache"]
    return "bench_scale " + " ".join(f"{k}={fmt(k, row[k])}" for k in keys)

def main(argv=None) -> None:
    args = parse_args(argv)
    head = f"bench_scale method={args.method} shape={args.shape} world={worlds(args)[-1]}"
    def abort(reason: str, peak: float) -> None:
        print(f"ABORTED: {reason}", flush=True)
        print(f"{head} peak_anon_gb={peak / GB:.2f} cache_gb=nan step_s=nan eval_s=nan peak_gpu_gb=nan status=aborted "
              f"reason={reason.replace(' ', '_')}", flush=True)
        os._exit(3)
    def exceed(now: float) -> None:
        abort(f"RssAnon {now / GB:.2f} GB over --memory-limit-gb {args.memory_limit_gb:g}", now)
    # a hard cap as well: the sampler may miss one allocation that jumps far past the limit between two samples
    cap = int((args.memory_limit_gb + 2) * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    monitor = AnonMonitor(args.memory_limit_gb, exceed).start()
    try: rows = run_rows(argv, monitor=monitor)
    except (MemoryError, RuntimeError) as e:
        if "can't allocate memory" in str(e) or isinstance(e, MemoryError):
            abort(f"allocation refused over the {args.memory_limit_gb:g} GB + 2 GB cap", monitor.peak)
        raise
    monitor.stop()
    for row in rows: print(last_line(row), flush=True)

def sweep(argv: list[str]) -> None:
    """`bench_scale.py sweep --method all|A,B --shape S[,T] [row options]`: several rows in one process, the backbone
    built once (a deep copy per row), each row's last line as it finishes. For the GPU figures (peak GPU memory is
    reset per row); no memory guard, and peak_anon_gb is the process's peak so far, not the row's."""
    argv = list(argv)
    def take(flag: str) -> str:
        i = argv.index(flag)
        value = argv[i + 1]
        del argv[i:i + 2]
        return value
    methods, shapes = take("--method"), take("--shape")
    for shape in shapes.split(","):
        for method in (list_methods() if methods == "all" else methods.split(",")):
            gc.collect()
            if torch.cuda.is_available(): torch.cuda.empty_cache()
            try: rows = run_rows(["--method", method, "--shape", shape, *argv], reuse_backbone=True,
                                 log=lambda *a: None)
            except Exception as e:  # one failing row must not lose the others' figures
                traceback.print_exc(limit=-6)
                print(f"bench_scale method={method} shape={shape} status=failed error={type(e).__name__}: {e}"[:400],
                      flush=True)
                continue
            for row in rows: print(last_line(row), flush=True)

if __name__ == "__main__":
    sweep(sys.argv[2:]) if sys.argv[1:2] == ["sweep"] else main()
