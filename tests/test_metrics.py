"""Tests of czsl_nb.metrics: the protocol's toy example, agreement with the brute-force reference and with an
original-style (czsl/CSP) evaluator, invariances, feasibility, and error messages. Runs in a few seconds."""
import importlib.util, json, re
from pathlib import Path

import numpy as np
import pytest
import torch

from czsl_nb.metrics import (evaluate, brute_force_evaluate, feasibility_scores, load_word_vectors, apply_feasibility,
                             calibrate_feasibility, plot_curve, random_world, assert_same_result, FEASIBILITY_MODES)

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- toy example
TOY_SCORES = np.array([[.9, .1, .5, .95], [.2, .6, .3, 0], [.7, .1, .5, 0], [.3, .2, .6, 0]])
TOY_PAIRS = [("red", "apple"), ("green", "car"), ("green", "apple"), ("red", "car")]
TOY_ATTR, TOY_OBJ = ["red", "green", "green", "green"], ["apple", "car", "apple", "apple"]
IDS = {"red": 0, "green": 1, "apple": 0, "car": 1}


def toy_args(ids: str):
    "The protocol's worked example with string ids, int ids (numpy) or int ids (torch)."
    if ids == "str":
        return TOY_SCORES, TOY_ATTR, TOY_OBJ, TOY_PAIRS, TOY_PAIRS[:2], TOY_PAIRS[:3]
    pairs = np.array([(IDS[a], IDS[o]) for a, o in TOY_PAIRS])
    attr, obj = np.array([IDS[a] for a in TOY_ATTR]), np.array([IDS[o] for o in TOY_OBJ])
    if ids == "torch":
        return (torch.tensor(TOY_SCORES, dtype=torch.float32), torch.tensor(attr), torch.tensor(obj),
                torch.tensor(pairs), torch.tensor(pairs[:2]), torch.tensor(pairs[:3]))
    return TOY_SCORES, attr, obj, pairs, pairs[:2], pairs[:3]


@pytest.mark.parametrize("fn", [evaluate, brute_force_evaluate])
@pytest.mark.parametrize("ids", ["str", "int", "torch"])
def test_toy_closed_world(fn, ids):
    scores, attr, obj, pairs, seen, test = toy_args(ids)
    r = fn(scores, attr, obj, pairs, seen, test)
    assert r["auc"] == pytest.approx(0.75)
    assert r["best_hm"] == pytest.approx(2 / 3)
    assert r["bias_term"] == pytest.approx(0.1999)
    assert r["biases"] == pytest.approx([-0.3001, 0.1999, 1000.0])
    assert r["seen_curve"] == pytest.approx([1, 1, 0]) and r["unseen_curve"] == pytest.approx([0, 0.5, 1])
    assert (r["hm_seen"], r["hm_unseen"], r["best_seen"], r["best_unseen"]) == pytest.approx((1, 0.5, 1, 1))
    assert (r["attr_acc"], r["obj_acc"]) == pytest.approx((0.75, 1.0))
    assert (r["attr_acc_max_bias"], r["obj_acc_max_bias"]) == pytest.approx((0.75, 0.75))
    assert (r["n_images"], r["n_candidates"], r["n_seen_images"], r["n_unseen_images"], r["topk"]) == (4, 3, 2, 2, 1)
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("fn", [evaluate, brute_force_evaluate])
@pytest.mark.parametrize("ids", ["str", "int"])
def test_toy_open_world(fn, ids):
    scores, attr, obj, pairs, seen, _ = toy_args(ids)
    r = fn(scores, attr, obj, pairs, seen)
    assert r["auc"] == pytest.approx(0.5) and r["best_hm"] == pytest.approx(0.5)
    assert r["seen_curve"] == pytest.approx([1, 0.5, 0]) and r["unseen_curve"] == pytest.approx([0, 0.5, 1])
    assert r["n_candidates"] == 4 and r["open_world"] is True


def test_result_keys():
    r = evaluate(*toy_args("str"))
    required = ("auc best_hm best_seen best_unseen hm_seen hm_unseen bias_term attr_acc obj_acc attr_acc_max_bias "
                "obj_acc_max_bias seen_curve unseen_curve biases topk n_images n_candidates n_seen_images "
                "n_unseen_images")
    assert set(required.split()) <= set(r)
    assert all(isinstance(r[k], float) for k in "auc best_hm bias_term attr_acc".split())
    assert r["biases"][-1] == 1000.0


