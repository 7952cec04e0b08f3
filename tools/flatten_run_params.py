"""Rewrite runs written before flat params.yaml (method values nested under `method_params`) to the flat form.

The flat form is what a run writes today: every TrainConfig field (fields added since the run take the defaults
that reproduce it, e.g. `lr_schedule: constant`), then the method's hyper-parameters, side by side, so that
`czsl-train -f runs/X/params.yaml -p run Y` re-runs X. Runs already flat are left alone.

    python tools/flatten_run_params.py [RUNS_DIR]
"""
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from czsl_nb.learner import RUN_FILES, TrainConfig, read_run_params


def flatten(run_dir: Path) -> bool:
    "Rewrite one run's params.yaml if it is nested; return whether it changed."
    path = run_dir / RUN_FILES["params"]
    nested = yaml.safe_load(path.read_text())
    if "method_params" not in nested: return False
    flat = read_run_params(run_dir)
    order = [f.name for f in fields(TrainConfig)] + list(nested["method_params"])
    path.write_text(yaml.safe_dump({k: flat[k] for k in order}, sort_keys=False))
    return True


def main(root: str = "runs") -> None:
    changed = [p.parent.name for p in sorted(Path(root).glob(f"*/{RUN_FILES['params']}")) if flatten(p.parent)]
    print(f"{len(changed)} run(s) rewritten to flat params.yaml" + (f": {', '.join(changed)}" if changed else ""))


if __name__ == "__main__":
    main(*sys.argv[1:])
