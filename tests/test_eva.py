"""EVA and its MoE-LoRA adapter: the invariants the issue names (zero-initialised experts leave CLIP
unchanged, exactly K routed experts per token, p_s is a max over the right pairs), image variants,
ablation switches and the losses each switch turns on."""
import pytest, torch
import torch.nn.functional as F
from czsl_nb.backbone import tiny_backbone
from czsl_nb.eva import EVA, max_over_pairs, parse_towers, primitive_logits, select_variants
from czsl_nb.methods import LabelSpace
from czsl_nb.moe_lora import LoRAExperts, MoELoRA, MoEMLP, add_moe_lora, expert_isolation_loss, switch_balance_loss

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"],
                   [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
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
    blocks = {"image": bb.model.visual.transformer.resblocks, "text": bb.model.transformer.resblocks}
    wrapped = {t for t in ("image", "text") for b in blocks[t] if isinstance(b.mlp, MoEMLP)}
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
    by_hand = each[..., :2, :].sum(-2) + (each[..., 2:, :] * gates[..., None]).sum(-2)
    torch.testing.assert_close(moe(h), by_hand, atol=1e-5, rtol=1e-5)
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
    # state 4: no pair
    pairs = torch.tensor([(a, o) for a in range(n_attrs) for o in range(n_objs) if (a * 7 + o) % 3 and a != 4])
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
        o_logits = eva.primitive_logits(cos, OPEN)[1]
        expected = F.softmax(eva.scale * cos, -1) + 0.5 * (F.softmax(a_logits, -1)[:, OPEN[:, 0]] +
                                                           F.softmax(o_logits, -1)[:, OPEN[:, 1]])
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
    ({"n_shared": 2, "balance_weight": 0.01},
     {"pair_loss", "primitive_loss", "variant_loss", "balance_loss"}, False, 10),
    ({"towers": "text"}, {"pair_loss", "primitive_loss", "variant_loss"}, True, 0),
    ({"lambda_variant": 0}, {"pair_loss", "primitive_loss"}, False, 0),  # build-up: + text-to-image only
    ({"alpha": 0}, {"pair_loss", "primitive_loss", "variant_loss"}, False, 9),  # + cross-modal affinity only
    ({"isolation_weight": 0.01}, {"pair_loss", "primitive_loss", "variant_loss", "isolation_loss"}, False, 9),
    ({"isolation_weight": 0.01, "balance_weight": 0.01},
     {"pair_loss", "primitive_loss", "variant_loss", "isolation_loss", "balance_loss"}, False, 9),
    ({"primitive_max": "probability"}, {"pair_loss", "primitive_loss", "variant_loss"}, False, 9),
])
def test_ablation_switches(params, terms, cached, n_variants):
    torch.manual_seed(0)
    m = EVA(tiny_backbone(), SPACE, **params).train()
    assert m.cache_image_features == cached
    assert m.image_features(IMAGES).shape == (5, 1 + n_variants, 32)
    out = m(_batch())
    assert set(out) == terms and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    image_grads = [p.grad for n, p in m.named_parameters()
                   if n.startswith("backbone.model.visual.") and p.requires_grad]
    assert bool(image_grads) == (not cached) and all(g is not None for g in image_grads)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n.startswith("backbone.") and "moe" not in n)

def test_moe_layers_and_towers_parameters():
    m = EVA(tiny_backbone(), SPACE, moe_layers=1, towers="image")
    assert [isinstance(b.mlp, MoEMLP) for b in m.backbone.model.visual.transformer.resblocks] == [False, True]
    assert not any(isinstance(b.mlp, MoEMLP) for b in m.backbone.model.transformer.resblocks)
    assert parse_towers("text+image") == ("image", "text")
    with pytest.raises(ValueError, match="towers"): parse_towers("image+image")
    with pytest.raises(ValueError, match="top_k"): EVA(tiny_backbone(), SPACE, n_routed=2, top_k=3)

# -- semantic isolation (issue 16) ------------------------------------------------------------------
@pytest.mark.parametrize("n_shared,n_routed", [(1, 8), (0, 3), (2, 0)])
def test_isolation_loss_is_the_brute_force_mean_squared_cosine_between_expert_outputs(n_shared, n_routed):
    torch.manual_seed(0)
    moe = MoELoRA(12, n_routed=n_routed, n_shared=n_shared, top_k=min(2, max(n_routed, 1)), rank=3)
    for e in (moe.shared, moe.routed):
        if e is not None: torch.nn.init.normal_(e.B)
    h = torch.randn(4, 6, 12)
    out = F.normalize(moe.expert_outputs(h), dim=-1)  # [4, 6, N, 12], the [T, N, d] the loss never builds
    n = n_shared + n_routed
    cos2 = (out @ out.transpose(-1, -2)).square()
    brute_force = cos2[..., ~torch.eye(n, dtype=torch.bool)].mean()
    torch.testing.assert_close(moe.isolation_loss(h), brute_force, atol=1e-5, rtol=1e-4)

