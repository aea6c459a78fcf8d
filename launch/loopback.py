"""``python -m launch.loopback``: the same as ``python -m batchproc.control.loopback``."""

from batchproc.control.loopback import main

if __name__ == "__main__":
    main()
