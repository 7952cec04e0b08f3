"""TRIDENT and its components: attribute smoothing invariants, the auxiliary-attribute and word-embedding
providers (formats and errors), the engine's partner sampling, the official-code switch, one run, auxiliary
attributes chosen from training images (kept by a reload), and the pair axis in chunks."""
import json
import pytest, torch
import torch.nn.functional as F
import czsl_nb.all  # noqa: F401
from czsl_nb.backbone import tiny_backbone
from czsl_nb.core import cache_dir
from czsl_nb.data import make_toy_dataset
from czsl_nb.learner import Learner, PartnerSplit, TrainConfig, FeatureSplit, prepare_run_dir, run_params
from czsl_nb.methods import LabelSpace
from czsl_nb.smoothing import (ClipNeighbourAux, JsonlAuxFile, aux_index_table, smoothed_cross_entropy,
                               smoothed_targets, write_llm_prompts)
from czsl_nb.word_embeddings import ClipTextHidden, ClipTokenEmbeddings, GloveFormatFile
from czsl_nb.trident import Trident
from czsl_nb.trident_features import pooled_from_hidden

pytestmark = pytest.mark.filterwarnings("ignore:.*marked NA")
SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"],
                   [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
SMALL = dict(local_features=3, global_features=2, emb_dim=16)

@pytest.fixture(scope="module")
def bb(): return tiny_backbone()

# -- attribute smoothing --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_alpha_zero_is_cross_entropy_and_targets_sum_to_one(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, 9, generator=g) * 5
    target, aux = torch.randint(9, (16,), generator=g), torch.randint(9, (16, 3), generator=g)
    assert torch.allclose(smoothed_cross_entropy(logits, target, aux, 0.0), F.cross_entropy(logits, target), atol=1e-6)
    for alpha in (0.0, 0.03, 0.09, 0.5, 1.0):
        q = smoothed_targets(target, aux, 9, alpha)
        assert torch.allclose(q.sum(1), torch.ones(16)) and (q >= 0).all()
        assert torch.allclose(q[torch.arange(16), target] >= 1 - alpha - 1e-6, torch.ones(16, dtype=torch.bool))
    # the soft-target CE moves toward the auxiliary classes: raising an auxiliary logit lowers the loss when alpha > 0
    bumped = logits.clone(); bumped[torch.arange(16), aux[:, 0]] += 1.0
    same = aux[:, 0] == target
    lower = (smoothed_cross_entropy(bumped, target, aux, 0.5, "none")
             < smoothed_cross_entropy(logits, target, aux, 0.5, "none"))
    assert lower[~same].float().mean() > 0.5

def test_alpha_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="must lie in"):
        smoothed_targets(torch.tensor([0]), torch.tensor([[1]]), 3, 1.5)

# -- providers --------------------------------------------------------------------------------------
def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "aux_label.jsonl"
    path.write_text('{"red ball": ["shiny", "round", "bright"]}\n{"wet dog": "soaked, shaggy, dripping"}\n["x"]\n')
    with pytest.raises(ValueError, match=r"aux_label.jsonl, line 3: expected one object"):
        JsonlAuxFile(path)
    path.write_text('{"red ball": ["shiny", "round", "bright"]}\n{"wet dog": "soaked, shaggy, dripping"}\n')
    got = JsonlAuxFile(path).get([("red", "ball"), ("wet", "dog")], 3)
    assert got[("wet", "dog")] == ["soaked", "shaggy", "dripping"]
    with pytest.raises(ValueError, match="no auxiliary attributes for 1 pair"):
        JsonlAuxFile(path).get([("old", "ball")], 3)

def test_prompt_file_round_trip(tmp_path):
    out = write_llm_prompts(SPACE.seen_pairs, tmp_path / "prompts.jsonl", t=3)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [next(iter(r)) for r in rows] == [f"{a} {o}" for a, o in SPACE.seen_pairs]
    assert all("three adjectives" in next(iter(r.values())) for r in rows)

def test_clip_neighbours_are_the_nearest_other_attributes(bb):
    attrs = ["red", "wet", "old", "new", "dry", "big"]
    aux = ClipNeighbourAux(bb, attrs).get([("red", "ball"), ("old", "dog")], 3)
    feats = F.normalize(bb.encode_text([f"a photo of {a} dog" for a in attrs]), dim=-1)
    sims = feats @ feats[2]; sims[2] = -2
    assert aux[("old", "dog")] == [attrs[i] for i in sims.topk(3).indices.tolist()]
    assert "red" not in aux[("red", "ball")]

