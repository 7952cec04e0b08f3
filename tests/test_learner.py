"""The engine end to end on the toy dataset with the tiny backbone: runs are written, never
overwritten, resume without loss, run through papermill, and run in two processes."""
import json, os, subprocess, sys
import numpy as np, pytest, yaml
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb import list_methods
from czsl_nb.learner import Learner, TrainConfig, launch
from czsl_nb.metrics import evaluate
from conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:.*marked NA")

def _cfg(toy, tiny_config, **kw):
    return TrainConfig(**{"method": "csp", "dataset": str(toy), "backbone": str(tiny_config), "epochs": 3,
                          "batch_size": 4, "lr": 1e-2, "seed": 0, **kw})

def _strip(metrics):
    return {k: v for k, v in metrics.items() if k not in ("git_commit", "train_seconds")}

def test_patience_stops_when_validation_auc_stalls(toy, tiny_config, tmp_path):
    "With a learning rate too small to move validation AUC, patience 1 stops after epoch 2 and keeps epoch 1."
    m = launch(_cfg(toy, tiny_config, run="p", epochs=6, patience=1, lr=1e-12), runs_root=tmp_path)
    history = json.loads((tmp_path / "p" / "history.json").read_text())
    assert (m["epochs_trained"], m["stopped_early"], m["epoch"]) == (2, True, 1) and len(history) == 2
    assert m["train_seconds"] >= 0  # the toy epochs can take under a millisecond
    full = launch(_cfg(toy, tiny_config, run="cap", epochs=2, lr=1e-12), runs_root=tmp_path)
    assert (full["epochs_trained"], full["stopped_early"]) == (2, False)

def test_run_folder_contents_and_scores_file(toy, tiny_config, tmp_path):
    m = launch(_cfg(toy, tiny_config, run="a", open_world=True), runs_root=tmp_path)
    d = tmp_path / "a"
    for name in ["params.yaml", "provenance.yaml", "metrics.json", "history.json", "checkpoint_best.pt",
                 "checkpoint_last.pt", "loss_curve.png", "curve_test_closed.png", "curve_test_open.png",
                 "test_scores.npz"]:
        assert (d / name).is_file(), name
    assert set(m) >= {"val", "test", "epoch", "git_commit"} and set(m["test"]) >= {"closed", "open"}
    assert 1 <= m["epoch"] <= 3 and len(json.loads((d / "history.json").read_text())) == 3
    z = np.load(d / "test_scores.npz", allow_pickle=False)
    assert z["scores"].dtype == np.float32 and z["pairs"].shape[1] == 2
    again = evaluate(z["scores"], z["attr"], z["obj"], z["pairs"], z["seen_pairs"], z["eval_pairs"])
    assert again["auc"] == pytest.approx(m["test"]["closed"]["auc"], abs=1e-12)

def test_existing_run_is_never_overwritten(toy, tiny_config, tmp_path):
    launch(_cfg(toy, tiny_config, run="b", epochs=1), runs_root=tmp_path)
    before = (tmp_path / "b" / "metrics.json").read_bytes()
    with pytest.raises(FileExistsError, match="finished run"):
        launch(_cfg(toy, tiny_config, run="b", epochs=1), runs_root=tmp_path)
    with pytest.raises(FileExistsError, match="finished run"):
        launch(_cfg(toy, tiny_config, run="b", epochs=1, resume=True), runs_root=tmp_path)
    assert (tmp_path / "b" / "metrics.json").read_bytes() == before

