"""The run's lifecycle: its states, the exit codes they map to, and the only writer of ``status.json``.

States and transitions (one owner: :func:`transition`)::

    (none) ──> RUNNING ──> FINISHING ──> COMPLETED      (COMPLETED is final)
                 │  ▲          │
                 ▼  │          ▼
          PREEMPTED / FAILED <─┘   (both resumable: the next start goes back to RUNNING,
                                     or to FINISHING when every batch was already committed)

* RUNNING: batches are being processed and committed.
* FINISHING: every batch is committed (outputs published, metrics final) and ``on_finish`` is
  running. A start that finds it (or PREEMPTED/FAILED with every batch committed) loads no batch
  and runs ``on_finish`` again, which must therefore be idempotent.
* COMPLETED: every rank's ``on_finish`` returned. It never changes again (until ``--fresh``).
* PREEMPTED: stopped after a checkpoint (signal or ``batchproc stop``); exit code 75.
* FAILED: ended by an error; ``error``, ``failed_rank`` and ``phase`` say which and where.

Workers report failures as separate files (``failures/``) so that a rank other than 0 never
races rank 0 on ``status.json``; :func:`root_cause` picks the one that started it all.
No torch import: ``batchproc status`` reads this module.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import time
import traceback
from typing import Any, Dict, FrozenSet, List, Mapping, Optional

from batchproc.rundir.layout import FAILURES, STATUS_FILE
from batchproc.rundir.storage import RunDir


class ExitCode(enum.IntEnum):
    """Exit codes of ``batchproc run`` and ``python -m launch.torch_distributed``."""

    COMPLETED = 0
    FAILED = 1  #: the generic failure code, when the child's own code says nothing (0, or unknown)
    USAGE = 2  #: bad command line or config
    LOCKED = 3  #: another job holds the run directory
    UNWRITABLE = 73  #: EX_CANTCREAT: the run directory cannot be written (read-only, full, not ours)
    PREEMPTED = 75  #: EX_TEMPFAIL: progress saved; running the same command again resumes
    BROKEN_PIPE = 141  #: 128 + SIGPIPE: stdout was closed (``batchproc status | head``)
    NOT_FOUND = 127  #: the entrypoint cannot be started, as a shell says


class RunState(str, enum.Enum):
    """Where a run stands; see the module docstring for the transitions."""

    RUNNING = "running"
    FINISHING = "finishing"
    COMPLETED = "completed"
    PREEMPTED = "preempted"
    FAILED = "failed"


_ANY_BUT_COMPLETED: FrozenSet[RunState] = frozenset(set(RunState) - {RunState.COMPLETED})
#: Allowed transitions: state now -> states it may go to. A completed run stays completed.
TRANSITIONS: Mapping[Optional[RunState], FrozenSet[RunState]] = {
    None: _ANY_BUT_COMPLETED,
    RunState.RUNNING: _ANY_BUT_COMPLETED,
    RunState.FINISHING: frozenset({RunState.FINISHING, RunState.COMPLETED, RunState.PREEMPTED, RunState.FAILED}),
    RunState.PREEMPTED: _ANY_BUT_COMPLETED,
    RunState.FAILED: _ANY_BUT_COMPLETED,
    RunState.COMPLETED: frozenset({RunState.COMPLETED}),
}
_STARTS = (RunState.RUNNING, RunState.FINISHING)
_CAUSE_FIELDS = ("error", "reason", "failed_rank", "phase", "phase_kind", "exit_code", "traceback")


@dataclasses.dataclass
class RunStatus:
    """``status.json``, typed. Unknown keys in the file are ignored (newer writers may add some)."""

    state: Optional[RunState] = None
    updated: Optional[float] = None
    attempt: Optional[str] = None
    attempts: int = 0
    restarts: int = 0
    world_size: Optional[int] = None
    committed_batches: int = 0
    total_batches: Optional[int] = None
    committed_samples: int = 0
    total_samples: Optional[int] = None
    samples_per_s: Optional[float] = None
    skipped_samples: int = 0
    skipped_batches: int = 0
    checkpoint_seq: Optional[int] = None
    schedule: Optional[str] = None  #: "dynamic" when ranks pull batches (else static)
    rank_batches: Dict[str, int] = dataclasses.field(default_factory=dict)  #: dynamic: rank -> batches this attempt
    metrics: Dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: Optional[str] = None  #: PREEMPTED: what asked the run to stop
    error: Optional[str] = None  #: FAILED: the root cause, "Type: message"
    traceback: Optional[str] = None  #: FAILED: the head of the root cause's traceback
    failed_rank: Optional[int] = None
    phase: Optional[str] = None  #: FAILED: "before the first batch", "in global batch 7", "in on_finish", ...
    phase_kind: Optional[str] = None  #: FAILED: the :class:`Phase` of ``phase``
    exit_code: Optional[int] = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "RunStatus":
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in raw.items() if k in names}
        state = known.pop("state", None)
        return cls(state=RunState(state) if state else None, **known)

    def to_json(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"] = self.state.value if self.state else None
        return out

    @property
    def all_committed(self) -> bool:
        return self.total_batches is not None and self.committed_batches >= self.total_batches


class IllegalTransition(RuntimeError):
    """A state change the lifecycle does not allow (a bug in batchproc, never the user's doing)."""


def read_status(run_dir: RunDir) -> RunStatus:
    return RunStatus.from_json(run_dir.read_json_or_none(STATUS_FILE) or {})


def read_state(run_dir: RunDir) -> Optional[RunState]:
    return read_status(run_dir).state


def transition(run_dir: RunDir, state: RunState, **fields: Any) -> bool:
    """Move the run to ``state``, updating ``fields``; the one writer of ``status.json``.

    Returns False, writing nothing, when the run is COMPLETED and ``state`` is not: a completed run
    stays completed (a rerun that failed before finding out there was nothing to do has lost
    nothing, and every later rerun, which writes nothing, would otherwise report that failure).
    Any other transition outside :data:`TRANSITIONS` raises :class:`IllegalTransition`.
    A start (RUNNING or FINISHING from another state) clears the previous end's cause.
    """
    status = read_status(run_dir)
    if state not in TRANSITIONS[status.state]:
        if status.state is RunState.COMPLETED:
            return False
        raise IllegalTransition(f"run {run_dir.url}: {status.state} -> {state.value} is not allowed")
    if state in _STARTS and status.state not in _STARTS:
        for name in _CAUSE_FIELDS:
            setattr(status, name, None)
    for name, value in fields.items():
        if not hasattr(status, name):
            raise TypeError(f"status.json has no field {name!r}")
        setattr(status, name, value)
    status.state = state
    status.updated = time.time()
    # Terminal states are what exit codes and resumes are decided from: they must survive a crash.
    run_dir.write_json(STATUS_FILE, status.to_json(), durable=state in (RunState.COMPLETED, RunState.FINISHING))
    return True


def exit_code_for(state: Optional[RunState], child_rc: int) -> int:
    """The exit code a recorded state means: 0 completed, 75 preempted, else the failure's code.

    RUNNING or FINISHING after the child ended, or no state at all, means it died without saying
    how (a crash): a failure, whose code is the child's own unless that was 0.
    """
    if state is RunState.COMPLETED:
        return ExitCode.COMPLETED
    if state is RunState.PREEMPTED:
        return ExitCode.PREEMPTED
    return child_rc if child_rc != 0 else ExitCode.FAILED


# -- failure reports -------------------------------------------------------------------------


class Phase(str, enum.Enum):
    """Where in a job a failure happened, for programs (``phase_kind``); :class:`Where` carries the
    human text beside it ("in global batch 7"), which is only ever shown, never compared."""

    SCRIPT_BEFORE = "script-before"  #: in the script, before torch_batch_process
    START = "start"  #: in torch_batch_process, before the first batch
    LOADING = "loading"  #: loading a batch
    BATCH = "batch"  #: in process_batch
    STUCK = "stuck"  #: a batch past batch_timeout_s
    CHECKPOINT = "checkpoint"  #: in a commit, the final one included
    OVER_BOUND = "over-bound"  #: past max_bad_samples or max_bad_batches
    FINAL = "final"  #: every batch committed, before on_finish
    ON_FINISH = "on-finish"  #: in the user's on_finish
    AFTER_ON_FINISH = "after-on-finish"
    SCRIPT_AFTER = "script-after"  #: in the script, after torch_batch_process returned


@dataclasses.dataclass(frozen=True)
class Where:
    """A phase and its human text."""

    kind: Phase
    text: str

    def __str__(self) -> str:
        return self.text


BEFORE_FIRST_BATCH = Where(Phase.START, "before the first batch")
IN_ON_FINISH = Where(Phase.ON_FINISH, "in on_finish")

# Errors that are consequences, not causes: a rank whose peer died sees its collective fail.
_SECONDARY = re.compile(r"PeerFailedError|DistBackendError|DistNetworkError|DistStoreError|Connection closed by peer|"
                        r"Connection reset by peer|gloo|NCCL|Broken pipe|KeyboardInterrupt|timed out",
                        re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Failure:
    """What one rank reported when it failed."""

    error: str
    rank: int
    phase: str  #: the human text of where it happened
    time: float
    traceback: str = ""
    attempt: Optional[str] = None
    phase_kind: Optional[str] = None  #: a :class:`Phase` value (None in reports of older versions)

    @property
    def secondary(self) -> bool:
        return is_secondary(self.error)


def is_secondary(error: str) -> bool:
    """Whether an error message reads as the consequence of another failure (a peer or a store
    that went away, a collective that timed out) rather than a cause of its own."""
    return _SECONDARY.search(error) is not None


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def report_failure(run_dir: RunDir, error: BaseException, rank: int, where: Where,
                   attempt: Optional[str] = None) -> Failure:
    """Record this rank's failure as a file of its own (every rank may fail at once)."""
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__, limit=8))
    failure = Failure(describe_error(error), rank, where.text, time.time(), tb[-4000:], attempt, where.kind.value)
    run_dir.write_json(f"{FAILURES}/r{rank}-p{os.getpid()}.json", dataclasses.asdict(failure))
    return failure


def read_failures(run_dir: RunDir, since: Optional[float] = None) -> List[Failure]:
    out = []
    for name in run_dir.listdir(FAILURES):
        raw = run_dir.read_json_or_none(f"{FAILURES}/{name}")
        if isinstance(raw, dict) and (since is None or raw.get("time", 0) >= since):
            try:
                out.append(Failure(**raw))
            except TypeError:
                continue
    return out


def root_cause(failures: List[Failure]) -> Optional[Failure]:
    """The failure that started it: a primary error before any consequence of it, earliest first."""
    if not failures:
        return None
    return min(failures, key=lambda f: (f.secondary, f.time, f.rank))


def clear_failures(run_dir: RunDir) -> None:
    run_dir.rm(FAILURES, recursive=True)


def record_failure(run_dir: RunDir, failure: Failure, exit_code: Optional[int] = None) -> bool:
    """FAILED, with ``failure`` as the cause (unless the run had completed: it stays so)."""
    return transition(run_dir, RunState.FAILED, error=failure.error, failed_rank=failure.rank,
                      phase=failure.phase, phase_kind=failure.phase_kind, traceback=failure.traceback or None,
                      exit_code=exit_code)
