"""The project as a user meets it: fresh imports, the exported package matching the notebooks,
a normal (non-editable) install that works without the notebooks, and CI running the README's command."""
import configparser, json, re, shutil, subprocess, sys, zipfile
from pathlib import Path
import pytest
from conftest import REPO

MODULES = sorted(p.stem for p in (REPO / "czsl_nb").glob("*.py") if not p.stem.startswith("_"))

def _run(args, cwd, **kw):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, **kw)

@pytest.mark.parametrize("module", MODULES)
def test_fresh_import(module, tmp_path):
    "Each module imports in a new interpreter (catches an import cell marked hide instead of export)."
    r = _run([sys.executable, "-c", f"import czsl_nb.{module}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr

def test_torchvision_fix_in_fresh_process(tmp_path):
    code = ("import czsl_nb, torchvision, open_clip, peft; from czsl_nb.core import patch_torchvision; "
            "assert patch_torchvision() is False; print(torchvision.transforms.functional.to_tensor)")
    r = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr

def test_default_exp_unique():
    "Two notebooks with one default_exp silently overwrite each other's module (nbdev#1034)."
    names = [m for nb in (REPO / "nbs").glob("*.ipynb")
             for m in re.findall(r"#\| *default_exp +(\S+?)\\n", nb.read_text())]
    assert len(names) == len(set(names)), names

def test_settings_keep_papermill_tags():
    "nbdev_clean strips papermill's `parameters` tag unless cell metadata `tags` is allowed."
    cfg = configparser.ConfigParser(); cfg.read(REPO / "settings.ini")
    assert "tags" in cfg["DEFAULT"]["allowed_cell_metadata_keys"].split()

def _project_copy(tmp_path):
    dst = tmp_path / "repo"; dst.mkdir()
    for item in ["nbs", "czsl_nb", "settings.ini", "setup.py", "pyproject.toml", "README.md"]:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, dst / item, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        else: shutil.copy(src, dst / item)
    return dst

def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts}

@pytest.mark.parametrize("command", ["nbdev_export", "nbdev_clean"])
def test_nbdev_leaves_tree_unchanged(command, tmp_path):
    "The committed package is what the notebooks export, and the notebooks are already clean."
    copy = _project_copy(tmp_path)
    before = _snapshot(copy)
    r = _run([str(Path(sys.executable).parent / command)], cwd=copy)
    assert r.returncode == 0, r.stdout + r.stderr
    after = _snapshot(copy)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"`{command}` changes {changed}: run it and commit the result"

def test_wheel_installs_without_notebooks(tmp_path):
    "A normal install ships the exported modules and works with no checkout around it."
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wheel, = (tmp_path / "dist").glob("czsl_nb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"czsl_nb/{m}.py" for m in MODULES} <= set(names) and not any(n.startswith("nbs/") for n in names)
    r = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
              str(wheel)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    code = (f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); "
            "import czsl_nb, czsl_nb.data, czsl_nb.core as c; "
            f"assert czsl_nb.__file__.startswith({str(tmp_path / 'site')!r}), czsl_nb.__file__; "
            "assert c.project_root() is None; print(czsl_nb.__version__)")
    r = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr

def _readme_test_command():
    text = (REPO / "README.md").read_text()
    section = text.split("## Run the tests", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()

def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "## Run the tests" in ci and "README.md" in ci  # CI extracts and runs the README's block
    assert _readme_test_command().startswith("python3 -m venv .venv")

def test_list_methods_after_plain_import(tmp_path):
    "`czsl_nb.list_methods()` names the built-in methods without importing their modules first."
    r = _run([sys.executable, "-c", "import czsl_nb; print(','.join(czsl_nb.list_methods()))"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {"clip", "csp"} <= set(r.stdout.strip().split(","))

def test_readme_main_job_names_a_fresh_run():
    "The README's main job must not collide with a committed run (czsl-train refuses to overwrite one)."
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.+?)\n```", text.split("## Train and evaluate", 1)[1], re.S).group(1)
    run = re.search(r"-p run (\S+)", block)
    assert run, "the README's main job should name its run with -p run NAME"
    assert not (REPO / "runs" / run.group(1)).exists()

def test_readme_results_tables_are_the_benchmark_runs():
    "The README's results tables are what `tools/benchmark.py readme` makes of the committed benchmark runs."
    r = subprocess.run([sys.executable, "tools/benchmark.py", "readme"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| `csp` |" in r.stdout and "synthetic-l" in r.stdout
    assert r.stdout.strip() in (REPO / "README.md").read_text(), "re-run tools/benchmark.py readme into the README"

EXPORT_FLAG = re.compile(r"^#\|\s*export", re.M)

def test_no_exported_cell_over_60_lines():
    "A reader follows the library in cells of at most 60 lines (split, prose between, methods attached with patch_to)."
    long = []
    for path in sorted((REPO / "nbs").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and EXPORT_FLAG.search(source) and len(source.splitlines()) > 60:
                long.append(f"{path.name}: cell {cell.get('id')} has {len(source.splitlines())} lines")
    assert not long, "\n".join(long)

def test_lint_is_part_of_the_readme_test_command():
    "ruff (ruff.toml: pyflakes, imports, 120 columns) runs on the package, notebooks, tests, tools and benchmarks."
    assert "ruff check ." in _readme_test_command()

def test_readme_scale_table_matches_the_benchmark_logs():
    "The README's scale table is what benchmarks/scale_table.py makes of the committed bench_scale logs."
    r = _run([sys.executable, str(REPO / "benchmarks" / "scale_table.py")], cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() in (REPO / "README.md").read_text(), "re-run benchmarks/scale_table.py into the README"
