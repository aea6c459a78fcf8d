"""``batchproc run|status|stop`` as a user runs them: real launcher, real signals, real exit codes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import PY, ROOT, output_rows

N, BS = 60, 2


def write_config(tmp_path: Path, nproc: int = 2, interval: int = 4, max_restarts: int = 0) -> Path:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
name: sums
entrypoint: python3 -m launch.torch_distributed python3 tests/scripts/sum_job.py {N} {BS} {interval}
resources:
  slots_per_trial: {nproc}
max_restarts: {max_restarts}
checkpoint_storage:
  type: shared_fs
  host_path: {tmp_path / 'runs'}
hyperparameters:
  note: hello
""")
    return cfg


def batchproc(*args: str):
    return [PY, "-m", "batchproc", *map(str, args)]


def clean_rows(procs, tmp_path):
    """What one uninterrupted single-process run writes (rows without their batch position)."""
    out = procs.run([PY, str(ROOT / "tests/scripts/sum_job.py"), str(N), str(BS), "1000", "-", str(tmp_path / "clean")])
    assert out.rc == 0, out.out
    return sorted((r["index"], r["y"]) for r in output_rows(tmp_path / "clean")), out.result()["metrics"]


def test_preempt_twice_with_world_size_changes_then_complete(procs, tmp_path):
    run_dir = tmp_path / "runs" / "sums"
    slow = {"SUM_JOB_SLEEP": "0.25"}
    for nproc, sig in ((2, signal.SIGTERM), (3, signal.SIGUSR1)):
        cfg = write_config(tmp_path, nproc=nproc)
        p = procs.start(batchproc("run", cfg), env=slow)
        procs.wait_for(p, r"PROGRESS \d+")
        os.kill(p.pid, sig)
        out = procs.finish(p)
        assert out.rc == 75, out.out
        assert "Run the same command again to resume" in out.out or "resume" in out.out.lower()
        status = json.loads(procs.run(batchproc("status", run_dir, "--json")).out)
        assert status["state"] == "preempted" and 0 < status["committed_batches"] < N // BS
    done = procs.run(batchproc("run", write_config(tmp_path, nproc=1)))
    assert done.rc == 0, done.out
    rows, metrics = clean_rows(procs, tmp_path)
    assert sorted((r["index"], r["y"]) for r in output_rows(run_dir)) == rows
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    status = json.loads(procs.run(batchproc("status", run_dir, "--json")).out)
    assert status["state"] == "completed" and status["attempts"] == 3
    assert status["committed_batches"] == status["total_batches"] == N // BS

    again = procs.run(batchproc("run", write_config(tmp_path, nproc=2)))
    assert again.rc == 0 and "completed" in again.out
    assert sorted((r["index"], r["y"]) for r in output_rows(run_dir)) == rows


def test_sigkilled_worker_restarts_under_batchproc_run(procs, tmp_path):
    import re

    run_dir = tmp_path / "runs" / "sums"
    p = procs.start(batchproc("run", write_config(tmp_path, nproc=2, max_restarts=1)), env={"SUM_JOB_SLEEP": "0.1"})
    lines = procs.wait_for(p, r"PROGRESS 10\b")
    pid = dict(re.findall(r"WORKER rank=(\d+) pid=(\d+)", "".join(lines)))["0"]
    os.kill(int(pid), signal.SIGKILL)
    out = procs.finish(p)
    assert out.rc == 0, out.out
    rows, metrics = clean_rows(procs, tmp_path)
    assert sorted((r["index"], r["y"]) for r in output_rows(run_dir)) == rows
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert json.loads((run_dir / "status.json").read_text())["restarts"] == 1


def test_stop_command_and_lock(procs, tmp_path):
    cfg = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "sums"
    p = procs.start(batchproc("run", cfg), env={"SUM_JOB_SLEEP": "0.5"})
    procs.wait_for(p, r"PROGRESS \d+")

    second = procs.run(batchproc("run", cfg), timeout=30)
    assert second.rc == 3, second.out
    assert "in use by" in second.out and "pid" in second.out

    running = json.loads(procs.run(batchproc("status", cfg, "--json")).out)
    assert running["state"] == "running"
    assert procs.run(batchproc("stop", run_dir)).rc == 0
    first = procs.finish(p)
    assert first.rc == 75, first.out  # the first job was unaffected by the second, and stopped cleanly
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"

    resumed = procs.run(batchproc("run", cfg))
    assert resumed.rc == 0, resumed.out
    assert sorted(r["index"] for r in output_rows(run_dir)) == list(range(N))


def test_hparams_reach_the_job_and_fresh_starts_over(procs, tmp_path):
    cfg = write_config(tmp_path, nproc=1)
    assert procs.run(batchproc("run", cfg)).rc == 0
    out = procs.run(batchproc("run", cfg, "--fresh"))
    assert out.rc == 0, out.out
    run_dir = tmp_path / "runs" / "sums"
    assert sorted(r["index"] for r in output_rows(run_dir)) == list(range(N))
    records = sorted((run_dir / "checkpoints").glob("ckpt-*.json"))  # the last 3 are kept
    assert len(records) == 3 and records[-1].name == f"ckpt-{-(-(N // BS) // 4) - 1:08d}.json"


def test_bad_config_names_the_key(procs, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\nentrypoint: python3 x.py\nresources:\n  slots_per_trail: 2\n")
    out = procs.run(batchproc("run", cfg))
    assert out.rc == 2
    assert "resources.slots_per_trail" in out.out and "bad.yaml" in out.out
