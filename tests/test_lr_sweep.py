"tools/lr_sweep.py on the toy data: one run per lr, the best validation AUC chosen, the recipe's lr line rewritten."
import importlib.util, json, sys
from pathlib import Path
import pytest, yaml
from conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:.*marked NA")

def _tool():
    spec = importlib.util.spec_from_file_location("lr_sweep", REPO / "tools" / "lr_sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

def test_lr_sweep_picks_the_best_validation_auc_and_writes_it(toy, tiny_config, tmp_path, monkeypatch):
    monkeypatch.setenv("CZSL_NB_RUNS", str(tmp_path / "runs"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: csp\ndataset: {toy}\nbackbone: {tiny_config}\nepochs: 1\nbatch_size: 4\n"
                      "lr: 0.001                           # placeholder\n")
    tool = _tool()
    result = tool.sweep([str(recipe)], [], lrs=("1e-12", "1e-1"))
    assert [r["lr"] for r in result["runs"]] == [1e-12, 1e-1] and len(list((tmp_path / "runs").glob("csp-lr*"))) == 2
    best = max(result["runs"], key=lambda r: (r["val_auc"], -r["lr"]))
    assert result["chosen_lr"] == best["lr"]
    again = tool.sweep([str(recipe)], [], lrs=("1e-12", "1e-1"))  # finished runs are read, not trained again
    assert again["runs"] == result["runs"]
    tool.write_lr(recipe, result)
    assert yaml.safe_load(recipe.read_text())["lr"] == result["chosen_lr"] and "lr_sweep.py" in recipe.read_text()
    table = json.loads((tmp_path / "runs" / f"lr-sweep-csp-{Path(toy).name}.json").read_text())
    assert table["chosen_lr"] == best["lr"]
