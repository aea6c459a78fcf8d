"""Run a job's child process with signals forwarded, and turn its outcome into an exit code.

Shared by ``batchproc run`` and ``launch.torch_distributed``, which nest (run -> launcher ->
torchrun -> workers): each level forwards a signal exactly once to the next and derives its exit
code from the run directory's state, because torchrun's own code cannot tell preempted from failed.

A preemption signal means "stop; progress is saved; run again to resume" (exit code 75) at any
moment, start-up included: both commands record signals from the top of their ``main`` with
:class:`PreemptionSignals`, start no child once one has come, and count a child that failed after
we forwarded one, before any worker said how it ended, as preempted (:func:`resolve_exit_code`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

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


class PreemptionSignals:
    """SIGTERM/SIGINT/SIGUSR1/SIGHUP received by this process, each forwarded once to its child.

    Installed (``with PreemptionSignals() as signals:``) first thing in a command, so that a signal
    during its start-up (config, imports, the run lock) is recorded instead of killing it with
    Python's default action, which would end the run as failed. Before a child exists a signal is
    only recorded, and delivered when :func:`run_child` attaches one; while the child runs it is
    forwarded at once; after the child ended it is only recorded (there is nobody left to tell).
    The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: List[int] = []  # every signal, in order: "stop" was asked if non-empty
        self.forwarded: List[int] = []  # those the child was sent (see resolve_exit_code)
        self._pending: List[int] = []  # received before there was a child
        self._child: Optional[subprocess.Popen] = None
        self._started = False  # run_child began starting a child
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "PreemptionSignals":
        for sig in FORWARDED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self._child = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def reason(self) -> str:
        """What status.json records as the preemption's reason."""
        return _reason(self.received)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Python runs handlers in the main thread, between two bytecodes of the code they
        # interrupt, which cannot interrupt them in turn: each signal lands in exactly one of
        # _pending (no child yet, see attach) or the child, so none is sent twice or lost.
        if signum == signal.SIGINT and not self._started and signal.SIGINT in self.received:
            # A second Ctrl-C before any child: the user insists (a start-up hung on storage, say).
            # Never once a child is being started: Popen interrupted could leave it running unseen.
            raise KeyboardInterrupt
        self.received.append(signum)
        child = self._child
        if child is None:
            self._pending.append(signum)
        elif child.poll() is None:
            self._send(child, signum)

    def _send(self, child: subprocess.Popen, signum: int) -> None:
        self.forwarded.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:  # it ended in between: resolve_exit_code reads how
            pass

    def attach(self, child: subprocess.Popen) -> None:
        """Forward to ``child`` from now on, starting with the signals that came before it."""
        self._child = child  # from here on the handler sends; what it queued before is sent below
        pending, self._pending = self._pending, []
        for signum in pending:
            self._send(child, signum)

    def detach(self) -> None:
        self._child = None
        self._pending = []  # the child ended: later signals have nobody to reach


def _reason(signals: Sequence[int], when: str = "during start-up") -> str:
    return f"signal {signal.Signals(signals[0]).name} {when}" if signals else when


def run_child(cmd: Sequence[str], env: Mapping[str, str], signals: Optional[PreemptionSignals] = None) -> int:
    """Run ``cmd`` to its end, forwarding SIGTERM/SIGINT/SIGUSR1/SIGHUP; return its exit code.

    The child gets its own process group, so a signal sent to ours (Ctrl-C, ``kill -- -PGID``)
    reaches it once, through us. Twice would break torchrun: a second signal during its graceful
    shutdown aborts the wait for the workers' checkpoint. A child killed by signal N returns 128+N.
    ``signals``, installed by the caller before its start-up, delivers what came before the child
    existed and tells (``signals.forwarded``) whether the child was asked to stop; without it the
    signals are handled only while this call runs.
    """
    with PreemptionSignals() if signals is None else contextlib.nullcontext(signals) as signals:
        signals._started = True
        child = subprocess.Popen(list(cmd), env=dict(env), process_group=0)
        signals.attach(child)
        try:
            rc = child.wait()
        finally:
            signals.detach()
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


def _record_preempted(run_dir: RunDir, reason: str) -> None:
    from batchproc import report

    try:
        # exit_code too: write_state keeps the other keys, and a failure's code must not linger.
        report.write_state(run_dir, report.RunState.PREEMPTED, reason=reason, exit_code=report.EXIT_PREEMPTED)
    except Exception as e:  # the exit code says it already; the next run resumes either way
        print(f"batchproc: cannot record the preemption in {run_dir.url}: {e}", file=sys.stderr)


def stop_before_start(run_dir: Optional[RunDir], signals: Sequence[int]) -> int:
    """The exit code of a command that was asked to stop before it started its child.

    Nothing ran, so nothing can be lost: 75 (run again to resume), with the run directory, if
    there is one, marked PREEMPTED; or 0 if the run has completed, which it stays. Call it holding
    the run's lock (or under a parent that holds it): it writes the run's status.
    """
    from batchproc import report

    if run_dir is None:
        return report.EXIT_PREEMPTED
    try:
        if report.read_status_file(run_dir).get("state") == report.RunState.COMPLETED.value:
            return 0
        exists = run_dir.exists("")
    except Exception as e:  # we were asked to stop and started nothing: that stands
        print(f"batchproc: cannot read the run state in {run_dir.url}: {e}", file=sys.stderr)
        return report.EXIT_PREEMPTED
    if exists:  # none yet (a launcher under its parent's lock, say): there is no run to mark
        _record_preempted(run_dir, _reason(signals))
    return report.EXIT_PREEMPTED


def resolve_exit_code(child_rc: int, run_dir: Optional[RunDir], before: Optional[float] = None,
                      signals: Sequence[int] = ()) -> int:
    """0 completed, 75 preempted (progress saved), else non-zero: the run failed.

    Without a run directory the child's code stands. With one, its recorded state decides, unless
    the child failed and the status still carries the stamp ``before`` (from :func:`status_stamp`):
    then no worker of this attempt wrote it (it died early), and a previous attempt's "preempted"
    or "completed" must not pass for this one's. A failure that no worker recorded (crash, OOM
    kill) is written as FAILED, unless we had forwarded a preemption signal (``signals``, from
    :attr:`PreemptionSignals.forwarded`): then the child died of it while starting, before it
    could checkpoint, and the attempt is PREEMPTED (75) -- or, on a completed run, still 0.
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
    if rc in (0, report.EXIT_PREEMPTED):
        return rc
    # No worker of this attempt said how it ended (nothing written, or still RUNNING: a rank died
    # between writing RUNNING and installing its own handlers), or rank 0 recorded the
    # KeyboardInterrupt that Python's default SIGINT action raised in it: with a signal forwarded,
    # that signal is what ended the attempt. Committed progress is intact and a rerun resumes.
    interrupted = (state is report.RunState.FAILED and signal.SIGINT in signals
                   and str(status.get("error", "")).startswith("KeyboardInterrupt"))
    if signals and (state in (None, report.RunState.RUNNING) or interrupted):
        if finished:
            return 0  # the run had completed before this attempt; nothing was left to do
        when = "during start-up" if state is None else "before the workers could checkpoint"
        _record_preempted(run_dir, _reason(signals, when))
        return report.EXIT_PREEMPTED
    if state in (None, report.RunState.RUNNING) and not finished:
        try:
            report.write_state(run_dir, report.RunState.FAILED, exit_code=rc)
        except Exception as e:
            print(f"batchproc: cannot record the failure in {run_dir.url}: {e}", file=sys.stderr)
    return rc
