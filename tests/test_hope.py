"""HOPE's invariants (issue 6): retrieval weights are distributions, L_r is minimal when all retrieval mass sits on
the ground-truth slots, Soft MoE dispatch/combine weights are convex combinations; plus the method's switches,
its memory initialisation from training images, and the retrieval accuracy split into seen/unseen compositions.
Issue 16: InfoNCE as the paper's Eq. 5, two Soft-MoE layers, stage-wise training, the low-shot protocol;
issue 14: the pair axis is chunked."""
import json, math
import pytest, torch
import torch.nn.functional as F
from czsl_nb.backbone import tiny_backbone
from czsl_nb.core import cache_dir
from czsl_nb.learner import TrainConfig, launch
from czsl_nb.methods import LabelSpace
from czsl_nb.hopfield import (HopfieldMemory, hopfield_retrieve, multi_positive_infonce, retrieval_loss,
                              retrieved_infonce, slot_means)
from czsl_nb.soft_moe import Composer, SoftMoE
from czsl_nb.hope import HOPE, HOPE_STAGES, retrieval_accuracy, stage_epochs

pytestmark = pytest.mark.filterwarnings("ignore:.*marked NA")

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"],
                   [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])

@pytest.fixture(scope="module")
def backbone(): return tiny_backbone()

def test_retrieval_weights_sum_to_one():
    g = torch.Generator().manual_seed(0)
    memory = HopfieldMemory(7, 16)
    for queries in (torch.randn(3, 16, generator=g), torch.randn(2, 4, 16, generator=g) * 50):
        r = memory(queries)
        assert (r.weights >= 0).all() and torch.allclose(r.weights.sum(-1), torch.ones(r.weights.shape[:-1]), atol=1e-6)
        assert torch.allclose(r.patterns, r.weights @ memory.memory(), atol=1e-6)
    raw = hopfield_retrieve(torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g), beta=3.0)
    assert torch.allclose(raw.weights.sum(-1), torch.ones(5))

def test_retrieval_loss_minimal_on_ground_truth_slots():
    slot_attr = torch.tensor([0, 0, 1, 2, 1])
    labels = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    on_gt = torch.zeros(2, 3, 5)  # all mass on the label's slots, spread unevenly among them
    on_gt[0, :, :2] = torch.softmax(torch.randn(3, 2, generator=g), -1)
    on_gt[1, :, [2, 4]] = torch.softmax(torch.randn(3, 2, generator=g), -1)
    best = retrieval_loss(on_gt, slot_attr, labels)
    assert abs(best.item()) < 1e-6
    for _ in range(20):  # any other distribution costs more
        other = torch.softmax(torch.randn(2, 3, 5, generator=g), -1)
        assert retrieval_loss(other, slot_attr, labels) > best + 1e-4
    # mass moved off the GT slots raises the loss monotonically
    leak = lambda eps: (1 - eps) * on_gt + eps * torch.full_like(on_gt, 0.2)
    losses = [retrieval_loss(leak(e), slot_attr, labels).item() for e in (0.0, 0.1, 0.5, 0.9)]
    assert losses == sorted(losses) and losses[-1] > losses[0]
    # the uniform reading: minimal (log of the number of GT slots) at the even spread over the GT slots
    even = torch.zeros(1, 1, 5); even[0, 0, :2] = 0.5
    assert math.isclose(retrieval_loss(even, slot_attr, labels[:1], "uniform").item(), math.log(2), rel_tol=1e-5)
    uneven = torch.zeros(1, 1, 5); uneven[0, 0, :2] = torch.tensor([0.9, 0.1])  # all on GT, but not evenly
    uniform = lambda w: retrieval_loss(w, slot_attr, labels[:1], "uniform")
    assert uniform(uneven) > uniform(even) + 0.1

def test_soft_moe_weights_are_convex_combinations():
    moe = SoftMoE(12, n_experts=3, slots_per_expert=2)
    x = torch.randn(4, 9, 12) * 10
    dispatch, combine = moe.routing(x)
    assert (dispatch >= 0).all() and (combine >= 0).all()
    assert torch.allclose(dispatch.sum(1), torch.ones(4, 6), atol=1e-6)  # each slot: a convex combination of tokens
    assert torch.allclose(combine.sum(-1), torch.ones(4, 9), atol=1e-6)  # each output: a convex combination of slots
    slots = dispatch.transpose(1, 2) @ x
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    assert ((slots >= lo - 1e-5) & (slots <= hi + 1e-5)).all()  # inside the tokens' bounding box
    assert torch.allclose(moe(x)[2:], moe(x[2:]), atol=1e-6)  # per-example: no mixing across the batch

