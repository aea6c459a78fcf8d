"""``python -m batchproc``: the same as the ``batchproc`` command."""

import sys

from batchproc.cli import main

sys.exit(main())
