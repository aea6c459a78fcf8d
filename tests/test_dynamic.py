"""``schedule="dynamic"`` end to end: real torchrun and launcher, gloo on 127.0.0.1, real signals.

What the static schedule guarantees must hold here too: every sample's output exactly once,
metrics equal to one uninterrupted process's, across preemptions, world-size changes and
SIGKILLed workers; and a faster rank does more of the batches.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.support import (PY, SCRIPTS, Procs, assert_exactly_once, index_and_y, job_cmd, output_rows, shared_fs,
                           sum_job_metrics, sum_job_rows, torchrun_cmd, write_config)

DYN = ("--schedule", "dynamic")


def read_calls(calls_dir: Path) -> Dict[str, Any]:
    return {f.stem: json.loads(f.read_text()) for f in sorted(calls_dir.glob("*.json"))}


def rows_by_index(run_dir: Path) -> Dict[int, int]:
    counts: Dict[int, int] = {}
    for r in output_rows(run_dir):
        counts[r["index"]] = counts.get(r["index"], 0) + 1
    return counts


@pytest.mark.parametrize("world,n,bs,extra", [
    (2, 29, 2, {}),                          # short last batch
    (3, 1, 4, {}),                           # one batch: two ranks get none and must not hang
    (2, 24, 4, {"SUM_JOB_OOM_ABOVE": "1"}),  # every batch runs out of memory and is split
])
def test_exactly_once_and_exact_metrics(procs: Procs, tmp_path: Path, world: int, n: int, bs: int,
                                        extra: Dict[str, str]) -> None:
    run_dir, calls = tmp_path / "run", tmp_path / "calls"
    out = procs.run(job_cmd(world, *DYN, n, bs, 3, "-", run_dir), env=dict(extra, SUM_JOB_CALLS_DIR=str(calls)))
    assert out.rc == 0, out.out
    assert out.result()["completed"] and out.result()["metrics"] == sum_job_metrics(n)
    assert_exactly_once(run_dir, n)
    per_rank = read_calls(calls)
    assert sorted(per_rank) == [f"r{r}-0" for r in range(world)]
    assert all(c["calls"]["on_finish"] == 1 for c in per_rank.values())
    batches = -(-n // bs)
    if not extra:
        assert sum(c["calls"]["process_batch"] for c in per_rank.values()) == batches
    status = json.loads((run_dir / "status.json").read_text())
    assert status["schedule"] == "dynamic" and sum(status["rank_batches"].values()) == batches, status
    assert not list((run_dir / "dynamic").glob("rank-*")), "the final record folds every rank record"


def test_a_faster_rank_does_more_batches(procs: Procs, tmp_path: Path) -> None:
    """Rank 1 sleeps 3x as long per batch: under the dynamic schedule rank 0 takes most batches
    (static would give each exactly half)."""
    run_dir, calls, n = tmp_path / "run", tmp_path / "calls", 80
    out = procs.run(job_cmd(2, *DYN, "--slow-rank", 1, n, 2, 4, "-", run_dir),
                    env={"SUM_JOB_CALLS_DIR": str(calls), "SUM_JOB_SLEEP": "0.1"})
    assert out.rc == 0, out.out
    assert_exactly_once(run_dir, n)
    done = {k: c["calls"]["process_batch"] for k, c in read_calls(calls).items()}
    assert done["r0-0"] + done["r1-0"] == n // 2
    # capacities 3:1; a loaded machine adds the same per-batch overhead to both, so ask for 1.5:1
    assert done["r0-0"] >= 1.5 * done["r1-0"], done
    status = json.loads(procs.run([PY, "-m", "batchproc", "status", run_dir, "--json"]).out)
    assert status["rank_batches"] == {"0": done["r0-0"], "1": done["r1-0"]}, status
    shown = procs.run([PY, "-m", "batchproc", "status", run_dir]).out
    assert "ranks:" in shown and f"r0: {done['r0-0']}" in shown, shown


def _config(tmp_path: Path, nproc: int, n: int) -> Path:
    cfg = write_config(tmp_path / "exp.yaml", (n, 2, 3), shared_fs(tmp_path / "runs"), slots=nproc)
    cfg.write_text(cfg.read_text() + "schedule: dynamic\n")  # the experiment key, not the script's argument
    return cfg


@pytest.mark.parametrize("first,second,how", [(2, 1, "SIGTERM"), (1, 3, "batchproc stop"), (2, 2, "stop-rank-1")])
def test_preempted_exits_75_and_resumes_with_another_world_size(procs: Procs, tmp_path: Path, first: int,
                                                               second: int, how: str) -> None:
    n, run_dir, calls = 60, tmp_path / "runs" / "sums", tmp_path / "calls"
    env = {"SUM_JOB_SLEEP": "0.1", "SUM_JOB_CALLS_DIR": str(calls)}
    if how == "stop-rank-1":  # only rank 1 is asked: the STOP mark in the counter stops rank 0 too
        env["BATCHPROC_FAULT"] = "stop@rank=1@step=3"
    p = procs.start([PY, "-m", "batchproc", "run", _config(tmp_path, first, n)], env=env)
    procs.wait_for(p, r"PROGRESS \d+")
    if how == "SIGTERM":
        os.kill(p.pid, signal.SIGTERM)
    elif how == "batchproc stop":
        assert procs.run([PY, "-m", "batchproc", "stop", run_dir]).rc == 0
    stopped = procs.finish(p)
    assert stopped.rc == 75, stopped.out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and 0 < status["committed_batches"] < n // 2, status
    assert set(rows_by_index(run_dir).values()) == {1}  # what is published is published once
    assert len(rows_by_index(run_dir)) == 2 * status["committed_batches"]

    done = procs.run([PY, "-m", "batchproc", "run", _config(tmp_path, second, n)],
                     env={"SUM_JOB_CALLS_DIR": str(calls)})
    assert done.rc == 0, done.out
    assert_exactly_once(run_dir, n)
    finishes = {k: c["calls"]["on_finish"] for k, c in read_calls(calls).items()}
    assert sum(finishes.values()) == second and all(v == 0 for k, v in finishes.items() if k.endswith("-0")
                                                    and int(k[1]) < first), finishes


@pytest.mark.parametrize("fault", [
    "kill@rank=1@step=3",          # mid-interval: its claimed, uncommitted batches are redone
    "kill-after-stage@rank=0",     # files staged, no record yet
    "kill-after-record@rank=1",    # record written, its publication not done
])
def test_sigkilled_worker_restarted_by_torchrun_is_exactly_once(procs: Procs, tmp_path: Path, fault: str) -> None:
    n, run_dir = 40, tmp_path / "run"
    out = procs.run(job_cmd(2, *DYN, n, 2, 3, "-", run_dir, max_restarts=1), env={"BATCHPROC_FAULT": fault})
    assert out.rc == 0, out.out
    assert out.result()["completed"] and out.result()["metrics"] == sum_job_metrics(n)
    assert_exactly_once(run_dir, n)
    assert json.loads((run_dir / "status.json").read_text())["restarts"] == 1


BAD = [3, 21, 38]  # spread so that both ranks meet some


@pytest.mark.parametrize("bound,ok", [(3, True), (2, False)])
def test_bad_samples_are_bounded_job_wide(procs: Procs, tmp_path: Path, bound: int, ok: bool) -> None:
    """max_bad_samples counts every rank's skips (in the store): 3 bad samples pass a bound of 3
    and fail one of 2, whichever ranks loaded them."""
    n, run_dir = 40, tmp_path / "run"
    env = {"SUM_JOB_BAD_SAMPLES": ",".join(map(str, BAD)), "SUM_JOB_MAX_BAD_SAMPLES": str(bound)}
    out = procs.run(job_cmd(2, *DYN, n, 2, 2, "-", run_dir), env=env)
    good = [i for i in range(n) if i not in BAD]
    if not ok:
        assert out.rc != 0 and "TooManyBadSamplesError" in out.out, out.out
        assert set(rows_by_index(run_dir).values()) <= {1}
        return
    assert out.rc == 0, out.out
    assert index_and_y(output_rows(run_dir)) == [(i, float(i * i)) for i in good]
    errors = [json.loads(line) for line in (run_dir / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["index"] for e in errors) == BAD
    metrics = out.result()["metrics"]
    assert metrics["count"] == len(good) and metrics["sum"] == float(sum(good))


def test_on_finish_runs_after_every_ranks_final_commit(procs: Procs, tmp_path: Path) -> None:
    """In on_finish, every rank sees all rows of every rank published and the final metrics."""
    n, run_dir, log = 30, tmp_path / "run", tmp_path / "log"
    cmd = torchrun_cmd(2, "finish_job.py", *DYN, n, 2, 2, run_dir)
    out = procs.run(cmd, env={"FINISH_JOB_LOG": str(log), "SUM_JOB_SLEEP": "0.01"})
    assert out.rc == 0, out.out
    for r in (0, 1):
        lines = (log / f"r{r}.log").read_text().splitlines()
        finish = [json.loads(line[len("finish "):]) for line in lines if line.startswith("finish ")]
        assert len(finish) == 1 and finish[0]["rows_published"] == n, lines
        assert finish[0]["metrics"] == sum_job_metrics(n)
        assert lines.index([line for line in lines if line.startswith("finish ")][0]) == len(lines) - 1
    assert index_and_y([r for r in output_rows(run_dir)]) == sum_job_rows(n)


def test_a_run_keeps_its_schedule(procs: Procs, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert procs.run(job_cmd(0, 9, 2, 1, "-", run_dir), env={"BATCHPROC_FAULT": "stop@step=1"}).rc == 0
    out = procs.run(job_cmd(0, *DYN, 9, 2, 1, "-", run_dir))
    assert out.rc != 0 and "schedule='static'" in out.out, out.out
    assert SCRIPTS.exists()


def test_the_experiment_key_reaches_the_workers(tmp_path: Path) -> None:
    from batchproc.control.config import load_config
    from batchproc.errors import ConfigError
    from batchproc.settings import RunSettings

    good = tmp_path / "good.yaml"
    good.write_text("name: x\nentrypoint: python3 job.py\nschedule: dynamic\n")
    settings = load_config(str(good)).run_settings(lock_held=False)
    assert RunSettings.from_env(settings.to_env()).schedule == "dynamic"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nentrypoint: python3 job.py\nschedule: fastest\n")
    with pytest.raises(ConfigError, match="schedule"):
        load_config(str(bad))
