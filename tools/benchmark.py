"""Run the benchmark of configs/benchmark.yaml: a learning-rate sweep per method, then every method's variants on every
world with paired seeds and the same budget, several runs at a time.

    python tools/benchmark.py plan [--spec configs/benchmark.yaml]     # every run as a czsl-train command; runs nothing
    python tools/benchmark.py run [--jobs 2] [--threads 1] [--set device=cuda] [--worlds W ...] [--methods M ...]
                                  [--part all|main|ablations|settle] [--stop-after SECONDS]
    python tools/benchmark.py table                                      # main and ablation tables of the finished runs
    python tools/benchmark.py readme                                     # the README's results tables
    python tools/benchmark.py bootstrap                                  # seed 0's test-image bootstrap per method
    python tools/benchmark.py write-recipes                              # the sweep's lrs and the budget into recipes
    python tools/benchmark.py pack OUT_DIR                               # the runs' small files as tarballs

A run is `runs/bench/<world>/<method>-<variant>-s<seed>` (the sweep's: `runs/bench/lr-sweep/<method>-lr<lr>-s0`),
trained in-process through the engine (`launch`, as tools/ablate.py does) with exactly the values `plan` prints.
Finished runs are skipped and killed ones resumed, so re-running `run` completes the benchmark. A run waits for the
runs it needs: its method's sweep (for the lr) and the run its `init_from` names. `--set` adds machine settings to
every run (device, precision, num_workers); they are recorded in each params.yaml like any value.
"""
import argparse, json, os, re, sys, tarfile, time, traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ablate.py and lr_sweep.py beside this file
from ablate import grid_runs, markdown_table, parse_assignments, print_table, split_signs
from lr_sweep import record_sweep, sweep_row, write_lr
from czsl_nb.learner import BENCH_SWEEP_FOLDER as LR_FOLDER, RUN_FILES, _NoDatesLoader, read_parameter_file

REPO = Path(__file__).resolve().parents[1]
BENCH = Path("runs") / "bench"  # relative to the repository root
RUN_KEYS = ("seed", "run")  # the per-run values, last

@dataclass
class Job:
    "One run: its folder (`root/run`), its values (lr filled in from `lr_from` once that sweep is finished)."
    root: Path
    values: dict
    needs: list[Path] = field(default_factory=list)  # run folders that must hold metrics.json first
    lr_from: str | None = None  # the method whose sweep gives the lr
    recipe: str = ""

    @property
    def folder(self) -> Path: return self.root / self.values["run"]
    @property
    def done(self) -> bool: return (self.folder / RUN_FILES["metrics"]).exists()

def load_spec(path: Path) -> dict:
    import yaml
    return yaml.load(Path(path).read_text(), Loader=_NoDatesLoader)

def method_recipe(method: str, variant: dict | None = None) -> str:
    return (variant or {}).get("recipe", f"configs/{method}/synthetic.yaml")

def run_values(recipe: str, *layers: dict) -> dict:
    "The recipe's values with each layer on top, in order (later wins)."
    values = read_parameter_file(REPO / recipe)
    for layer in layers: values.update({k: v for k, v in layer.items() if k != "recipe"})
    return values

def variants_of(spec: dict, method: str) -> dict:
    return {"full": {}, **(spec["methods"][method] or {}).get("variants", {})}

def trains(spec: dict, method: str) -> bool:
    return (spec["methods"][method] or {}).get("train", True)

def sweep_jobs(spec: dict, machine: dict, methods: list[str]) -> list[Job]:
    root = REPO / BENCH / LR_FOLDER
    jobs = []
    for method in filter(lambda m: trains(spec, m), methods):
        variant = variants_of(spec, method)[(spec["methods"][method] or {}).get("lr_variant", "full")]
        for lr in spec["lr_grid"]:
            recipe = method_recipe(method, variant)
            values = run_values(recipe, {"dataset": spec["lr_world"]}, spec["budget"], variant, {"lr": lr}, machine,
                                {"seed": 0, "run": f"{method}-lr{lr:g}-s0"})
            jobs.append(Job(root, values, recipe=recipe))
    return jobs

