"""Every process of a job holds its local run directory, not only the one that took the lock.

The run's ``filelock`` (``.lock``) belongs to the process that took it: ``batchproc run``, the
launcher, or rank 0 of a plain ``python script.py``. If that process is SIGKILLed (the OOM
killer, ``kill -9``, a node agent), the lock goes with it while the launcher, torchrun and the
workers below it still run, and a second job on the same run directory would find it free,
delete their staged files and commit beside them. So every process of a job also holds a shared
``flock`` on ``.lock.job`` for as long as it lives (the kernel drops it when the process dies, so
nothing is left behind), and a new job, once it has ``.lock``, waits for an exclusive one there:
for every process of the job before it to be gone. Workers also hold ``.lock.workers``, so that
a supervisor whose child died under it (torchrun SIGKILLed) waits for the orphaned workers to
finish their checkpoint before it decides the exit code from the run's state.

On an object store the lease (:class:`batchproc.rundir.storage.RunLock`) stands for ``.lock``,
and these flocks live in a folder of this machine named after the run's URL
(:func:`lock_root`): a lease left by a SIGKILLed supervisor is taken over at once when its pid is
gone, and the new job still waits for the workers that supervisor left on this machine. Workers
on other machines are fenced by the lease check before each record and by records that cannot
be written twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Optional

from batchproc.errors import RunDirLockedError
from batchproc.rundir import layout

if TYPE_CHECKING:
    from batchproc.rundir.storage import RunDir

#: How long a new job waits for the processes of the job before it (their supervisor died, and
#: they checkpoint and stop: torchrun's grace for that is 30 s).
PREVIOUS_JOB_WAIT_S = 90.0


def lock_root(run_dir: "RunDir") -> str:
    """Where a job's flocks live: the run directory itself when it is local, else a folder of this
    machine named after the run's URL (``$BATCHPROC_LOCK_DIR`` or the temp dir), made if missing."""
    if run_dir.is_local:
        os.makedirs(run_dir.root, exist_ok=True)
        return str(run_dir.root)
    base = os.environ.get("BATCHPROC_LOCK_DIR") or tempfile.gettempdir()
    folder = os.path.join(base, "batchproc-jobs", hashlib.sha256(run_dir.url.encode()).hexdigest()[:24])
    os.makedirs(folder, exist_ok=True)
    return folder


class _Flock:
    """One ``flock`` on one file, on a descriptor that child processes do not inherit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def take(self, mode: int, timeout_s: float) -> bool:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.1)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None


class JobMembership:
    """This process's shared hold on a local run directory (see the module docstring)."""

    def __init__(self, root: str, worker: bool) -> None:
        self._job = _Flock(os.path.join(root, layout.JOB_LOCK))
        self._workers = _Flock(os.path.join(root, layout.WORKERS_LOCK)) if worker else None

    def join(self, timeout_s: float = 10.0) -> "JobMembership":
        """Hold the run directory as a process of the running job.

        Fails only while a new job waits for the processes of the one before it: this process
        belongs to that old job, whose supervisor is gone, and must not start now.
        """
        if not self._job.take(fcntl.LOCK_SH, timeout_s) or (
                self._workers is not None and not self._workers.take(fcntl.LOCK_SH, timeout_s)):
            self.leave()
            raise RunDirLockedError(
                f"run directory {os.path.dirname(self._job.path)} was taken by a new job while this process "
                "started (the supervisor of this one is gone); this process stops without touching it.")
        return self

    def leave(self) -> None:
        if self._workers is not None:
            self._workers.release()
        self._job.release()


def take_over(root: str, timeout_s: float = PREVIOUS_JOB_WAIT_S) -> JobMembership:
    """For the job that has just taken ``.lock``: wait until no process of an earlier job holds the
    run directory, then hold it as this job's first member. Raises :class:`RunDirLockedError`
    naming the wait when they outlive ``timeout_s``."""
    member = JobMembership(root, worker=False)
    job = member._job
    if not job.take(fcntl.LOCK_EX, 0.0):
        print(f"batchproc: processes of an earlier job on {root} are still running (the command that "
              f"started them is gone); waiting up to {timeout_s:.0f} s for them to checkpoint and stop",
              file=sys.stderr, flush=True)
        if not job.take(fcntl.LOCK_EX, timeout_s):
            job.release()
            raise RunDirLockedError(
                f"run directory {root} is still in use by processes of an earlier job (their supervisor "
                f"died; they did not stop within {timeout_s:.0f} s). Find them with `fuser {root}/{layout.JOB_LOCK}`, "
                "stop them, then run again; nothing committed is lost.")
    job.take(fcntl.LOCK_SH, 0.0)  # converted in place: this job's own processes join beside it
    return member


def wait_for_workers(root: str, timeout_s: float) -> bool:
    """Wait until no worker holds the run directory (their parent died under them and they are
    checkpointing); True if none is left."""
    probe = _Flock(os.path.join(root, layout.WORKERS_LOCK))
    try:
        return probe.take(fcntl.LOCK_EX, timeout_s)
    finally:
        probe.release()
