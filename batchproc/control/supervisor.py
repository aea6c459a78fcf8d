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
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence

from batchproc import lifeline, settings as _settings
from batchproc.engine import verdict
from batchproc.rundir import lifecycle
from batchproc.rundir.lifecycle import IN_ON_FINISH, ExitCode, Phase, RunState, Where
from batchproc.settings import FORWARDED_SIGNALS, RunSettings

if TYPE_CHECKING:
    from batchproc.rundir.storage import RunDir

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
        self._child: Optional["subprocess.Popen[bytes]"] = None
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

    def _send(self, child: "subprocess.Popen[bytes]", signum: int) -> None:
        self.forwarded.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:  # it ended in between: resolve_exit_code reads how
            pass

    def starting_child(self) -> None:
        """A child is about to be started: a second Ctrl-C no longer interrupts us (see _on_signal)."""
        self._started = True

    def kill_child(self) -> None:
        """SIGKILL the child's process group now (the lease was lost: nothing may checkpoint, and
        a SIGTERM would ask for a checkpoint). The levels below end through their lifeline."""
        child = self._child
        if child is not None and child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def attach(self, child: "subprocess.Popen[bytes]") -> None:
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


#: Seconds a supervisor whose child ended waits for workers that outlived it (torchrun SIGKILLed:
#: its workers got SIGTERM from the kernel and checkpoint) before it reads the run's state.
WORKERS_WAIT_S = 60.0
#: Seconds the other ranks get to leave on their own once one left a verdict (see run_child).
VERDICT_GRACE_S = 5.0


def run_child(cmd: Sequence[str], env: Mapping[str, str], signals: Optional[PreemptionSignals] = None,
              verdicts: Optional[str] = None) -> int:
    """Run ``cmd`` to its end, forwarding SIGTERM/SIGINT/SIGUSR1/SIGHUP; return its exit code.

    The child gets its own process group, so a signal sent to ours (Ctrl-C, ``kill -- -PGID``)
    reaches it once, through us. Twice would break torchrun: a second signal during its graceful
    shutdown aborts the wait for the workers' checkpoint. A child killed by signal N returns 128+N.
    ``signals``, installed by the caller before its start-up, delivers what came before the child
    existed and tells (``signals.forwarded``) whether the child was asked to stop; without it the
    signals are handled only while this call runs.

    ``verdicts``: the folder where ranks that failed for good leave their verdicts. Their peers
    normally see their collectives break and leave at once; one still waiting for the failed rank
    where nothing breaks (the process group's rendezvous, when that rank failed in its script
    before ``torch_batch_process``) would wait the whole process-group timeout. So the child is
    asked to stop (SIGTERM, which torchrun passes on) :data:`VERDICT_GRACE_S` after the first verdict.
    """
    with PreemptionSignals() if signals is None else contextlib.nullcontext(signals) as signals:
        signals.starting_child()
        child = subprocess.Popen(list(cmd), env=lifeline.child_env(dict(env)), process_group=0)
        signals.attach(child)
        try:
            rc = _wait(child, verdicts)
        finally:
            signals.detach()
    return 128 - rc if rc < 0 else rc


def _wait(child: "subprocess.Popen[bytes]", verdicts: Optional[str]) -> int:
    if verdicts is None:
        return child.wait()
    deadline: Optional[float] = None
    while True:
        try:
            return child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if deadline is None and verdict.read(verdicts):
            deadline = time.monotonic() + VERDICT_GRACE_S
        elif deadline is not None and time.monotonic() > deadline:
            deadline = float("inf")  # once
            first = verdict.read(verdicts)[0]
            print(f"batchproc: rank {first['rank']} failed for good {VERDICT_GRACE_S:.0f} s ago "
                  f"({first['phase']}) and ranks are still running: stopping them", file=sys.stderr, flush=True)
            try:
                child.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass


def status_stamp(run_dir: Optional[RunDir]) -> Optional[float]:
    """When the run's status was last written; take it before starting a child (see below)."""
    if run_dir is None:
        return None
    try:
        return lifecycle.read_status(run_dir).updated
    except Exception:  # no stamp: any state found afterwards counts as this attempt's
        return None


def _record_preempted(run_dir: RunDir, reason: str) -> None:
    try:
        lifecycle.transition(run_dir, RunState.PREEMPTED, reason=reason, exit_code=ExitCode.PREEMPTED)
    except Exception as e:  # the exit code says it already; the next run resumes either way
        print(f"batchproc: cannot record the preemption in {run_dir.url}: {e}", file=sys.stderr)


