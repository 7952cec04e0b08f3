"tools/benchmark.py: the plan's order and prerequisites, and a small benchmark (sweep, main, ablation) on toy data."
import importlib.util, json, os, sys
import pytest, yaml
from conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:.*marked NA")

def _tool():
    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

def test_the_committed_plan_validates_and_puts_prerequisites_first():
    tool = _tool()
    spec = tool.load_spec(REPO / "configs" / "benchmark.yaml")
    jobs = tool.plan_jobs(spec, {}, spec["worlds"], list(spec["methods"]))
    tool.validate(jobs)
    folders = [j.folder for j in jobs]
    assert len(set(folders)) == len(folders)
    for job in jobs:  # every prerequisite that is a job of the plan comes before it
        assert all(folders.index(n) < folders.index(job.folder) for n in job.needs if n in folders), job.folder
    trainable = [m for m in spec["methods"] if tool.trains(spec, m)]
    assert all(j.root.name == "lr-sweep" for j in jobs[:len(trainable) * len(spec["lr_grid"])])
    main = tool.plan_jobs(spec, {}, ["synthetic"], ["sam"], part="main")
    runs = [j.values["run"] for j in main if j.root.name == "synthetic"]
    # SAM's main row starts from stage I of the same seed, so stage I runs the main seeds too, just before it
    assert runs[:2] == ["sam-sa-s0", "sam-full-s0"] and f"sam-sa-s{spec['main_seeds'][-1]}" in runs
    assert all(j.values["epochs"] == spec["budget"]["epochs"] for j in main)
    assert "czsl-train -f configs/sam/synthetic.yaml" in tool.czsl_train_command(main[-1])

def test_a_small_benchmark_runs_end_to_end(toy, tiny_config, tmp_path, capsys):
    tool = _tool()
    spec = {"worlds": [str(toy)], "budget": {"epochs": 2, "patience": 1}, "lr_grid": [1e-3, 1e-1],
            "lr_world": str(toy), "main_seeds": [0, 1], "ablation_seeds": [0],
            "methods": {"clip": {"train": False}, "csp": {"variants": {"no_dropout": {"attr_dropout": 0.0}}}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    args = ["--spec", str(tmp_path / "spec.yaml"), "--root", str(tmp_path / "bench"), "--jobs", "1",
            "--set", f"backbone={tiny_config}", "--set", "batch_size=4", "--set", "open_world=False"]
    runs_before = os.environ.get("CZSL_NB_RUNS")
    with pytest.raises(SystemExit) as done: tool.main(["run", *args])
    assert done.value.code == 0
    chosen = json.loads((tmp_path / "bench" / "lr-sweep" / f"lr-sweep-csp-{toy.name}.json").read_text())["chosen_lr"]
    world = tmp_path / "bench" / toy.name
    runs = sorted(p.name for p in world.iterdir())
    assert runs == ["clip-full-s0", "clip-full-s1", "csp-full-s0", "csp-full-s1", "csp-no_dropout-s0"]
    for run in runs[2:]:  # the trained runs got the sweep's lr and the budget
        params = yaml.safe_load((world / run / "params.yaml").read_text())
        assert params["lr"] == chosen and params["epochs"] == 2 and params["patience"] == 1
    capsys.readouterr()
    tool.main(["table", *args])
    out = capsys.readouterr().out
    assert "| csp |" in out and "no_dropout" in out and "/1" in out  # the paired column has its sign count
    with pytest.raises(SystemExit) as again: tool.main(["run", *args])  # everything finished: nothing trains
    assert again.value.code == 0 and "7 of 7 runs already finished" in capsys.readouterr().out
    assert os.environ.get("CZSL_NB_RUNS") == runs_before  # the runs' folder is set in the workers only
    tool.pack(tmp_path / "packed")
    assert {p.name for p in (tmp_path / "packed").iterdir()} == {"lr-sweep.tgz", f"{toy.name}.tgz"}

def test_write_budget_replaces_or_adds_each_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: csp\nepochs: 10                          # old\nlr: 0.001 # x\n")
    _tool().write_budget(recipe, {"epochs": 20, "patience": 3})
    values = yaml.safe_load(recipe.read_text())
    assert values == {"method": "csp", "epochs": 20, "patience": 3, "lr": 0.001}
    assert recipe.read_text().count("configs/benchmark.yaml") == 2

def test_settle_adds_the_main_seeds_where_a_paired_sign_is_unsettled(tmp_path):
    tool = _tool()
    keys = ("auc", "best_hm", "best_seen", "best_unseen", "attr_acc", "obj_acc")
    def run(variant, seed, auc):  # a finished run's metrics.json, as much of it as collect_runs reads
        folder = tmp_path / "w" / f"csp-{variant}-s{seed}"
        folder.mkdir(parents=True)
        metrics = {"method": "csp", "dataset": "w", "seed": seed, "epoch": 1, "val": {"auc": auc},
                   "test": {"closed": dict.fromkeys(keys, auc)}}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    for seed, (full, steady, wobbly) in enumerate([(0.5, 0.4, 0.6), (0.5, 0.4, 0.4), (0.5, 0.4, 0.6)]):
        run("full", seed, full); run("steady", seed, steady); run("wobbly", seed, wobbly)
    assert tool.unsettled_variants(tmp_path / "w", "csp") == {"wobbly"}
    # a comparison besides `full` whose sign is split settles both of its sides; `full` is never added
    assert tool.unsettled_variants(tmp_path / "w", "csp", [("steady", "wobbly")]) == {"steady", "wobbly"}
    assert tool.unsettled_variants(tmp_path / "w", "csp", [("full", "steady")]) == {"wobbly"}
    assert tool.unsettled_variants(tmp_path / "nothing", "csp") == set()

def test_settle_settles_every_comparison_a_notebook_claims(tmp_path, monkeypatch):
    "Each Claims row that pairs two variants of a method, neither `full`, is one of the method's `pairs` in the spec."
    tool = _tool()
    spec = tool.load_spec(REPO / "configs" / "benchmark.yaml")
    monkeypatch.setenv("CZSL_NB_RUNS", str(tmp_path))  # no runs: the cells build their claims and tabulate nothing
    import pandas as pd
    from czsl_nb.core import runs_dir
    for method in spec["methods"]:
        notebook = next((REPO / "nbs").glob(f"2?_{method}.ipynb"))
        cells = ["".join(c["source"]) for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
        scope = {"pd": pd, "json": json, "runs_dir": runs_dir, "display": lambda table: None}
        exec(next(c for c in cells if "CLAIMS = [" in c), scope)
        variants, pairs = set(tool.variants_of(spec, method)) - {"full"}, set(tool.compared_pairs(spec, method))
        for claim in scope["CLAIMS"]:
            if {claim.variant, claim.reference} <= variants:
                assert {(claim.variant, claim.reference), (claim.reference, claim.variant)} & pairs, (method, claim)
