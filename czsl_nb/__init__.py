"""czsl_nb: notebook-first, literate Compositional Zero-Shot Learning on CLIP.

Hand-written (nbdev only updates `__version__`): importing the package first makes torchvision
importable on a CPU-only torch (see `nbs/00_core.ipynb`)."""
__version__ = "0.1.0"

from .core import patch_torchvision as _patch_torchvision
_patch_torchvision()

from .core import list_methods, get_method, register  # noqa: E402