def stop_before_start(run_dir: Optional[RunDir], signals: Sequence[int]) -> int:
    """The exit code of a command that was asked to stop before it started its child.

    Nothing ran, so nothing can be lost: 75 (run again to resume), with the run directory, if
    there is one, marked PREEMPTED; or 0 if the run has completed, which it stays. Call it holding
    the run's lock (or under a parent that holds it): it writes the run's status.
    """
    if run_dir is None:
        return ExitCode.PREEMPTED
    try:
        if lifecycle.read_state(run_dir) is RunState.COMPLETED:
            return ExitCode.COMPLETED
        exists = run_dir.exists("")
    except Exception as e:  # we were asked to stop and started nothing: that stands
        print(f"batchproc: cannot read the run state in {run_dir.url}: {e}", file=sys.stderr)
        return ExitCode.PREEMPTED
    if exists:  # none yet (a launcher under its parent's lock, say): there is no run to mark
        _record_preempted(run_dir, _reason(signals))
    return ExitCode.PREEMPTED


@dataclasses.dataclass(frozen=True)
class ExitDecision:
    """How an attempt ended: the exit code, and the state to record (None: leave the status as is),
    with why (a preemption's reason, or the cause of a failure no worker could record) and where."""

    exit_code: int
    record: Optional[RunState] = None
    reason: str = ""
    phase: Optional[Where] = None


_UNSAID = (None, RunState.RUNNING, RunState.FINISHING)  # the child ended without saying how
_DIED = ("no worker recorded an error of its own: one died (a signal or the out-of-memory killer), hung or "
         "lost its connection, and the launcher's output above names it")
DIED_RUNNING = _DIED + "; committed work is kept, and a rerun resumes"
DIED_IN_FINISH = _DIED + "; every batch is committed, and a rerun runs only on_finish"


@dataclasses.dataclass(frozen=True)
class AttemptOutcome:
    """What the supervisor knows when its child has ended: the input of :func:`decide`."""

    child_rc: int  #: the child's exit code (128+N for signal N)
    state: Optional[RunState]  #: what this attempt's workers recorded (None: nothing, or only an earlier attempt's stamp)
    completed_before: bool = False  #: status.json says COMPLETED, whatever this attempt did
    signalled: bool = False  #: we forwarded a preemption signal to the child
    interrupted: bool = False  #: rank 0 recorded the KeyboardInterrupt of Python's default SIGINT action
    signal_reason: str = ""  #: "signal SIGTERM", for the preemption's recorded reason
    failed_for_good: bool = False  #: a rank left a verdict (:mod:`batchproc.engine.verdict`)
    failed_after_completion: bool = False  #: a rank's script raised after torch_batch_process returned


def decide(outcome: AttemptOutcome) -> ExitDecision:
    """The exit-code policy, as a pure function (tests/test_lifecycle.py holds it to a table)."""
    child_rc, state, completed_before = outcome.child_rc, outcome.state, outcome.completed_before
    signalled, interrupted, signal_reason = outcome.signalled, outcome.interrupted, outcome.signal_reason
    failed_for_good, failed_after_completion = outcome.failed_for_good, outcome.failed_after_completion
    if failed_for_good:
        # The run failed, whatever code torchrun ended with: 0 when every worker left cleanly, 143
        # when we stopped the ranks still waiting for the failed one (run_child).
        child_rc = ExitCode.FAILED
    rc = lifecycle.exit_code_for(state, child_rc)
    if rc == ExitCode.COMPLETED and failed_after_completion:
        return ExitDecision(ExitCode.FAILED)  # the run completed (and stays so), then the script failed
    if rc == ExitCode.PREEMPTED and failed_for_good and not signalled:
        # A rank failed for good, and a peer took the SIGTERM that ended it for a preemption:
        # the run failed (a rerun would meet the same failure).
        return ExitDecision(ExitCode.FAILED, RunState.FAILED)
    if rc in (ExitCode.COMPLETED, ExitCode.PREEMPTED):
        return ExitDecision(rc)
    # Nobody said how it ended (or rank 0 said "KeyboardInterrupt"), and we had forwarded a
    # signal: that signal ended the attempt. Committed progress is intact and a rerun resumes.
    if signalled and (state in _UNSAID or interrupted):
        if completed_before:
            return ExitDecision(ExitCode.COMPLETED)  # the run had completed; nothing was left to do
        when = ("during start-up" if state is None else
                "during on_finish, after every batch was committed" if state is RunState.FINISHING else
                "before the workers could checkpoint")
        return ExitDecision(ExitCode.PREEMPTED, RunState.PREEMPTED, f"{signal_reason} {when}".strip())
    if state in _UNSAID and not completed_before:
        # A crash (OOM kill, SIGKILL, segfault) no worker could record; the state says where.
        if state is RunState.FINISHING:
            return ExitDecision(rc, RunState.FAILED, DIED_IN_FINISH, IN_ON_FINISH)
        return ExitDecision(rc, RunState.FAILED, DIED_RUNNING if state is RunState.RUNNING else "")
    return ExitDecision(rc)  # FAILED as recorded by a worker, or a completed run's rerun that failed early


