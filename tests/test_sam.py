"""SAM's invariants (issue 5): sparse alignment equals a brute-force max over tokens; a memory update
replaces only the highest-entropy slot of the predicted composition and only with a lower entropy;
`memory="none"` leaves scores identical to the fused SA + VAC path; plus staging, LoRA placement and
the engine hooks (bank built in on_fit_end, test-time updates kept inside the scorer).
Issue 16 (fidelity): patch tokens by default, the W mix, linear selection, a dropout-free frozen stage II,
static/dynamic banks, LoRA dropout. Issue 14 (scale): chunks along the pair axis change nothing, the bank
stores slots only for compositions that hold images, the RMG record streams over the test split."""
import math
import pytest, torch
import torch.nn.functional as F
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb import get_method
from czsl_nb.backbone import tiny_backbone
from czsl_nb.methods import LabelSpace
from czsl_nb.memory_bank import DynamicMemoryBank, entropy, lowest_entropy_slots, softmax_stats
from czsl_nb.sam import SAM, composed_probability
from czsl_nb.sparse_alignment import relative_modality_gap, sparse_alignment, token_text_similarity

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"],
                   [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
ALL_PAIRS = SPACE.ids([(a, o) for a in SPACE.attrs for o in SPACE.objs])

@pytest.fixture(scope="module")
def trained():
    "A SAM whose LoRA, prompts and VAC moved off their initialisation (so no path is trivially zero)."
    torch.manual_seed(0)
    m = SAM(tiny_backbone(), SPACE)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pair = torch.arange(8) % 4
    batch = {"image": images, "pair": pair, "attr": SPACE.seen_ids[pair, 0], "obj": SPACE.seen_ids[pair, 1],
             "index": torch.arange(8)}
    opt = torch.optim.SGD([p for g in m.param_groups(0.5) for p in g["params"]], lr=0.5)
    for stage in (1, 2):
        m.train(); m.stage = stage
        opt.zero_grad(); sum(m(batch).values()).backward(); opt.step()
    m.eval()
    with torch.no_grad(): tokens = m.image_features(images)
    return m, tokens, pair

def test_registered_with_paper_defaults():
    d = get_method("sam").defaults
    got = (d["lora_rank"], d["lora_alpha"], d["vac_depth"], d["alpha"], d["beta"], d["gamma"], d["memory_slots"])
    assert got == (16, 32, 3, 0.5, 0.5, 1.0, 3)
    assert (d["selection"], d["memory"], d["kl_direction"], d["memory_temperature"]) == \
        ("max", "dynamic", "vac||sa", 0.1)
    assert (d["sa_tokens"], d["sa_global_weight"]) == ("patches", 0.0)

def test_sparse_alignment_is_brute_force_max():
    g = torch.Generator().manual_seed(3)
    tokens, text = torch.randn(4, 7, 16, generator=g), torch.randn(5, 16, generator=g)
    brute = {k: torch.empty(4, 5) for k in ("all", "patches")}
    for b in range(4):
        for c in range(5):
            cos = [float(F.cosine_similarity(tokens[b, l], text[c], dim=0)) for l in range(7)]
            brute["all"][b, c], brute["patches"][b, c] = max(cos), max(cos[1:])
    for candidates in ("all", "patches"):
        for chunk in (1, 2, 1024):
            got = sparse_alignment(tokens, text, "max", candidates=candidates, chunk_size=chunk)
            assert torch.allclose(got, brute[candidates], atol=1e-6)
    assert torch.equal(sparse_alignment(tokens, text), sparse_alignment(tokens, text, candidates="patches"))
    assert not torch.allclose(sparse_alignment(tokens, text, "mean"), brute["patches"], atol=1e-3)

def test_chunked_max_has_the_gradients_of_the_full_similarity():
    "Training at C-GQA size: the max over tokens goes through the texts in chunks, forward and backward."
    g = torch.Generator().manual_seed(4)
    tokens, text = torch.randn(3, 9, 8, generator=g), torch.randn(11, 8, generator=g)
    weights = torch.randn(3, 11, generator=g)
    def grads(fn):
        a, b = tokens.clone().requires_grad_(), text.clone().requires_grad_()
        (fn(a, b) * weights).sum().backward()
        return a.grad, b.grad
    want = grads(lambda a, b: token_text_similarity(a, b)[:, 1:].amax(1))
    for chunk in (1, 4, 11):
        for got, ref in zip(grads(lambda a, b: sparse_alignment(a, b, chunk_size=chunk)), want):
            assert torch.allclose(got, ref, atol=1e-5)

def test_sa_scores_of_the_method_are_max_over_its_tokens(trained):
    m, tokens, _ = trained
    text = m.prompts(m.backbone, ALL_PAIRS)["pair"]
    unit_t, unit_v = F.normalize(text, dim=-1), F.normalize(tokens, dim=-1)
    over_patches = torch.stack([(unit_v[b, 1:] @ unit_t.T).max(0).values for b in range(len(tokens))])
    over_all = torch.stack([(unit_v[b] @ unit_t.T).max(0).values for b in range(len(tokens))])
    assert torch.allclose(m.sa_logits(tokens, {"pair": text})["pair"], m.scale * over_patches, atol=1e-5)
    every = SAM(tiny_backbone(), SPACE, sa_tokens="all")
    every.load_trainable_state_dict(m.trainable_state_dict()); every.eval()
    assert torch.allclose(every.sa_logits(tokens, {"pair": text})["pair"], m.scale * over_all, atol=1e-5)
    mixed = SAM(tiny_backbone(), SPACE, sa_global_weight=0.4)
    mixed.load_trainable_state_dict(m.trainable_state_dict()); mixed.eval()
    cls = unit_v[:, 0] @ unit_t.T
    want = m.scale * (0.6 * over_patches + 0.4 * cls)
    assert torch.allclose(mixed.sa_logits(tokens, {"pair": text})["pair"], want, atol=1e-4)

def test_memory_update_replaces_only_the_highest_entropy_slot():
    torch.manual_seed(0)
    slots = F.normalize(torch.randn(4, 3, 8), dim=-1)
    h = torch.tensor([[0.5, 1.2, 0.9], [0.1, 0.2, 0.3], [2.0, 2.0, 2.0], [math.inf, math.inf, math.inf]])
    every_filled = torch.ones(4, 3, dtype=torch.bool)
    bank = DynamicMemoryBank.from_text(torch.randn(4, 8), 3, slots.clone(), h.clone(), every_filled)
    # random offers: after each, at most one slot changed: argmax entropy of the predicted class
    for trial in range(40):
        probs = torch.softmax(torch.randn(4) * (trial % 5), -1)
        before_s, before_h = bank.dense()
        c, new_h = int(probs.argmax()), float(entropy(probs))
        j = int(before_h[c].argmax())
        replaced = bank.update(torch.randn(8), probs)
        assert replaced == (new_h < float(before_h[c, j]))
        after_s, after_h = bank.dense()
        changed = (after_s != before_s).any(-1) | (after_h != before_h)
        expected = torch.zeros(4, 3, dtype=torch.bool)
        if replaced: expected[c, j] = True
        assert torch.equal(changed, expected)
        if replaced: assert math.isclose(float(after_h[c, j]), new_h, rel_tol=1e-6)

class DenseBank:
    "The bank as first written: every composition stored as N slots (text copies included). The reference."
    def __init__(self, slots, slot_entropy): self.slots, self.slot_entropy = slots.clone(), slot_entropy.clone()
    def logits(self, query, scale, temperature=0.1):
        sims = torch.einsum("bd,cnd->bcn", F.normalize(query, dim=-1), self.slots)
        return scale * (torch.softmax(sims / temperature, dim=-1) * sims).sum(-1)
    def predict_then_update(self, query, probs, scale, temperature=0.1):
        out = []
        for feature, p in zip(query, probs):
            out.append(self.logits(feature[None], scale, temperature)[0])
            c, h = int(p.argmax()), float(entropy(p))
            j = int(self.slot_entropy[c].argmax())
            if h < float(self.slot_entropy[c, j]):
                self.slots[c, j], self.slot_entropy[c, j] = F.normalize(feature, dim=0), h
        return torch.stack(out)

def test_sparse_bank_scores_and_updates_as_the_dense_one():
    "Storing slots only for compositions that hold images changes no logit and no update, static or dynamic."
    g = torch.Generator().manual_seed(5)
    n_comp, n_slots, dim = 40, 3, 8
    text = torch.randn(n_comp, dim, generator=g)
    seen = torch.tensor([3, 7, 11, 20, 21, 39])
    seen_slots, seen_h = torch.randn(len(seen), n_slots, dim, generator=g), torch.rand(len(seen), n_slots, generator=g)
    filled = torch.rand(len(seen), n_slots, generator=g) > 0.3
    filled[1] = False  # a seen composition without a single correct training sample
    stream = F.normalize(torch.randn(64, dim, generator=g), dim=-1)
    probs = torch.softmax(12 * stream @ F.normalize(text, dim=-1).T, -1)
    for chunk in (1, 7, 1000):
        bank = DynamicMemoryBank.from_text(text, n_slots, seen_slots, seen_h, filled, seen, chunk_size=chunk)
        assert bank.n_rows == int(filled.any(-1).sum())  # stored: only compositions holding an image
        dense = DenseBank(*bank.dense())
        assert torch.allclose(bank.logits(stream, 50.0), dense.logits(stream, 50.0), atol=1e-5)
        streamed = bank.predict_then_update(stream, probs, 50.0)
        assert torch.allclose(streamed, dense.predict_then_update(stream, probs, 50.0), atol=1e-5)
        slots, slot_entropy = bank.dense()
        assert torch.equal(slot_entropy, dense.slot_entropy) and torch.allclose(slots, dense.slots, atol=1e-6)

def test_softmax_stats_streams_over_key_chunks():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(9, 16, generator=g), torch.randn(300, 16, generator=g)
    probs = (20.0 * q @ k.T).softmax(-1)
    for chunk in (1, 7, 4096):
        h, top = softmax_stats(q, k, 20.0, chunk)
        assert torch.allclose(h, entropy(probs), atol=1e-4) and torch.equal(top, probs.argmax(-1))

def test_seen_slots_are_lowest_entropy_correct_samples():
    feats = torch.randn(10, 4)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, -1])
    h = torch.tensor([0.4, 0.1, 0.3, 0.2, 0.5, 0.05, 0.6, 0.7, 0.8, 0.0])
    ok = torch.tensor([True, True, False, True, True, False, True, False, False, True])
    slots, slot_h, filled = lowest_entropy_slots(feats, labels, h, ok, n_classes=3, n_slots=2)
    assert torch.equal(slots[0], feats[[1, 3]]) and torch.equal(slots[1], feats[[4, 6]])
    assert not filled[2].any() and torch.isinf(slot_h[2]).all()

