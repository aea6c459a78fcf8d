"""The public import path of :mod:`batchproc.data.images` (kept for scripts and the README)."""

from batchproc.data.images import *  # noqa: F401,F403
from batchproc.data.images import __all__  # noqa: F401
