"""Pick a method's learning rate by a small, recorded sweep on validation AUC (the same grid size for every method).

    python tools/lr_sweep.py -f configs/csp/synthetic.yaml [-p NAME VALUE ...] [--lrs 3e-4 1e-3 3e-3] \\
        [--write configs/csp/synthetic.yaml]

Each learning rate is the run `runs/<method>-lr<lr>-<dataset>-s<seed>`, trained from the recipe (`-f`, `-p` as for
`czsl-train`, e.g. `-p patience 3 -p epochs 30` for equal budgets) with that lr; finished runs are skipped and killed
ones resumed. The chosen lr has the best validation AUC of its selected epoch (a tie goes to the smaller lr); the test
split is never looked at. The sweep's table is written to `runs/lr-sweep-<method>-<dataset>.json`. `--write FILE`
replaces the recipe's `lr:` line with the chosen value and a comment naming the sweep.
"""
import argparse, json, os, re, sys
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ablate.py beside this file, however this one is loaded
from ablate import finish_run
from czsl_nb.core import runs_dir
from czsl_nb.learner import cli_parameters

DEFAULT_LRS = ("3e-4", "1e-3", "3e-3")

def sweep(files: list[str], pairs: list[tuple[str, str]], lrs=DEFAULT_LRS) -> dict:
    "Train one run per lr (skipping finished ones); the table of (lr, val AUC, epochs) and the chosen lr."
    plans = []
    for lr in lrs:  # every run is validated before the first one starts
        _, cfg, method_params = cli_parameters(files, [*pairs, ("lr", lr)])
        cfg.run = f"{cfg.method}-lr{lr}-{Path(cfg.dataset).name}-s{cfg.seed}"
        plans.append((lr, cfg, method_params))
    rows = [sweep_row(lr, cfg.run, finish_run(cfg, method_params)[0]) for lr, cfg, method_params in plans]
    return record_sweep(plans[0][1].method, Path(plans[0][1].dataset).name, rows, runs_dir())

def sweep_row(lr, run: str, metrics: dict) -> dict:
    "One learning rate's line of the sweep's table, from its finished run's metrics."
    return {"lr": float(lr), "run": run, "val_auc": 100 * metrics["val"]["auc"], "epoch": metrics["epoch"],
            "epochs_trained": metrics.get("epochs_trained")}

def record_sweep(method: str, dataset: str, rows: list[dict], folder: Path) -> dict:
    "The chosen lr (best validation AUC; a tie goes to the smaller lr), written with the table to `folder`."
    best = max(rows, key=lambda r: (r["val_auc"], -r["lr"]))
    result = {"method": method, "dataset": dataset, "lrs": [r["lr"] for r in rows], "runs": rows,
              "chosen_lr": best["lr"]}
    (Path(folder) / f"lr-sweep-{method}-{dataset}.json").write_text(json.dumps(result, indent=1))
    return result

def write_lr(recipe: Path, result: dict, table_folder: str = "runs", by: str = "tools/lr_sweep.py") -> None:
    "Replace the recipe's `lr:` line (one must exist) with the chosen lr and where it came from."
    text = recipe.read_text()
    grid = ", ".join(f"{lr:g}" for lr in result["lrs"])
    line = (f"lr: {result['chosen_lr']:g}".ljust(36) + f"# {by}: best validation AUC over {grid} "
            f"({table_folder}/lr-sweep-{result['method']}-{result['dataset']}.json)")
    new, n = re.subn(r"^lr:.*$", line, text, count=1, flags=re.M)
    if n != 1: raise SystemExit(f"{recipe}: no `lr:` line to replace")
    recipe.write_text(new)

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-f", "--parameters_file", action="append", default=[], metavar="FILE")
    ap.add_argument("-p", "--parameters", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--lrs", nargs="+", default=list(DEFAULT_LRS))
    ap.add_argument("--write", type=Path, default=None, help="recipe whose lr: line gets the chosen value")
    args = ap.parse_args(argv)
    result = sweep(args.parameters_file, [tuple(p) for p in args.parameters], args.lrs)
    for r in result["runs"]:
        print(f"lr {r['lr']:g}: val AUC {r['val_auc']:.2f} (epoch {r['epoch']}, trained {r['epochs_trained']})")
    print(f"chosen lr {result['chosen_lr']:g}")
    if args.write: write_lr(args.write, result); print(f"wrote it into {args.write}")

if __name__ == "__main__":
    main()
