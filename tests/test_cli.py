"""``batchproc run|status|stop`` as a user runs them: real launcher, real signals, real exit codes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import List

from tests.support import (PY, Procs, assert_exactly_once, index_and_y, output_indices, output_rows, shared_fs,
                           sum_job_metrics, sum_job_rows, write_config as _write_config)

N, BS = 60, 2


def write_config(tmp_path: Path, nproc: int = 2, interval: int = 4, max_restarts: int = 0) -> Path:
    return _write_config(tmp_path / "exp.yaml", (N, BS, interval), shared_fs(tmp_path / "runs"), slots=nproc,
                         max_restarts=max_restarts, hparams={"note": "hello"})


def batchproc(*args: object) -> List[str]:
    return [PY, "-m", "batchproc", *map(str, args)]


def test_preempt_twice_with_world_size_changes_then_complete(procs: Procs, tmp_path: Path) -> None:
    # Also what tests/test_engine.py's stop-and-resume case checks for a world-size change: each
    # rank's on_finish runs once, in the attempt that completes, never in a preempted one.
    run_dir, calls = tmp_path / "runs" / "sums", tmp_path / "calls"
    slow = {"SUM_JOB_SLEEP": "0.25", "SUM_JOB_CALLS_DIR": str(calls)}
    committed = 0
    for nproc, sig in ((2, signal.SIGTERM), (3, signal.SIGUSR1)):
        cfg = write_config(tmp_path, nproc=nproc)
        p = procs.start(batchproc("run", cfg), env=slow)
        procs.wait_for(p, r"PROGRESS \d+")
        os.kill(p.pid, sig)
        out = procs.finish(p)
        assert out.rc == 75, out.out
        assert "batchproc: preempted; progress saved (" in out.out, out.out
        assert f"Run the same command again to resume: batchproc run {cfg}" in out.out, out.out
        status = json.loads(procs.run(batchproc("status", run_dir, "--json")).out)
        assert status["state"] == "preempted" and committed < status["committed_batches"] < N // BS, status
        committed = status["committed_batches"]
        assert output_indices(run_dir) == list(range(committed * BS))  # committed work is published
    done = procs.run(batchproc("run", write_config(tmp_path, nproc=1)), env={"SUM_JOB_CALLS_DIR": str(calls)})
    assert done.rc == 0, done.out
    assert_exactly_once(run_dir, N)
    assert f"metrics: {json.dumps(sum_job_metrics(N), sort_keys=True)}" in done.out
    status = json.loads(procs.run(batchproc("status", run_dir, "--json")).out)
    assert status["state"] == "completed" and status["attempts"] == 3
    assert status["committed_batches"] == status["total_batches"] == N // BS

    again = procs.run(batchproc("run", write_config(tmp_path, nproc=2)), env={"SUM_JOB_CALLS_DIR": str(calls)})
    assert again.rc == 0 and "batchproc: completed (30/30 batches)" in again.out, again.out
    assert index_and_y(output_rows(run_dir)) == sum_job_rows(N)
    finishes = {f.stem: (json.loads(f.read_text())["calls"] or {}).get("on_finish") for f in calls.glob("*.json")}
    assert finishes == {"r0-0": 0, "r1-0": 0, "r0-1": 0, "r1-1": 0, "r2-0": 0,  # preempted at 2, then 3 ranks
                        "r0-2": 1,  # completed on 1 rank
                        "r0-3": None, "r1-2": None}, finishes  # the completed run again: no processor at all


def test_stop_command_and_lock(procs: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "sums"
    p = procs.start(batchproc("run", cfg), env={"SUM_JOB_SLEEP": "0.5"})
    procs.wait_for(p, r"PROGRESS \d+")

    second = procs.run(batchproc("run", cfg), timeout=30)
    assert second.rc == 3, second.out
    assert "in use by" in second.out and f"(pid {p.pid} on" in second.out, second.out  # names the holder

    running = json.loads(procs.run(batchproc("status", cfg, "--json")).out)
    assert running["state"] == "running"
    assert procs.run(batchproc("stop", run_dir)).rc == 0
    first = procs.finish(p)
    assert first.rc == 75, first.out  # the first job was unaffected by the second, and stopped cleanly
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and "batchproc stop" in status["reason"], status

    resumed = procs.run(batchproc("run", cfg))
    assert resumed.rc == 0, resumed.out
    assert_exactly_once(run_dir, N)


def test_hparams_reach_the_job_and_fresh_starts_over(procs: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, nproc=1)
    first = procs.run(batchproc("run", cfg))
    assert first.rc == 0, first.out
    assert 'HPARAMS {"note": "hello"}' in first.out, first.out
    out = procs.run(batchproc("run", cfg, "--fresh"))
    assert out.rc == 0, out.out
    run_dir = tmp_path / "runs" / "sums"
    assert_exactly_once(run_dir, N)
    assert json.loads((run_dir / "status.json").read_text())["attempts"] == 1  # started over, not resumed
    records = sorted((run_dir / "checkpoints").glob("ckpt-*.json"))  # the last 3 are kept
    assert len(records) == 3 and records[-1].name == f"ckpt-{-(-(N // BS) // 4) - 1:08d}.json"


def test_bad_config_names_the_key(procs: Procs, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nentrypoint: python3 x.py\nresources:\n  slots_per_trail: 2\n")
    out = procs.run(batchproc("run", cfg))
    assert out.rc == 2
    assert "resources.slots_per_trail" in out.out and "bad.yaml" in out.out
