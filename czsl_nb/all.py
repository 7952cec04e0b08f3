"""Import every czsl_nb module, so that every method registers itself (hand-written, like fastcore.all)."""
from .core import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
from .synthetic import *  # noqa: F401,F403
from .backbone import *  # noqa: F401,F403
from .mini_clip import *  # noqa: F401,F403
from .prompts import *  # noqa: F401,F403
from .methods import *  # noqa: F401,F403
from .clip_zeroshot import *  # noqa: F401,F403
from .csp import *  # noqa: F401,F403
from .learner import *  # noqa: F401,F403
