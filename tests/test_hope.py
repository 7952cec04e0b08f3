"""HOPE's invariants (issue 6): retrieval weights are distributions, L_r is minimal when all retrieval mass sits on
the ground-truth slots, Soft MoE dispatch/combine weights are convex combinations; plus the method's switches,
its memory initialisation from training images, and the retrieval accuracy split into seen/unseen compositions."""
import math
import pytest, torch
import torch.nn.functional as F
from czsl_nb.backbone import tiny_backbone
from czsl_nb.methods import LabelSpace
from czsl_nb.hopfield import HopfieldMemory, hopfield_retrieve, multi_positive_infonce, retrieval_loss, slot_means
from czsl_nb.soft_moe import Composer, SoftMoE
from czsl_nb.hope import HOPE, retrieval_accuracy

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"], [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])

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
    assert retrieval_loss(uneven, slot_attr, labels[:1], "uniform") > retrieval_loss(even, slot_attr, labels[:1], "uniform") + 0.1

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
    assert [type(b.mlp).__name__ for b in Composer(64).blocks] == ["Sequential", "SoftMoE"]
    assert all(type(b.mlp).__name__ == "Sequential" for b in Composer(64, mixer="self_attention").blocks)
    with pytest.raises(ValueError, match="unknown composer"): Composer(64, mixer="moe")

def test_slot_means_and_infonce():
    feats = torch.arange(10.).reshape(5, 2)
    means, empty = slot_means(feats, torch.tensor([1, 1, -1, 0, 1]), 3, n_images=0)
    assert torch.allclose(means, torch.tensor([[6., 7.], [10 / 3, 13 / 3], [0., 0.]])) and empty.tolist() == [False, False, True]
    two, _ = slot_means(feats, torch.tensor([1, 1, -1, 0, 1]), 3, n_images=2, seed=1)
    assert any(torch.allclose(two[1], feats[list(p)].mean(0)) for p in [(0, 1), (0, 4), (1, 4)])
    a, c = torch.tensor([[1., 0.]]), torch.tensor([[1., 0.], [0., 1.]])
    expected = -torch.log_softmax(torch.tensor([1., 0.]) / 0.5, 0)[0]
    assert torch.isclose(multi_positive_infonce(a, c, torch.tensor([[True, False]]), 0.5), expected, atol=1e-6)
    assert multi_positive_infonce(a, c, torch.tensor([[False, False]])).item() == 0.0

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
    assert set(HOPE(backbone, SPACE, use_infonce=False).loss(batch)) == {"pair_loss", "dfm_loss", "spm_loss", "retrieval_loss"}
    sa = HOPE(backbone, SPACE, composer="self_attention")
    assert not any(type(b.mlp).__name__ == "SoftMoE" for b in sa.composer.blocks)
    assert HOPE.cache_image_features and not any(p.requires_grad for p in full.backbone.parameters())
    for bad, match in [({"n_queries": 3}, "even"), ({"composer": "mlp"}, "composer='mlp': not a valid choice"),
                       ({"retrieval_target": "x"}, "retrieval_target='x': not a valid choice"),
                       ({"hopfield_scale": "x"}, "hopfield_scale='x': not a valid choice")]:
        with pytest.raises(ValueError, match=match): HOPE(backbone, SPACE, **bad)
    out = full.compose(batch["features"])
    assert torch.allclose(out.attr.weights.sum(-1), torch.ones(8, 2), atol=1e-6)

def test_memory_initialisation_from_training_images(backbone):
    hope = HOPE(backbone, SPACE, memory_init_images=1)
    feats = torch.randn(8, backbone.embed_dim)
    class FakeLearner:
        class cfg: seed = 0
        def split_outputs(self, split):
            assert split == "train"
            return feats, {"pair": torch.tensor([0, 0, 1, 1, 2, 2, -1, -1])}
    text_slot = hope.attr_memory.patterns[3].clone()
    hope.on_fit_start(FakeLearner())
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
    labels = {"attr": torch.tensor([0, 1, 2, 0, 2]), "obj": torch.tensor([0, 1, 0, 1, 1]), "pair": torch.tensor([0, 1, 2, 3, -1])}
    acc = retrieval_accuracy(hope, torch.cat([distinct, distinct[2:3]]), labels)
    assert acc["seen"] == {"attr": 1.0, "obj": 1.0, "pair": 1.0, "n": 4}
    assert acc["unseen"] == {"attr": 1.0, "obj": 0.0, "pair": 0.0, "n": 1}  # ("old", "dog") read as ("old", "ball")
