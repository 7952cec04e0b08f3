"""sepfusion (issue 7) and its components: the invariants the issue lists (no fusion = the separated-prompt
model exactly, normalised attention weights, identity block when fusion is off, closed/open-world shapes)
plus the prompt and fusion switches the ablations rely on."""
import pytest, torch
import torch.nn.functional as F
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb import get_method
from czsl_nb.backbone import tiny_backbone
from czsl_nb.fusion import CrossAttention, FUSION_ORDERS, ModalFusionSynthesizer, SeparatedPrompts
from czsl_nb.methods import LabelSpace
from czsl_nb.sepfusion import SepFusion

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"], [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
OPEN = SPACE.ids([(a, o) for a in SPACE.attrs for o in SPACE.objs])
FUSIONS = [f for f in FUSION_ORDERS if f != "none"]

@pytest.fixture(scope="module")
def bb(): return tiny_backbone()

@pytest.fixture(scope="module")
def tokens(bb):
    images = torch.rand(5, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
    return bb.image_tokens(images).tokens

def build(bb, seed=0, **hp):
    torch.manual_seed(seed)
    return SepFusion(bb, SPACE, **hp).eval()

def close_gates(m):
    with torch.no_grad():
        for p in m.fusion.parameters():
            if p.ndim == 0: p.zero_()
    return m

def test_registered():
    assert get_method("sepfusion") is SepFusion and SepFusion.cache_image_features

def test_attention_weights_are_normalised():
    torch.manual_seed(0)
    ca = CrossAttention(64, heads=4)
    w = ca.attention_weights(torch.randn(1, 7, 64), torch.randn(3, 11, 64))
    assert w.shape == (3, 4, 7, 11) and (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 4, 7))

@pytest.mark.parametrize("fusion", FUSIONS)
def test_attention_weights_normalised_inside_the_block(fusion, tokens):
    "Every cross-attention the block runs (its real inputs, after LayerNorm) yields distributions over the context."
    torch.manual_seed(0)
    D = tokens.shape[-1]
    block = ModalFusionSynthesizer(D, fusion)
    state, obj = torch.randn(3, D), torch.randn(2, D)
    for layer in block.children():
        w = layer.attn.attention_weights(layer.norm_query(state[None]), layer.norm_context(tokens))
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))

def test_block_without_fusion_is_identity(tokens):
    D, B = tokens.shape[-1], tokens.shape[0]
    state, obj, pair = torch.randn(3, D), torch.randn(2, D), torch.randn(6, D)
    block = ModalFusionSynthesizer(D, "none")
    assert list(block.parameters()) == []
    out = block(tokens, state, obj)
    assert torch.equal(out.image, tokens[:, 0]) and torch.equal(out.state, state.expand(B, -1, -1))
    assert torch.equal(out.object, obj.expand(B, -1, -1)) and torch.equal(block.fuse_pair(tokens, pair), pair.expand(B, -1, -1))

def test_no_fusion_is_the_separated_prompt_model(bb, tokens):
    "fusion='none': scores and loss equal the separated-prompt model computed by hand from the pooled feature."
    m = build(bb, fusion="none")
    f = tokens[:, 0]
    state, obj = m.prompts.primitive_features(bb)
    z_pair, z_s, z_o = bb.logits(f, m.prompts.pair_features(bb, OPEN)), bb.logits(f, state), bb.logits(f, obj)
    expected = z_pair.softmax(-1) + z_s.softmax(-1)[:, OPEN[:, 0]] * z_o.softmax(-1)[:, OPEN[:, 1]]
    torch.testing.assert_close(m.scores(tokens, OPEN), expected, atol=1e-6, rtol=1e-5)
    pair = torch.arange(5) % 4
    batch = {"features": tokens, "pair": pair, "attr": SPACE.seen_ids[pair, 0], "obj": SPACE.seen_ids[pair, 1]}
    terms = m.loss(batch)
    seen_logits = bb.logits(f, m.prompts.pair_features(bb, SPACE.seen_ids))
    torch.testing.assert_close(terms["pair_loss"], F.cross_entropy(seen_logits, pair))
    torch.testing.assert_close(terms["state_loss"], F.cross_entropy(z_s, batch["attr"]))
    torch.testing.assert_close(terms["object_loss"], F.cross_entropy(z_o, batch["obj"]))