def unsettled_variants(root: Path, method: str, pairs=()) -> set[str]:
    """The variants whose paired closed-world AUC difference to `full`, or within one of `pairs` ((variant, reference):
    the method's other comparisons), does not yet have one sign in every seed; both sides of such a pair."""
    runs = grid_runs(method, [], root) if root.is_dir() else None
    if runs is None or runs.empty: return set()
    closed = runs[runs.world == "closed"]
    split_pairs = [pair for pair in pairs if pair[0] in split_signs(closed[closed.variant.isin(pair)], pair[1])]
    return split_signs(closed, "full") | {variant for pair in split_pairs for variant in pair} - {"full"}

def compared_pairs(spec: dict, method: str) -> list[tuple[str, str]]:
    "The (variant, reference) comparisons of a method besides each variant against `full` (its notebook's Claims)."
    return [tuple(pair) for pair in (spec["methods"][method] or {}).get("pairs", [])]

def variant_jobs(spec: dict, machine: dict, world: str, methods: list[str], settle: bool = False):
    """Every variant x seed run of one world, each with whether it belongs to the main table: the `full` variant
    and the runs it starts from (SAM's stage I) run the main seeds and come first; the other variants the ablation
    seeds, or with `settle` the main seeds where their paired sign is not settled yet."""
    root, jobs = REPO / BENCH / Path(world).name, []
    for method in methods:
        sweep = [root.parent / LR_FOLDER / f"{method}-lr{lr:g}-s0" for lr in spec["lr_grid"]] if trains(
            spec, method) else []
        budget = spec["budget"] if trains(spec, method) else {}
        variants = variants_of(spec, method)
        full_start = str(run_values(method_recipe(method, variants["full"]), variants["full"]).get("init_from", ""))
        more_seeds = unsettled_variants(root, method, compared_pairs(spec, method)) if settle else set()
        for name, variant in variants.items():
            main = name == "full" or full_start == f"{method}-{name}-s{{seed}}"
            for seed in spec["main_seeds" if main or name in more_seeds else "ablation_seeds"]:
                recipe = method_recipe(method, variant)
                values = run_values(recipe, {"dataset": world}, budget, variant, machine,
                                    {"seed": seed, "run": f"{method}-{name}-s{seed}"})
                needs = list(sweep)
                if values.get("init_from"): needs.append(root / str(values["init_from"]).format(seed=seed))
                jobs.append((main, Job(root, values, needs, method if sweep else None, recipe)))
    return jobs

def plan_jobs(spec: dict, machine: dict, worlds: list[str], methods: list[str], part: str = "all") -> list[Job]:
    "Every job in priority order: the sweeps, each world's main table, then each world's ablations (`part`: one)."
    per_world = [variant_jobs(spec, machine, world, methods, settle=part == "settle") for world in worlds]
    jobs = sweep_jobs(spec, machine, methods)
    for main in {"all": (True, False), "main": (True,), "ablations": (False,), "settle": (False,)}[part]:
        jobs += [job for world in per_world for is_main, job in world if is_main == main]
    return prioritised(jobs)

def prioritised(jobs: list[Job]) -> list[Job]:
    "A job's prerequisites move up to just before it (a main-table run that starts from an ablation run)."
    by_folder, order, placed = {j.folder: j for j in jobs}, [], set()
    def place(job):
        if job.folder in placed: return
        for need in job.needs:
            if need in by_folder: place(by_folder[need])
        placed.add(job.folder); order.append(job)
    for job in jobs: place(job)
    return order

def czsl_train_command(job: Job) -> str:
    "The same run as a czsl-train command (recipe, then every value that differs from it)."
    base = read_parameter_file(REPO / job.recipe)
    pairs = [f"-p {k} {json.dumps(v) if isinstance(v, (list, str)) and (not v or ' ' in str(v)) else v}"
             for k, v in job.values.items() if k in RUN_KEYS or base.get(k) != v]
    lr = ["-p lr <the sweep's lr>"] if job.lr_from else []
    root = job.root.relative_to(REPO) if job.root.is_relative_to(REPO) else job.root
    return f"CZSL_NB_RUNS={root} czsl-train -f {job.recipe} {' '.join(pairs + lr)}"

def chosen_lr(spec: dict, method: str) -> float:
    "The sweep's choice for `method` (every sweep run finished); its table is written beside the runs."
    folder = REPO / BENCH / LR_FOLDER
    rows = []
    for lr in spec["lr_grid"]:
        run = f"{method}-lr{lr:g}-s0"
        rows.append(sweep_row(lr, run, json.loads((folder / run / RUN_FILES["metrics"]).read_text())))
    return record_sweep(method, Path(spec["lr_world"]).name, rows, folder)["chosen_lr"]

