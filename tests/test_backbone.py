"""CLIPBackbone (nbs/03_backbone.ipynb): the identities every method relies on, on a tiny random CLIP."""
import copy, json, os, time, warnings
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import open_clip
from czsl_nb.backbone import (CLIPBackbone, ImageTokens, WeightsUnavailableError, FREEZE_POLICIES, cached_pretrained,
                              host_reachable, resolve_model_name, resolve_pretrained)

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
PROMPTS = ["a photo of red apple", "a photo of sliced apple", "a photo of old car"]


def _write_config(folder, stem, cfg):
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(cfg))
    return path

@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
    return _write_config(tmp_path_factory.mktemp("cfg"), "test-backbone-tiny", TINY)

@pytest.fixture()
def bb(tiny_json):
    torch.manual_seed(0)
    return CLIPBackbone.create(tiny_json).eval()

@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- creation -----------------------------------------------------------------------------------------

def test_dimensions_and_repr(bb):
    assert (bb.embed_dim, bb.vision_width, bb.text_width, bb.context_length, bb.image_size, bb.grid_size) == \
           (32, 64, 64, 16, 32, (4, 4))
    assert bb.name == "test-backbone-tiny" and bb.pretrained is None and bb.device == torch.device("cpu")
    assert isinstance(bb.logit_scale, nn.Parameter)
    assert "test-backbone-tiny" in repr(bb) and len(repr(bb).splitlines()) == 1

def test_transforms_follow_the_model(bb):
    from PIL import Image
    photo = Image.new("RGB", (50, 40), (120, 30, 200))
    assert bb.preprocess(photo).shape == (3, 32, 32)
    assert bb.train_transform(photo).shape == (3, 32, 32)

def test_wraps_an_existing_clip(tiny_json):
    model = open_clip.create_model(resolve_model_name(tiny_json))
    wrapped = CLIPBackbone(model)
    assert wrapped.tokenize("a photo").shape == (1, 16) and wrapped.preprocess is not None
    with pytest.raises(TypeError, match="open_clip.CLIP"):
        CLIPBackbone(nn.Linear(2, 2))

