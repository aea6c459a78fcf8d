"""A process of a job ends with the process that started it.

``batchproc run`` -> launcher -> torchrun -> workers -> loader workers: each level starts the
next in a process group (or session) of its own, so a SIGKILL of one level (the OOM killer,
``kill -9``, a node agent) reaches none below it, and they would run on beside the next job. Each
level therefore asks the kernel for a SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``):
a preemption at every level, which checkpoints and stops as any other does. Loader workers end
with their rank already (:mod:`batchproc.engine.loader`). Leaf module: no torch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Dict, MutableMapping, Optional

#: Set by :func:`batchproc.control.supervisor.run_child` for its child: the pid it must outlive
#: not. Read and removed by :func:`die_with_parent`, so it never reaches a grandchild.
ENV_PARENT_PID = "BATCHPROC_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def child_env(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` for a child of this process, naming this process as the parent it must not outlive."""
    return dict(env, **{ENV_PARENT_PID: str(os.getpid())})


def die_with_parent(sig: int = signal.SIGTERM, environ: Optional[MutableMapping[str, str]] = None,
                    started_by_supervisor: bool = True) -> bool:
    """Get ``sig`` when the parent dies; if it died already, get it now. False where Linux's
    ``prctl`` is unavailable (nothing is done there).

    ``started_by_supervisor``: this process is the child that ``run_child`` started, so the pid it
    left in the environment is our parent's. A torchrun worker passes False: the variable it may
    see is its grandparent's (torchrun itself passes the environment on unread).
    """
    env = os.environ if environ is None else environ
    expected = env.pop(ENV_PARENT_PID, None) if started_by_supervisor else None
    env.pop(ENV_PARENT_PID, None)
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may have died before prctl: then nobody will send the signal.
    parent = os.getppid()
    if parent == 1 or (expected is not None and expected.isdigit() and int(expected) != parent):
        os.kill(os.getpid(), sig)
    return True


def under_torchrun(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Whether this process is a worker that torchrun's agent started (its parent is the agent)."""
    env = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in env and "LOCAL_RANK" in env


def exit_without_collecting() -> None:
    """Spare the ending process the garbage collection of everything it still holds.

    Call it where nothing is left but the interpreter's own exit. Python's finalization collects
    the whole heap, and with torch imported that heap is millions of objects: a process that
    imported torch takes 1.5-2.5 s to exit on a 2-core VM, 0.4 s after this (docs/SCALING.md).
    ``gc.freeze()`` moves every object into the permanent generation, which no collection visits;
    objects are still freed by their reference counts, files flushed and closed, ``atexit``
    handlers run (and what they allocate is collected as usual).
    """
    import gc

    gc.freeze()
