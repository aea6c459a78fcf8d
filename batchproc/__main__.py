"""``python -m batchproc``: the same as the ``batchproc`` command."""

import sys

from batchproc.control.cli import main

sys.exit(main())