def test_composer_variants():
    assert [type(b.mlp).__name__ for b in Composer(64).blocks] == ["SoftMoE", "SoftMoE"]  # the paper's 2 layers
    assert [type(b.mlp).__name__ for b in Composer(64, moe_layers=1).blocks] == ["Sequential", "SoftMoE"]
    with pytest.raises(ValueError, match="between 0 and depth"): Composer(64, depth=2, moe_layers=3)
    assert all(type(b.mlp).__name__ == "Sequential" for b in Composer(64, mixer="self_attention").blocks)
    with pytest.raises(ValueError, match="unknown composer"): Composer(64, mixer="moe")

def test_slot_means_and_infonce():
    feats = torch.arange(10.).reshape(5, 2)
    means, empty = slot_means(feats, torch.tensor([1, 1, -1, 0, 1]), 3, n_images=0)
    assert torch.allclose(means, torch.tensor([[6., 7.], [10 / 3, 13 / 3], [0., 0.]]))
    assert empty.tolist() == [False, False, True]
    two, _ = slot_means(feats, torch.tensor([1, 1, -1, 0, 1]), 3, n_images=2, seed=1)
    assert any(torch.allclose(two[1], feats[list(p)].mean(0)) for p in [(0, 1), (0, 4), (1, 4)])
    a, c = torch.tensor([[1., 0.]]), torch.tensor([[1., 0.], [0., 1.]])
    expected = -torch.log_softmax(torch.tensor([1., 0.]) / 0.5, 0)[0]
    assert torch.isclose(multi_positive_infonce(a, c, torch.tensor([[True, False]]), 0.5), expected, atol=1e-6)
    assert multi_positive_infonce(a, c, torch.tensor([[False, False]])).item() == 0.0
    # k above a slot's image count: the mean of all its images, never a sum divided by k
    many, _ = slot_means(feats, torch.tensor([1, 1, -1, 0, 1]), 3, n_images=10)
    assert torch.allclose(many, means)

