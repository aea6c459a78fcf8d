"""Run state, progress, final metrics and skipped-sample records, as files in the run directory.

``status.json`` is rewritten (atomically) by rank 0 at each start, checkpoint and end, and by the
launcher when a job fails; ``batchproc status`` and the launcher's exit code read it.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Any, Dict, List, Optional

from batchproc.storage import RunDir

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
ERRORS_FILE = "errors.jsonl"
STOP_FILE = "stop-request"
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: progress saved, run the same command again to resume


class RunState(str, enum.Enum):
    """A run's lifecycle.

    RUNNING -> COMPLETED when the last batch is committed; RUNNING -> PREEMPTED when a signal or
    ``batchproc stop`` ended it after a checkpoint (running again resumes, back to RUNNING);
    RUNNING -> FAILED when the job exited with an error (running again also resumes).
    """

    RUNNING = "running"
    PREEMPTED = "preempted"
    COMPLETED = "completed"
    FAILED = "failed"


def exit_code(state: Optional[RunState], child_rc: int) -> int:
    """The launcher's exit code: 0 completed, 75 preempted, otherwise the failure's code."""
    if state is RunState.COMPLETED:
        return 0
    if state is RunState.PREEMPTED:
        return EXIT_PREEMPTED
    return child_rc if child_rc != 0 else 1


def read_status_file(run_dir: RunDir) -> Dict[str, Any]:
    return run_dir.read_json_or_none(STATUS_FILE) or {}


def read_state(run_dir: RunDir) -> Optional[RunState]:
    state = read_status_file(run_dir).get("state")
    return RunState(state) if state else None


def write_state(run_dir: RunDir, state: RunState, **details: Any) -> None:
    """Set the run's state, keeping the progress already recorded.

    A completed run stays completed: a rerun that fails before finding out there is nothing left
    to do (signalled during start-up) has lost nothing, and every later rerun, which writes
    nothing, would otherwise report that failure for good."""
    status = read_status_file(run_dir)
    if state is RunState.FAILED and status.get("state") == RunState.COMPLETED.value:
        return
    status.update(details)
    status["state"] = state.value
    status["updated"] = time.time()
    run_dir.write_json(STATUS_FILE, status)


def write_progress(run_dir: RunDir, state: RunState, progress: Dict[str, Any]) -> None:
    """Rank 0's view after a commit: watermark, totals, rate, metrics so far."""
    status = dict(progress, state=state.value, updated=time.time())
    run_dir.write_json(STATUS_FILE, status)


def read_status(run_dir: RunDir) -> Dict[str, Any]:
    """What ``batchproc status`` shows, as a dict (``--json`` prints it as is)."""
    s = read_status_file(run_dir)
    committed, total = s.get("committed_batches", 0), s.get("total_batches")
    rate = s.get("samples_per_s")
    remaining = s.get("total_samples", 0) - s.get("committed_samples", 0)
    eta = remaining / rate if rate and s.get("state") == RunState.RUNNING.value else None
    return {
        "run_dir": run_dir.url,
        "state": s.get("state", "not started"),
        "committed_batches": committed,
        "total_batches": total,
        "committed_samples": s.get("committed_samples", 0),
        "total_samples": s.get("total_samples"),
        "samples_per_s": rate,
        "eta_s": eta,
        "metrics": s.get("metrics", {}),
        "restarts": s.get("restarts", 0),
        "attempts": s.get("attempts", 0),
        "skipped_samples": s.get("skipped_samples", 0),
        "world_size": s.get("world_size"),
        "updated": s.get("updated"),
        "exit_code": s.get("exit_code"),
    }


def format_status(status: Dict[str, Any]) -> str:
    total = status["total_batches"]
    pct = f" ({100.0 * status['committed_batches'] / total:.1f}%)" if total else ""
    lines = [
        f"run:       {status['run_dir']}",
        f"state:     {status['state']}",
        f"committed: {status['committed_batches']}/{total if total is not None else '?'} batches{pct}",
    ]
    if status["samples_per_s"]:
        lines.append(f"rate:      {status['samples_per_s']:.1f} samples/s")
    if status["eta_s"] is not None:
        lines.append(f"eta:       {status['eta_s']:.0f} s")
    lines.append(f"restarts:  {status['restarts']}   attempts: {status['attempts']}   skipped samples: {status['skipped_samples']}")
    if status["metrics"]:
        lines.append("metrics:   " + json.dumps(status["metrics"], sort_keys=True))
    return "\n".join(lines)


def write_metrics(run_dir: RunDir, metrics: Dict[str, Any]) -> None:
    run_dir.write_json(METRICS_FILE, metrics)


def write_errors(run_dir: RunDir, errors: List[Dict[str, Any]]) -> None:
    """Rewrite ``errors.jsonl`` from the committed record (object stores cannot append)."""
    run_dir.write_atomic(ERRORS_FILE, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())


def request_stop(run_dir: RunDir) -> None:
    """Ask the job on ``run_dir`` to checkpoint and stop, as a preemption would."""
    run_dir.write_json(STOP_FILE, {"requested": time.time()})
