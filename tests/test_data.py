"""The standard-layout reader on layouts shaped like each real benchmark, and its errors."""
import collections, warnings
import pytest, torch
from PIL import Image
from czsl_nb.data import (CompositionData, CompositionSplit, DatasetError, SPLITS, metadata_file, pairs_file,
                          write_layout, make_toy_dataset)

def _cgqa_like(root):
    "C-GQA style: flat image folder, multi-word names joined by `_`, mixed image modes."
    pairs = {"train": [("dark_brown", "traffic_light"), ("wet", "dog"), ("wet", "traffic_light"),
                       ("dark_brown", "dog")],
             "val": [("wet", "dog"), ("dark_brown", "cat")], "test": [("wet", "cat"), ("dark_brown", "dog")]}
    modes = ["RGB", "L", "P", "RGBA", "LA"]
    entries = []
    (root / "images").mkdir(parents=True)
    for split, ps in pairs.items():
        for i, (a, o) in enumerate(ps):
            name = f"{split}{i} img.png"
            mode = modes[(i + len(entries)) % len(modes)]
            Image.new(mode, (6, 5)).save(root / "images" / name)
            entries.append({"image": name, "attr": a, "obj": o, "set": split})
    return write_layout(root, pairs, entries)

def test_cgqa_like_layout(tmp_path):
    data = CompositionData(_cgqa_like(tmp_path / "cgqa"))
    assert data.attrs == ["dark_brown", "wet"] and data.objs == ["cat", "dog", "traffic_light"]
    # the 4 seen pairs + dark_brown cat (val) + wet cat (test)
    assert len(data.open_pairs) == 6 and len(data.pairs) == 6
    assert data.summary()["test"] == {"seen_pairs": 1, "unseen_pairs": 1, "images": 2}
    for split in SPLITS:
        ds = CompositionSplit(data, split)
        for i in range(len(ds)):
            assert ds[i]["image"].shape == (3, 5, 6)  # every file mode arrives as 3-channel RGB

def test_labels_match_pair_ids(tmp_path):
    data = CompositionData(make_toy_dataset(tmp_path / "toy"), warn=False)
    attr, obj = data.labels("train")
    pairs = data.pair_ids(data.pairs).tolist()
    for a, o, s in zip(attr.tolist(), obj.tolist(), data.samples["train"]):
        assert (data.attrs[a], data.objs[o]) == s.pair and [a, o] in pairs

def test_report_is_a_warning_not_silent(tmp_path):
    with pytest.warns(UserWarning, match="marked NA"):
        CompositionData(make_toy_dataset(tmp_path / "toy"))

def test_metadata_needing_unpickling_is_refused(tmp_path):
    root = make_toy_dataset(tmp_path / "toy")
    torch.save([collections.OrderedDict(image="x", attr="red", obj="apple", set="train"), object()],
               metadata_file(root))
    with pytest.raises(DatasetError, match="cannot be read as a torch.save'd list of dicts"):
        CompositionData(root)

def test_unknown_set_value_names_choices(tmp_path):
    root = make_toy_dataset(tmp_path / "toy")
    torch.save([{"image": "x.png", "attr": "red", "obj": "apple", "set": "training"}], metadata_file(root))
    with pytest.raises(DatasetError, match="set='training'; expected one of train, val, test or NA"):
        CompositionData(root)

def test_blank_lines_tolerated_but_not_extra_fields(tmp_path):
    root = make_toy_dataset(tmp_path / "toy")
    pairs_file(root, "train").write_text("red apple\n\ngreen car\nblue car\n")
    with warnings.catch_warnings(): warnings.simplefilter("ignore"); CompositionData(root)
    pairs_file(root, "train").write_text("red apple\ngreen car extra\n")
    with pytest.raises(DatasetError, match=r"train_pairs.txt:2: expected exactly two names"):
        CompositionData(root)