def test_isolation_loss_bounds_and_gradients():
    torch.manual_seed(0)
    experts = LoRAExperts(4, 10, 10, rank=2)
    h = torch.randn(7, 10)
    assert expert_isolation_loss(experts.codes(h), experts.B).item() == 0.0  # B = 0: untrained experts
    loss_grad = torch.autograd.grad(expert_isolation_loss(experts.codes(h), experts.B), experts.B, allow_unused=True)[0]
    assert loss_grad is None or loss_grad.abs().sum() == 0
    with torch.no_grad():
        experts.A[:] = experts.A[0]; experts.B[:] = torch.randn(10, 2)  # four copies of one expert
    torch.testing.assert_close(expert_isolation_loss(experts.codes(h), experts.B), torch.tensor(1.0))
    with torch.no_grad(): torch.nn.init.normal_(experts.B); torch.nn.init.normal_(experts.A)
    loss = expert_isolation_loss(experts.codes(h), experts.B)
    assert 0 < loss.item() < 1
    loss.backward()
    assert experts.A.grad.abs().sum() > 0 and experts.B.grad.abs().sum() > 0
    half = expert_isolation_loss(experts.codes(h).half(), experts.B.half())  # computed in float32 whatever comes in
    assert half.dtype == torch.float32 and torch.isfinite(half)

def test_eva_isolation_term_averages_the_adapted_blocks_and_needs_two_experts():
    torch.manual_seed(0)
    m = EVA(tiny_backbone(), SPACE, isolation_weight=0.5).train()
    _randomise_B(m.adapter)
    batch = _batch()
    with m.adapter.tracking("isolation") as tracked:
        torch.manual_seed(1); m.loss({**batch, "features": m.batch_features(batch)})
    n_blocks = len(m.adapter.moes)
    assert len(tracked["isolation"]) >= n_blocks  # the image forward and the text forwards (pairs, primitives)
    torch.manual_seed(1)
    out = m(batch)
    torch.testing.assert_close(out["isolation_loss"], 0.5 * torch.stack(tracked["isolation"]).mean())
    out["isolation_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for moe in m.adapter.moes for e in (moe.shared, moe.routed)
               for p in (e.A, e.B))
    with pytest.raises(ValueError, match="isolation_weight > 0 needs use_experts=True"):
        EVA(tiny_backbone(), SPACE, isolation_weight=0.1, use_experts=False)
    with pytest.raises(ValueError, match="n_shared \\+ n_routed >= 2"):
        EVA(tiny_backbone(), SPACE, isolation_weight=0.1, n_shared=1, n_routed=0)

# -- the p_s choice (issue 16) -------------------------------------------------------------------------
def test_p_s_over_probabilities_is_the_max_of_p_c_over_the_right_pairs():
    torch.manual_seed(0)
    m = EVA(tiny_backbone(), SPACE, primitive_max="probability").eval()
    with torch.no_grad():
        feats = m.image_features(IMAGES)
        cos = F.normalize(feats[:, 0], dim=-1) @ m.pair_text(OPEN).T
        p_c = F.softmax(m.scale * cos, -1)
        a_logits, o_logits = m.primitive_logits(cos, OPEN)
        for a in range(len(SPACE.attrs)):
            torch.testing.assert_close(a_logits[:, a], m.log_tau_attr.exp() * p_c[:, OPEN[:, 0] == a].max(1).values)
        for o in range(len(SPACE.objs)):
            torch.testing.assert_close(o_logits[:, o], m.log_tau_obj.exp() * p_c[:, OPEN[:, 1] == o].max(1).values)
        expected = p_c + 0.5 * (F.softmax(a_logits, -1)[:, OPEN[:, 0]] + F.softmax(o_logits, -1)[:, OPEN[:, 1]])
        torch.testing.assert_close(m.scores(feats, OPEN), expected)
        cosine = EVA(tiny_backbone(), SPACE).eval()
        cosine.load_state_dict(m.state_dict())
        assert not torch.allclose(cosine.scores(feats, OPEN), m.scores(feats, OPEN))
    # in training, over the seen pairs: the loss's primitive term uses the same max of p_c over C_s
    m.train(); m.vocab.dropout.p = 0.0
    batch = _batch()
    terms = m.loss({**batch, "features": m.image_features(IMAGES)})
    feats = F.normalize(m.image_features(IMAGES).float(), dim=-1)
    p_seen = F.softmax(m.scale * feats[:, 0] @ m.pair_text(SPACE.seen_ids).T, -1)
    a_logits, o_logits = primitive_logits(p_seen, SPACE.seen_ids, 3, 2, m.log_tau_attr.exp(), m.log_tau_obj.exp())
    expected = F.cross_entropy(a_logits, batch["attr"]) + F.cross_entropy(o_logits, batch["obj"])
    torch.testing.assert_close(terms["primitive_loss"], expected)