def resolve_exit_code(child_rc: int, run_dir: Optional[RunDir], before: Optional[float] = None,
                      signals: Sequence[int] = (), since: Optional[float] = None,
                      verdicts: Sequence[Dict[str, Any]] = ()) -> int:
    """0 completed, 75 preempted (progress saved), else non-zero: the run failed.

    Without a run directory the child's code stands. With one, its recorded state decides, unless
    the child failed and the status still carries the stamp ``before`` (from :func:`status_stamp`):
    then no worker of this attempt wrote it (it died early), and a previous attempt's "preempted"
    or "completed" must not pass for this one's. See :func:`decide` for the rest. A failure is
    recorded with its root cause among the failure reports written since ``since``. ``verdicts``:
    those the ranks left (the run failed, whatever torchrun's own code says).
    """
    if verdicts:
        child_rc = ExitCode.FAILED  # as in decide(); before the status is trusted or not
    if run_dir is None:
        return child_rc
    try:
        status = lifecycle.read_status(run_dir)
    except Exception as e:  # unreadable storage must not hide the child's own verdict
        print(f"batchproc: cannot read the run state in {run_dir.url}: {e}", file=sys.stderr)
        return child_rc if child_rc != 0 else ExitCode.FAILED
    # A clean exit may leave the status as it was (a rerun of a finished run has nothing to write),
    # and the state then still tells the truth; a failed child that wrote nothing has failed.
    trusted = child_rc == 0 or before is None or status.updated != before
    state = status.state if trusted else None
    if state is RunState.FAILED and not verdicts and lifecycle.is_secondary(status.error or ""):
        # Rank 0 recorded only a consequence (its collective broke when a peer died, which no
        # one could record): decide as if nothing was said, from where the run had got to.
        state = RunState.FINISHING if status.all_committed else RunState.RUNNING
    interrupted = (state is RunState.FAILED and signal.SIGINT in signals
                   and (status.error or "").startswith("KeyboardInterrupt"))
    # A failing script exits non-zero at every level (its rank's verdict, then the launcher's code),
    # so a clean run costs no look at the failure reports.
    after = child_rc != 0 and _failed_after_completion(verdicts, run_dir, since)
    decision = decide(AttemptOutcome(
        child_rc, state, completed_before=status.state is RunState.COMPLETED, signalled=bool(signals),
        interrupted=interrupted, signal_reason=_reason(signals, "").strip(), failed_for_good=bool(verdicts),
        failed_after_completion=after))
    try:
        if decision.record is RunState.PREEMPTED:
            _record_preempted(run_dir, decision.reason)
        elif decision.exit_code not in (ExitCode.COMPLETED, ExitCode.PREEMPTED):
            _record_root_cause(run_dir, decision, since)
    except Exception as e:
        print(f"batchproc: cannot record the failure in {run_dir.url}: {e}", file=sys.stderr)
    return decision.exit_code


def _record_root_cause(run_dir: RunDir, decision: ExitDecision, since: Optional[float]) -> None:
    """FAILED with the root cause among the ranks' failure reports (a rank that failed first,
    rather than rank 0 seeing its collective break because of it)."""
    cause = lifecycle.root_cause(lifecycle.read_failures(run_dir, since))
    if cause is not None and not (cause.secondary and decision.reason):
        lifecycle.record_failure(run_dir, cause, exit_code=decision.exit_code)
    elif decision.record is RunState.FAILED:
        # Only a consequence was reported (a rank's collective broke when its peer died): the
        # decision's account of the crash is the truer cause.
        error = decision.reason or None
        if error and cause is not None:
            error += f"; rank {cause.rank} then saw {cause.error[:300]}"
        lifecycle.transition(run_dir, RunState.FAILED, exit_code=decision.exit_code, error=error,
                             phase=decision.phase.text if decision.phase else None,
                             phase_kind=decision.phase.kind.value if decision.phase else None,
                             failed_rank=None, traceback=None)


def _failed_after_completion(found: Sequence[Dict[str, Any]], run_dir: RunDir, since: Optional[float]) -> bool:
    """Whether a rank's script raised after torch_batch_process returned, in this attempt (seen in
    our verdicts, or in the run's failure reports when a nested launcher read the verdicts)."""
    if any(v.get("phase_kind") == Phase.SCRIPT_AFTER.value for v in found):
        return True
    try:
        return any(f.phase_kind == Phase.SCRIPT_AFTER.value for f in lifecycle.read_failures(run_dir, since))
    except Exception:
        return False


