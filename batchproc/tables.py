"""The public import path of :mod:`batchproc.data.tables`: ``from batchproc.tables import TableRows``."""

from batchproc.data.tables import *  # noqa: F401,F403
from batchproc.data.tables import __all__  # noqa: F401
