"""EVA and its MoE-LoRA adapter: the invariants the issue names (zero-initialised experts leave CLIP
unchanged, exactly K routed experts per token, p_s is a max over the right pairs), image variants,
ablation switches and the losses each switch turns on."""
import pytest, torch
import torch.nn.functional as F
from czsl_nb.backbone import tiny_backbone
from czsl_nb.eva import EVA, max_over_pairs, parse_towers, primitive_logits, select_variants
from czsl_nb.methods import LabelSpace
from czsl_nb.moe_lora import MoELoRA, MoEMLP, add_moe_lora, switch_balance_loss

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"], [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
OPEN = SPACE.ids([(a, o) for a in SPACE.attrs for o in SPACE.objs])
IMAGES = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))

def _batch():
    pair = torch.arange(5) % len(SPACE.seen_pairs)
    attr, obj = SPACE.seen_ids[pair].unbind(1)
    return {"image": IMAGES, "pair": pair, "attr": attr, "obj": obj, "index": torch.arange(5)}

def _randomise_B(adapter, std=0.1):
    for m in adapter.moes:
        for e in (m.shared, m.routed):
            if e is not None: torch.nn.init.normal_(e.B, std=std)

@pytest.mark.parametrize("towers", [("image",), ("text",), ("image", "text")])
def test_zero_init_experts_leave_clip_exactly_unchanged(towers):
    bb = tiny_backbone().freeze("all")
    texts = ["a photo of a red ball", "a wet dog"]
    with torch.no_grad():
        img, txt, tok = bb.encode_image(IMAGES), bb.encode_text(texts), bb.image_tokens(IMAGES).tokens
        add_moe_lora(bb, towers, n_routed=8, n_shared=1, top_k=2, rank=4)
        assert torch.equal(bb.encode_image(IMAGES), img)
        assert torch.equal(bb.encode_text(texts), txt)
        assert torch.equal(bb.image_tokens(IMAGES).tokens, tok)
    wrapped = {t for t in ("image", "text") for b in (bb.model.visual.transformer.resblocks if t == "image" else bb.model.transformer.resblocks)
               if isinstance(b.mlp, MoEMLP)}
    assert wrapped == set(towers)