def supervise(cmd: Sequence[str], settings: RunSettings, run_dir: Optional[RunDir],
              signals: PreemptionSignals, *, holder: str, take_lock: bool,
              prepare: Optional[Callable[[], None]] = None,
              env_defaults: Optional[Mapping[str, str]] = None, name: str = "batchproc") -> int:
    """The supervision sequence that ``batchproc run`` and the launcher share.

    signals (installed by the caller) -> the run's lock (``take_lock``) -> nothing more if a
    stop came already -> ``prepare`` (``--fresh``) -> the child with ``settings`` in its
    environment -> the exit code from the run's state (:func:`resolve_exit_code`).
    """
    from batchproc.errors import RunDirLockedError, RunDirUnwritableError
    from batchproc.rundir import job_lock
    from batchproc.rundir.storage import RunDir, acquire_run_lock

    lock = None
    member: Optional[job_lock.JobMembership] = None
    if run_dir is not None and settings.lock_held and not take_lock:
        # Under our parent's lock: hold the run directory as one more process of its job.
        try:
            member = job_lock.JobMembership(job_lock.lock_root(run_dir), worker=False).join()
        except (RunDirLockedError, OSError) as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            return ExitCode.LOCKED
    if run_dir is not None and take_lock:
        try:
            lock = acquire_run_lock(run_dir, holder=holder, wait_for_earlier_job=True)
            if not run_dir.is_local and lock.holder_died:
                # The lease of a supervisor SIGKILLed on this machine is taken over at once (its
                # pid is gone); the workers it left here must be gone too before anything starts.
                # (A live holder past its lease, frozen or cut off, is fenced by the records.)
                member = job_lock.take_over(job_lock.lock_root(run_dir))
        except RunDirLockedError as e:
            if lock is not None:
                lock.release()
                lock = None
            print(f"{name}: error: {e}", file=sys.stderr)
            return ExitCode.LOCKED
        except OSError as e:  # read-only, full, or not ours: say so, not a traceback
            if lock is not None:
                lock.release()
                lock = None
            print(f"{name}: error: {RunDirUnwritableError.wrap(run_dir.url, e)}", file=sys.stderr)
            return ExitCode.UNWRITABLE
        lock.on_lost = lambda message: signals.kill_child()
        settings = dataclasses.replace(settings, lock_held=True, lease_id=lock.lease_id)
    try:
        if signals.received:
            # Asked to stop before anything started: start nothing (nor wipe anything for --fresh).
            # The status is written only under the run's lock (ours or our parent's): on several
            # nodes the others may be running.
            print(f"{name}: {signals.reason}: nothing started", file=sys.stderr)
            return stop_before_start(run_dir if settings.lock_held else None, signals.received)
        if prepare is not None:
            prepare()
        if lock is not None and run_dir is not None:
            # The ranks' failure reports of an earlier attempt; this one's stay after it ends, for
            # the summary (batchproc run) and whoever looks into the run directory.
            lifecycle.clear_failures(run_dir)
        env = child_env(settings)
        for key, value in (env_defaults or {}).items():
            env.setdefault(key, value)
        verdicts = tempfile.mkdtemp(prefix="batchproc-verdicts-")
        env[_settings.ENV_VERDICT_DIR] = verdicts  # ours, even under an outer supervisor: we read it
        before, since = status_stamp(run_dir), time.time()
        try:
            try:
                child_rc = run_child(cmd, env, signals, verdicts)
            except OSError as e:
                print(f"{name}: error: cannot start {shlex.join(cmd)!r}: {e}", file=sys.stderr)
                return ExitCode.NOT_FOUND
            # A rank that failed for good left a verdict, and every worker left cleanly so that
            # torchrun would not replay it.
            found = verdict.read(verdicts)
            announced = verdict.announced_run_dir(verdicts) if run_dir is None else None
            if announced is not None:  # the script chose its run directory: its state decides too
                run_dir = RunDir(announced["url"], settings.storage_options)
                before = announced.get("status_updated")
            if found and run_dir is None:
                first = found[0]
                print(f"{name}: failed: {first['error']} (rank {first['rank']}, {first['phase']})", file=sys.stderr)
            if lock is not None and lock.lost is not None:
                print(f"{name}: error: {lock.lost}", file=sys.stderr, flush=True)
                return ExitCode.LOCKED
            if run_dir is not None and not job_lock.wait_for_workers(job_lock.lock_root(run_dir), WORKERS_WAIT_S):
                print(f"{name}: warning: workers of this job still hold {run_dir.url} {WORKERS_WAIT_S:.0f} s after "
                      "their launcher ended", file=sys.stderr, flush=True)
            return resolve_exit_code(child_rc, run_dir, before, signals.forwarded, since, found)
        finally:
            shutil.rmtree(verdicts, ignore_errors=True)
    finally:
        if lock is not None:
            lock.release()
        if member is not None:
            member.leave()
