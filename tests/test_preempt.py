"""Preemption with real signals sent to real processes (torchrun, gloo, 127.0.0.1).

A SIGKILLed worker that torchrun restarts: tests/test_checkpoint.py (kill@rank=1@step=5, torchrun)
and tests/test_batch_faults.py (the chief, under ``batchproc run``)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from batchproc.rundir.lifecycle import ExitCode
from tests.support import (PY, SCRIPTS, Procs, assert_exactly_once, job_cmd, output_indices, sum_job_metrics,
                           torchrun_cmd)

N, BS = 60, 2
SLOW = {"SUM_JOB_SLEEP": "0.15"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_to_torchrun_checkpoints_and_resumes(procs: Procs, tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(2, "sum_job.py", N, BS, 4, "-", run_dir)
    cmd.insert(3, "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    p = procs.start(cmd, env=SLOW)
    procs.wait_for(p, r"PROGRESS 6\b")
    os.kill(p.pid, sig)
    first = procs.finish(p)
    result = first.result()
    assert result["preempted"] and not result["completed"], first.out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["committed_batches"] == result["steps_completed"]
    assert sig.name in status["reason"], status  # the signal that asked (torchrun passes it on)
    assert 0 < result["steps_completed"] < N // BS
    assert output_indices(run_dir) == list(range(result["steps_completed"] * BS))

    if sig != signal.SIGTERM:
        return  # the run directory is in the same state whichever signal stopped it: resumed once below

    second = procs.run(job_cmd(2, N, BS, 4, "-", run_dir))
    assert second.rc == 0, second.out
    assert second.result()["completed"]
    assert second.result()["metrics"] == sum_job_metrics(N)
    assert_exactly_once(run_dir, N)



def test_launcher_without_a_run_directory_exits_75_when_the_script_was_preempted(procs: Procs, tmp_path: Path) -> None:
    """The script picks its own run directory (no batchproc run above the launcher): rank 0 tells
    the launcher which, so its exit code follows the run's state as under batchproc run."""
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "launch.torch_distributed", "--nproc-per-node", "2", "--",
           PY, str(SCRIPTS / "sum_job.py"), str(N), str(BS), "4", "-", str(run_dir)]
    first = procs.run(cmd, {"BATCHPROC_FAULT": "stop@step=2"})
    assert first.rc == ExitCode.PREEMPTED, first.out
    second = procs.run(cmd)
    assert second.rc == ExitCode.COMPLETED, second.out
    assert_exactly_once(run_dir, N)
