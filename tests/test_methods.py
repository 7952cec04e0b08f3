"""Contracts every registered method must meet, checked on the tiny backbone (shapes, finite float32
scores in both worlds, losses and gradients only where training should reach, checkpoints)."""
from dataclasses import fields as _fields
from typing import Literal, get_args, get_origin, get_type_hints
import pytest, torch
import czsl_nb.all  # noqa: F401  (registers every method)
from czsl_nb import list_methods, get_method
from czsl_nb.backbone import tiny_backbone
from czsl_nb.learner import TrainConfig
from czsl_nb.methods import _INTERVAL, LabelSpace

SPACE = LabelSpace(["red", "wet", "old"], ["ball", "dog"],
                   [("red", "ball"), ("wet", "dog"), ("old", "ball"), ("red", "dog")])
OPEN = SPACE.ids([(a, o) for a in SPACE.attrs for o in SPACE.objs])

def _build(name, seed=0):
    torch.manual_seed(seed)
    return get_method(name)(tiny_backbone(), SPACE)

def _batch(method, n=5):
    "A training batch of `n` random images; with the partner batches the engine adds when the method asks for them."
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pair = torch.arange(n) % len(SPACE.seen_pairs)
    ids = SPACE.seen_ids[pair]
    batch = {"image": images, "attr": ids[:, 0], "obj": ids[:, 1], "pair": pair, "index": torch.arange(n)}
    for key in method.partner_samples:
        same, other = (0, 1) if key == "attr" else (1, 0)
        shares = lambda i, j: ids[j, same] == ids[i, same] and ids[j, other] != ids[i, other]
        partner = [next((j for j in range(n) if shares(i, j)), i) for i in range(n)]
        batch[f"{key}_partner"] = {k: v[partner] for k, v in batch.items() if not k.endswith("partner")}
        batch[f"{key}_partner_mask"] = torch.tensor([float(j != i) for i, j in enumerate(partner)])
    return batch

def test_baselines_registered():
    assert {"clip", "csp"} <= set(list_methods())

@pytest.mark.parametrize("name", list_methods())
def test_scores_shape_and_dtype(name):
    m = _build(name).eval()
    feats = m.image_features(_batch(m)["image"])
    for pairs in (SPACE.seen_ids, OPEN):
        s = m.scores(feats, pairs)
        assert s.shape == (5, len(pairs)) and s.dtype == torch.float32 and torch.isfinite(s).all()

@pytest.mark.parametrize("name", list_methods())
def test_unknown_hyperparameter_is_an_error(name):
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        get_method(name)(tiny_backbone(), SPACE, not_a_parameter=1)

@pytest.mark.parametrize("name", [n for n in list_methods() if get_method(n).trainable])
def test_loss_and_gradients(name):
    m = _build(name).train()
    terms = m(_batch(m))
    assert terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= trainable
    grouped = [id(p) for g in m.param_groups(1e-3) for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in m.parameters() if p.requires_grad)  # each trainable param once

@pytest.mark.parametrize("name", [n for n in list_methods() if get_method(n).trainable])
def test_checkpoint_round_trip(name):
    m = _build(name).train()
    opt = torch.optim.SGD([p for g in m.param_groups(0.5) for p in g["params"]], lr=0.5)
    sum(m(_batch(m)).values()).backward(); opt.step()
    m.eval(); other = _build(name).eval()
    feats = m.image_features(_batch(m)["image"])
    assert not torch.allclose(other.scores(feats, OPEN), m.scores(feats, OPEN))
    other.load_trainable_state_dict(m.trainable_state_dict())
    assert torch.allclose(other.scores(feats, OPEN), m.scores(feats, OPEN), atol=1e-6)
    assert not any(k.startswith("backbone.") and not v.requires_grad
                   for k, v in m.named_parameters() if k in m.trainable_state_dict())

@pytest.mark.parametrize("name", [n for n in list_methods() if get_method(n).cache_image_features])
def test_cacheable_image_features_are_frozen(name):
    "A method that lets the engine cache image features must not train anything in the image path."
    m = _build(name).train()
    images = _batch(m)["image"]
    assert torch.equal(m.image_features(images), m.image_features(images))
    assert not any(p.requires_grad for p in m.backbone.model.visual.parameters())

# -- typed hyper-parameters ---------------------------------------------------------------------

def _bad_value(params, f):
    "A value the field must refuse, and what the error must then say is valid."
    kind = get_type_hints(params)[f.name]
    if get_origin(kind) is Literal: return "not-a-choice", "valid: " + ", ".join(map(repr, get_args(kind)))
    if kind is bool: return "maybe", "must be True or False"
    interval = f.metadata.get("range")
    if interval:
        low_bracket, low, high, high_bracket = _INTERVAL.match(interval).groups()
        low, high = float(low), float(high)
        if low > float("-inf"): value = low if low_bracket == "(" else low - 1
        else: value = high if high_bracket == ")" else high + 1
        value = [int(value)] if get_origin(kind) is list else (int(value) if kind is int else value)
        return value, f"out of range; valid: {interval}"
    if kind in (int, float): return "many", "must be"
    if kind is str: return 3, "must be a string"
    raise AssertionError(f"{params.__name__}.{f.name}: no bad value known for {kind}")