# -- the build-up rows (issue 16) ----------------------------------------------------------------------
def test_text_to_image_only_keeps_beta_at_inference_and_skips_the_variants():
    torch.manual_seed(0)
    t2i = EVA(tiny_backbone(), SPACE, lambda_variant=0).train()
    assert not t2i.uses_image_variants and t2i.image_features(IMAGES).shape == (5, 1, 32)
    t2i.eval()
    torch.manual_seed(0)
    no_variants = EVA(tiny_backbone(), SPACE, use_variants=False).eval()
    with torch.no_grad():
        feats = t2i.image_features(IMAGES)
        assert torch.allclose(no_variants.scores(feats, OPEN).sum(-1), torch.ones(5))  # p_c alone
        assert (t2i.scores(feats, OPEN) - no_variants.scores(feats, OPEN)).min() > 0  # + β (p_s + p_o)

# -- the pair axis in chunks (issue 14) ----------------------------------------------------------------
def _text_batches(m):
    sizes, encode = [], m.backbone.encode_text_embeddings
    m.backbone.encode_text_embeddings = lambda ids, emb, **kw: (sizes.append(len(ids)), encode(ids, emb, **kw))[1]
    return sizes

def test_text_tower_sees_at_most_pair_chunk_size_prompts_and_chunks_change_nothing():
    torch.manual_seed(0)
    m = EVA(tiny_backbone(), SPACE).eval()
    feats = m.image_features(IMAGES)
    whole = m.scores(feats, OPEN)
    m.pair_chunk_size = 4
    sizes = _text_batches(m)
    torch.testing.assert_close(m.scores(feats, OPEN), whole, atol=1e-6, rtol=1e-5)
    assert sizes == [4, 2]
    def step(chunk):  # a training step: same seed, same vocabulary dropout, whatever the chunk size
        m.pair_chunk_size = chunk; m.train().zero_grad()
        torch.manual_seed(3); loss = sum(m(_batch()).values()); loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    (loss_1, grads_1), (loss_all, grads_all) = step(1), step(10**9)
    torch.testing.assert_close(loss_1, loss_all, atol=1e-5, rtol=1e-5)
    assert grads_1.keys() == grads_all.keys()
    for n in grads_1: torch.testing.assert_close(grads_1[n], grads_all[n], atol=1e-5, rtol=1e-4)

# -- the ablation commands the notebook gives ---------------------------------------------------------
def test_the_benchmark_runs_every_variant_the_notebook_tables():
    "Each variant 23_eva's ablation tables name is one of the benchmark's EVA variants, and every one validates."
    import json, re
    from pathlib import Path
    import yaml
    from czsl_nb.learner import read_parameter_file, resolve_parameters
    repo = Path(__file__).resolve().parents[1]
    variants = yaml.safe_load((repo / "configs" / "benchmark.yaml").read_text())["methods"]["eva"]["variants"]
    for name, switches in {"full": {}, **variants}.items():
        recipe = read_parameter_file(repo / "configs" / "eva" / "synthetic.yaml")
        cfg, method_params = resolve_parameters({**recipe, **switches})
        cfg.validate(method_params, probe_method=False)
    nb = json.loads((repo / "nbs" / "23_eva.ipynb").read_text())
    text = next("".join(c["source"]) for c in nb["cells"] if "".join(c["source"]).startswith("## Ablations"))
    build_up = re.findall(r"^\| [^|]+\| [^|]+\| `(\w+)` \|", text, flags=re.M)  # its third column: the variant
    auxiliary = re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", text, flags=re.M)  # its first column
    tabled = set(build_up) | {name for row in auxiliary for name in row if name}
    assert {"baseline", "experts_only", "variants_only", "experts_t2i", "experts_t2i_cross", "isolation", "balance",
            "ps_probability"} <= tabled
    assert tabled <= {"full", *variants}, tabled - {"full", *variants}
