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

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"],
                   [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
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
    state = torch.randn(3, D)
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
    assert torch.equal(out.object, obj.expand(B, -1, -1))
    assert torch.equal(block.fuse_pair(tokens, pair), pair.expand(B, -1, -1))

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
    closed = close_gates(fused).scores(tokens, OPEN)
    torch.testing.assert_close(closed, plain.scores(tokens, OPEN), atol=1e-5, rtol=1e-5)

def test_fusion_order_matters(bb, tokens):
    inter_intra = build(bb, fusion="inter_intra").scores(tokens, OPEN)
    assert not torch.allclose(inter_intra, build(bb, fusion="intra_inter").scores(tokens, OPEN))

@pytest.mark.parametrize("kinds", [("hard", "hard", "hard"), ("soft", "soft", "soft"),
                                   ("hard", "soft", "soft"), ("soft", "hard", "soft")])
@pytest.mark.parametrize("fusion", list(FUSION_ORDERS))
def test_shapes_closed_and_open_world(bb, tokens, kinds, fusion):
    pair, state, obj = kinds
    m = build(bb, pair_prompt=pair, state_prompt=state, object_prompt=obj, fusion=fusion)
    for pairs in (SPACE.seen_ids, OPEN):
        s = m.scores(tokens, pairs)
        assert s.shape == (5, len(pairs)) and s.dtype == torch.float32 and torch.isfinite(s).all()
        m.pair_chunk_size = 2  # chunking the pairs changes nothing
        with torch.no_grad(): z_pair, z_s, z_o = m.all_logits(tokens, pairs)
        assert (z_pair.shape, z_s.shape, z_o.shape) == ((5, len(pairs)), (5, 3), (5, 2))
        with torch.no_grad(): torch.testing.assert_close(m.combine(z_pair, z_s, z_o, pairs), s, atol=1e-6, rtol=1e-5)
        m.pair_chunk_size = SepFusion.pair_chunk_size
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
    with pytest.raises(ValueError, match="unknown prompt kind"):
        SeparatedPrompts(bb, SPACE.attrs, SPACE.objs, pair="fixed")

# -- the pair axis in chunks (issue 14) ------------------------------------------------------------
BIG = LabelSpace([f"a{i}" for i in range(6)], [f"o{i}" for i in range(5)],
                 [(f"a{i}", f"o{(i + k) % 5}") for i in range(6) for k in range(2)])
BIG_OPEN = BIG.ids([(a, o) for a in BIG.attrs for o in BIG.objs])

def _recording(m):
    "Wrap the method's per-image pair fusion: record (images, pairs) of every call."
    calls, fuse = [], m.fusion.fuse_pair
    m.fusion.fuse_pair = lambda tokens, pair: (calls.append((len(tokens), len(pair))), fuse(tokens, pair))[1]
    return calls

@pytest.mark.parametrize("pair_prompt", ["hard", "soft"])
def test_pair_fusion_works_in_bounded_steps_with_the_same_scores(bb, pair_prompt):
    "Scoring 30 open-world pairs for 7 images with chunks of 4 pairs and 12 rows: no step fuses more, scores unchanged."
    images = torch.rand(7, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    m = SepFusion(bb, BIG, pair_prompt=pair_prompt).eval()
    tokens = m.image_features(images)
    whole = m.scores(tokens, BIG_OPEN)
    m.pair_chunk_size, m.fusion_images = 4, 3
    calls = _recording(m)
    chunked = m.scores(tokens, BIG_OPEN)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert max(b * c for b, c in calls) <= 12 and max(c for _, c in calls) <= 4
    assert sum(b * c for b, c in calls) == 7 * 30  # every (image, pair) row fused exactly once

def test_chunked_training_recomputes_each_step_and_keeps_loss_and_gradients(bb):
    "With grad, each step is checkpointed: backward runs it again (its activations were not kept); same loss and grads."
    images = torch.rand(6, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(3))
    pair = torch.arange(6) % len(BIG.seen_pairs)
    def run(chunk, n_images):
        torch.manual_seed(0)
        m = SepFusion(bb, BIG, pair_prompt="soft").train()
        m.pair_chunk_size, m.fusion_images = chunk, n_images
        batch = {"features": m.image_features(images), "pair": pair,
                 "attr": BIG.seen_ids[pair, 0], "obj": BIG.seen_ids[pair, 1]}
        calls = _recording(m)
        torch.manual_seed(1)
        loss = sum(m(batch).values())
        forward_calls = len(calls)
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        return loss.detach(), grads, forward_calls, len(calls)
    loss, grads, forward, total = run(10**9, 10**9)
    assert (forward, total) == (1, 1)  # one step: nothing to recompute
    loss_c, grads_c, forward_c, total_c = run(5, 2)  # 12 seen pairs in chunks of 5, images in blocks of 2
    assert forward_c == 3 * 3 and total_c == 2 * forward_c
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_c.keys() and any(n.startswith("prompts.soft.pair") for n in grads)
    for n in grads: torch.testing.assert_close(grads_c[n], grads[n], atol=1e-5, rtol=1e-4)

def test_scoring_adds_the_primitive_term_in_place_as_composed_probability(bb, tokens):
    from czsl_nb.methods import composed_probability
    m = build(bb)
    m.pair_chunk_size = 2
    with torch.no_grad():
        z = m.all_logits(tokens, OPEN)
        assert torch.equal(m.combine(*z, OPEN), composed_probability({"pair": z[0], "attr": z[1], "obj": z[2]}, OPEN))