def test_aux_words_extend_the_vocabulary():
    table, new = aux_index_table([("red", "ball")], {("red", "ball"): ["shiny", "wet", "dog"]}, SPACE.attrs, SPACE.objs)
    assert new == ["shiny"] and table.tolist() == [[5, 1, 4]]

def test_word_embedding_providers(bb, tmp_path):
    (tmp_path / "w.txt").write_text("red 1 2\nball 3 4\n")
    glove = GloveFormatFile(tmp_path / "w.txt")
    assert glove.embed(["red_ball"]).tolist() == [[2.0, 3.0]]
    (tmp_path / "bad.txt").write_text("red 1 2\nball 3\n")
    with pytest.raises(ValueError, match="bad.txt, line 2"):
        GloveFormatFile(tmp_path / "bad.txt")
    hidden, vocab = ClipTextHidden(bb).embed(["red", "ball"]), ClipTokenEmbeddings(bb).embed(["red", "ball"])
    assert hidden.shape == vocab.shape == (2, bb.text_width) and not torch.allclose(hidden, vocab)

# -- the engine's partner sampler -------------------------------------------------------------------
def _check_partners(item, labels):
    i = item["index"]
    for key, other in (("attr", "obj"), ("obj", "attr")):
        partner, mask = item[f"{key}_partner"], float(item[f"{key}_partner_mask"])
        exists = any(labels[key][j] == labels[key][i] and labels[other][j] != labels[other][i]
                     for j in range(len(labels[key])))
        assert mask == float(exists)
        if exists:
            assert partner[key] == item[key] and partner[other] != item[other] and partner["index"] != i
        else:
            assert partner["index"] == i

def test_partner_sampler_shares_the_label_on_random_labels():
    g = torch.Generator().manual_seed(0)
    attr, obj = torch.randint(4, (60,), generator=g), torch.randint(5, (60,), generator=g)
    base = FeatureSplit(torch.randn(60, 3), {"attr": attr, "obj": obj, "pair": torch.zeros(60, dtype=torch.long)})
    ds = PartnerSplit(base, attr, obj, ("attr", "obj"), seed=0)
    labels = {"attr": attr.tolist(), "obj": obj.tolist()}
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        for i in range(len(ds)): _check_partners(ds[i], labels)

def test_learner_gives_trident_real_partners_and_trains(tmp_path):
    toy = make_toy_dataset(tmp_path / "toy")
    tiny_backbone()
    cfg = TrainConfig(method="trident", dataset=str(toy), backbone=str(cache_dir() / "configs" / "tiny-clip.json"),
                      epochs=1, batch_size=4, lr=1e-3, seed=0, run="t")
    params = dict(SMALL)
    learner = Learner(cfg, prepare_run_dir(cfg, run_params(cfg, params), tmp_path / "runs"), params)
    ds = learner.loaders["train"].dataset
    assert isinstance(ds, PartnerSplit)
    labels = {k: v.tolist() for k, v in zip(("attr", "obj"), learner.data.labels("train"))}
    masks = {"attr": [], "obj": []}
    for i in range(len(ds)):
        item = ds[i]; _check_partners(item, labels)
        for k in masks: masks[k].append(float(item[f"{k}_partner_mask"]))
    assert 0 < sum(masks["obj"]) < len(ds)  # toy data: 'car' has two attributes, 'apple' one
    batch = next(iter(learner.loaders["train"]))
    assert batch["attr_partner"]["features"].shape == batch["features"].shape
    metrics = learner.fit()
    assert 0.0 <= metrics["test"]["closed"]["auc"] <= 1.0

# -- the method -------------------------------------------------------------------------------------
def _batch(model, n=6, masks=None):
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pair = torch.arange(n) % len(SPACE.seen_pairs)
    ids = SPACE.seen_ids[pair]
    batch = {"features": model.image_features(images), "attr": ids[:, 0], "obj": ids[:, 1], "pair": pair,
             "index": torch.arange(n)}
    for key, (same, other) in {"attr": (0, 1), "obj": (1, 0)}.items():
        partner = [next((j for j in range(n) if ids[j, same] == ids[i, same] and ids[j, other] != ids[i, other]), i)
                   for i in range(n)]
        batch[f"{key}_partner"] = {k: v[partner] for k, v in batch.items() if not k.endswith("partner")}
        batch[f"{key}_partner_mask"] = (torch.tensor([float(j != i) for i, j in enumerate(partner)])
                                        if masks is None else masks)
    return batch

