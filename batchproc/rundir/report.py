"""What a run reports: the status as ``batchproc status`` shows it, final metrics, and the stop
request of ``batchproc stop`` (skipped-sample records: :mod:`batchproc.rundir.errors_log`).

``status.json`` itself is written only by :mod:`batchproc.rundir.lifecycle`; this module reads it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict

from batchproc.rundir import lifecycle
from batchproc.rundir.lifecycle import RunState
from batchproc.rundir.layout import METRICS_FILE, STOP_FILE
from batchproc.rundir.storage import RunDir


def read_status(run_dir: RunDir) -> Dict[str, Any]:
    """What ``batchproc status`` shows, as a dict (``--json`` prints it as is)."""
    s = lifecycle.read_status(run_dir)
    rate = s.samples_per_s
    remaining = (s.total_samples or 0) - s.committed_samples
    eta = remaining / rate if rate and s.state is RunState.RUNNING else None
    return {
        "run_dir": run_dir.url,
        "state": s.state.value if s.state else "not started",
        "committed_batches": s.committed_batches,
        "total_batches": s.total_batches,
        "committed_samples": s.committed_samples,
        "total_samples": s.total_samples,
        "samples_per_s": rate,
        "eta_s": eta,
        "metrics": s.metrics,
        "restarts": s.restarts,
        "attempts": s.attempts,
        "skipped_samples": s.skipped_samples,
        "skipped_batches": s.skipped_batches,
        "world_size": s.world_size,
        "schedule": s.schedule or "static",
        "rank_batches": dict(s.rank_batches),
        "updated": s.updated,
        "exit_code": s.exit_code,
        "reason": s.reason,
        "error": s.error,
        "failed_rank": s.failed_rank,
        "phase": s.phase,
        "phase_kind": s.phase_kind,
    }


def format_status(status: Dict[str, Any]) -> str:
    total = status["total_batches"]
    pct = f" ({100.0 * status['committed_batches'] / total:.1f}%)" if total else ""
    lines = [
        f"run:       {status['run_dir']}",
        f"state:     {status['state']}",
        f"committed: {status['committed_batches']}/{total if total is not None else '?'} batches{pct}",
    ]
    shares = status.get("rank_batches") or {}
    if shares:
        done = sum(shares.values()) or 1
        lines.append("ranks:     " + "   ".join(f"r{r}: {n} ({100.0 * n / done:.0f}%)"
                                                for r, n in sorted(shares.items(), key=lambda kv: int(kv[0])))
                     + "   (batches committed by each rank this attempt, schedule=dynamic)")
    if status["samples_per_s"]:
        lines.append(f"rate:      {status['samples_per_s']:.1f} samples/s")
    if status["eta_s"] is not None:
        lines.append(f"eta:       {status['eta_s']:.0f} s")
    lines.append(f"restarts:  {status['restarts']}   attempts: {status['attempts']}   "
                 f"skipped samples: {status['skipped_samples']}   skipped batches: {status['skipped_batches']}")
    if status["metrics"]:
        lines.append("metrics:   " + json.dumps(status["metrics"], sort_keys=True))
    if status["state"] == RunState.PREEMPTED.value and status["reason"]:
        lines.append(f"reason:    {status['reason']}")
    if status["state"] == RunState.FAILED.value:
        lines.append("cause:     " + describe_cause(status))
    return "\n".join(lines)


def describe_cause(status: Dict[str, Any]) -> str:
    """A failed run's recorded root cause, where it happened, in one line."""
    if not status.get("error"):
        code = status.get("exit_code")
        return (f"no worker recorded a cause (the entrypoint exited with code {code}); "
                "its output says why" if code is not None else "no worker recorded a cause")
    where = []
    if status.get("failed_rank") is not None:
        where.append(f"rank {status['failed_rank']}")
    if status.get("phase"):
        where.append(str(status["phase"]))
    return str(status["error"]) + (f" ({', '.join(where)})" if where else "")


def write_metrics(run_dir: RunDir, metrics: Dict[str, Any]) -> None:
    run_dir.write_json(METRICS_FILE, metrics)


def request_stop(run_dir: RunDir) -> None:
    """Ask the job on ``run_dir`` to checkpoint and stop, as a preemption would."""
    run_dir.write_json(STOP_FILE, {"requested": time.time()})