@pytest.mark.parametrize("name", list_methods())
def test_every_hyperparameter_rejects_a_bad_value_naming_what_is_valid(name):
    method = get_method(name)
    for f in _fields(method.Params):
        assert f.metadata.get("help"), f"{name}.{f.name} has no one-line meaning"
        value, valid = _bad_value(method.Params, f)
        with pytest.raises(ValueError) as err:
            method.resolve_hparams({f.name: value})
        assert f"method {name!r}: {f.name}={value!r}" in str(err.value) and valid in str(err.value), str(err.value)

@pytest.mark.parametrize("name", list_methods())
def test_every_method_defaults_validate(name):
    assert get_method(name).resolve_hparams({}) == get_method(name).defaults
    TrainConfig(method=name).validate()  # the probe build with every default

def test_run_level_fields_reject_bad_values():
    for f in _fields(TrainConfig):
        value, valid = _bad_value(TrainConfig, f)
        if f.name in ("method", "dataset", "backbone", "pretrained", "run"): continue  # strings checked by validate()
        with pytest.raises(ValueError, match="parameter " + f.name):
            TrainConfig(**{f.name: value})

def test_method_hyperparameters_never_shadow_run_parameters():
    "params.yaml and the parameters cell put run-level and method names side by side: they must not collide."
    run_names = {f.name for f in _fields(TrainConfig)}
    for name in list_methods():
        assert not run_names & set(get_method(name).defaults), name

@pytest.mark.parametrize("name", list_methods())
def test_scores_do_not_depend_on_the_pair_chunk_size(name):
    "Work along the pair axis is chunked (C-GQA's open world has 278,362 pairs); the chunk size never changes a score."
    scores = {}
    for chunk in (2, 10**9):
        m = _build(name).eval()
        m.pair_chunk_size = chunk
        feats = m.image_features(_batch(m)["image"])
        scores[chunk] = [m.scores(feats, pairs) for pairs in (SPACE.seen_ids, OPEN)]
    for small, whole in zip(scores[2], scores[10**9]):
        assert torch.allclose(small, whole, atol=1e-5), (small - whole).abs().max()

# -- registration ---------------------------------------------------------------------------------
def test_every_method_class_in_the_package_is_registered():
    "Walk every czsl_nb module: a CZSLMethod subclass that `list_methods()` does not know would be unreachable."
    import importlib, inspect, pkgutil
    import czsl_nb
    from czsl_nb.core import METHODS
    from czsl_nb.methods import CZSLMethod
    list_methods()
    registered = set(METHODS.values())
    for info in pkgutil.iter_modules(czsl_nb.__path__):
        module = importlib.import_module(f"czsl_nb.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, CZSLMethod) and cls is not CZSLMethod and cls.__module__ == module.__name__:
                assert cls in registered, f"{module.__name__}.{name} is a CZSLMethod but not registered"

_OUTSIDE_METHOD = '''
from dataclasses import dataclass
import torch, torch.nn.functional as F
from czsl_nb.methods import CZSLMethod, Params, hparam

@dataclass
class ProtoParams(Params):
    scale: float = hparam(10.0, "logit scale of the prototype cosine", range="(0, inf)")

class Prototypes(CZSLMethod):
    "One learned prototype per attribute and per object; a pair scores the sum of both cosines."
    Params, cache_image_features = ProtoParams, True
    def __init__(self, backbone, space, **hparams):
        super().__init__(backbone, space, **hparams)
        backbone.freeze("all")
        d = backbone.embed_dim
        self.attr = torch.nn.Parameter(torch.randn(len(space.attrs), d) * 0.02)
        self.obj = torch.nn.Parameter(torch.randn(len(space.objs), d) * 0.02)
        self.register_buffer("seen_ids", space.seen_ids, persistent=False)
    def _logits(self, features, pair_ids):
        f = F.normalize(features, dim=-1)
        return self.hparams["scale"] * (f @ F.normalize(self.attr, dim=-1).T[:, pair_ids[:, 0]]
                                        + f @ F.normalize(self.obj, dim=-1).T[:, pair_ids[:, 1]])
    def loss(self, batch):
        return {"pair_loss": F.cross_entropy(self._logits(batch["features"], self.seen_ids), batch["pair"])}
    def scorer(self, pair_ids):
        return lambda features: self._logits(features, pair_ids).float()
'''

def test_a_method_from_another_package_trains_through_czsl_train(tmp_path):
    "One entry point in another package's metadata, and `czsl-train -p method NAME` finds, trains and tests it."
    import json, os, subprocess, sys
    from czsl_nb.backbone import tiny_backbone
    from czsl_nb.core import cache_dir
    from czsl_nb.data import make_toy_dataset
    from conftest import REPO
    site = tmp_path / "site"; site.mkdir()
    (site / "proto_method.py").write_text(_OUTSIDE_METHOD)
    info = site / "proto_method-0.1.dist-info"; info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: proto-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[czsl_nb.methods]\nprototypes = proto_method:Prototypes\n")
    toy = make_toy_dataset(tmp_path / "toy"); tiny_backbone()
    env = {**os.environ, "PYTHONPATH": str(site), "CZSL_NB_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", "from czsl_nb.learner import train_cli; train_cli()",
                        "-p", "method", "prototypes", "-p", "dataset", str(toy),
                        "-p", "backbone", str(cache_dir() / "configs" / "tiny-clip.json"),
                        "-p", "epochs", "1", "-p", "batch_size", "4", "-p", "scale", "5.0", "-p", "run", "outside"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "outside" / "metrics.json").read_text())
    assert metrics["method"] == "prototypes" and metrics["epoch"] == 1
