"""``python -m launch.torch_distributed [TORCHRUN_OVERRIDES... --] SCRIPT...``: the launcher's
entry point, as DESIGN.md names it. The launcher itself is :mod:`batchproc.control.launcher`."""

import sys

from batchproc.control.launcher import main

if __name__ == "__main__":
    sys.exit(main())
