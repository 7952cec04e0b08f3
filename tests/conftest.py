"""Shared pytest set-up: offline hub, czsl_nb imported first so torchvision works on CPU torch, and the toy data."""
import os
from pathlib import Path
import pytest
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
import czsl_nb  # noqa: F401  (applies the torchvision fix before any test imports open_clip)

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    "The toy dataset in the standard layout (3 images a split)."
    from czsl_nb.data import make_toy_dataset
    return make_toy_dataset(tmp_path_factory.mktemp("data") / "toy")

@pytest.fixture(scope="module")
def tiny_config():
    "The tiny random CLIP's open_clip config file."
    from czsl_nb.backbone import tiny_backbone
    from czsl_nb.core import cache_dir
    tiny_backbone()
    return cache_dir() / "configs" / "tiny-clip.json"