def test_smoothing_reads_the_auxiliary_table_only_when_alpha_is_positive(bb):
    for alpha, changes in ((0.0, False), (0.09, True)):
        torch.manual_seed(0)
        m = Trident(bb, SPACE, alpha=alpha, **SMALL).eval()
        batch = _batch(m)
        before = m(batch)["dis_loss"]
        m.aux_table = (m.aux_table + 1) % len(m.words)
        assert (not torch.allclose(before, m(batch)["dis_loss"])) == changes

def test_images_without_partners_add_no_disentanglement_loss(bb):
    torch.manual_seed(0)
    m = Trident(bb, SPACE, **SMALL).train()
    terms = m(_batch(m, masks=torch.zeros(6)))
    assert terms["dis_loss"] == 0 and terms["pair_loss"] > 0

@pytest.mark.parametrize("freeze", [False, True])
def test_local_aggregators_train_unless_frozen_as_in_the_official_code(bb, freeze):
    torch.manual_seed(0)
    m = Trident(bb, SPACE, freeze_local_aggregators=freeze, **SMALL).train()
    before = [p.detach().clone() for p in m.faa.aggregators.parameters()]
    opt = torch.optim.Adam(m.param_groups(1e-2))
    sum(m(_batch(m)).values()).backward(); opt.step()
    moved = any(not torch.equal(a, b) for a, b in zip(before, m.faa.aggregators.parameters()))
    assert moved != freeze
    assert ("faa.aggregators.0.0.weight" in m.trainable_state_dict())  # saved either way (the official code loses them)

def test_ablation_switches_change_the_slots(bb):
    torch.manual_seed(0)
    feats = Trident(bb, SPACE, **SMALL).image_features(torch.rand(2, 3, 32, 32))
    for kw, shape in (({}, (3, 2)), ({"use_faa": False}, (1, 2)), ({"use_masks": False}, (3, 1))):
        local, glob = Trident(bb, SPACE, **{**SMALL, **kw}).eval().slots(feats)
        assert (local.shape[1], glob.shape[1]) == shape
    vocab = Trident(bb, SPACE, word_embeddings="clip_vocab", **SMALL)
    text = Trident(bb, SPACE, **SMALL)
    assert not torch.allclose(vocab.word_embedding.weight, text.word_embedding.weight)

# -- auxiliary attributes chosen from the training images (the default, clip_images) --------------------------------
def _train_images(toy_root, bb):
    "CLIP image features of the toy training images (evaluation transform, sample order) and their seen-pair index."
    from czsl_nb.data import CompositionData, load_image
    data = CompositionData(toy_root, check_images="none")
    samples, seen = data.samples["train"], list(data.train_pairs)
    with torch.no_grad():
        feats = bb.encode_image(torch.stack([bb.preprocess(load_image(data.image_path(s))) for s in samples]))
    return feats, torch.tensor([seen.index(s.pair) for s in samples])

def test_learner_chooses_aux_attributes_from_training_images_and_a_reload_keeps_them(tmp_path):
    from czsl_nb.learner import load_run
    toy = make_toy_dataset(tmp_path / "toy")
    bb = tiny_backbone()
    cfg = TrainConfig(method="trident", dataset=str(toy), backbone=str(cache_dir() / "configs" / "tiny-clip.json"),
                      epochs=1, batch_size=4, lr=1e-3, seed=0, run="aux", pair_chunk_size=2)
    learner = Learner(cfg, prepare_run_dir(cfg, run_params(cfg, dict(SMALL)), tmp_path / "runs"), dict(SMALL))
    method = learner.method
    assert method.hparams["aux_attributes"] == "clip_images"
    assert (method.aux_table == -1).all()  # nothing chosen before the hook
    # what on_fit_start reads: CLIP's image feature of every training image, rebuilt from the cached layer
    layer = method.hparams["layer"]
    pooled, labels = learner.split_outputs("train", lambda t: pooled_from_hidden(method.backbone, t, layer))
    feats, pair = _train_images(toy, bb)
    assert torch.allclose(pooled, feats, atol=5e-3) and torch.equal(labels["pair"], pair)  # float16 cache
    learner.fit()
    chosen = method.aux_table.clone()
    assert (chosen >= 0).all() and (chosen < len(method.space.attrs)).all()  # closed vocabulary: attributes only
    expected = Trident(bb, method.space, **SMALL)
    expected.choose_aux_attributes(pooled, labels["pair"])
    assert torch.equal(expected.aux_table, chosen)
    assert "aux_table" in method.trainable_state_dict()
    reloaded = load_run(tmp_path / "runs" / "aux")
    assert torch.equal(reloaded.method.aux_table.cpu(), chosen.cpu())