def _init_worker(threads: int) -> None:
    import torch
    if threads: torch.set_num_threads(threads)
    import czsl_nb.all  # noqa: F401  (registers every method)

def _run_job(root: str, values: dict) -> dict:
    "Train (or read) one run in this worker; a failure comes back as its traceback."
    os.environ["CZSL_NB_RUNS"] = root
    from ablate import finish_run
    from czsl_nb.learner import resolve_parameters
    start = time.perf_counter()
    try:
        cfg, method_params = resolve_parameters(values)
        cfg.validate(method_params)
        metrics, trained = finish_run(cfg, method_params)
    except Exception:
        return {"error": traceback.format_exc()}
    return {"seconds": time.perf_counter() - start, "trained": trained, "epoch": metrics["epoch"],
            "epochs_trained": metrics.get("epochs_trained"), "stopped_early": metrics.get("stopped_early"),
            "val_auc": 100 * metrics["val"]["auc"], "test_auc": 100 * metrics["test"]["closed"]["auc"]}

def run(spec: dict, jobs: list[Job], workers: int, threads: int, stop_after: float) -> int:
    "Run the jobs `workers` at a time, each once what it needs is finished; the number of failed or skipped jobs."
    from czsl_nb.learner import WORLD_PRESETS
    from czsl_nb.synthetic import synthetic_world
    for world in {j.values["dataset"] for j in jobs} & set(WORLD_PRESETS):
        synthetic_world(**WORLD_PRESETS[world])  # once here, not in every worker at the same time
    start, pending, running, failed = time.monotonic(), [j for j in jobs if not j.done], {}, set()
    lrs = {}  # each method's swept lr, read (and its table written) once its sweep is finished
    total, finished = len(pending), 0
    print(f"{len(jobs) - total} of {len(jobs)} runs already finished; {total} to go, {workers} at a time", flush=True)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        while pending or running:
            blocked = [j for j in pending if any(n in failed for n in j.needs)]
            for job in blocked: failed.add(job.folder); pending.remove(job); print(f"skipped {job.folder}: "
                                                                                   "a run it needs failed")
            ready = [j for j in pending if all((n / RUN_FILES["metrics"]).exists() for n in j.needs)]
            late = stop_after and time.monotonic() - start > stop_after
            while ready and len(running) < workers and not late:
                job = ready.pop(0); pending.remove(job)
                if job.lr_from:
                    if job.lr_from not in lrs: lrs[job.lr_from] = chosen_lr(spec, job.lr_from)
                    job.values["lr"] = lrs[job.lr_from]
                running[pool.submit(_run_job, str(job.root), job.values)] = job
            if not running: break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job, result = running.pop(future), future.result()
                finished += 1
                where = f"[{finished}/{total}, {time.monotonic() - start:.0f} s] {job.root.name}/{job.values['run']}"
                if "error" in result:
                    failed.add(job.folder); print(f"{where}: FAILED\n{result['error']}", flush=True); continue
                print(f"{where}: {result['seconds']:.0f} s, epochs {result['epochs_trained']} (best "
                      f"{result['epoch']}{', stopped early' if result['stopped_early'] else ''}), val AUC "
                      f"{result['val_auc']:.2f}, test AUC {result['test_auc']:.2f}", flush=True)
    left = len(pending)
    if left: print(f"stopped after {stop_after:.0f} s: {left} runs not started")
    return len(failed) + left

def world_runs(world: str):
    "One world's finished `full` runs (each method's main-table runs), every test world (closed, open)."
    from czsl_nb.learner import collect_runs
    table = collect_runs(REPO / BENCH / Path(world).name)
    return table[table.variant == "full"] if len(table) else table

def main_table(spec: dict, world: str):
    "The `full` variant of every method on one world, closed world: `learner.main_table`, in the spec's order."
    from czsl_nb.learner import main_table as summarize_full
    table = world_runs(world)
    if table.empty: return table
    summary = summarize_full(table[table.world == "closed"], by=("method",)).set_index("method")
    return summary.loc[[m for m in spec["methods"] if m in summary.index]].reset_index()

