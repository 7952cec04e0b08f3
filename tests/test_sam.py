"""SAM's invariants (issue 5): sparse alignment equals a brute-force max over tokens; a memory update
replaces only the highest-entropy slot of the predicted composition and only with a lower entropy;
`memory="none"` leaves scores identical to the fused SA + VAC path; plus staging, LoRA placement and
the engine hooks (bank built in on_fit_end, test-time updates kept inside the scorer)."""
import math
import pytest, torch
import torch.nn.functional as F
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb import get_method
from czsl_nb.backbone import tiny_backbone
from czsl_nb.methods import LabelSpace
from czsl_nb.memory_bank import DynamicMemoryBank, entropy, lowest_entropy_slots
from czsl_nb.sam import SAM, composed_probability
from czsl_nb.sparse_alignment import relative_modality_gap, sparse_alignment

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"], [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
ALL_PAIRS = SPACE.ids([(a, o) for a in SPACE.attrs for o in SPACE.objs])

@pytest.fixture(scope="module")
def trained():
    "A SAM whose LoRA, prompts and VAC moved off their initialisation (so no path is trivially zero)."
    torch.manual_seed(0)
    m = SAM(tiny_backbone(), SPACE)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pair = torch.arange(8) % 4
    batch = {"image": images, "pair": pair, "attr": SPACE.seen_ids[pair, 0], "obj": SPACE.seen_ids[pair, 1], "index": torch.arange(8)}
    opt = torch.optim.SGD([p for g in m.param_groups(0.5) for p in g["params"]], lr=0.5)
    for stage in (1, 2):
        m.train(); m.stage = stage
        opt.zero_grad(); sum(m(batch).values()).backward(); opt.step()
    m.eval()
    with torch.no_grad(): tokens = m.image_features(images)
    return m, tokens, pair

def test_registered_with_paper_defaults():
    d = get_method("sam").defaults
    assert (d["lora_rank"], d["lora_alpha"], d["vac_depth"], d["alpha"], d["beta"], d["gamma"], d["memory_slots"]) == (16, 32, 3, 0.5, 0.5, 1.0, 3)
    assert (d["selection"], d["memory"], d["kl_direction"], d["memory_temperature"]) == ("max", "online", "vac||sa", 0.1)

def test_sparse_alignment_is_brute_force_max():
    g = torch.Generator().manual_seed(3)
    tokens, text = torch.randn(4, 7, 16, generator=g), torch.randn(5, 16, generator=g)
    brute = torch.empty(4, 5)
    for b in range(4):
        for c in range(5):
            brute[b, c] = max(float(F.cosine_similarity(tokens[b, l], text[c], dim=0)) for l in range(7))
    assert torch.allclose(sparse_alignment(tokens, text, "max"), brute, atol=1e-6)
    assert not torch.allclose(sparse_alignment(tokens, text, "mean"), brute, atol=1e-3)

def test_sa_scores_of_the_method_are_max_over_its_tokens(trained):
    m, tokens, _ = trained
    text = m.prompts(m.backbone, ALL_PAIRS)["pair"]
    unit_t, unit_v = F.normalize(text, dim=-1), F.normalize(tokens, dim=-1)
    brute = torch.stack([(unit_v[b] @ unit_t.T).max(0).values for b in range(len(tokens))])
    assert torch.allclose(m.sa_logits(tokens, {"pair": text})["pair"], m.scale * brute, atol=1e-5)

def test_memory_update_replaces_only_the_highest_entropy_slot():
    torch.manual_seed(0)
    slots = F.normalize(torch.randn(4, 3, 8), dim=-1)
    h = torch.tensor([[0.5, 1.2, 0.9], [0.1, 0.2, 0.3], [2.0, 2.0, 2.0], [math.inf, math.inf, math.inf]])
    bank = DynamicMemoryBank(slots.clone(), h.clone())
    for trial in range(40):  # random offers: after each, at most one slot changed: argmax entropy of the predicted class
        probs = torch.softmax(torch.randn(4) * (trial % 5), -1)
        before_s, before_h = bank.slots.clone(), bank.slot_entropy.clone()
        c, new_h = int(probs.argmax()), float(entropy(probs))
        j = int(before_h[c].argmax())
        replaced = bank.update(torch.randn(8), probs)
        assert replaced == (new_h < float(before_h[c, j]))
        changed = (bank.slots != before_s).any(-1) | (bank.slot_entropy != before_h)
        expected = torch.zeros(4, 3, dtype=torch.bool)
        if replaced: expected[c, j] = True
        assert torch.equal(changed, expected)
        if replaced: assert math.isclose(float(bank.slot_entropy[c, j]), new_h, rel_tol=1e-6)

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
    for mode in ("none", "seen_only", "online"):
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
    seen_only = SAM(tiny_backbone(), SPACE, memory="seen_only")
    seen_only.load_trainable_state_dict(m.trainable_state_dict()); seen_only.eval()
    assert not seen_only.shuffled_evaluation
    assert torch.allclose(first[0], seen_only.scores(tokens, ALL_PAIRS)[0], atol=1e-6)
    bank_state = m.trainable_state_dict()
    assert torch.equal(bank_state["memory_slots"], stored)  # the bank is saved with the checkpoint

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
    sa_only = SAM(tiny_backbone(), SPACE, use_vac=False, use_kl=False, memory="none", selection="attention")
    assert torch.isfinite(sa_only.eval().scores(sa_only.image_features(torch.rand(2, 3, 32, 32)), ALL_PAIRS)).all()
    for bad in ({"use_vac": False}, {"use_vac": False, "use_kl": False}, {"selection": "median"}, {"memory": "always"}):
        with pytest.raises(ValueError): SAM(tiny_backbone(), SPACE, **bad)

