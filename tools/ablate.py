"""Run a method's ablation grid (variants x seeds) through the engine and print its table.

    python tools/ablate.py --method eva --seeds 0 1 2 --set epochs=5 --set lr=5e-4 \\
        --variant full --variant experts_only:use_variants=False --variant baseline:use_experts=False,use_variants=False

Each variant x seed is the run `runs/<method>-<variant>-s<seed>` (parameters recorded in its params.yaml,
as for any run). Finished runs are skipped and killed ones resumed, so re-running the same command
completes a grid. `--table` only prints the table of the runs that exist. Values are parsed like
papermill's `-p` (numbers, True/False, strings). `--threads 1` keeps a sweep from crowding a shared machine.

Besides mean ± std, the table gives each variant's paired difference to `--reference` (default: the variant named
`full`, else the first): the mean and std over seeds of (variant - reference) on the same seed, and in how many seeds
the sign agrees. `--max-seeds 5` then adds seeds (to every variant, so they stay paired) while some variant's sign
is not the same in every seed, up to that many seeds.
"""
import argparse, json, os, re, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
import torch
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb.core import runs_dir
from czsl_nb.learner import (RUN_FILES, TrainConfig, _papermill_value, ablation_table, collect_runs, launch,
                             paired_differences, split_parameters)

def parse_assignments(text: str, what: str) -> dict:
    "`k=v,k=v` -> {k: parsed v}; an entry without `=` is an error naming `what`."
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item: raise SystemExit(f"{what}: {item!r} is not NAME=VALUE")
        k, v = item.split("=", 1); out[k.strip()] = _papermill_value(v.strip())
    return out

def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, assignments = spec.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=]*", name):
        raise SystemExit(f"--variant {spec!r}: the name may hold letters, digits and _ . + = "
                         "(no '-', it separates the seed)")
    return name, parse_assignments(assignments, f"--variant {name}")

def markdown_table(df) -> str:
    "A DataFrame as a markdown table (ours: pandas' `to_markdown` needs `tabulate`, which is not a dependency)."
    cols = list(df.columns)
    rows = [["" if v != v else str(v) for v in r] for r in df.itertuples(index=False)]  # v != v: NaN, no value
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

def grid_runs(method: str, variants: list[str], root=None):
    "The finished runs of this method's grid (runs named <method>-<variant>-s<seed>) in `root` (default runs/)."
    table = collect_runs(root)
    if table.empty: return table
    table = table[(table.method == method) & table.run.str.match(rf"^{re.escape(method)}-.+-s\d+$")]
    return table[table.variant.isin(variants)] if variants else table

def reference_variant(variants: list[str], asked: str | None) -> str | None:
    if asked: return asked
    return "full" if "full" in variants else (variants[0] if variants else None)

def print_table(method: str, variants: list[str], reference: str | None = None, root=None) -> None:
    table = grid_runs(method, variants, root)
    if table.empty: print("no finished runs"); return
    reference = reference_variant(variants or sorted(table.variant.unique()), reference)
    summary = ablation_table(table, reference, by=("method", "world"))
    if variants: summary = summary.sort_values("variant", key=lambda s: s.map(variants.index), kind="stable")
    for world in summary.world.unique():
        print(f"\n{method}, test split, {world} world (%, mean ± std over seeds; paired: mean ± std of the "
              f"difference on the same seed, seeds where its sign agrees)\n")
        print(markdown_table(summary[summary.world == world].drop(columns=["method", "world"])))

def split_signs(table, reference: str) -> set[str]:
    "The variants in `table` whose paired AUC difference to `reference` does not have the same sign in every seed."
    if table.empty: return set()
    paired = paired_differences(table, reference)
    return set(paired[paired.sign_agrees < paired.seeds].variant) if not paired.empty else set()

def unsettled(method: str, variants: list[str], reference: str) -> bool:
    "Whether some variant's paired AUC difference to `reference` does not have the same sign in every seed."
    return bool(split_signs(grid_runs(method, variants), reference))

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--variant", action="append", default=[], help="NAME or NAME:param=value,param=value")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="param=value for every run (run or method parameter)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--table", action="store_true", help="only print the table of existing runs")
    ap.add_argument("--reference", default=None, help="the variant the paired differences are taken to "
                                                      "(default: full, else the first variant)")
    ap.add_argument("--max-seeds", type=int, default=0,
                    help="add seeds (next integers) while a variant's paired sign is unsettled, up to this many")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names): raise SystemExit(f"--variant names repeat: {names}")
    if args.table: print_table(args.method, names, args.reference); return
    if not variants: raise SystemExit("give at least one --variant")
    if args.threads: torch.set_num_threads(args.threads)
    common = {k: v for s in args.set for k, v in parse_assignments(s, "--set").items()}
    run_grid(args.method, variants, common, args.seeds)
    seeds, reference = list(args.seeds), reference_variant(names, args.reference)
    while len(seeds) < args.max_seeds and unsettled(args.method, names, reference):
        seeds.append(max(seeds) + 1)
        print(f"a paired sign is not settled yet: adding seed {seeds[-1]}")
        run_grid(args.method, variants, common, seeds[-1:])
    print_table(args.method, names, args.reference)

def finish_run(cfg: TrainConfig, method_params: dict) -> tuple[dict, bool]:
    "The run's metrics: read when it is finished, else trained now (a killed run resumed); and whether it trained."
    run_dir = runs_dir() / cfg.run_name
    if (run_dir / RUN_FILES["metrics"]).exists(): return json.loads((run_dir / RUN_FILES["metrics"]).read_text()), False
    cfg.resume = (run_dir / RUN_FILES["params"]).exists()
    return launch(cfg, method_params), True

def run_grid(method: str, variants: list[tuple[str, dict]], common: dict, seeds: list[int]) -> None:
    "Every variant x seed run that is not finished yet; the whole grid is validated before the first run starts."
    plans = []
    for name, params in variants:
        run_values, method_params = split_parameters({**common, **params, "method": method}, method)
        for seed in seeds:
            cfg = TrainConfig(**{**run_values, "seed": seed, "run": f"{method}-{name}-s{seed}"})
            cfg.validate(method_params)
            plans.append((cfg, method_params))
    for i, (cfg, method_params) in enumerate(plans, 1):
        start = time.perf_counter()
        m, trained = finish_run(cfg, method_params)
        if not trained:
            print(f"[{i}/{len(plans)}] {cfg.run}: finished, skipped"); continue
        closed = m["test"]["closed"]
        print(f"[{i}/{len(plans)}] {cfg.run}: {time.perf_counter() - start:.0f} s, epoch {m['epoch']}, "
              f"test AUC {100 * closed['auc']:.2f}, best HM {100 * closed['best_hm']:.2f}", flush=True)

if __name__ == "__main__":
    main()
