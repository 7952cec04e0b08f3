"""Rewrite the `parameters` cell of nbs/train.ipynb from TrainConfig and every method's Params dataclass.

Run it after adding or changing a run-level field or a method hyper-parameter; tests/test_learner.py fails
while the notebook's cell differs from `czsl_nb.learner.parameters_cell()`.
"""
import json
from pathlib import Path

from czsl_nb.learner import parameters_cell

NOTEBOOK = Path(__file__).resolve().parents[1] / "nbs" / "train.ipynb"


def main() -> None:
    nb = json.loads(NOTEBOOK.read_text())
    (cell,) = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    lines = parameters_cell().split("\n")
    cell["source"] = [line + "\n" for line in lines[:-1]] + [lines[-1]]
    NOTEBOOK.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    print(f"{NOTEBOOK}: parameters cell rewritten ({len(lines)} lines)")


if __name__ == "__main__":
    main()