# ------------------------------------------------------------------------------- agreement with the reference
@pytest.mark.parametrize("kind", ["normal", "round", "zeros", "fp16", "neginf"])
@pytest.mark.parametrize("open_world", [False, True])
def test_agrees_with_brute_force(kind, open_world):
    for seed in range(4):
        world = random_world(n_images=30 + 17 * seed, n_attrs=4 + seed, n_objs=6, seen_frac=0.15 + 0.2 * seed,
                             open_world=open_world, kind=kind, seed=seed + 100 * open_world)
        for k in (1, 2, 3):
            assert_same_result(evaluate(**world, topk=k, chunk_size=5 + seed), brute_force_evaluate(**world, topk=k))


def test_agrees_under_heavy_ties():
    "Integer-valued scores in {-1, 0, 1}: most rows straddle the top-k cut with equal values."
    for seed in range(6):
        world = random_world(n_images=50, n_attrs=5, n_objs=6, open_world=seed % 2 == 0, seed=seed)
        world["scores"] = np.round(world["scores"] * 0.3)
        for k in (1, 2, 4):
            assert_same_result(evaluate(**world, topk=k, chunk_size=7), brute_force_evaluate(**world, topk=k))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_metrics", ROOT / "benchmarks" / "bench_metrics.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("topk", [1, 3])
def test_matches_original_style_evaluator_without_ties(topk):
    bench = load_bench()
    problem, gt, is_seen = bench.make_problem(200, 500, 60, seed=3)
    ours = evaluate(**problem, topk=topk)
    orig = bench.original_style_evaluate(torch.from_numpy(problem["scores"]), torch.as_tensor(gt),
                                         torch.as_tensor(problem["pairs"]), torch.as_tensor(is_seen),
                                         torch.ones(500, dtype=torch.bool), topk=topk)
    for key in ("auc", "best_hm", "best_seen", "best_unseen", "attr_acc", "obj_acc"):
        assert ours[key] == pytest.approx(orig[key], abs=1e-6), key
    assert len(ours["biases"]) == orig["n_biases"]


# ------------------------------------------------------------------------------------------------ invariances
def test_column_permutation_invariance_without_ties():
    world = random_world(n_images=80, n_attrs=7, n_objs=8, seen_frac=0.3, seed=5)
    perm = np.random.default_rng(0).permutation(len(world["pairs"]))
    permuted = dict(world, scores=world["scores"][:, perm], pairs=world["pairs"][perm])
    for k in (1, 2):
        assert_same_result(evaluate(**world, topk=k), evaluate(**permuted, topk=k), tol=0)


def test_half_precision_equals_its_upcast():
    world = random_world(n_images=60, seen_frac=0.3, open_world=True, kind="fp16", seed=2)
    up = dict(world, scores=world["scores"].astype(np.float32))
    for k in (1, 2):
        assert_same_result(evaluate(**world, topk=k), evaluate(**up, topk=k), tol=0)
    bf16 = torch.from_numpy(up["scores"]).bfloat16()
    assert_same_result(evaluate(**dict(world, scores=bf16)), evaluate(**dict(world, scores=bf16.float())), tol=0)


def test_input_is_not_modified_and_read_only_arrays_work():
    world = random_world(n_images=40, open_world=True, seed=4)
    scores = world["scores"]; before = scores.copy()
    scores.flags.writeable = False
    torch_scores = torch.from_numpy(before.copy()).requires_grad_()
    assert_same_result(evaluate(**world), evaluate(**dict(world, scores=torch_scores)), tol=0)
    np.testing.assert_array_equal(scores, before)


def test_chunk_size_does_not_matter():
    world = random_world(n_images=37, kind="round", seed=9)
    reference = evaluate(**world, topk=2)
    for rows in (1, 4, 36, 37, 100):
        assert_same_result(evaluate(**world, topk=2, chunk_size=rows), reference, tol=0)


# ------------------------------------------------------------------------------------------------ feasibility
ATTR_VEC = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])   # red, green, blue: cos(r,g)=.6 cos(r,b)=0 cos(g,b)=.8
OBJ_VEC = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])    # apple, car, pear: cos(a,c)=0 cos(a,p)=.8 cos(c,p)=.6


def test_feasibility_scores_by_hand():
    seen = [(0, 0), (1, 1), (2, 2)]
    pairs = [(0, 0), (1, 1), (2, 2), (0, 2), (1, 0), (2, 1), (0, 1), (1, 2), (2, 0)]
    # (r,p): .8/0 ; (g,a): 0/.6 ; (b,c): .6/.8 ; (r,c): 0/.6 ;
    # (g,p): cos(p,c)=.6 / cos(g,b)=.8 ; (b,a): cos(a,p)=.8 / cos(b,r)=0
    expected = torch.tensor([0, 0, 0, .4, .3, .7, .3, .7, .4])
    torch.testing.assert_close(feasibility_scores(pairs, seen, ATTR_VEC, OBJ_VEC), expected, atol=1e-6, rtol=0)
    # an empty max counts as -1 (CompCos): car was never seen with another attribute
    torch.testing.assert_close(feasibility_scores([(0, 1)], [(0, 0)], ATTR_VEC, OBJ_VEC), torch.tensor([-0.5]))