def readme_table(spec: dict, world: str) -> str:
    """The README's results table of one world: each method's `full` runs, mean ± std over seeds (closed world, the
    standard AUC and best HM, then our exact-curve AUC; open world calibrated where the recipe runs it), the epochs
    it trained (mean; the budget is the same for all) and its training time, and the lr the sweep chose."""
    from czsl_nb.learner import main_table as summarize_full, paired_differences
    table = world_runs(world)
    closed_runs = table[table.world == "closed"]
    closed = summarize_full(closed_runs, keys=("auc", "best_hm", "auc_exact"), by=("method",)).set_index("method")
    open_auc = summarize_full(table[table.world == "open"], keys=("auc",), by=("method",)).set_index("method").auc
    methods = closed_runs.assign(variant=lambda t: t.method, method="all")  # methods paired by seed
    versus = paired_differences(methods, "csp", "auc", by=("method",)).set_index("variant").difference
    lines = ["| method | closed AUC | − csp, paired | seed 0: 95% bootstrap | closed best HM | closed AUC, exact curve "
             "(ours) | open AUC | seeds | epochs trained | training s | lr |", "|" + " --- |" * 11]
    for method in filter(lambda m: m in closed.index, spec["methods"]):
        row, trained = closed.loc[method], trains(spec, method)
        lines.append(f"| `{method}` | {row.auc} | {versus.get(method, '')} | {seed0_interval(world, method)} | "
                     f"{row.best_hm} | {row.auc_exact} | {open_auc.get(method, 'not run')} | {row.seeds} | "
                     f"{f'{row.epochs_trained:.1f}' if trained else 'none'} | "
                     f"{f'{row.train_s:.0f}' if trained else '0'} | {f'{row.lr:g}' if trained else 'none'} |")
    return "\n".join(lines)

def full_run(world: str, method: str, seed: int = 0) -> Path:
    return REPO / BENCH / Path(world).name / f"{method}-full-s{seed}"

def seed0_interval(world: str, method: str) -> str:
    "The 95% interval of seed 0's closed-world test AUC over resamples of the test images (`bootstrap` writes it)."
    path = full_run(world, method) / RUN_FILES["bootstrap"]
    if not path.is_file(): return "not computed"
    auc = next(row for row in json.loads(path.read_text()) if row["metric"] == "auc")
    return f"[{auc['low']:.2f}, {auc['high']:.2f}]"

def bootstrap(spec: dict, worlds: list[str], methods: list[str]) -> None:
    "Each method's `full` seed-0 run: its test AUC's bootstrap interval into `bootstrap_test.json` (from its scores)."
    from czsl_nb.learner import bootstrap_test_metrics
    for world in worlds:
        for method in methods:
            run = full_run(world, method)
            if not (run / RUN_FILES["scores"]).is_file(): print(f"{run}: no test scores"); continue
            auc = bootstrap_test_metrics(run).set_index("metric").loc["auc"]
            print(f"{world} {method}: test AUC {auc.value:.2f}, 95% [{auc.low:.2f}, {auc.high:.2f}]")

def print_tables(spec: dict, worlds: list[str], methods: list[str]) -> None:
    for world in worlds:
        print(f"\n## {world}: main table (variant full, closed world, test split, %)\n")
        table = main_table(spec, world)
        print(markdown_table(table) if not table.empty else "no finished runs")
        for method in methods:
            if len(variants_of(spec, method)) > 1:
                print(f"\n### {world}: {method}")
                print_table(method, list(variants_of(spec, method)), "full", REPO / BENCH / Path(world).name)

def write_recipes(spec: dict, methods: list[str]) -> None:
    "Into each trainable method's recipes: the sweep's lr and the budget, so a recipe is what its `full` runs ran."
    for method in filter(lambda m: trains(spec, m), methods):
        table = REPO / BENCH / LR_FOLDER / f"lr-sweep-{method}-{Path(spec['lr_world']).name}.json"
        result = json.loads(table.read_text())
        for recipe in sorted({method_recipe(method, v) for v in variants_of(spec, method).values()}):
            write_lr(REPO / recipe, result, table_folder=str(BENCH / LR_FOLDER), by="tools/benchmark.py's sweep")
            write_budget(REPO / recipe, spec["budget"])
            print(f"{recipe}: lr {result['chosen_lr']:g}, {spec['budget']}")