def test_eq5_infonce():
    "Eq. 5: each positive a separate -log softmax over the image's own retrieved vectors; no positive: skipped."
    g = torch.Generator().manual_seed(0)
    anchors, patterns = torch.randn(3, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    positive = torch.tensor([[True, False, True, False], [False] * 4, [False, False, False, True]])
    expected = []
    for i in (0, 2):
        cos = torch.stack([F.cosine_similarity(anchors[i], patterns[i, j], dim=0) for j in range(4)])
        log_p = torch.log_softmax(cos / 0.1, 0)
        expected.append(-sum(log_p[j] for j in range(4) if positive[i, j]))
    got = retrieved_infonce(anchors, patterns, positive, tau=0.1)
    assert torch.isclose(got, torch.stack(expected).mean(), atol=1e-5)
    assert retrieved_infonce(anchors, patterns, torch.zeros(3, 4, dtype=torch.bool)).item() == 0.0
    # a positive gains when it gets closer to the anchor, a negative's gain costs
    closer = patterns.clone(); closer[0, 0] = anchors[0]
    assert retrieved_infonce(anchors, closer, positive) < retrieved_infonce(anchors, patterns, positive)
    closer = patterns.clone(); closer[0, 1] = anchors[0]
    assert retrieved_infonce(anchors, closer, positive) > retrieved_infonce(anchors, patterns, positive)

def _batch(method):
    feats = method.image_features(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    pair = torch.arange(8) % 4
    ids = SPACE.seen_ids[pair]
    return {"features": feats, "attr": ids[:, 0], "obj": ids[:, 1], "pair": pair, "index": torch.arange(8)}

def test_hope_switches(backbone):
    torch.manual_seed(0)
    full = HOPE(backbone, SPACE).train()
    batch = _batch(full)
    assert set(full.loss(batch)) == {"pair_loss", "dfm_loss", "spm_loss", "retrieval_loss", "infonce_loss"}
    no_infonce = HOPE(backbone, SPACE, use_infonce=False)
    assert set(no_infonce.loss(batch)) == {"pair_loss", "dfm_loss", "spm_loss", "retrieval_loss"}
    sa = HOPE(backbone, SPACE, composer="self_attention")
    assert not any(type(b.mlp).__name__ == "SoftMoE" for b in sa.composer.blocks)
    assert [type(b.mlp).__name__ for b in full.composer.blocks] == ["SoftMoE", "SoftMoE"]
    one_layer = HOPE(backbone, SPACE, soft_moe_layers=1)  # before the fidelity fix
    assert [type(b.mlp).__name__ for b in one_layer.composer.blocks] == ["Sequential", "SoftMoE"]
    out = full.compose(batch["features"])
    eq5 = full.infonce(out, batch)
    batch_form = HOPE(backbone, SPACE, infonce_form="batch")
    batch_form.load_state_dict(full.state_dict())
    assert torch.isclose(batch_form.compose(batch["features"]).composed, out.composed).all()
    assert not torch.isclose(batch_form.infonce(out, batch), eq5)
    assert HOPE.cache_image_features and not any(p.requires_grad for p in full.backbone.parameters())
    for bad, match in [({"n_queries": 3}, "even"), ({"composer": "mlp"}, "composer='mlp': not a valid choice"),
                       ({"retrieval_target": "x"}, "retrieval_target='x': not a valid choice"),
                       ({"hopfield_scale": "x"}, "hopfield_scale='x': not a valid choice"),
                       ({"soft_moe_layers": 3}, "soft_moe_layers=3 > composer_depth=2"),
                       ({"infonce_form": "sum"}, "infonce_form='sum': not a valid choice"),
                       ({"training": "staged"}, "training='staged': not a valid choice"),
                       ({"training": "stagewise", "stagewise_parts": "current", "use_retrieval_loss": False,
                         "use_infonce": False}, "trains the Hopfield stage")]:
        with pytest.raises(ValueError, match=match): HOPE(backbone, SPACE, **bad)
    out = full.compose(batch["features"])
    assert torch.allclose(out.attr.weights.sum(-1), torch.ones(8, 2), atol=1e-6)

def test_memory_initialisation_from_training_images(backbone):
    hope = HOPE(backbone, SPACE, memory_init_images=1)
    feats = torch.randn(8, backbone.embed_dim)
    class FakeLearner:
        class cfg: seed = 0
        logged = {}
        def split_outputs(self, split):
            assert split == "train"
            return feats, {"pair": torch.tensor([0, 0, 1, 1, 2, 2, -1, -1])}
        def log(self, name, value): self.logged[name] = float(value)
    text_slot = hope.attr_memory.patterns[3].clone()
    ctx = FakeLearner()
    hope.on_fit_start(ctx)
    assert ctx.logged == {"memory_images_per_slot_mean": 0.75, "memory_images_per_slot_min": 0.0}  # k = 1; slot 3: none
    unit = F.normalize(feats, dim=-1)
    for slot, rows in [(0, (0, 1)), (1, (2, 3)), (2, (4, 5))]:  # k = 1: the slot is one of its images
        assert any(torch.allclose(hope.attr_memory.patterns[slot], unit[r], atol=1e-6) for r in rows)
    assert torch.equal(hope.attr_memory.patterns[3], text_slot)  # a slot without images keeps its text init
    assert torch.equal(hope.obj_memory.patterns, hope.attr_memory.patterns)

def test_retrieval_accuracy_seen_unseen(backbone):
    hope = HOPE(backbone, SPACE)
    distinct = torch.eye(4, backbone.embed_dim)
    hope.init_memories(distinct, torch.arange(4))
    with torch.no_grad():
        hope.queries.linear.weight.copy_(torch.eye(backbone.embed_dim).repeat(4, 1)); hope.queries.linear.bias.zero_()
    labels = {"attr": torch.tensor([0, 1, 2, 0, 2]), "obj": torch.tensor([0, 1, 0, 1, 1]),
              "pair": torch.tensor([0, 1, 2, 3, -1])}
    acc = retrieval_accuracy(hope, torch.cat([distinct, distinct[2:3]]), labels)
    assert acc["seen"] == {"attr": 1.0, "obj": 1.0, "pair": 1.0, "n": 4}
    assert acc["unseen"] == {"attr": 1.0, "obj": 0.0, "pair": 0.0, "n": 1}  # ("old", "dog") read as ("old", "ball")

def test_stagewise_parts_and_terms(backbone):
    "Each stage trains its parts with its terms (cumulative: and the earlier ones'); only the last is selectable."
    batch = _batch(HOPE(backbone, SPACE))
    parts = {"prompt": {"prompt", "vocab"}, "hopfield": {"queries", "attr_memory", "obj_memory"},
             "composer": {"composer"}}
    for mode in ("cumulative", "current"):
        torch.manual_seed(0)
        hope = HOPE(backbone, SPACE, training="stagewise", stagewise_parts=mode).train()
        assert HOPE.min_epochs(hope.hparams) == 3
        assert len(hope.param_groups(1e-3)[0]["params"]) == len(hope.trainable_names)
        for epoch, stage in zip(range(1, 8), [0, 0, 1, 1, 2, 2, 2]):  # 7 epochs: 2, 2, 3
            hope.on_epoch_start(epoch, 7)
            assert hope.stage == stage and hope.selectable == (stage == 2)
            hope.zero_grad(set_to_none=True)
            sum(hope.loss(batch).values()).backward()
            got = {n.split(".")[0] for n, p in hope.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            stages = HOPE_STAGES[:stage + 1] if mode == "cumulative" else HOPE_STAGES[stage:stage + 1]
            assert got == set().union(*(parts[s] for s in stages)), (mode, epoch, got)
    assert stage_epochs(7) == [2, 2, 3] and stage_epochs(4) == [1, 1, 2]
    assert HOPE.min_epochs(HOPE(backbone, SPACE).hparams) == 1

def test_pair_axis_is_chunked(backbone):
    "Scores and losses do not depend on pair_chunk_size; at C-GQA's open-world size no text block exceeds a chunk."
    hope = HOPE(backbone, SPACE).eval()
    batch = _batch(hope)
    open_ids = SPACE.ids([(a, o) for a in SPACE.attrs for o in SPACE.objs])
    got = {}
    for chunk in (1, 3, 10**9):
        hope.pair_chunk_size = chunk
        got[chunk] = hope.scores(batch["features"], open_ids), hope.loss(batch)
    for chunk in (1, 3):
        assert torch.allclose(got[chunk][0], got[10**9][0], atol=1e-5)
        assert all(torch.isclose(v, got[10**9][1][k], atol=1e-5) for k, v in got[chunk][1].items())
    n_pairs, widths, logits = 278_362, [], backbone.logits
    text = F.normalize(torch.randn(n_pairs, backbone.embed_dim), dim=-1)
    hope.pair_text_features = lambda pair_ids: text
    backbone.logits = lambda image, t, *a, **kw: (widths.append(len(t)), logits(image, t, *a, **kw))[1]
    try:
        hope.pair_chunk_size = 5000
        scores = hope.scorer(torch.zeros(n_pairs, 2, dtype=torch.long))(batch["features"])
    finally: del backbone.logits
    assert scores.shape == (8, n_pairs) and max(widths) == 5000 and sum(widths) == n_pairs

def _run(toy, tmp_path, method_params=None, **kw):
    tiny_backbone()
    backbone = str(cache_dir() / "configs" / "tiny-clip.json")
    cfg = TrainConfig(**{"method": "hope", "dataset": str(toy), "backbone": backbone, "batch_size": 4, "lr": 1e-2,
                         "seed": 0, **kw})
    return launch(cfg, method_params, runs_root=tmp_path)

def test_stagewise_run_selects_a_last_stage_epoch(toy, tmp_path):
    "Through the engine: a 4-epoch stage-wise run (1, 1, 2 epochs) may only select epoch 3 or 4."
    m = _run(toy, tmp_path, {"training": "stagewise"}, epochs=4, run="staged")
    history = json.loads((tmp_path / "staged" / "history.json").read_text())
    assert [h["selectable"] for h in history] == [False, False, True, True]
    assert m["epoch"] in (3, 4)
    assert set(json.loads((tmp_path / "staged" / "retrieval_accuracy.json").read_text())) <= {"seen", "unseen"}

def test_low_shot_memory_initialisation(toy, tmp_path):
    "max_train_per_pair=1 leaves one training image per composition: every slot is initialised from 1 image, not k."
    full = _run(toy, tmp_path, epochs=0, run="all")
    low = _run(toy, tmp_path, epochs=0, run="one", max_train_per_pair=1)
    assert full["logged"]["memory_images_per_slot_mean"] == 2.0  # the toy world has 2 training images per pair
    assert low["logged"] == {"memory_images_per_slot_mean": 1.0, "memory_images_per_slot_min": 1.0}
