"Tests of the synthetic CZSL world (czsl_nb.synthetic): small configurations in tmp dirs, a few seconds in all."
import json, re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from czsl_nb import synthetic as syn
from czsl_nb.data import CompositionData

TINY = dict(train_per_pair=2, val_per_pair=1, test_per_pair=1, corpus_size=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return syn.synthetic_world(0, tmp_path_factory.mktemp("world") / "w", workers=2, **TINY)


def held_out(root):
    info = syn.world_info(root)
    return {tuple(p) for k in ("val_unseen", "test_unseen") for p in info["splits"][k]}


# ---------------------------------------------------------------- determinism
def test_same_seed_same_bytes_whatever_the_workers(world, tmp_path):
    serial = syn.synthetic_world(0, tmp_path / "serial", workers=0, **TINY)
    assert syn.world_digest(serial) == syn.world_digest(world)


def test_other_seed_other_world(world, tmp_path):
    other = syn.synthetic_world(1, tmp_path / "other", workers=2, **TINY)
    assert syn.world_digest(other) != syn.world_digest(world)
    a = np.asarray(Image.open(world / "images" / CompositionData(world).samples["train"][0].image))
    b = np.asarray(Image.open(other / "images" / CompositionData(other).samples["train"][0].image))
    assert not np.array_equal(a, b)


def test_render_is_a_function_of_the_seed():
    a, info_a = syn.render_image("broken", "house", np.random.default_rng([0, 0, 7]))
    b, info_b = syn.render_image("broken", "house", np.random.default_rng([0, 0, 7]))
    assert np.array_equal(a, b) and info_a == info_b
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8


# ---------------------------------------------------------------- splits
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_structure(seed):
    cfg = syn.WorldConfig()
    s = syn.make_splits(cfg, seed)
    train = set(s["train"])
    assert len(train) == 60
    assert Counter(a for a, _ in train) == {a: 5 for a in cfg.states}  # every state in 5 training pairs
    assert Counter(o for _, o in train) == {o: 5 for o in cfg.objects}
    vu, tu, ow = set(s["val_unseen"]), set(s["test_unseen"]), set(s["open_world_only"])
    assert len(vu) == 15 and len(tu) == 18 and len(s["val_seen"]) == 15 and len(s["test_seen"]) == 18
    assert not vu & tu and not (vu | tu) & train and not ow & (train | vu | tu)
    assert len(train | vu | tu | ow) == 144
    assert set(s["val"]) == set(s["val_seen"]) | vu and set(s["test"]) == set(s["test_seen"]) | tu
    assert set(s["val_seen"]) <= train and set(s["test_seen"]) <= train


def test_layout_reads_back(world):
    data = CompositionData(world, check_images="full")
    assert data.report.clean
    cfg = syn.WorldConfig.make(**TINY)
    assert set(data.attrs) == set(syn.STATES) and set(data.objs) == set(syn.OBJECTS)
    s = data.summary()
    counts = lambda split: (s[split]["seen_pairs"], s[split]["unseen_pairs"], s[split]["images"])
    assert counts("train") == (60, 0, 60 * cfg.train_per_pair)
    assert (s["val"]["seen_pairs"], s["val"]["unseen_pairs"], s["val"]["images"]) == (15, 15, 30 * cfg.val_per_pair)
    assert (s["test"]["seen_pairs"], s["test"]["unseen_pairs"], s["test"]["images"]) == (18, 18, 36 * cfg.test_per_pair)
    val_unseen = set(data.val_pairs) - set(data.train_pairs)
    test_unseen = set(data.test_pairs) - set(data.train_pairs)
    assert not val_unseen & test_unseen and val_unseen | test_unseen == held_out(world)
    for split in ("train", "val", "test"):  # every listed pair has images, paths are MIT-States style
        assert {smp.pair for smp in data.samples[split]} == set(data.split_pairs[split])
        for smp in data.samples[split]:
            assert re.fullmatch(rf"{smp.attr}_{smp.obj}/\d{{6}}\.png", smp.image), smp.image
    img = Image.open(data.image_path(data.samples["test"][0]))
    assert img.mode == "RGB" and img.size == (64, 64)
    # pairs that exist only in the open world have no images at all
    info = syn.world_info(world)
    shown = {smp.pair for split in data.samples.values() for smp in split}
    assert not shown & {tuple(p) for p in info["splits"]["open_world_only"]}


def test_smaller_vocabulary(tmp_path):
    cfg = dict(states=("red", "blue", "striped", "broken", "melted", "fuzzy"), objects=syn.OBJECTS[:6],
               seen_per_primitive=3, val_seen=3, val_unseen=3, test_seen=3, test_unseen=4,
               train_per_pair=1, val_per_pair=1, test_per_pair=1, corpus_size=20, image_size=32)
    root = syn.synthetic_world(5, tmp_path / "small", workers=0, **cfg)
    data = CompositionData(root)
    assert set(data.attrs) == set(cfg["states"]) and len(data.train_pairs) == 18
    images, records = syn.load_corpus(root)
    assert images.shape == (20, 32, 32, 3)


# ---------------------------------------------------------------- corpus
def test_corpus_excludes_held_out_pairs(tmp_path):
    # heavy caption noise exercises the wrong-mention path as well
    root = syn.synthetic_world(3, tmp_path / "noisy", workers=2, **(TINY | dict(corpus_size=600, noise_rate=0.5)))
    images, records = syn.load_corpus(root)
    bad = held_out(root)
    info = syn.world_info(root)
    allowed = {tuple(p) for p in info["splits"]["train"] + info["splits"]["open_world_only"]}
    assert len(records) == len(images) == 600
    assert sum(r["noisy"] for r in records) > 100
    for r in records:
        assert (r["attr"], r["obj"]) in allowed
        if r["mentioned_attr"] and r["mentioned_obj"]: assert (r["mentioned_attr"], r["mentioned_obj"]) in allowed
        assert all(d in syn.OBJECTS for d in r["distractors"])  # distractors are plain objects, no state
    # nor does any caption's text name a held-out pair, under any synonym
    for a, o in bad:
        for aw in (a,) + syn.STATE_SYNONYMS[a]:
            for ow in (o,) + syn.OBJECT_SYNONYMS[o]:
                phrase = re.compile(rf"\b({aw} {ow}|{ow} is {aw}|{ow} that is {aw}|{ow} looks {aw})\b")
                for r in records:
                    assert not phrase.search(r["caption"].lower()), (r["caption"], a, o)


def test_corpus_contents(world):
    images, records = syn.load_corpus(world)
    assert images.shape == (300, 64, 64, 3) and images.dtype == np.uint8
    assert [r["id"] for r in records] == list(range(300))
    assert {"caption", "attr", "obj", "distractors", "background", "mention", "noisy"} <= set(records[0])
    kinds = Counter(r["pair_kind"] for r in records)
    assert kinds["seen"] > 0 and kinds["open_world"] > 0  # open-world-only pairs are in the corpus
    assert len({r["caption"] for r in records}) > 200  # varied captions
    assert Counter(r["mention"] for r in records)["full"] < 300
    # corpus images are fresh renders, none equal to a benchmark image
    data = CompositionData(world)
    bench = {np.asarray(Image.open(data.image_path(s))).tobytes() for split in data.samples.values() for s in split}
    assert not any(img.tobytes() in bench for img in np.asarray(images))
    # the stored record regenerates a caption with the same kind of mention
    rng = np.random.default_rng(0)
    allowed = {(r["attr"], r["obj"]) for r in records}
    first = records[0]
    cap = syn.make_caption(first["attr"], first["obj"], first["distractors"], first["background"], rng, allowed)
    assert isinstance(cap["caption"], str) and cap["caption"]


# ---------------------------------------------------------------- cache, config, atomicity
def test_cache_path_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("CZSL_NB_CACHE", str(tmp_path / "cache"))
    root = syn.synthetic_world(0, workers=0, **TINY)
    assert root == syn.world_dir(0, **TINY) and root.parent == tmp_path / "cache" / "synthetic"
    marker = json.loads((root / "world.json").read_text())
    assert marker["seed"] == 0 and marker["config"]["train_per_pair"] == TINY["train_per_pair"]
    stamp = (root / "world.json").stat().st_mtime_ns
    assert syn.synthetic_world(0, workers=0, **TINY) == root and (root / "world.json").stat().st_mtime_ns == stamp
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temp folder left behind
    assert syn.world_dir(0, **TINY) != syn.world_dir(0, **(TINY | {"corpus_size": 301}))
    assert syn.world_dir(0, **TINY) != syn.world_dir(1, **TINY)
    assert syn.world_dir(0) != syn.world_dir(0, image_size=48)
    defaults = {f: getattr(syn.WorldConfig(), f) for f in ("image_size", "corpus_size")}
    assert syn.world_dir(0) == syn.world_dir(0, **defaults)


def test_bad_options(tmp_path, world):
    with pytest.raises(ValueError, match="valid options"): syn.synthetic_world(0, tmp_path / "x", imgsize=32)
    with pytest.raises(ValueError, match="seen_per_primitive"): syn.WorldConfig(seen_per_primitive=7)
    with pytest.raises(ValueError, match="valid states"): syn.render_image("purple", "ball", np.random.default_rng(0))
    with pytest.raises(FileExistsError, match="not the synthetic world"): syn.synthetic_world(1, world, **TINY)
    with pytest.raises(FileNotFoundError, match="captions.jsonl"): syn.load_corpus(tmp_path)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(root, *args):
        (root / "half-written").write_text("x")
        raise KeyboardInterrupt
    monkeypatch.setattr(syn, "_generate", fail)
    with pytest.raises(KeyboardInterrupt): syn.synthetic_world(0, tmp_path / "w", **TINY)
    assert list(tmp_path.iterdir()) == []