@pytest.mark.parametrize("n_routed,top_k", [(8, 1), (8, 2), (4, 4), (1, 1)])
def test_router_selects_exactly_k_experts_per_token(n_routed, top_k):
    torch.manual_seed(0)
    moe = MoELoRA(16, n_routed=n_routed, n_shared=1, top_k=top_k, rank=4)
    gates, probs = moe.gates(torch.randn(6, 11, 16))
    assert ((gates > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(6, 11))
    chosen = gates > 0  # the K chosen are the K largest router probabilities
    assert (probs.masked_fill(~chosen, 2).amin(-1) >= probs.masked_fill(chosen, -1).amax(-1)).all()

def test_mixture_is_shared_plus_gated_routed_and_balance_loss():
    torch.manual_seed(0)
    moe = MoELoRA(8, n_routed=4, n_shared=2, top_k=2, rank=2, lora_alpha=4.0)
    for e in (moe.shared, moe.routed): torch.nn.init.normal_(e.B)
    h = torch.randn(3, 5, 8)
    gates, _ = moe.gates(h)
    each = moe.expert_outputs(h)  # already scaled by alpha / rank = 2
    torch.testing.assert_close(moe(h), each[..., :2, :].sum(-2) + (each[..., 2:, :] * gates[..., None]).sum(-2), atol=1e-5, rtol=1e-5)
    assert moe.scale == 2.0
    uniform = switch_balance_loss(torch.eye(4).repeat(3, 1), torch.full((12, 4), 0.25), top_k=1)
    collapsed = switch_balance_loss(torch.eye(4)[[1] * 12], torch.eye(4)[[1] * 12], top_k=1)
    assert abs(uniform.item() - 1.0) < 1e-6 and abs(collapsed.item() - 4.0) < 1e-6

def test_image_variants_one_per_expert_and_single_expert_equals_image_feature():
    bb = tiny_backbone().freeze("all")
    one = add_moe_lora(bb, "image", n_routed=1, n_shared=0, top_k=1, rank=4)
    _randomise_B(one)
    with torch.no_grad():
        pooled, variants = one.image_variants(IMAGES)
        torch.testing.assert_close(variants[:, 0], pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, bb.encode_image(IMAGES), atol=1e-5, rtol=1e-5)
    bb = tiny_backbone().freeze("all")
    many = add_moe_lora(bb, "image", n_routed=8, n_shared=2, top_k=2, rank=4)
    _randomise_B(many)
    with torch.no_grad(): _, variants = many.image_variants(IMAGES)
    assert variants.shape == (5, 10, bb.embed_dim)
    assert not torch.allclose(variants[:, 0], variants[:, 1])

def test_p_s_is_brute_force_max_over_the_pairs_containing_the_state():
    g = torch.Generator().manual_seed(3)
    n_attrs, n_objs = 5, 4
    pairs = torch.tensor([(a, o) for a in range(n_attrs) for o in range(n_objs) if (a * 7 + o) % 3 and a != 4])  # state 4: no pair
    cos = torch.rand(6, len(pairs), generator=g) * 2 - 1
    a_logits, o_logits = primitive_logits(cos, pairs, n_attrs, n_objs, torch.tensor(10.0), torch.tensor(5.0))
    for a in range(n_attrs):
        members = (pairs[:, 0] == a).nonzero().flatten()
        if len(members): torch.testing.assert_close(a_logits[:, a], 10.0 * cos[:, members].max(1).values)
        else: assert torch.isinf(a_logits[:, a]).all() and (a_logits[:, a] < 0).all()
    for o in range(n_objs):
        members = (pairs[:, 1] == o).nonzero().flatten()
        torch.testing.assert_close(o_logits[:, o], 5.0 * cos[:, members].max(1).values)
    p_s = F.softmax(a_logits, -1)
    assert torch.isfinite(p_s).all() and (p_s[:, 4] == 0).all()
    # and inside the method: its p_s, with C = the scored pairs, is the same max over the method's own cosines
    eva = EVA(tiny_backbone(), SPACE).eval()
    with torch.no_grad():
        feats = eva.image_features(IMAGES)
        cos = F.normalize(feats[:, 0], dim=-1) @ eva.pair_text(OPEN).T
        a_logits, _ = eva.primitive_logits(cos, OPEN)
        tau = eva.log_tau_attr.exp()
        for a in range(len(SPACE.attrs)):
            torch.testing.assert_close(a_logits[:, a], tau * cos[:, OPEN[:, 0] == a].max(1).values)
        expected = F.softmax(eva.scale * cos, -1) + 0.5 * (F.softmax(a_logits, -1)[:, OPEN[:, 0]] +
                                                           F.softmax(eva.primitive_logits(cos, OPEN)[1], -1)[:, OPEN[:, 1]])
        torch.testing.assert_close(eva.scores(feats, OPEN), expected)

def test_max_over_pairs_gradient_reaches_only_the_winner():
    cos = torch.tensor([[0.1, 0.5, 0.3]], requires_grad=True)
    max_over_pairs(cos, torch.tensor([0, 0, 1]), 2).sum().backward()
    assert cos.grad.tolist() == [[0.0, 1.0, 1.0]]

def test_select_variants_uses_both_affinities():
    v = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]]), dim=-1)
    t, f = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.equal(select_variants(v, t, f, 0.0), v[:, 0])
    assert torch.equal(select_variants(v, t, f, 1.0), v[:, 2])

@pytest.mark.parametrize("params,terms,cached,n_variants", [
    ({}, {"pair_loss", "primitive_loss", "variant_loss"}, False, 9),
    ({"use_experts": False, "use_variants": False}, {"pair_loss"}, True, 0),
    ({"use_variants": False}, {"pair_loss"}, False, 0),
    ({"use_experts": False}, {"pair_loss", "primitive_loss", "variant_loss"}, True, 0),
    ({"n_shared": 0}, {"pair_loss", "primitive_loss", "variant_loss"}, False, 8),
    ({"n_shared": 2, "balance_weight": 0.01}, {"pair_loss", "primitive_loss", "variant_loss", "balance_loss"}, False, 10),
    ({"towers": "text"}, {"pair_loss", "primitive_loss", "variant_loss"}, True, 0),
])
def test_ablation_switches(params, terms, cached, n_variants):
    torch.manual_seed(0)
    m = EVA(tiny_backbone(), SPACE, **params).train()
    assert m.cache_image_features == cached
    assert m.image_features(IMAGES).shape == (5, 1 + n_variants, 32)
    out = m(_batch())
    assert set(out) == terms and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    image_grads = [p.grad for n, p in m.named_parameters() if n.startswith("backbone.model.visual.") and p.requires_grad]
    assert bool(image_grads) == (not cached) and all(g is not None for g in image_grads)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith("backbone.") and "moe" not in n)

def test_moe_layers_and_towers_parameters():
    m = EVA(tiny_backbone(), SPACE, moe_layers=1, towers="image")
    assert [isinstance(b.mlp, MoEMLP) for b in m.backbone.model.visual.transformer.resblocks] == [False, True]
    assert not any(isinstance(b.mlp, MoEMLP) for b in m.backbone.model.transformer.resblocks)
    assert parse_towers("text+image") == ("image", "text")
    with pytest.raises(ValueError, match="towers"): parse_towers("image+image")
    with pytest.raises(ValueError, match="top_k"): EVA(tiny_backbone(), SPACE, n_routed=2, top_k=3)