def test_memory_none_equals_fused_sa_vac(trained):
    m, tokens, pair = trained
    with torch.no_grad():
        text = m.prompts(m.backbone, ALL_PAIRS)
        fused = 0.5 * composed_probability(m.sa_logits(tokens, text), ALL_PAIRS) \
            + 0.5 * composed_probability(m.global_logits(m.vac(tokens), text), ALL_PAIRS)
    for mode in ("none", "static", "dynamic"):
        other = SAM(tiny_backbone(), SPACE, memory=mode)
        other.load_trainable_state_dict(m.trainable_state_dict()); other.eval()
        assert torch.allclose(other.scores(tokens, ALL_PAIRS), fused, atol=1e-6)  # no bank built: memory never matters
        other.build_memory(other.global_features(tokens), pair)
        if mode == "none": assert torch.allclose(other.scores(tokens, ALL_PAIRS), fused, atol=1e-6)

def test_online_updates_stay_in_the_scorer(trained):
    m, tokens, pair = trained
    m.build_memory(m.global_features(tokens), pair)
    assert m.shuffled_evaluation and bool(m.memory_built)
    stored = m.memory_slots.clone()
    first, second = m.scores(tokens, ALL_PAIRS), m.scores(tokens, ALL_PAIRS)
    assert torch.equal(first, second) and torch.equal(m.memory_slots, stored)
    static = SAM(tiny_backbone(), SPACE, memory="static")
    static.load_trainable_state_dict(m.trainable_state_dict()); static.eval()
    assert not static.shuffled_evaluation
    assert torch.allclose(first[0], static.scores(tokens, ALL_PAIRS)[0], atol=1e-6)
    flip = torch.arange(len(tokens) - 1, -1, -1)  # the static bank never changes: scores do not depend on the order
    assert torch.allclose(static.scores(tokens, ALL_PAIRS)[flip], static.scores(tokens[flip], ALL_PAIRS), atol=1e-6)
    bank_state = m.trainable_state_dict()
    assert torch.equal(bank_state["memory_slots"], stored)  # the bank is saved with the checkpoint