@pytest.mark.parametrize("fusion", FUSIONS)
def test_closed_gates_reduce_to_no_fusion(bb, tokens, fusion):
    fused, plain = build(bb, fusion=fusion), build(bb, fusion="none")
    assert not torch.allclose(fused.scores(tokens, OPEN), plain.scores(tokens, OPEN))
    torch.testing.assert_close(close_gates(fused).scores(tokens, OPEN), plain.scores(tokens, OPEN), atol=1e-5, rtol=1e-5)

def test_fusion_order_matters(bb, tokens):
    assert not torch.allclose(build(bb, fusion="inter_intra").scores(tokens, OPEN), build(bb, fusion="intra_inter").scores(tokens, OPEN))

@pytest.mark.parametrize("kinds", [("hard", "hard", "hard"), ("soft", "soft", "soft"), ("hard", "soft", "soft"), ("soft", "hard", "soft")])
@pytest.mark.parametrize("fusion", list(FUSION_ORDERS))
def test_shapes_closed_and_open_world(bb, tokens, kinds, fusion):
    pair, state, obj = kinds
    m = build(bb, pair_prompt=pair, state_prompt=state, object_prompt=obj, fusion=fusion)
    for pairs in (SPACE.seen_ids, OPEN):
        s = m.scores(tokens, pairs)
        assert s.shape == (5, len(pairs)) and s.dtype == torch.float32 and torch.isfinite(s).all()
        z_pair, z_s, z_o = m.all_logits(tokens, pairs, chunk_size=2)  # chunking the pairs changes nothing
        assert (z_pair.shape, z_s.shape, z_o.shape) == ((5, len(pairs)), (5, 3), (5, 2))
        torch.testing.assert_close(m.combine(z_pair, z_s, z_o, pairs), s, atol=1e-6, rtol=1e-5)
    assert m.trainable == (kinds != ("hard", "hard", "hard") or fusion != "none")

def test_soft_equals_hard_at_initialisation(bb, tokens):
    "Soft prompts start from their hard twins' words: before training the prompt ablation's variants agree."
    hard = build(bb, pair_prompt="hard", state_prompt="hard", object_prompt="hard", fusion="none")
    soft = build(bb, pair_prompt="soft", state_prompt="soft", object_prompt="soft", fusion="none")
    torch.testing.assert_close(hard.scores(tokens, OPEN), soft.scores(tokens, OPEN), atol=1e-5, rtol=1e-4)

def test_trainable_parts_and_loss_terms(bb):
    m = build(bb)
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("prompts.", "fusion.")) for n in names)
    assert not any(n.startswith("prompts.soft.pair") for n in names)  # the pair prompt is hard by default
    batch = {"features": torch.randn(4, 17, bb.embed_dim), "pair": torch.tensor([0, 1, 2, 3]),
             "attr": SPACE.seen_ids[:, 0], "obj": SPACE.seen_ids[:, 1]}
    assert sorted(build(bb, comp_weight=0.5, object_weight=0).loss(batch)) == ["comp_loss", "pair_loss", "state_loss"]
    half, full = build(bb, state_weight=0.5).loss(batch), build(bb).loss(batch)
    torch.testing.assert_close(half["state_loss"], 0.5 * full["state_loss"])

def test_invalid_switches(bb):
    with pytest.raises(ValueError, match="method 'sepfusion': fusion='cross': not a valid choice; valid: 'none', "):
        SepFusion(bb, SPACE, fusion="cross")
    with pytest.raises(ValueError, match="object_prompt='learned': not a valid choice; valid: 'hard', 'soft'"):
        SepFusion(bb, SPACE, object_prompt="learned")
    with pytest.raises(ValueError, match="unknown prompt kind"): SeparatedPrompts(bb, SPACE.attrs, SPACE.objs, pair="fixed")
