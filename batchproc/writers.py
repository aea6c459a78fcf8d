"""The public import path of :mod:`batchproc.data.writers` (kept for scripts and the README)."""

from batchproc.data.writers import *  # noqa: F401,F403
from batchproc.data.writers import __all__  # noqa: F401