def test_feasibility_scores_matches_loop():
    rng = np.random.default_rng(0)
    attr_vec, obj_vec = torch.randn(9, 5), torch.randn(11, 5)
    pairs = [(a, o) for a in range(9) for o in range(11)]
    seen = [p for p in pairs if rng.random() < 0.25]
    cos = lambda u, v: float(torch.nn.functional.cosine_similarity(u, v, dim=0))
    expected = []
    for a, o in pairs:
        if (a, o) in seen: expected.append(0.0); continue
        f_obj = max([-1.0] + [cos(obj_vec[o], obj_vec[o2]) for (a2, o2) in seen if a2 == a and o2 != o])
        f_attr = max([-1.0] + [cos(attr_vec[a], attr_vec[a2]) for (a2, o2) in seen if o2 == o and a2 != a])
        expected.append((f_obj + f_attr) / 2)
    torch.testing.assert_close(feasibility_scores(pairs, seen, attr_vec, obj_vec), torch.tensor(expected),
                               atol=1e-5, rtol=0)


def test_feasibility_scores_errors():
    with pytest.raises(ValueError, match="integer"):
        feasibility_scores([("red", "car")], [("red", "apple")], ATTR_VEC, OBJ_VEC)
    with pytest.raises(ValueError, match=re.escape("outside [0, 3) x [0, 3)")):
        feasibility_scores([(3, 0)], [(0, 0)], ATTR_VEC, OBJ_VEC)


