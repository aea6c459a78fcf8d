"""Failures a restart cannot fix end the run at the first attempt, without torchrun replaying them.

torchrun restarts the workers whenever one exits non-zero. That is right for a SIGKILLed worker, a
lost node or a collective timeout, and wrong for an exception in the user's code, bad data past its
budget, or a stuck batch: every restart redoes the work since the last checkpoint and meets the
same failure again. Under a supervisor (``batchproc run`` or the launcher, which set
``BATCHPROC_VERDICT_DIR``), a rank that fails that way writes a verdict there and exits 0, as a
cooperative stop does; its peers, whose collectives break when it leaves, find the verdict and exit
0 too. torchrun then ends without restarting, and the supervisor turns the verdict into the failed
exit code. Without a supervisor the error is raised as usual.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

from batchproc.errors import (BadSampleError, BatchTimeoutError, CorruptCheckpointError, FingerprintMismatchError,
                              InputChangedError, LeaseLostError, PeerFailedError, RecordTakenError, TooManyBadBatchesError,
                              TooManyBadSamplesError, UserCodeError)
from batchproc.rundir.layout import ANNOUNCED_RUN_DIR
from batchproc.rundir.lifecycle import Where
from batchproc.settings import ENV_VERDICT_DIR

#: Errors that the same inputs and code would raise again on a restart.
DETERMINISTIC = (UserCodeError, BadSampleError, TooManyBadSamplesError, TooManyBadBatchesError,
                 FingerprintMismatchError, InputChangedError, BatchTimeoutError, PeerFailedError,
                 CorruptCheckpointError,  # the same damaged files are read again
                 LeaseLostError, RecordTakenError)  # another job holds the run: a restart of this one cannot commit


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` was raised inside ``torch.distributed``: a collective in the user's code
    broke (a peer died, a connection dropped). A consequence a restart may cure, not the user's own
    error, so it is neither wrapped as one nor skipped under ``bad_batches="skip"``."""
    dist = sys.modules.get("torch.distributed")  # not imported here: the launcher does without torch
    if dist is not None and isinstance(error, getattr(dist, "DistError", ())):
        return True
    tb, last = error.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and _TORCH_DISTRIBUTED in last.tb_frame.f_code.co_filename


_TORCH_DISTRIBUTED = os.path.join("torch", "distributed", "")




def announce_run_dir(url: str, status_updated: Optional[float]) -> None:
    """Rank 0 tells a supervisor started without a run directory (the launcher running a script
    that picks its own storage) which one it opened, and the status stamp it found there, so that
    the exit code follows the run's state (75 when preempted) as under ``batchproc run``."""
    folder = verdict_dir()
    if folder is None:
        return
    _write_json(os.path.join(folder, ANNOUNCED_RUN_DIR), {"url": url, "status_updated": status_updated})


def announced_run_dir(folder: str) -> Optional[Dict[str, Any]]:
    """What :func:`announce_run_dir` left in ``folder``, if anything."""
    try:
        with open(os.path.join(folder, ANNOUNCED_RUN_DIR)) as f:
            found: Dict[str, Any] = json.load(f)
        return found
    except (OSError, ValueError):
        return None


def verdict_dir(environ: Optional[Dict[str, str]] = None) -> Optional[str]:
    env = os.environ if environ is None else environ
    return env.get(ENV_VERDICT_DIR) or None


#: Storage that is full or read-only stays so across a restart: fail at once, naming the path.
_DETERMINISTIC_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def is_deterministic(error: BaseException) -> bool:
    if isinstance(error, DETERMINISTIC):
        return True
    seen = set()
    while error is not None and id(error) not in seen:  # also when wrapped (raise ... from e)
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DETERMINISTIC_ERRNOS:
            return True
        error = error.__cause__  # type: ignore[assignment]
    return False


def write(error: str, rank: int, where: Where, folder: Optional[str] = None) -> bool:
    """Leave this rank's verdict for the supervisor; False without one (nobody would read it)."""
    folder = folder or verdict_dir()
    if folder is None:
        return False
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, f"r{rank}-p{os.getpid()}.json"),
                {"error": error, "rank": rank, "phase": where.text, "phase_kind": where.kind.value, "time": time.time()})
    return True


def _write_json(path: str, obj: Dict[str, Any]) -> None:
    """Whole or not at all: the supervisor may read the folder at any moment."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def read(folder: Optional[str]) -> List[Dict[str, Any]]:
    """The verdicts left in ``folder``, earliest first."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    found.append(json.load(f))
            except (OSError, ValueError):
                continue
    return sorted(found, key=lambda v: v.get("time", 0))


def peer_failed() -> bool:
    """Whether another rank of this job left a verdict (our collective broke because it left)."""
    return bool(read(verdict_dir()))


def exit_cleanly(error: BaseException, rank: int, where: Where) -> None:
    """Print the error as Python would, then leave with code 0 (see the module docstring)."""
    if isinstance(error, PeerFailedError):  # not this rank's failure: no traceback to blame it with
        print(f"batchproc: rank {rank}: {error}; this worker exits without asking torchrun for a restart",
              file=sys.stderr, flush=True)
        raise SystemExit(0)
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"batchproc: rank {rank} failed {where.text}; a restart would fail the same way, so this worker "
          "exits without asking torchrun for one", file=sys.stderr, flush=True)
    raise SystemExit(0)


def handle(error: BaseException, rank: int, where: Where) -> None:
    """In ``torch_batch_process``'s error path: leave cleanly if the failure is one a restart cannot
    fix (ours or a peer's) and a supervisor reads verdicts; otherwise return, and the caller raises."""
    if verdict_dir() is None or isinstance(error, SystemExit):
        return
    if is_deterministic(error):
        if write(f"{type(error).__name__}: {error}"[:2000], rank, where):
            exit_cleanly(error, rank, where)
    elif peer_failed():
        print(f"batchproc: rank {rank}: {type(error).__name__} after a peer failed for good; exiting cleanly",
              file=sys.stderr, flush=True)
        raise SystemExit(0)