def test_bad_names_and_precisions(tmp_path, tiny_json):
    with pytest.raises(ValueError, match=r"open_clip\.list_models\(\)"):
        CLIPBackbone.create("ViT-L-41")
    assert resolve_model_name("ViT-L/14") == "ViT-L-14"
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_name(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"embed_dim": 3,\n')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        resolve_model_name(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text('{"embed_dim": 3}')
    with pytest.raises(ValueError, match="missing"):
        resolve_model_name(tmp_path / "partial.json")
    with pytest.raises(ValueError, match="CustomTextCLIP"):
        resolve_model_name("ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match="'fp32', 'amp'"):
        CLIPBackbone.create(tiny_json, precision="half")


# --- pretrained weights ---------------------------------------------------------------------------------

def test_pretrained_tag_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(WeightsUnavailableError, match="local checkpoint file path") as info:
        CLIPBackbone.create("ViT-L-14", pretrained="openai")
    assert time.time() - start < 10
    assert "ViT-L-14:openai" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)

def test_pretrained_tag_without_offline_flag_probes_fast(monkeypatch):
    if host_reachable("https://huggingface.co"):
        pytest.skip("the hub is reachable here: the tag would really download")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.time()
    with pytest.raises(WeightsUnavailableError, match="unreachable.*local checkpoint file path"):
        CLIPBackbone.create("ViT-B-32", pretrained="openai")
    assert time.time() - start < 10

def test_unknown_tag_and_missing_file():
    with pytest.raises(ValueError, match="list_pretrained_tags_by_model"):
        resolve_pretrained("ViT-B-32", "opneai")
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        resolve_pretrained("ViT-B-32", "/nowhere/model.safetensors")
    assert resolve_pretrained("ViT-B-32", None) == (None, {})

def test_tag_found_in_the_clip_url_cache(tmp_path):
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    (tmp_path / "ViT-B-32.pt").write_bytes(b"stand-in")
    path, tag_cfg = resolve_pretrained("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert path == str(tmp_path / "ViT-B-32.pt") and tag_cfg["quick_gelu"] is True
    assert cached_pretrained(cfg, str(tmp_path))[0] == path

def test_tag_found_in_the_hf_hub_cache(tmp_path):
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"stand-in")
    path, _ = resolve_pretrained("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert path.endswith("open_clip_model.safetensors") and os.path.isfile(path)

def test_tag_path_end_to_end(bb, tiny_json, tmp_path, monkeypatch, images):
    "A cached tag loads its file, follows its QuickGELU flag and its image mean/std."
    torch.save(bb.model.state_dict(), tmp_path / "tiny.bin")
    fake_tag = {"file": str(tmp_path / "tiny.bin"), "quick_gelu": True, "mean": (0.5, 0.5, 0.5),
                "std": (0.25, 0.25, 0.25)}
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda name, tag: fake_tag if (name, tag) == ("test-backbone-tiny", "fake")
                        else real(name, tag))
    tagged = CLIPBackbone.create(tiny_json, pretrained="fake").eval()
    assert type(tagged.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert tuple(tagged.preprocess.transforms[-1].mean) == (0.5, 0.5, 0.5)
    plain = CLIPBackbone.create(tiny_json, pretrained="fake", quick_gelu=False)
    assert type(plain.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    torch.testing.assert_close(tagged.model.visual.proj, bb.model.visual.proj, rtol=0, atol=0)


# --- local checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["nested.pt", "plain.bin", "module.pth", "weights.safetensors", "jit.pt"])
def test_checkpoint_round_trip(fmt, bb, tiny_json, tmp_path, images):
    state, path = bb.model.state_dict(), tmp_path / fmt
    if fmt == "nested.pt": torch.save({"state_dict": state, "epoch": 1}, path)
    elif fmt == "plain.bin": torch.save(state, path)
    elif fmt == "module.pth": torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif fmt == "weights.safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.script(bb.model), str(path))
    loaded = CLIPBackbone.create(tiny_json, pretrained=path).eval()
    assert loaded.pretrained == str(path)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), bb.encode_image(images))
        assert torch.equal(loaded.encode_text(PROMPTS), bb.encode_text(PROMPTS))

def test_checkpoint_of_another_architecture(bb, tmp_path):
    torch.save(bb.model.state_dict(), tmp_path / "tiny.pt")
    other = _write_config(tmp_path, "test-backbone-other", {**TINY, "embed_dim": 16})
    with pytest.raises(ValueError, match="tiny.pt: checkpoint does not fit"):
        CLIPBackbone.create(other, pretrained=tmp_path / "tiny.pt")


# --- pooled features and scores -------------------------------------------------------------------------

def test_encoders_are_open_clips(bb, images):
    with torch.no_grad():
        assert torch.equal(bb.encode_image(images), bb.model.encode_image(images))
        ids = open_clip.tokenize(PROMPTS, context_length=16)
        assert torch.equal(bb.encode_text(PROMPTS), bb.model.encode_text(ids))
        assert torch.equal(bb.encode_text(ids), bb.model.encode_text(ids))
        torch.testing.assert_close(bb.encode_text(PROMPTS, normalize=True).norm(dim=-1), torch.ones(3))

def test_scores_are_scaled_cosines_in_float32(bb, images):
    with torch.no_grad():
        f, t = bb.encode_image(images), bb.encode_text(PROMPTS)
        cosine = F.normalize(f, dim=-1) @ F.normalize(t, dim=-1).T
        scores = bb(images, PROMPTS)
        assert scores.dtype == torch.float32 and scores.shape == (3, 3)
        torch.testing.assert_close(scores, bb.logit_scale.exp() * cosine)
        torch.testing.assert_close(bb.logits(f.half(), t.half(), scale=100.0), 100 * cosine, atol=1e-2, rtol=0)
        assert bb.logits(f.half(), t.half()).dtype == torch.float32

def test_tokenize(bb):
    ids = bb.tokenize("a photo of x x", context_length=8)
    assert ids.dtype == torch.long and ids.shape == (1, 8) and ids[0, 0] == 49406 and ids.argmax(-1).item() == 6
    with pytest.raises(ValueError, match="exceeds"):
        bb.tokenize("x", context_length=17)

def test_short_context_matches_full_context(bb):
    with torch.no_grad():
        torch.testing.assert_close(bb.encode_text(bb.tokenize(PROMPTS, context_length=8)), bb.encode_text(PROMPTS),
                                   atol=1e-5, rtol=1e-5)


# --- image tokens ---------------------------------------------------------------------------------------

def test_image_token_identities(bb, images):
    with torch.no_grad():
        out = bb.image_tokens(images, layers=(-2, -1, 0))
        assert isinstance(out, ImageTokens)
        assert out.tokens.shape == (3, 17, 32) and out.patches.shape == (3, 16, 32) and out.pooled.shape == (3, 32)
        assert sorted(out.hidden) == [-2, -1, 0] and out.hidden[-2].shape == (3, 17, 64)
        assert torch.equal(out.tokens[:, 0], out.pooled)
        assert torch.equal(out.pooled, bb.encode_image(images))
        visual = bb.model.visual
        torch.testing.assert_close(visual.ln_post(out.hidden[-1]) @ visual.proj, out.tokens, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.hidden[0], out.hidden[-2])
        # open_clip's own patch tokens (output_tokens=True) are ours before the projection
        visual.output_tokens = True
        try: _, raw = visual(images)
        finally: visual.output_tokens = False
        torch.testing.assert_close(raw @ visual.proj, out.patches, atol=1e-5, rtol=1e-5)
    assert all(v.dtype == torch.float32 for v in [out.pooled, out.tokens, *out.hidden.values()])

def test_penultimate_layer_matches_a_forward_hook(bb, images):
    seen = {}
    hook = bb.model.visual.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        bb.encode_image(images)
        out = bb.image_tokens(images, layers=(-2,))
    hook.remove()
    assert torch.equal(seen["h"], out.hidden[-2])

def test_image_tokens_bad_layers(bb, images):
    with pytest.raises(ValueError, match=r"valid: -2\.\.1"):
        bb.image_tokens(images, layers=(2,))

def test_image_tokens_average_pooling(tmp_path, images):
    cfg = copy.deepcopy(TINY); cfg["vision_cfg"]["pool_type"] = "avg"
    avg = CLIPBackbone.create(_write_config(tmp_path, "test-backbone-avg", cfg)).eval()
    with torch.no_grad():
        out = avg.image_tokens(images)
        assert torch.equal(out.pooled, avg.encode_image(images))
        torch.testing.assert_close(out.patches.mean(1), out.pooled, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out.tokens[:, 0], out.pooled)

def test_image_tokens_refuse_attentional_pooling(tmp_path, images):
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=4)
    pooled = CLIPBackbone.create(_write_config(tmp_path, "test-backbone-attnpool", cfg))
    with pytest.raises(NotImplementedError, match="attentional pooling"):
        pooled.image_tokens(images)


