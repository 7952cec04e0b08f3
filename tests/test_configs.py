"""The paper recipes in configs/: one per method and benchmark, each valid, each value with its source,
and the synthetic ones are exactly what the README's results table ran."""
import re, subprocess, sys
import pytest
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb import list_methods
from czsl_nb.learner import cli_parameters, read_run_params, run_params
from conftest import REPO

BENCHMARKS = ("mit-states", "ut-zappos", "cgqa")
CONFIGS = sorted((REPO / "configs").glob("*/*.yaml"))
# the runs behind the README's results table (tests/test_packaging.py checks the table against them)
README_RUNS = {method: f"bench/synthetic/{method}-full-s0"  # tools/benchmark.py's main table, small world
               for method in ("clip", "csp", "eva", "hope", "sam", "sepfusion", "trident")}

def test_every_method_has_a_recipe_per_benchmark():
    for method in list_methods():
        for name in (*BENCHMARKS, "synthetic"):
            assert (REPO / "configs" / method / f"{name}.yaml").is_file(), f"configs/{method}/{name}.yaml"

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_passes_check_and_cites_a_source_per_value(path):
    values, cfg, method_params = cli_parameters([path], [])
    assert cfg.method == path.parent.name
    for line in path.read_text().splitlines():
        if re.match(r"^\w+\s*:", line): assert "#" in line, f"{path.name}: no source comment on {line!r}"
    header = path.read_text().split("\n\n", 1)[0]
    assert "published" in header.lower() or path.stem == "synthetic" or "synthetic" in path.stem, path

def test_czsl_train_check_prints_the_resolved_parameters():
    r = subprocess.run([sys.executable, "-c", "from czsl_nb.learner import train_cli; train_cli()", "--check",
                        "-f", "configs/trident/cgqa.yaml", "-p", "dataset", "data/cgqa", "-p", "seed", "3"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "method: trident" in r.stdout and "seed: 3" in r.stdout and "# ok: trident" in r.stdout
    assert not (REPO / "runs" / "trident-cgqa-s3").exists()  # --check runs nothing

@pytest.mark.parametrize("method", sorted(README_RUNS))
def test_readme_runs_come_from_the_synthetic_recipes(method):
    "The synthetic recipe, resolved, is the committed run's params.yaml (less the per-run names)."
    per_run = ("seed", "run", "resume")
    _, cfg, method_params = cli_parameters([REPO / "configs" / method / "synthetic.yaml"], [])
    recipe = {k: v for k, v in run_params(cfg, method_params).items() if k not in per_run}
    ran = {k: v for k, v in read_run_params(REPO / "runs" / README_RUNS[method]).items() if k not in per_run}
    assert recipe == ran