def write_budget(recipe: Path, budget: dict) -> None:
    "Each budget value as the recipe's `name:` line (replaced, or added after the `epochs:` line)."
    text = recipe.read_text()
    for name, value in budget.items():
        line = f"{name}: {value}".ljust(36) + "# configs/benchmark.yaml: the budget of every method"
        text, n = re.subn(rf"^{name}:.*$", line, text, count=1, flags=re.M)
        if not n: text = re.sub(r"^(epochs:.*)$", lambda m: f"{m.group(1)}\n{line}", text, count=1, flags=re.M)
    recipe.write_text(text)

def pack(out: Path) -> None:
    "Each folder of runs/bench as `<folder>.tgz` in `out`: json, yaml and the `full` runs' plots; no checkpoints."
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in (REPO / BENCH).iterdir() if p.is_dir()):
        with tarfile.open(out / f"{folder.name}.tgz", "w:gz") as tar:
            for path in sorted(folder.rglob("*")):
                small = path.suffix in (".json", ".yaml") or (path.suffix == ".png" and "-full-s" in path.parent.name)
                if path.is_file() and small: tar.add(path, arcname=str(BENCH / path.relative_to(REPO / BENCH)))

def main(argv=None) -> None:
    global BENCH
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["plan", "run", "table", "readme", "bootstrap", "write-recipes", "pack"])
    ap.add_argument("out", nargs="?", type=Path, help="pack: the folder the tarballs go to")
    ap.add_argument("--spec", type=Path, default=REPO / "configs" / "benchmark.yaml")
    ap.add_argument("--root", type=Path, default=BENCH, help="where the runs go (relative: to the repository)")
    ap.add_argument("--worlds", nargs="+", help="a subset of the spec's worlds")
    ap.add_argument("--methods", nargs="+", help="a subset of the spec's methods (in this order)")
    ap.add_argument("--part", choices=["all", "main", "ablations", "settle"], default="all",
                    help="main: the main table's runs; ablations: the other variants (the sweeps come with either); "
                         "settle: the ablations, with the main seeds for each variant whose paired sign (to full, or "
                         "in one of the method's pairs) is unsettled")
    ap.add_argument("--set", action="append", default=[], help="param=value for every run (device, precision, ...)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    ap.add_argument("--stop-after", type=float, default=0, help="start no run after this many seconds (0: never)")
    args = ap.parse_args(argv)
    BENCH, spec = args.root, load_spec(args.spec)
    worlds, methods = args.worlds or spec["worlds"], args.methods or list(spec["methods"])
    for name, valid, given in (("--worlds", spec["worlds"], worlds), ("--methods", list(spec["methods"]), methods)):
        if set(given) - set(valid): raise SystemExit(f"{name} {' '.join(given)}: valid: {', '.join(valid)}")
    machine = {k: v for s in args.set for k, v in parse_assignments(s, "--set").items()}
    if set(machine) & set(RUN_KEYS): raise SystemExit(f"--set: {', '.join(RUN_KEYS)} are set per run")
    if args.command == "table": print_tables(spec, worlds, methods); return
    if args.command == "readme":
        for world in worlds: print(f"**{world}**\n\n{readme_table(spec, world)}\n")
        return
    if args.command == "bootstrap": bootstrap(spec, worlds, methods); return
    if args.command == "write-recipes": write_recipes(spec, methods); return
    if args.command == "pack":
        if not args.out: raise SystemExit("pack needs OUT_DIR")
        pack(args.out); return
    jobs = plan_jobs(spec, machine, worlds, methods, args.part)
    if args.command == "plan":
        for job in jobs: print(czsl_train_command(job))
        return
    validate(jobs)
    raise SystemExit(1 if run(spec, jobs, args.jobs, args.threads, args.stop_after) else 0)

def validate(jobs: list[Job]) -> None:
    "Every run's values pass the engine's checks (a swept lr with the recipe's in its place) before any run starts."
    from czsl_nb.learner import resolve_parameters
    import czsl_nb.all  # noqa: F401
    for job in jobs:
        try:
            cfg, method_params = resolve_parameters(job.values)
            cfg.validate(method_params, check_paths=False)
        except ValueError as e: raise SystemExit(f"{job.root.name}/{job.values['run']}: {e}") from None

if __name__ == "__main__":
    main()