def test_memory_names_static_dynamic_and_old_aliases():
    "The committed runs' params.yaml say seen_only / online: they load as static / dynamic."
    assert SAM.resolve_hparams({"memory": "seen_only"})["memory"] == "static"
    assert SAM.resolve_hparams({"memory": "online"})["memory"] == "dynamic"
    assert SAM(tiny_backbone(), SPACE, memory="online").shuffled_evaluation
    assert not SAM(tiny_backbone(), SPACE, memory="seen_only").shuffled_evaluation

def test_stages_reach_the_right_parameters():
    torch.manual_seed(0)
    m = SAM(tiny_backbone(), SPACE)
    batch = {"image": torch.rand(4, 3, 32, 32), "pair": torch.arange(4)}
    batch.update(attr=SPACE.seen_ids[:, 0], obj=SPACE.seen_ids[:, 1], index=torch.arange(4))
    got = {}
    for stage in (1, 2):
        m.zero_grad(set_to_none=True); m.train(); m.stage = stage
        terms = m(batch)
        assert set(terms) == {"base_loss", "vac_loss", "kl_loss"}
        sum(terms.values()).backward()
        got[stage] = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in n for n in got[1]) and any(n.startswith("prompts.") for n in got[1])
    assert not any(n.startswith("vac.") for n in got[1]) and got[2] and all(n.startswith("vac.") for n in got[2])
    m.on_epoch_start(1, 4); assert m.stage == 1
    m.on_epoch_start(3, 4); assert m.stage == 2
    names = [n for n, p in m.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    assert names and all(n.startswith("backbone.model.visual.") and "lora_" in n for n in names)

def test_ablation_switches():
    base = SAM(tiny_backbone(), SPACE, use_sa=False, use_vac=False, use_kl=False, memory="none")
    assert base.vac is None and set(base(_images_batch())) == {"base_loss"}
    for selection in ("attention", "linear", "mean"):
        sa_only = SAM(tiny_backbone(), SPACE, use_vac=False, use_kl=False, memory="none", selection=selection)
        assert torch.isfinite(sa_only.eval().scores(sa_only.image_features(torch.rand(2, 3, 32, 32)), ALL_PAIRS)).all()
    for bad in ({"use_vac": False}, {"use_vac": False, "use_kl": False}, {"selection": "median"}, {"memory": "always"},
                {"sa_tokens": "cls"}, {"sa_global_weight": -0.1}):
        with pytest.raises(ValueError): SAM(tiny_backbone(), SPACE, **bad)

def _images_batch():
    pair = torch.arange(4)
    return {"image": torch.rand(4, 3, 32, 32), "pair": pair, "attr": SPACE.seen_ids[:, 0], "obj": SPACE.seen_ids[:, 1],
            "index": pair}

def test_relative_modality_gap_shrinks_as_images_move_to_text():
    text = F.normalize(torch.randn(30, 16), dim=-1)
    offset = torch.randn(16)
    gaps = [relative_modality_gap(text + s * offset, text) for s in (2.0, 1.0, 0.3, 0.0)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-6

def _context(run_dir, seed):
    "What the engine hands a hook, for a run in `run_dir` (only what init_from reads)."
    from czsl_nb.learner import FitContext, TrainConfig
    return FitContext(TrainConfig(seed=seed, backbone="tiny"), run_dir, None, None, None, None, None)

def test_init_from_loads_a_run_and_checks_its_parameters(trained, tmp_path):
    ("Evaluation-only runs (other memory modes) start from another run's best checkpoint; "
     "training parameters must match.")
    import yaml
    m, tokens, _ = trained
    source = tmp_path / "sam-full-s3"; source.mkdir()
    torch.save(m.trainable_state_dict(), source / "checkpoint_best.pt")
    params = {"method": "sam", "dataset": "synthetic", "backbone": "tiny", "pretrained": "",
              "method_params": dict(m.hparams)}
    (source / "params.yaml").write_text(yaml.safe_dump(params))
    learner = _context(tmp_path / "sam-kl-s3", seed=3)
    fresh = SAM(tiny_backbone(), SPACE, memory="seen_only", init_from="sam-full-s{seed}")
    fresh.on_fit_start(learner); fresh.eval()
    text = m.prompts(m.backbone, ALL_PAIRS)
    assert torch.allclose(fresh.prompts(fresh.backbone, ALL_PAIRS)["pair"], text["pair"], atol=1e-6)
    ones = torch.ones(1, 3, 32, 32)
    assert torch.allclose(fresh.image_features(ones), m.image_features(ones), atol=1e-6)
    assert not bool(fresh.memory_built)  # the bank is rebuilt for this run's own mode
    with pytest.raises(ValueError, match="differs"):
        SAM(tiny_backbone(), SPACE, alpha=0.3, init_from="sam-full-s{seed}").on_fit_start(learner)

def test_vac_only_continues_a_stage1_run(trained, tmp_path):
    "schedule='vac_only' loads an SA run's LoRA and prompts, starts VAC fresh and trains stage II only."
    import yaml
    torch.manual_seed(0)
    sa = SAM(tiny_backbone(), SPACE, use_vac=False, use_kl=False, memory="none")
    sa.load_trainable_state_dict({k: v for k, v in trained[0].trainable_state_dict().items()
                                  if not k.startswith(("vac.", "memory_"))}
                                 | {k: v for k, v in sa.state_dict().items() if k.startswith("memory_")})
    source = tmp_path / "sam-sa-s0"; source.mkdir()
    torch.save(sa.trainable_state_dict(), source / "checkpoint_best.pt")
    (source / "params.yaml").write_text(yaml.safe_dump({"method": "sam", "dataset": "synthetic", "backbone": "tiny",
                                                        "pretrained": "", "method_params": dict(sa.hparams)}))
    learner = _context(tmp_path / "sam-full-s0", seed=0)
    m = SAM(tiny_backbone(), SPACE, schedule="vac_only", init_from="sam-sa-s{seed}")
    vac_before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("vac.")}
    m.on_fit_start(learner); m.on_epoch_start(1, 1)
    assert m.stage == 2 and all(torch.equal(m.state_dict()[k], v) for k, v in vac_before.items())
    assert torch.equal(m.prompts.vocab.weight, sa.prompts.vocab.weight)
    with pytest.raises(ValueError, match="init_from"): SAM(tiny_backbone(), SPACE, schedule="vac_only")

def test_evaluation_run_keeps_the_trained_vac(trained, tmp_path):
    "An epochs=0 evaluation of a vac_only run (another memory mode) loads its trained VAC, not a fresh one."
    import yaml
    m = trained[0]
    full = SAM(tiny_backbone(), SPACE, schedule="vac_only", init_from="sam-sa-s{seed}")
    full.load_trainable_state_dict(m.trainable_state_dict())
    source = tmp_path / "sam-full-s1"; source.mkdir()
    torch.save(full.trainable_state_dict(), source / "checkpoint_best.pt")
    (source / "params.yaml").write_text(yaml.safe_dump({"method": "sam", "dataset": "synthetic", "backbone": "tiny",
                                                        "pretrained": "", "method_params": dict(full.hparams)}))
    learner = _context(tmp_path / "sam-kl-s1", seed=1)
    kl = SAM(tiny_backbone(), SPACE, schedule="vac_only", init_from="sam-full-s{seed}", memory="none")
    kl.on_fit_start(learner)
    assert torch.equal(kl.vac.query, m.vac.query)

def test_stage2_teacher_and_targets_are_dropout_free():
    "Stage II trains VAC against the frozen stage-I model: the same KL target and VAC loss at every call."
    torch.manual_seed(0)
    m = SAM(tiny_backbone(), SPACE, vac_dropout=0.0, lora_dropout=0.3).train()
    m.stage = 2
    batch = _images_batch()
    first, second = m(batch), m(batch)
    assert all(torch.equal(first[k], second[k]) for k in first)
    m.stage = 1
    assert not torch.equal(m(batch)["base_loss"], m(batch)["base_loss"])  # stage I: vocabulary and LoRA dropout

def test_lora_dropout_trains_and_leaves_evaluation_alone():
    torch.manual_seed(0)
    m = SAM(tiny_backbone(), SPACE, lora_dropout=0.2)
    with torch.no_grad():
        for block in m.backbone.model.visual.transformer.resblocks: block.attn.lora_B["default"].weight.normal_(std=0.5)
    plain = SAM(tiny_backbone(), SPACE)
    plain.load_trainable_state_dict(m.trainable_state_dict())
    images = torch.rand(3, 3, 32, 32)
    m.train(); m.stage = 1
    assert not torch.allclose(m.image_features(images), m.image_features(images))
    m.zero_grad(); sum(m(_images_batch()).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_A" in n)
    assert torch.allclose(m.eval().image_features(images), plain.eval().image_features(images), atol=1e-5)
    with torch.no_grad():  # the dropout-free path is peft's own: with p -> identity it equals the parametrisation
        from czsl_nb.sam import lora_attention
        block, x = m.backbone.model.visual.transformer.resblocks[0], torch.randn(2, 17, 64)
        assert torch.allclose(lora_attention(block.attn, x, torch.nn.Identity()), block.attention(x), atol=1e-5)

def test_linear_selection_learns_one_weight_per_patch():
    m = SAM(tiny_backbone(), SPACE, selection="linear", use_vac=False, use_kl=False, memory="none")
    assert m.sa_weights.shape == (16,) and torch.allclose(m.sa_weights.sum(), torch.tensor(1.0))
    m.train(); sum(m(_images_batch()).values()).backward()
    assert m.sa_weights.grad is not None and m.sa_weights.grad.abs().sum() > 0
    assert "sa_weights" in m.trainable_state_dict()

def test_pair_chunks_change_no_score_bank_or_gap(trained):
    m, tokens, pair = trained
    m.build_memory(m.global_features(tokens), pair)
    got = {}
    for chunk in (1, 2, 10**9):
        c = SAM(tiny_backbone(), SPACE)
        c.load_trainable_state_dict(m.trainable_state_dict()); c.eval(); c.pair_chunk_size = chunk
        text = c.text_features(ALL_PAIRS)["pair"]
        bank = c.memory_bank(text, ALL_PAIRS)
        assert bank.n_rows == int(c.memory_filled.any(-1).sum()) and len(bank.slots) <= len(SPACE.seen_pairs)
        got[chunk] = (c.scores(tokens, ALL_PAIRS), *bank.dense(),
                      torch.tensor(list(c.modality_gaps(tokens, SPACE.seen_ids[pair], batch_size=3).values())))
    for chunk in (1, 2):
        for a, b in zip(got[chunk], got[10**9]):
            assert torch.allclose(a.nan_to_num(posinf=9.0), b.nan_to_num(posinf=9.0), atol=1e-5)

def test_init_from_a_run_made_before_sa_tokens(trained, tmp_path):
    "A stage-I run written before sa_tokens existed selected among all tokens: it continues only as sa_tokens='all'."
    import yaml
    sa = SAM(tiny_backbone(), SPACE, use_vac=False, use_kl=False, memory="none", sa_tokens="all")
    source = tmp_path / "sam-old-s0"; source.mkdir()
    torch.save(sa.trainable_state_dict(), source / "checkpoint_best.pt")
    old = {k: v for k, v in sa.hparams.items() if k not in ("sa_tokens", "sa_global_weight")}
    (source / "params.yaml").write_text(yaml.safe_dump({"method": "sam", "dataset": "synthetic", "backbone": "tiny",
                                                        "pretrained": "", **old, "memory": "none"}))
    learner = _context(tmp_path / "next", seed=0)
    SAM(tiny_backbone(), SPACE, schedule="vac_only", init_from="sam-old-s{seed}", sa_tokens="all").on_fit_start(learner)
    with pytest.raises(ValueError, match="sa_tokens"):
        SAM(tiny_backbone(), SPACE, schedule="vac_only", init_from="sam-old-s{seed}").on_fit_start(learner)

@pytest.mark.filterwarnings("ignore:.*marked NA")
def test_fit_writes_the_streamed_gap_record(tmp_path):
    "End to end on the toy data: rmg.json (streamed over test batches) equals the record of all test tokens at once."
    import json
    from czsl_nb.core import cache_dir
    from czsl_nb.data import make_toy_dataset
    from czsl_nb.learner import TrainConfig, launch, load_run
    tiny_backbone()
    toy = make_toy_dataset(tmp_path / "toy")
    tiny = str(cache_dir() / "configs" / "tiny-clip.json")
    cfg = TrainConfig(method="sam", dataset=str(toy), backbone=tiny, epochs=2, batch_size=4, eval_batch_size=3, lr=1e-2,
                      seed=0, run="sam-toy", pair_chunk_size=2)
    launch(cfg, {"memory": "static"}, runs_root=tmp_path / "runs")
    record = json.loads((tmp_path / "runs" / "sam-toy" / "rmg.json").read_text())["test"]
    assert set(record) == {"rmg_cls", "rmg_sa", "rmg_vac", "sa_cls_share", "sa_patch_share"}
    assert record["sa_cls_share"] == 0.0 and record["sa_patch_share"] == 1.0 and record["rmg_sa"] != record["rmg_cls"]
    learner = load_run(tmp_path / "runs" / "sam-toy")
    tokens, labels = learner.split_outputs("test")
    labels = torch.stack([labels["attr"], labels["obj"]], 1)
    whole = learner.method.modality_gaps(tokens, labels, batch_size=len(tokens))
    assert whole == pytest.approx(record, abs=1e-6)