# --- soft prompts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["all", "none"])
@pytest.mark.parametrize("grad", [False, True])
def test_unmodified_embeddings_give_encode_text_exactly(bb, policy, grad):
    bb.freeze(policy)
    ids = bb.tokenize(PROMPTS)
    with torch.set_grad_enabled(grad):
        pooled, hidden = bb.encode_text_embeddings(ids, bb.token_embedding(ids), return_hidden=True)
        assert torch.equal(pooled, bb.encode_text(ids))
    assert hidden.shape == (3, 16, 64) and hidden.dtype == torch.float32
    with pytest.raises(ValueError, match=r"must be \[T, n, D_t\]"):
        bb.encode_text_embeddings(ids, torch.zeros(3, 16, 5))

def test_gradient_reaches_learned_rows_only(bb, images):
    bb.freeze("all")
    pairs = [(0, 1), (1, 1)]
    ids = bb.tokenize(["a photo of x x"] * len(pairs), context_length=8)
    eot, rows = ids.argmax(-1), torch.arange(len(pairs))
    vocab = nn.Parameter(torch.randn(4, bb.text_width) * 0.02)  # attrs 0-1, objects 2-3
    attrs, objs = torch.tensor([a for a, _ in pairs]), torch.tensor([2 + o for _, o in pairs])
    emb = bb.token_embedding(ids)
    assert not emb.requires_grad
    emb = emb.index_put((rows, eot - 2), vocab[attrs]).index_put((rows, eot - 1), vocab[objs])
    scores = bb.logits(bb.encode_image(images[:1]), bb.encode_text_embeddings(ids, emb))
    F.cross_entropy(scores, torch.tensor([0])).backward()
    assert (vocab.grad.abs().sum(-1) > 0).tolist() == [True, True, False, True]
    assert all(p.grad is None for p in bb.parameters())

