"""czsl_nb: notebook-first, literate Compositional Zero-Shot Learning on CLIP.

Hand-written (nbdev only updates `__version__`): importing the package first makes torchvision
importable on a CPU-only torch (see `nbs/00_core.ipynb`). The method lookups live in `czsl_nb.methods`
and load on first use, so `import czsl_nb` stays light."""
__version__ = "0.1.0"

import warnings as _warnings
# huggingface_hub imports tqdm.auto, which warns in a Jupyter kernel without ipywidgets; we draw no notebook bars
_warnings.filterwarnings("ignore", message="IProgress not found")

from .core import patch_torchvision as _patch_torchvision  # noqa: E402
_patch_torchvision()

from .core import register as register  # noqa: E402  (re-exported: `czsl_nb.register`)


def __getattr__(name: str):
    "`czsl_nb.list_methods` and `czsl_nb.get_method`, imported when first asked for."
    if name in ("list_methods", "get_method"):
        from . import methods
        return getattr(methods, name)
    raise AttributeError(f"module 'czsl_nb' has no attribute {name!r}")
