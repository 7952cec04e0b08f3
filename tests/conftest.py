"""Shared pytest set-up: offline hub, and czsl_nb imported first so torchvision works on CPU torch."""
import os
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
import czsl_nb  # noqa: F401  (applies the torchvision fix before any test imports open_clip)

REPO = Path(__file__).resolve().parents[1]
