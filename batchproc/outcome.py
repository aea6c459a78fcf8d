"""Run a job's child process with signals forwarded, and turn its outcome into an exit code.

Shared by ``batchproc run`` and ``launch.torch_distributed``, which nest (run -> launcher ->
torchrun -> workers): each level forwards a signal exactly once to the next and derives its exit
code from the run directory's state, because torchrun's own code cannot tell preempted from failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence

from batchproc import settings as _settings
from batchproc.settings import RunSettings

if TYPE_CHECKING:
    from batchproc.storage import RunDir

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

# Names that RunSettings.to_env() may leave out; a stale value from our own environment must not
# reach the child (e.g. BATCHPROC_LOCK_HELD=1 from an outer job on another run directory).
_OPTIONAL_ENV = (_settings.ENV_NAME, _settings.ENV_RUN_DIR, _settings.ENV_SLOTS, _settings.ENV_LOCK_HELD)


def child_env(run_settings: RunSettings, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """``base`` (default ``os.environ``) with ``run_settings`` written over it."""
    env = dict(os.environ if base is None else base)
    for name in _OPTIONAL_ENV:
        env.pop(name, None)
    env.update(run_settings.to_env())
    return env


def run_child(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``cmd`` to its end, forwarding SIGTERM/SIGINT/SIGUSR1/SIGHUP; return its exit code.

    The child gets its own process group, so a signal sent to ours (Ctrl-C, ``kill -- -PGID``)
    reaches it once, through us. Twice would break torchrun: a second signal during its graceful
    shutdown aborts the wait for the workers' checkpoint. A child killed by signal N returns 128+N.
    """
    pending: List[int] = []
    child: Optional[subprocess.Popen] = None

    def forward(signum: int, frame: object) -> None:
        if child is None:
            pending.append(signum)  # arrived before the child existed: deliver it once it does
        elif child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        child = subprocess.Popen(list(cmd), env=dict(env), process_group=0)
        for signum in pending:
            child.send_signal(signum)
        rc = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


def status_stamp(run_dir: Optional[RunDir]) -> Optional[float]:
    """When the run's status was last written; take it before starting a child (see below)."""
    if run_dir is None:
        return None
    from batchproc import report

    try:
        return report.read_status_file(run_dir).get("updated")
    except Exception:  # no stamp: any state found afterwards counts as this attempt's
        return None


def resolve_exit_code(child_rc: int, run_dir: Optional[RunDir], before: Optional[float] = None) -> int:
    """0 completed, 75 preempted (progress saved), else non-zero: the run failed.

    Without a run directory the child's code stands. With one, its recorded state decides, unless
    the child failed and the status still carries the stamp ``before`` (from :func:`status_stamp`):
    then no worker of this attempt wrote it (it died early), and a previous attempt's "preempted"
    or "completed" must not pass for this one's. A failure that no worker recorded (crash, OOM
    kill) is written as FAILED.
    """
    if run_dir is None:
        return child_rc
    from batchproc import report

    try:
        status = report.read_status_file(run_dir)
    except Exception as e:  # unreadable storage must not hide the child's own verdict
        print(f"batchproc: cannot read the run state in {run_dir.url}: {e}", file=sys.stderr)
        return child_rc if child_rc != 0 else 1
    # A clean exit may leave the status as it was (a rerun of a finished run has nothing to write),
    # and the state then still tells the truth; a failed child that wrote nothing has failed.
    trusted = child_rc == 0 or before is None or status.get("updated") != before
    state = report.RunState(status["state"]) if trusted and status.get("state") else None
    rc = report.exit_code(state, child_rc)
    # A finished run stays finished: a rerun that failed before its workers could say anything
    # (signalled at start-up) must not mark it failed, or every later rerun, which finds nothing
    # to do and writes nothing, would report that failure again.
    finished = status.get("state") == report.RunState.COMPLETED.value
    if rc not in (0, report.EXIT_PREEMPTED) and state in (None, report.RunState.RUNNING) and not finished:
        try:
            report.write_state(run_dir, report.RunState.FAILED, exit_code=rc)
        except Exception as e:
            print(f"batchproc: cannot record the failure in {run_dir.url}: {e}", file=sys.stderr)
    return rc
