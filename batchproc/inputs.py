"""The public import path of :mod:`batchproc.data.inputs` (kept for scripts and the README)."""

from batchproc.data.inputs import *  # noqa: F401,F403
from batchproc.data.inputs import __all__  # noqa: F401