def test_killed_run_resumes_and_loses_nothing(toy, tiny_config, tmp_path, monkeypatch):
    straight = launch(_cfg(toy, tiny_config, run="straight"), runs_root=tmp_path)
    original = Learner._train_epoch
    def dies_in_epoch_3(self, model, opt, schedule, loader, epoch):
        if epoch == 3: raise KeyboardInterrupt("killed")
        return original(self, model, opt, schedule, loader, epoch)
    monkeypatch.setattr(Learner, "_train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        launch(_cfg(toy, tiny_config, run="killed"), runs_root=tmp_path)
    assert not (tmp_path / "killed" / "metrics.json").exists()
    with pytest.raises(FileExistsError, match="resume True"):
        launch(_cfg(toy, tiny_config, run="killed"), runs_root=tmp_path)
    with pytest.raises(ValueError, match="changed parameters"):
        launch(_cfg(toy, tiny_config, run="killed", resume=True, lr=0.5), runs_root=tmp_path)
    monkeypatch.setattr(Learner, "_train_epoch", original)
    resumed = launch(_cfg(toy, tiny_config, run="killed", resume=True), runs_root=tmp_path)
    assert _strip(resumed) == _strip(straight)
    hist = lambda run: json.loads((tmp_path / run / "history.json").read_text())
    assert hist("killed") == hist("straight")

def test_killed_run_resumes_its_lr_schedule_exactly(toy, tiny_config, tmp_path, monkeypatch):
    "A multistep schedule with warm-up, killed after epoch 1 of 3 and resumed, ends as the uninterrupted run."
    schedule = dict(lr_schedule="multistep", lr_milestones=[1], lr_gamma=0.1, warmup_epochs=0.5)
    straight = launch(_cfg(toy, tiny_config, run="straight", **schedule), runs_root=tmp_path)
    original = Learner._train_epoch
    def dies_in_epoch_2(self, model, opt, sched, loader, epoch):
        if epoch == 2: raise KeyboardInterrupt("killed")
        return original(self, model, opt, sched, loader, epoch)
    monkeypatch.setattr(Learner, "_train_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        launch(_cfg(toy, tiny_config, run="killed", **schedule), runs_root=tmp_path)
    monkeypatch.setattr(Learner, "_train_epoch", original)
    resumed = launch(_cfg(toy, tiny_config, run="killed", resume=True, **schedule), runs_root=tmp_path)
    assert _strip(resumed) == _strip(straight)
    hist = lambda run: json.loads((tmp_path / run / "history.json").read_text())
    assert hist("killed") == hist("straight")
    assert [h["lr"] for h in hist("killed")][1:] == pytest.approx([1e-3, 1e-3])  # 1e-2 dropped by 0.1 after epoch 1

def test_run_reruns_from_its_own_params_file(toy, tiny_config, tmp_path):
    "`czsl-train -f runs/X/params.yaml -p run Y` trains X again: the same test metrics, on CPU."
    first = launch(_cfg(toy, tiny_config, run="first", epochs=2, lr_schedule="step", lr_step_size=1, lr_gamma=0.5),
                   {"attr_dropout": 0.2}, runs_root=tmp_path)
    params = yaml.safe_load((tmp_path / "first" / "params.yaml").read_text())
    assert "method_params" not in params and params["attr_dropout"] == 0.2 and params["lr_schedule"] == "step"
    assert "git_commit" in yaml.safe_load((tmp_path / "first" / "provenance.yaml").read_text())
    env = {**os.environ, "CZSL_NB_RUNS": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "from czsl_nb.learner import train_cli; train_cli()",
                        "-f", str(tmp_path / "first" / "params.yaml"), "-p", "run", "again"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["test"] == first["test"] and again["val"] == first["val"] and again["epoch"] == first["epoch"]

def test_train_notebook_parameters_cell_is_generated():
    "One source of truth: the parameters cell is what the dataclasses generate (tools/sync_train_parameters.py)."
    from czsl_nb.learner import parameters_cell
    cells = json.loads((REPO / "nbs" / "train.ipynb").read_text())["cells"]
    (cell,) = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert "".join(cell["source"]) == parameters_cell(), "run: python tools/sync_train_parameters.py"

def test_help_notebook_lists_run_and_method_parameters(tmp_path):
    r = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(REPO / "nbs" / "train.ipynb")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ["lr_schedule", "lr_milestones", "attr_dropout", "towers", "memory", "aux_per_pair"]:
        assert f"  {name}:" in r.stdout, name
    assert "_kernel_names" not in r.stdout
    import papermill
    from dataclasses import fields
    from czsl_nb.learner import TrainConfig, method_parameter_fields
    every = {f.name for f in fields(TrainConfig)} | set(method_parameter_fields())
    assert set(papermill.inspect_notebook(str(REPO / "nbs" / "train.ipynb"))) == every  # papermill parses every line

def test_two_cpu_processes_train_and_score_each_image_once(toy, tiny_config, tmp_path):
    """gloo data parallelism: the toy test split has 3 images, so 2 ranks need a padded duplicate that must be dropped.
    Run in a fresh interpreter, as from papermill: Accelerate refuses to launch where an Accelerator already exists."""
    code = (f"import warnings; warnings.filterwarnings('ignore'); import czsl_nb.all; from pathlib import Path; "
            f"from czsl_nb.learner import TrainConfig, launch; "
            f"launch(TrainConfig(method='csp', dataset={str(toy)!r}, backbone={str(tiny_config)!r}, epochs=2, "
            f"batch_size=4, lr=1e-2, run='ddp', num_processes=2), runs_root=Path({str(tmp_path)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert len(json.loads((tmp_path / "ddp" / "history.json").read_text())) == 2
    assert m["test"]["closed"]["n_images"] == 3 and m["val"]["n_images"] == 2
    assert (tmp_path / "ddp" / "checkpoint_best.pt").exists()
    assert np.load(tmp_path / "ddp" / "test_scores.npz")["scores"].shape[0] == 3

_LAUNCHED = """import json, sys, warnings; warnings.filterwarnings("ignore")
import czsl_nb.all
from pathlib import Path
from czsl_nb.learner import TrainConfig, launch
cfg, hparams, runs = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
launch(TrainConfig(**cfg), hparams, runs_root=Path(runs))
"""

def _numbers(metrics):
    "Every number of a metrics.json, by its path (commit and float-level bias terms aside)."
    out = {}
    def walk(value, path):
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if items is None:
            if isinstance(value, (int, float)): out[path] = value
            return
        for k, v in items:
            if k not in ("git_commit", "train_seconds", "bias_term", "biases"): walk(v, f"{path}.{k}")
    walk(metrics, "")
    return out

@pytest.mark.parametrize("method, hparams", [("csp", {}), ("sam", {"vac_dropout": 0.0})])
def test_accelerate_launch_two_processes_match_one(method, hparams, toy, tiny_config, tmp_path):
    """`accelerate launch` with two CPU processes (gloo) trains and tests as one process: CSP on cached features, and
    SAM with its online memory bank, which every process updates from every test image in the one fixed order.
    batch_size divides the toy training split, so each batch splits evenly; VAC's dropout is off because each
    process would draw its own mask for its share of the batch."""
    # lr 1e-3: at 1e-2 Adam turns all-reduce rounding in VAC's near-zero gradients into 1e-5 loss differences
    settings = dict(method=method, epochs=2, batch_size=2, lr=1e-3)
    one = launch(_cfg(toy, tiny_config, run="one", **settings), hparams, runs_root=tmp_path)
    script = tmp_path / "launched.py"
    script.write_text(_LAUNCHED)
    cfg = json.dumps({"method": method, "dataset": str(toy), "backbone": str(tiny_config), "seed": 0,
                      "run": "two", **settings})
    port = str(29700 + os.getpid() % 200)
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "--main_process_port", port, str(script), cfg, json.dumps(hparams), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert _numbers(two) == pytest.approx(_numbers(one), abs=1e-6)
    assert [h["loss"] for h in json.loads((tmp_path / "two" / "history.json").read_text())] == pytest.approx(
        [h["loss"] for h in json.loads((tmp_path / "one" / "history.json").read_text())], abs=1e-5)

def _papermill(args, runs, tmp_path):
    env = {**os.environ, "CZSL_NB_RUNS": str(runs), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "papermill", str(REPO / "nbs" / "train.ipynb"),
                           str(tmp_path / "out.ipynb"), "--cwd", str(tmp_path), *args],
                          capture_output=True, text=True, env=env, timeout=600)

def test_papermill_train(toy, tiny_config, tmp_path):
    runs = tmp_path / "runs"
    r = _papermill(["-p", "dataset", str(toy), "-p", "backbone", str(tiny_config), "-p", "epochs", "1",
                    "-p", "batch_size", "4", "-p", "run", "pm", "-p", "attr_dropout", "0.1"], runs, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((runs / "pm" / "metrics.json").read_text())
    assert m["method"] == "csp" and m["epoch"] == 1
    assert yaml.safe_load((runs / "pm" / "params.yaml").read_text())["attr_dropout"] == 0.1

@pytest.mark.parametrize("args, message", [
    (["-p", "method", "sam_typo"], "unknown method; valid: " + ", ".join(list_methods())),
    (["-p", "lr_rate", "0.1"], "unknown parameter(s) lr_rate"),
    (["-p", "epochs", "-2"], "parameter epochs=-2: out of range"),
    # a bad value, caught by the probe build
    (["-p", "method", "eva", "-p", "towers", "both"], "method 'eva': towers='both'"),
])
def test_papermill_rejects_bad_parameters_before_work(args, message, tmp_path):
    r = _papermill(args, tmp_path / "runs", tmp_path)
    assert r.returncode != 0 and message in (r.stdout + r.stderr)
    assert not (tmp_path / "runs").exists()  # nothing was written

@pytest.mark.parametrize("nb", ["train.ipynb", "eval.ipynb", "results.ipynb"])
def test_entry_points_keep_parameters_tag(nb):
    "Without the tag papermill silently runs the defaults (nbdev_clean strips it unless allowed)."
    cells = json.loads((REPO / "nbs" / nb).read_text())["cells"]
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in cells) == 1

@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_and_tests_end_to_end(name, toy, tiny_config, tmp_path):
    "Each registered method through the engine with its defaults: its hooks, one epoch, both worlds, a reload."
    from czsl_nb.learner import load_run
    from czsl_nb import get_method
    epochs = max(1, get_method(name).min_epochs(get_method(name).defaults))  # SAM's staged default needs stage II
    m = launch(_cfg(toy, tiny_config, method=name, epochs=epochs, run=name, open_world=True), runs_root=tmp_path)
    assert set(m["test"]) >= {"closed", "open", "open_uncalibrated"}
    assert all(0 <= r["auc"] <= 1 for r in m["test"].values())
    reloaded = load_run(tmp_path / name)  # the best checkpoint (and what on_fit_end added) reproduces the stored scores
    scores = reloaded.score_split("test", reloaded.data.pairs).numpy()
    assert np.allclose(scores, np.load(tmp_path / name / "test_scores.npz")["scores"], atol=1e-5)

def test_zero_epoch_run_keeps_what_its_hooks_set(toy, tiny_config, tmp_path):
    "HOPE fills its memories from training images in on_fit_start: a 0-epoch run saves them; a reload scores the same."
    from czsl_nb.learner import load_run
    launch(_cfg(toy, tiny_config, method="hope", epochs=0, run="hope0"), runs_root=tmp_path)
    assert (tmp_path / "hope0" / "checkpoint_best.pt").is_file()
    reloaded = load_run(tmp_path / "hope0")
    scores = reloaded.score_split("test", reloaded.data.pairs).numpy()
    assert np.allclose(scores, np.load(tmp_path / "hope0" / "test_scores.npz")["scores"], atol=1e-5)

def test_bootstrap_test_metrics_is_seeded_and_written(toy, tiny_config, tmp_path):
    from czsl_nb.learner import bootstrap_test_metrics
    m = launch(_cfg(toy, tiny_config, run="boot", epochs=1), runs_root=tmp_path)
    first = bootstrap_test_metrics(tmp_path / "boot", n_boot=20, seed=3)
    again = bootstrap_test_metrics(tmp_path / "boot", n_boot=20, seed=3)
    assert first.equals(again) and first.metric.tolist() == ["auc", "best_hm"]
    assert (first.low <= first.high).all() and first.value[0] == pytest.approx(100 * m["test"]["closed"]["auc"])
    assert json.loads((tmp_path / "boot" / "bootstrap_test.json").read_text())[0]["n_boot"] == 20

def test_grad_checkpointing_trains_the_same_model(toy, tiny_config, tmp_path):
    "EVA trains its image tower's experts: recomputing each block in backward gives the same run."
    runs = {flag: launch(_cfg(toy, tiny_config, method="eva", run=f"gc{int(flag)}", epochs=1, grad_checkpointing=flag),
                         runs_root=tmp_path) for flag in (False, True)}
    plain, checkpointed = (runs[f]["test"]["closed"] for f in (False, True))
    assert checkpointed["auc"] == pytest.approx(plain["auc"], abs=1e-6)
    scores = [np.load(tmp_path / f"gc{i}" / "test_scores.npz")["scores"] for i in (0, 1)]
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-4)