def test_load_word_vectors(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("red 1 0 0\ndark 0 2 0\nblue 0 0 4\nfake 1 1 1\nfur 3 3 3\n")
    vectors = load_word_vectors(path, ["red", "Dark_Blue", "dark blue", "Faux.Fur"])
    torch.testing.assert_close(vectors, torch.tensor([[1., 0, 0], [0, 1, 2], [0, 1, 2], [2, 2, 2]]))
    with pytest.raises(LookupError) as err:
        load_word_vectors(path, ["red", "green_apple", "purple"])
    assert "['green_apple', 'purple']" in str(err.value) and "vectors.txt" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_word_vectors(tmp_path / "nope.txt", ["red"])


def test_apply_feasibility_modes():
    scores = np.array([[3., 2, 1, 4], [1, 1, 1, 1]], dtype=np.float32)
    feas, seen = np.array([0., 0.2, 0.6, 0.]), np.array([True, False, False, True])
    np.testing.assert_array_equal(apply_feasibility(scores, feas, 0.5, seen), [[3, 0, 1, 4], [1, 0, 1, 1]])
    np.testing.assert_array_equal(apply_feasibility(scores, feas, 0.0, seen), [[6, 2, 1, 8], [2, 1, 1, 2]])  # CSP quirk
    masked = apply_feasibility(torch.from_numpy(scores), torch.tensor(feas), 0.5, torch.tensor(seen), mode="mask")
    assert isinstance(masked, torch.Tensor)
    torch.testing.assert_close(masked, torch.tensor([[3, -np.inf, 1, 4], [1, -np.inf, 1, 1]], dtype=torch.float32))
    assert scores[0, 1] == 2.0
    with pytest.raises(ValueError, match="expected one of multiply, mask"):
        apply_feasibility(scores, feas, 0.5, seen, mode="soft")
    with pytest.raises(ValueError, match="one entry per pair"):
        apply_feasibility(scores, feas[:3], 0.5, seen)
    assert FEASIBILITY_MODES == ("multiply", "mask")


CAL_PAIRS = [(0, 0), (0, 1), (1, 0), (1, 1)]           # seen (0,0); unseen f = 0, .9, 1
CAL_FEAS = np.array([0.0, 0.0, 0.9, 1.0])
CAL_SCORES = np.array([[5., 1, 0.5, 0.1], [1., 3, 2, 0.1]])


def test_calibrate_takes_first_strictly_best_threshold():
    cal = calibrate_feasibility(CAL_SCORES, [0, 1], [0, 0], CAL_PAIRS, [(0, 0)], CAL_FEAS, n_thresholds=4)
    assert cal["thresholds"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert cal["aucs"] == pytest.approx([0, 0.5, 0.5, 0])
    assert cal["threshold"] == pytest.approx(1 / 3) and cal["auc"] == pytest.approx(0.5)
    for mode in FEASIBILITY_MODES:   # the per-chunk filter equals evaluating an explicitly suppressed copy
        cal = calibrate_feasibility(CAL_SCORES, [0, 1], [0, 0], CAL_PAIRS, [(0, 0)], CAL_FEAS, n_thresholds=7,
                                    mode=mode)
        seen = np.array([1, 0, 0, 0], bool)
        for t, auc in zip(cal["thresholds"], cal["aucs"]):
            suppressed = apply_feasibility(CAL_SCORES, CAL_FEAS, t, seen, mode=mode)
            assert evaluate(suppressed, [0, 1], [0, 0], CAL_PAIRS, [(0, 0)])["auc"] == auc


def test_calibrate_keeps_minus_ten_when_no_auc_beats_zero():
    scores = np.array([[5., 1, 0.5, 0.1], [9., 3, 2, 0.1]])   # the unseen image is never right: every AUC is 0
    cal = calibrate_feasibility(scores, [0, 1], [0, 0], CAL_PAIRS, [(0, 0)], CAL_FEAS, n_thresholds=3)
    assert cal["threshold"] == -10.0 and cal["auc"] == 0.0


# ------------------------------------------------------------------------------------------------------ plot
def test_plot_curve():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ax = plot_curve(evaluate(*toy_args("str")), title="toy")
    assert ax.get_title() == "toy" and "AUC 75.00" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(ax.figure)


# ----------------------------------------------------------------------------------------------------- errors
def bad(**changes):
    scores, attr, obj, pairs, seen, test = toy_args("str")
    args = dict(scores=scores, attr_labels=attr, obj_labels=obj, pairs=pairs, seen_pairs=seen, eval_pairs=test)
    return dict(args, **changes)


@pytest.mark.parametrize("changes, message", [
    (dict(scores=TOY_SCORES[:, :3]), "`scores` has 3 columns but `pairs` lists 4 pairs"),
    (dict(scores=TOY_SCORES[0]), "`scores` must be a 2-D"),
    (dict(attr_labels=TOY_ATTR[:3]), "expected one label per image"),
    (dict(attr_labels=["red"] * 4, obj_labels=["car"] * 4), "which is not a candidate"),
    (dict(attr_labels=["blue"] * 4), "which is not a column of `pairs`"),
    (dict(eval_pairs=[("blue", "car")]), "`eval_pairs` lists 1 pair(s) that are not columns of `pairs`"),
    (dict(seen_pairs=[("red", "pear")]), "`seen_pairs` lists 1 pair(s)"),
    (dict(pairs=TOY_PAIRS[:3] + [("red", "apple")]), "duplicate columns"),
    (dict(topk=0), "`topk` must be an integer >= 1"),
    (dict(topk=1.5), "`topk` must be an integer >= 1"),
    (dict(topk=4), "exceeds the 3 candidate pairs"),
    (dict(scores=np.where(np.eye(4, dtype=bool), np.nan, TOY_SCORES)), "NaN"),
])
@pytest.mark.parametrize("fn", [evaluate, brute_force_evaluate])
def test_bad_input(fn, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(**bad(**changes))


def test_calibrate_errors():
    with pytest.raises(ValueError, match="one entry per pair"):
        calibrate_feasibility(CAL_SCORES, [0, 1], [0, 0], CAL_PAIRS, [(0, 0)], CAL_FEAS[:2])
    with pytest.raises(ValueError, match="expected one of multiply, mask"):
        calibrate_feasibility(CAL_SCORES, [0, 1], [0, 0], CAL_PAIRS, [(0, 0)], CAL_FEAS, mode="hard")

def test_exact_curve_by_hand():
    """Seen images a, b and unseen c, d; columns (seen S, unseen U). The protocol samples only the unseen flips
    (0.2, 0.8): AUC 0.5, best HM 0.5. Every change (b leaves at 0.5, a at 1.0) gives the staircase with AUC 0.75
    and best HM 2/3 (seen 1, unseen 1/2 just below 0.5)."""
    scores = np.array([[1.0, 0.0], [1.0, 0.5], [0.8, 0.0], [0.2, 0.0]])
    pairs = [(0, 0), (1, 1)]
    r = evaluate(scores, [0, 0, 1, 1], [0, 0, 1, 1], pairs, [(0, 0)], pairs)
    assert r["auc"] == pytest.approx(0.5) and r["best_hm"] == pytest.approx(0.5)
    assert r["auc_exact"] == pytest.approx(0.75) and r["best_hm_exact"] == pytest.approx(2 / 3)

@pytest.mark.parametrize("open_world", [False, True])
def test_exact_best_hm_is_never_below_the_protocols(open_world):
    "The protocol's biases are a subset of the exact curve's, so its best HM can only be matched or beaten."
    for seed in range(5):
        w = random_world(open_world=open_world, seed=seed)
        r = evaluate(**w)
        assert r["best_hm_exact"] >= r["best_hm"] - 1e-12
