"""benchmarks/bench_scale.py on a tiny shape with the tiny CLIP: the last line's format, and that the Learner reads
the tiled feature caches as complete (it encodes no image of a split while reading them)."""
import importlib.util, re, subprocess, sys
from pathlib import Path
import pytest
from czsl_nb.backbone import tiny_backbone
from czsl_nb.core import cache_dir

ROOT = Path(__file__).resolve().parents[1]
LAST = re.compile(r"^bench_scale method=(\S+) shape=(\S+) world=(closed|open) peak_anon_gb=(\d+\.\d+) "
                  r"cache_gb=(\d+\.\d+) step_s=(\S+) eval_s=(\S+) peak_gpu_gb=(\d+\.\d+)( [a-z_]+=\S+)*$")

def load_bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module

@pytest.fixture(scope="module")
def bench(): return load_bench()

@pytest.fixture(scope="module")
def tiny_json():
    tiny_backbone()  # writes the config
    return str(cache_dir() / "configs" / "tiny-clip.json")

def test_shapes_have_the_real_sizes(bench):
    for name, (attrs, objs, train, val_imgs) in {"mit-states": (115, 245, 1262, 10420), "cgqa": (413, 674, 5592, 7280),
                                                 "ut-zappos": (16, 12, 83, 3214)}.items():
        shape = bench.SHAPES[name]
        pairs = bench.shape_pairs(shape)
        assert len(pairs["train"]) == train and shape.images[1] == val_imgs
        assert {a for a, _ in pairs["train"]} == {a for a, _ in pairs["train"] + pairs["val"] + pairs["test"]}
        assert len({a for a, _ in pairs["train"]}) == attrs and len({o for _, o in pairs["train"]}) == objs
        unseen_val = set(pairs["val"]) - set(pairs["train"])
        unseen_test = set(pairs["test"]) - set(pairs["train"])
        assert (len(unseen_val), len(unseen_test)) == (shape.val_pairs[1], shape.test_pairs[1])
        assert not unseen_val & unseen_test

def test_cached_method_row(bench, tiny_json, tmp_path, capsys):
    argv = ["--method", "csp", "--shape", "tiny", "--backbone", tiny_json, "--cache-dir", str(tmp_path), "--steps", "2"]
    row = bench.run(argv)
    line = bench.last_line(row)
    m = LAST.match(line)
    assert m and m.groups()[:3] == ("csp", "tiny", "closed"), line
    # the first run tiled every split's cache from the 8 image files; the Learner then read them without encoding
    assert row["tiled_from"] == bench.N_IMAGE_FILES
    assert [c["split"] for c in row["cache"]] == ["train", "val", "test"]
    assert all(not c["found"] and c["encoded_on_read"] == 0 for c in row["cache"])
    assert row["cache_gb"] > 0 and row["step_s"] > 0 and row["eval_images"] == "24/24" and row["extrapolated"] == 0
    # a second run finds the same caches complete and encodes nothing at all
    again = bench.run(argv + ["--open-world", "--eval-images", "10"])
    assert [(c["split"], c["found"], c["encoded_on_read"]) for c in again["cache"]] == [
        ("train", True, 0), ("val", True, 0), ("test", True, 0)]
    assert again["world"] == "open" and again["eval_images"] == "10/24" and again["extrapolated"] == 1
    assert again["pairs"] == 6 * 5 and again["score_matrix_gb"] == pytest.approx(24 * 30 * 4 / 1e9)

def test_cli_last_line_and_memory_guard(tiny_json, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--method", "clip", "--shape", "tiny",
           "--backbone", tiny_json, "--cache-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert LAST.match(last) and " trainable=0 " in last and " encoded_on_read=0 " in last, last
    guarded = subprocess.run(cmd + ["--memory-limit-gb", "0.05"], capture_output=True, text=True, timeout=300)
    last = guarded.stdout.strip().splitlines()[-1]
    assert guarded.returncode == 3 and last.startswith("bench_scale method=clip shape=tiny world=closed peak_anon_gb=")
    assert " status=aborted " in last, last

def test_one_training_phase_tests_both_worlds(bench, tiny_json, tmp_path):
    "--worlds closed,open: one row per world from one process; the training steps (and so step_s) are shared."
    argv = ["--method", "csp", "--shape", "tiny", "--backbone", tiny_json, "--cache-dir", str(tmp_path), "--steps", "1",
            "--worlds", "closed,open"]
    closed, open_ = bench.run_rows(argv)
    assert (closed["world"], open_["world"]) == ("closed", "open") and closed["step_s"] == open_["step_s"]
    assert (closed["pairs"], open_["pairs"]) == (14, 30)
    assert all(LAST.match(bench.last_line(row)) for row in (closed, open_))
