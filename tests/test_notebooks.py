"""Every library notebook runs top to bottom (minus `#| slow` cells), one pytest test per notebook,
so CI's test count includes them (nbdev_test itself prints only "Success."). Each runs in a fresh
interpreter through `nbdev_test`, like a fresh Jupyter kernel: nothing this test process imported
(czsl_nb's torchvision fix, the method registry) can mask a notebook that only works after it."""
import subprocess, sys
from pathlib import Path
import pytest
from conftest import REPO

NOTEBOOKS = sorted(p for p in (REPO / "nbs").glob("*.ipynb")
                   if not p.name.startswith("_") and (p.name[:2].isdigit() or p.name == "index.ipynb"))

def test_notebooks_found():
    assert [p.name for p in NOTEBOOKS][:1] == ["00_core.ipynb"]

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb):
    nbdev_test = Path(sys.executable).parent / "nbdev_test"
    r = subprocess.run([str(nbdev_test), "--path", str(nb)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "Success." in r.stdout, f"{nb.name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