def test_image_choice_follows_the_images_and_differs_from_text_neighbours(bb):
    attrs = ["red", "wet", "old", "new", "dry", "big", "hot"]
    space = LabelSpace(attrs, ["ball", "dog"], [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
    m = Trident(bb, space, **SMALL)
    g = torch.Generator().manual_seed(0)
    feats, pair = torch.randn(16, bb.embed_dim, generator=g), torch.arange(16) % 4
    m.choose_aux_attributes(feats, pair)
    first = m.aux_table.clone()
    assert all(a not in words for (a, _), words in m.aux_words.items())
    m.choose_aux_attributes(feats, (pair + 1) % 4)  # the same images under other labels: other attributes
    assert not torch.equal(first, m.aux_table)
    text = Trident(bb, space, aux_attributes="clip_neighbours", **SMALL)
    assert not torch.equal(first, text.aux_table)
    with pytest.raises(ValueError, match="does not choose from images"):
        text.choose_aux_attributes(feats, pair)

def test_used_outside_the_engine_text_neighbours_stand_in_until_images_are_seen(bb):
    torch.manual_seed(0)
    m = Trident(bb, SPACE, **SMALL).train()
    assert (m.aux_table == -1).all()
    m(_batch(m))
    text = Trident(bb, SPACE, aux_attributes="clip_neighbours", **SMALL)
    assert torch.equal(m.aux_table, text.aux_table)
    torch.manual_seed(0)
    plain = Trident(bb, SPACE, alpha=0.0, **SMALL).train()
    plain(_batch(plain))
    assert (plain.aux_table == -1).all()  # alpha = 0 needs no auxiliary attributes

def test_checkpoints_without_the_aux_table_still_load_when_it_is_fixed_at_build(bb):
    old = Trident(bb, SPACE, aux_attributes="clip_neighbours", **SMALL)
    state = {k: v for k, v in old.trainable_state_dict().items() if k != "aux_table"}
    fresh = Trident(bb, SPACE, aux_attributes="clip_neighbours", **SMALL)
    fresh.load_trainable_state_dict(state)
    assert torch.equal(fresh.aux_table, old.aux_table)
    with pytest.raises(KeyError, match="aux_table"):  # chosen from images: a checkpoint must carry the choice
        Trident(bb, SPACE, **SMALL).load_trainable_state_dict(state)

# -- the pair axis in chunks (C-GQA open world: 278,362 pairs) -------------------------------------------------------
def test_composition_embeddings_and_logits_are_built_chunk_by_chunk(bb):
    torch.manual_seed(0)
    m = Trident(bb, SPACE, **SMALL).eval()
    pairs = SPACE.ids([(a, o) for a in SPACE.attrs for o in SPACE.objs])
    sizes = []
    hook = m.compose.register_forward_hook(lambda mod, inp, out: sizes.append(len(inp[0])))
    feats = m.image_features(torch.rand(3, 3, 32, 32))
    whole = m.scores(feats, pairs)
    m.pair_chunk_size = 2
    sizes.clear()
    chunked = m.scores(feats, pairs)
    hook.remove()
    assert max(sizes) == 2 and sum(sizes) == len(pairs)  # never more than pair_chunk_size compositions at once
    assert torch.allclose(chunked, whole, atol=1e-6)
    # training: the same loss and gradients over the seen pairs, whatever the chunk size
    grads = {}
    for chunk in (1, 1024):
        torch.manual_seed(0)
        t = Trident(bb, SPACE, **SMALL).eval()
        t.pair_chunk_size = chunk
        loss = t(_batch(t))["pair_loss"]
        loss.backward()
        grads[chunk] = (loss.detach(), t.compose[1].weight.grad.clone())
    assert torch.allclose(grads[1][0], grads[1024][0], atol=1e-6)
    assert torch.allclose(grads[1][1], grads[1024][1], atol=1e-6)