def _images_batch():
    pair = torch.arange(4)
    return {"image": torch.rand(4, 3, 32, 32), "pair": pair, "attr": SPACE.seen_ids[:, 0], "obj": SPACE.seen_ids[:, 1], "index": pair}

def test_relative_modality_gap_shrinks_as_images_move_to_text():
    text = F.normalize(torch.randn(30, 16), dim=-1)
    offset = torch.randn(16)
    gaps = [relative_modality_gap(text + s * offset, text) for s in (2.0, 1.0, 0.3, 0.0)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-6

def test_init_from_loads_a_run_and_checks_its_parameters(trained, tmp_path):
    "Evaluation-only runs (other memory modes) start from another run's best checkpoint; training parameters must match."
    from types import SimpleNamespace
    import yaml
    m, tokens, _ = trained
    source = tmp_path / "sam-full-s3"; source.mkdir()
    torch.save(m.trainable_state_dict(), source / "checkpoint_best.pt")
    params = {"method": "sam", "dataset": "synthetic", "backbone": "tiny", "pretrained": "", "method_params": dict(m.hparams)}
    (source / "params.yaml").write_text(yaml.safe_dump(params))
    learner = SimpleNamespace(run_dir=tmp_path / "sam-kl-s3", cfg=SimpleNamespace(seed=3, dataset="synthetic", backbone="tiny", pretrained=""))
    fresh = SAM(tiny_backbone(), SPACE, memory="seen_only", init_from="sam-full-s{seed}")
    fresh.on_fit_start(learner); fresh.eval()
    text = m.prompts(m.backbone, ALL_PAIRS)
    assert torch.allclose(fresh.prompts(fresh.backbone, ALL_PAIRS)["pair"], text["pair"], atol=1e-6)
    assert torch.allclose(fresh.image_features(torch.ones(1, 3, 32, 32)), m.image_features(torch.ones(1, 3, 32, 32)), atol=1e-6)
    assert not bool(fresh.memory_built)  # the bank is rebuilt for this run's own mode
    with pytest.raises(ValueError, match="differs"):
        SAM(tiny_backbone(), SPACE, alpha=0.3, init_from="sam-full-s{seed}").on_fit_start(learner)

def test_vac_only_continues_a_stage1_run(trained, tmp_path):
    "schedule='vac_only' loads an SA run's LoRA and prompts, starts VAC fresh and trains stage II only."
    import yaml
    from types import SimpleNamespace
    torch.manual_seed(0)
    sa = SAM(tiny_backbone(), SPACE, use_vac=False, use_kl=False, memory="none")
    sa.load_trainable_state_dict({k: v for k, v in trained[0].trainable_state_dict().items() if not k.startswith(("vac.", "memory_"))}
                                 | {k: v for k, v in sa.state_dict().items() if k.startswith("memory_")})
    source = tmp_path / "sam-sa-s0"; source.mkdir()
    torch.save(sa.trainable_state_dict(), source / "checkpoint_best.pt")
    (source / "params.yaml").write_text(yaml.safe_dump({"method": "sam", "dataset": "synthetic", "backbone": "tiny", "pretrained": "",
                                                        "method_params": dict(sa.hparams)}))
    learner = SimpleNamespace(run_dir=tmp_path / "sam-full-s0", cfg=SimpleNamespace(seed=0, dataset="synthetic", backbone="tiny", pretrained=""))
    m = SAM(tiny_backbone(), SPACE, schedule="vac_only", init_from="sam-sa-s{seed}")
    vac_before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("vac.")}
    m.on_fit_start(learner); m.on_epoch_start(1, 1)
    assert m.stage == 2 and all(torch.equal(m.state_dict()[k], v) for k, v in vac_before.items())
    assert torch.equal(m.prompts.vocab.weight, sa.prompts.vocab.weight)
    with pytest.raises(ValueError, match="init_from"): SAM(tiny_backbone(), SPACE, schedule="vac_only")

def test_evaluation_run_keeps_the_trained_vac(trained, tmp_path):
    "An epochs=0 evaluation of a vac_only run (another memory mode) loads its trained VAC, not a fresh one."
    import yaml
    from types import SimpleNamespace
    m = trained[0]
    full = SAM(tiny_backbone(), SPACE, schedule="vac_only", init_from="sam-sa-s{seed}")
    full.load_trainable_state_dict(m.trainable_state_dict())
    source = tmp_path / "sam-full-s1"; source.mkdir()
    torch.save(full.trainable_state_dict(), source / "checkpoint_best.pt")
    (source / "params.yaml").write_text(yaml.safe_dump({"method": "sam", "dataset": "synthetic", "backbone": "tiny", "pretrained": "",
                                                        "method_params": dict(full.hparams)}))
    learner = SimpleNamespace(run_dir=tmp_path / "sam-kl-s1", cfg=SimpleNamespace(seed=1, dataset="synthetic", backbone="tiny", pretrained=""))
    kl = SAM(tiny_backbone(), SPACE, schedule="vac_only", init_from="sam-full-s{seed}", memory="none")
    kl.on_fit_start(learner)
    assert torch.equal(kl.vac.query, m.vac.query)