def test_gradient_reaches_token_embedding_when_text_trains(bb):
    bb.freeze("image")
    ids = bb.tokenize(["a photo of red apple"])
    bb.encode_text(ids).sum().backward()
    grad = bb.model.token_embedding.weight.grad
    assert grad is not None and set(grad.abs().sum(-1).nonzero().flatten().tolist()) == set(ids[0, :7].tolist())
    assert all(p.grad is None for p in bb.model.visual.parameters())


# --- freezing -------------------------------------------------------------------------------------------

def test_freeze_policies(bb):
    total = bb.count_parameters(trainable_only=False)
    assert bb.count_parameters() == total and total["logit"] == 1
    expected = {"all": {"image": 0, "text": 0, "logit": 0}, "none": total,
                "image": {**total, "image": 0}, "text": {**total, "text": 0}}
    for policy in FREEZE_POLICIES:
        counts = bb.freeze(policy).count_parameters()
        want = {k: expected[policy][k] for k in ("image", "text", "logit")}
        assert counts == {**want, "total": sum(want.values())}, policy
        assert bb.freeze_policy == policy
    with pytest.raises(ValueError, match="'all', 'none', 'image', 'text'"):
        bb.freeze("vision")

def test_frozen_towers_stay_in_eval_mode(bb):
    bb.freeze("image").train()
    assert not bb.model.visual.training and bb.model.transformer.training and bb.training
    bb.freeze("text")
    assert bb.model.visual.training and not bb.model.transformer.training and not bb.model.token_embedding.training
    bb.freeze("all").train()
    assert not any(m.training for name, m in bb.model.named_modules() if name)  # every tower module
    bb.freeze("none")
    assert all(m.training for m in bb.model.modules())


# --- precision ------------------------------------------------------------------------------------------

def test_autocast_is_a_noop_on_cpu(tiny_json):
    import contextlib
    amp = CLIPBackbone.create(tiny_json, precision="amp")
    assert isinstance(amp.autocast(), contextlib.nullcontext)

def test_low_precision_weights_still_give_float32(bb, tiny_json, tmp_path, images):
    torch.save(bb.model.state_dict(), tmp_path / "tiny.pt")
    low = CLIPBackbone.create(tiny_json, pretrained=tmp_path / "tiny.pt", precision="bf16").eval()
    assert low.model.visual.proj.dtype == torch.bfloat16
    with torch.no_grad():
        f, t = low.encode_image(images), low.encode_text(PROMPTS)
        out = low.image_tokens(images, layers=(-2,))
        ids = low.tokenize(PROMPTS)
        soft = low.encode_text_embeddings(ids, low.token_embedding(ids))
    assert all(x.dtype == torch.float32 for x in [f, t, out.pooled, out.tokens, out.hidden[-2], soft])
    with torch.no_grad():
        torch.testing.assert_close(F.cosine_similarity(f, bb.encode_image(images)), torch.ones(3), atol=0.02, rtol=0)


# --- the papers' architecture ---------------------------------------------------------------------------

def test_vit_b32_tokens():
    b32 = CLIPBackbone.create("ViT-B-32").eval()
    with torch.no_grad():
        out = b32.image_tokens(torch.randn(2, 3, 224, 224), layers=(-2,))
    assert out.tokens.shape == (2, 50, 512) and out.hidden[-2].shape == (2, 50, 768) and b32.grid_size == (7, 7)
    assert torch.equal(out.tokens[:, 0], out.pooled)
