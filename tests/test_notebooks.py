"""Every library notebook runs top to bottom (minus `#| slow` cells), one pytest test per notebook,
so CI's test count includes them (nbdev_test itself prints only "Success.")."""
import pytest
import nbdev.test as nbt  # not `from nbdev.test import test_nb`: pytest would collect it as a test
from conftest import REPO

NOTEBOOKS = sorted(p for p in (REPO / "nbs").glob("*.ipynb")
                   if not p.name.startswith("_") and p.name[:2].isdigit())

def test_notebooks_found():
    assert [p.name for p in NOTEBOOKS][:1] == ["00_core.ipynb"]

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb, monkeypatch):
    monkeypatch.chdir(nb.parent)  # nbdev_test runs notebooks from nbs/
    ok, secs = nbt.test_nb(nb, skip_flags=["slow", "cuda", "notest"], do_print=False)
    assert ok, f"{nb.name} failed (see the traceback above)"
