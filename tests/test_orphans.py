"""A SIGKILLed supervisor leaves no orphans and no second writer (the OOM killer, ``kill -9``).

``batchproc run`` -> launcher -> torchrun -> workers, each started in a group of its own: a
SIGKILL of one level reaches none below it. Each level gets a SIGTERM from the kernel when its
parent dies (batchproc.lifeline) and stops as on a preemption, and the run directory stays held
by every process of the job (batchproc.rundir.job_lock), so a rerun started at once waits for
them instead of committing beside them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from tests.support import (PY, Procs, assert_exactly_once, children_map, descendants, index_and_y, s3_storage,
                           shared_fs, sum_job_metrics, sum_job_rows, write_config)

N, BS = 400, 2  # 100 steps of 0.15 s on 2 ranks: the first job has ~14 s left when its supervisor dies
SLOW = {"SUM_JOB_SLEEP": "0.15"}


def _victim(pid: int, level: str) -> int:
    """The pid of ``level`` under the ``batchproc run`` process ``pid``."""
    if level == "run":
        return pid
    launcher = children_map()[pid][0]
    if level == "launcher":
        return launcher
    return children_map()[launcher][0]  # torchrun (our loopback wrapper around its main)


@pytest.mark.parametrize("level,slots", [("run", 2), ("launcher", 2), ("torchrun", 2), ("run", 1), ("torchrun", 1)])
def test_a_sigkilled_supervisor_leaves_no_orphans_and_a_rerun_outputs_every_sample_once(
        procs: Procs, tmp_path: Path, level: str, slots: int) -> None:
    """With one slot, "torchrun" is the agent of our own that stands in for it (batchproc.control.solo_agent)."""
    config = write_config(tmp_path / "exp.yaml", (N, BS, 4), shared_fs(tmp_path / "runs"), name="orphans",
                          slots=slots)
    run_dir = tmp_path / "runs" / "orphans"
    first = procs.start([PY, "-m", "batchproc", "run", str(config)], env=SLOW)
    procs.wait_for(first, r"PROGRESS 8\b")
    job = set(descendants(first.pid)) | {first.pid}
    victim = _victim(first.pid, level)
    assert victim in job
    os.kill(victim, signal.SIGKILL)

    # With batchproc run itself killed, the rerun starts at once, while the first job's processes
    # still run: it must wait for them. Otherwise the first batchproc run still holds the run
    # directory, and is itself expected to end with its job.
    second = procs.start([PY, "-m", "batchproc", "run", str(config)]) if level == "run" else None
    deadline = time.monotonic() + 10  # a checkpoint, not the rest of the job
    while first.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not first.leftovers(), f"orphans of the first job after killing the {level}: {first.leftovers()}"
    if second is None:
        assert first.wait(timeout=10) is not None, f"batchproc run did not end with its job: {first.output}"
        second = procs.start([PY, "-m", "batchproc", "run", str(config)])
    done = procs.finish(second, timeout=240)
    assert done.rc == 0, done.out
    assert done.result()["completed"] and done.result()["metrics"] == sum_job_metrics(N), done.out
    assert_exactly_once(run_dir, N)


def test_a_sigkilled_supervisor_on_s3_leaves_no_orphans_and_a_rerun_outputs_every_sample_once(
        procs: Procs, tmp_path: Path, s3_server: Dict[str, Any], s3_bucket: str) -> None:
    """On S3 the lease of the killed ``batchproc run`` is taken over at once (its pid is gone), so
    the rerun must still wait for the workers it left on this machine (batchproc.rundir.job_lock)."""
    bucket = s3_bucket[len("s3://"):]
    config = write_config(tmp_path / "exp.yaml", (N, BS, 4), s3_storage(bucket, "runs", s3_server["endpoint"]),
                          name="orphans")
    env = dict(s3_server["env"], BATCHPROC_LOCK_DIR=str(tmp_path / "locks"))
    # Its workers, SIGTERMed when it dies, take 20 s to flush (torchrun grants 30): the rerun's
    # workers would start long before.
    first = procs.start([PY, "-m", "batchproc", "run", str(config)], env=dict(env, SUM_JOB_FLUSH_SLEEP="20", **SLOW))
    procs.wait_for(first, r"PROGRESS 8\b")
    os.kill(first.pid, signal.SIGKILL)
    second = procs.start([PY, "-m", "batchproc", "run", str(config)], env=env)
    deadline = time.monotonic() + 35
    while first.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not first.leftovers(), f"orphans of the first job: {first.leftovers()}"
    done = procs.finish(second, timeout=240)
    assert done.rc == 0, done.out
    assert done.result()["metrics"] == sum_job_metrics(N), done.out
    fs = s3_server["server"].fs()
    fs.invalidate_cache()
    run = f"{bucket}/runs/orphans"
    rows = [json.loads(line) for f in fs.find(f"{run}/outputs") if f.endswith(".jsonl")
            for line in fs.cat_file(f).decode().splitlines() if line.strip()]
    assert index_and_y(rows) == sum_job_rows(N)
    assert not fs.find(f"{run}/staging")
