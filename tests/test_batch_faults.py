"""One failing batch does not stop the job (bad_batches="skip"), out-of-memory batches are split,
deterministic errors end the run at the first attempt, and a stuck batch fails the job promptly.
Multi-process cases run through ``batchproc run`` (our launcher, torchrun, gloo on 127.0.0.1)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Set

import torch

from batchproc.engine.batch_faults import batch_size_of, take
from batchproc.rundir.lifecycle import ExitCode
from tests.support import PY, Procs, shared_fs, write_config

N, BS, INTERVAL = 30, 3, 2  # 10 global batches, 5 per rank on 2 ranks


def _config(tmp_path: Path, max_restarts: int = 0, slots: int = 2) -> Path:
    return write_config(tmp_path / "exp.yaml", [N, BS, INTERVAL], shared_fs(tmp_path / "runs"), name="faulty",
                        script="tests/scripts/faulty_job.py", max_restarts=max_restarts, slots=slots)


def _run(procs: Procs, config: Path, env: Dict[str, str], timeout: float = 150) -> Any:
    return procs.run([PY, "-m", "batchproc", "run", str(config)], env, timeout=timeout)


def _run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "faulty"


def _indices(run_dir: Path) -> List[int]:
    rows = [json.loads(line) for f in sorted((run_dir / "outputs").rglob("*.jsonl")) for line in f.read_text().splitlines()]
    assert all(r["y"] == r["index"] ** 2 for r in rows)
    return sorted(r["index"] for r in rows)


def _errors(run_dir: Path) -> List[Dict[str, Any]]:
    path = run_dir / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _batch(g: int) -> Set[int]:
    return set(range(g * BS, min(N, (g + 1) * BS)))


# -- splitting what the default collate function makes ------------------------------------------


def test_split_default_collated_batches() -> None:
    batch = {"x": torch.arange(6), "pair": (torch.zeros(6, 2), ["a", "b", "c", "d", "e", "f"]), "n": [1, 2, 3, 4, 5, 6]}
    assert batch_size_of(batch) == 6
    half = take(batch, 3, 6)
    assert half["x"].tolist() == [3, 4, 5] and half["pair"][1] == ["d", "e", "f"] and half["n"] == [4, 5, 6]
    assert half["pair"][0].shape == (3, 2)
    assert batch_size_of({"x": torch.arange(4), "y": torch.arange(5)}) is None  # not a collated batch
    assert batch_size_of(object()) is None


# -- bad_batches="skip" ------------------------------------------------------------------------


def test_skipped_batches_are_recorded_once_across_a_preemption(tmp_path: Path, procs: Procs) -> None:
    """Batches 3 and 6 raise after buffering their rows; a preemption after step 2 and a resume in
    between: every other sample is output exactly once, each failed batch is in errors.jsonl once
    with its indices, error and traceback, and none of its rows is published."""
    config = _config(tmp_path)
    env = {"FAULTY_RAISE": "3,6", "FAULTY_POLICY": "skip"}
    first = _run(procs, config, dict(env, BATCHPROC_FAULT="stop@step=2"))
    assert first.rc == ExitCode.PREEMPTED, first.out
    second = _run(procs, config, env)
    assert second.rc == ExitCode.COMPLETED, second.out
    run_dir = _run_dir(tmp_path)
    assert f"skipped 2 batch(es) and 0 sample(s), each named in {run_dir}/errors.jsonl" in second.out, second.out
    assert _indices(run_dir) == sorted(set(range(N)) - _batch(3) - _batch(6))
    errors = _errors(run_dir)
    assert sorted(e["global_batch"] for e in errors) == [3, 6]
    for e in errors:
        assert e["kind"] == "batch" and set(e["indices"]) == _batch(e["global_batch"])
        assert e["error"] == f"ValueError: cannot process batch {e['global_batch']}"
        assert "Traceback" in e["traceback"] and "faulty_job.py" in e["traceback"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["skipped_batches"] == 2 and status["metrics"]["processed"] == N - 6
    shown = procs.run([PY, "-m", "batchproc", "status", str(run_dir)], {}, timeout=60)
    assert "skipped batches: 2" in shown.out


def test_too_many_bad_batches_fails_naming_the_count_and_the_records(tmp_path: Path, procs: Procs) -> None:
    """The bound counts the whole job: one bad batch on each rank is 2 > 1. Everything done up to
    then is committed, each skip named; a rerun with a higher bound finishes the rest."""
    config = _config(tmp_path, max_restarts=3)
    env = {"FAULTY_RAISE": "2,3", "FAULTY_POLICY": "skip", "FAULTY_MAX_BAD": "1"}  # rank 0 and rank 1
    done = _run(procs, config, env)
    assert done.rc == ExitCode.FAILED, done.out
    run_dir = _run_dir(tmp_path)
    assert f"2 batches failed in process_batch, more than max_bad_batches=1; each is named in {run_dir}/errors.jsonl" \
        in done.out, done.out
    assert done.out.count("WORKER rank=0") == 1, "a deterministic failure must not be restarted"
    assert sorted(e["global_batch"] for e in _errors(run_dir)) == [2, 3]
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["skipped_batches"], status["committed_batches"]) == ("failed", 2, 4), status
    again = _run(procs, config, dict(env, FAULTY_MAX_BAD="2"))
    assert again.rc == ExitCode.COMPLETED, again.out
    assert _indices(run_dir) == sorted(set(range(N)) - _batch(2) - _batch(3))
    assert sorted(e["global_batch"] for e in _errors(run_dir)) == [2, 3]


def test_skip_records_survive_a_crash_before_errors_jsonl_is_written(tmp_path: Path, procs: Procs) -> None:
    """Killed after the record that holds a skip and before errors.jsonl caught up with it: the
    resume writes the file from the record (one process, no launcher needed)."""
    storage = str(tmp_path / "runs" / "faulty")
    cmd = [PY, "tests/scripts/faulty_job.py", str(N), str(BS), str(INTERVAL), storage]
    env = {"FAULTY_RAISE": "1", "FAULTY_POLICY": "skip"}
    first = procs.run(cmd, dict(env, BATCHPROC_FAULT="kill-before-errors"), timeout=120)
    assert first.rc == -9, first.out
    assert not (_run_dir(tmp_path) / "errors.jsonl").exists()
    second = procs.run(cmd, env, timeout=120)
    assert second.rc == 0, second.out
    (error,) = _errors(_run_dir(tmp_path))
    assert error["global_batch"] == 1 and set(error["indices"]) == _batch(1)
    assert _indices(_run_dir(tmp_path)) == sorted(set(range(N)) - _batch(1))


# -- out of memory -------------------------------------------------------------------------------


def test_out_of_memory_batches_are_split_down_to_one_sample(tmp_path: Path, procs: Procs) -> None:
    """Batches of more than one sample 'run out of memory': each is split until it fits, over a
    preemption and resume; sample 13 fails even alone and is recorded under skip."""
    config = _config(tmp_path)
    env = {"FAULTY_OOM_ABOVE": "1", "FAULTY_OOM_ALONE": "13", "FAULTY_POLICY": "skip",
           "FAULTY_CALLS": str(tmp_path / "calls")}
    first = _run(procs, config, dict(env, BATCHPROC_FAULT="stop@step=1"))
    assert first.rc == ExitCode.PREEMPTED, first.out
    second = _run(procs, config, env)
    assert second.rc == ExitCode.COMPLETED, second.out
    run_dir = _run_dir(tmp_path)
    assert _indices(run_dir) == sorted(set(range(N)) - {13})
    (error,) = _errors(run_dir)
    assert (error["global_batch"], error["indices"]) == (4, [13]) and error["error"].startswith("OutOfMemoryError")
    assert "out of memory in global batch 4 with 3 samples (12..14); retrying as 1 + 2" in first.out + second.out
    calls = [json.loads(line) for f in (tmp_path / "calls").glob("*.log") for line in f.read_text().splitlines()]
    assert {tuple(c["indices"]) for c in calls if len(c["indices"]) == 1} >= {(i,) for i in range(N)}
    assert json.loads((run_dir / "metrics.json").read_text()) == {"processed": N - 1}


def test_out_of_memory_of_one_sample_under_raise_fails_naming_it(tmp_path: Path, procs: Procs) -> None:
    done = _run(procs, _config(tmp_path, slots=1), {"FAULTY_OOM_ABOVE": "1", "FAULTY_OOM_ALONE": "13"})
    assert done.rc == ExitCode.FAILED, done.out
    assert "global batch 4, dataset indices 13)" in done.out and "OutOfMemoryError" in done.out


# -- no restart loops ------------------------------------------------------------------------------


def test_a_raising_batch_fails_at_the_first_attempt(tmp_path: Path, procs: Procs) -> None:
    done = _run(procs, _config(tmp_path, max_restarts=3), {"FAULTY_RAISE": "5"})
    assert done.rc == ExitCode.FAILED, done.out
    assert done.out.count("WORKER rank=0") == 1 and done.out.count("WORKER rank=1") == 1, done.out
    last = done.out.strip().splitlines()[-2:]
    assert "ValueError: cannot process batch 5" in last[0] and "(rank 1, in global batch 5)" in last[0], last
    status = json.loads((_run_dir(tmp_path) / "status.json").read_text())
    assert status["state"] == "failed" and status["failed_rank"] == 1 and status["phase"] == "in global batch 5"


def test_a_killed_worker_is_still_restarted_and_completes(tmp_path: Path, procs: Procs) -> None:
    # The chief (rank 0, which commits) SIGKILLed mid-interval, under batchproc run.
    done = _run(procs, _config(tmp_path, max_restarts=3), {"BATCHPROC_FAULT": "kill@rank=0@step=2"})
    assert done.rc == ExitCode.COMPLETED, done.out
    assert done.out.count("WORKER rank=0") == 2  # restarted once
    assert _indices(_run_dir(tmp_path)) == list(range(N))
    status = json.loads((_run_dir(tmp_path) / "status.json").read_text())
    assert status["state"] == "completed" and status["restarts"] == 1, status


def test_an_error_in_the_script_fails_at_the_first_attempt_and_names_its_phase(tmp_path: Path, procs: Procs) -> None:
    done = _run(procs, _config(tmp_path, max_restarts=3), {"FAULTY_SCRIPT": "0,1:before"})  # a fresh run
    assert done.rc == ExitCode.FAILED, done.out
    assert done.out.count("Traceback (most recent call last)") == 2, done.out  # once per rank: no replay
    last = done.out.strip().splitlines()[-2:]
    assert "FileNotFoundError" in last[0] and "/nonexistent/dir/labels.csv" in last[0], last
    assert "in the script, before torch_batch_process" in last[0], last
    assert "0/? batches committed; nothing committed was lost" in last[1], last
    status = json.loads((_run_dir(tmp_path) / "status.json").read_text())
    assert status["state"] == "failed" and "FileNotFoundError" in status["error"], status


def test_a_script_failing_after_the_run_completed_fails_and_keeps_the_run(tmp_path: Path, procs: Procs) -> None:
    config = _config(tmp_path, max_restarts=3)
    done = _run(procs, config, {"FAULTY_SCRIPT": "0:after"})
    assert done.rc == ExitCode.FAILED and done.out.count("RESULT ") == 1, done.out
    last = done.out.strip().splitlines()[-2:]
    assert "RuntimeError: post-processing failed" in last[0] and "after torch_batch_process returned" in last[0], last
    assert "holds a completed run (10/10 batches)" in last[1], last
    assert _indices(_run_dir(tmp_path)) == list(range(N))

    # On a completed run, a slip before torch_batch_process must not read as if it were resumable.
    done = _run(procs, config, {"FAULTY_SCRIPT": "0,1:before"})
    assert done.rc == ExitCode.FAILED and done.out.count("Traceback (most recent call last)") == 2, done.out
    last = done.out.strip().splitlines()[-2:]
    assert "FileNotFoundError" in last[0] and "in the script, before torch_batch_process" in last[0], last
    assert "holds a completed run (10/10 batches)" in last[1] and "resume" not in last[1], last
    assert json.loads((_run_dir(tmp_path) / "status.json").read_text())["state"] == "completed"


def test_a_script_failing_on_one_rank_only_does_not_leave_the_other_waiting(tmp_path: Path, procs: Procs) -> None:
    # Rank 1 goes on into torch_batch_process and waits in the rendezvous for rank 0, which will
    # never come: the supervisor stops it shortly after rank 0's verdict, not at the 600 s timeout.
    config = write_config(tmp_path / "exp.yaml", [N, BS, INTERVAL], shared_fs(tmp_path / "runs"), name="faulty",
                          script="tests/scripts/faulty_job.py", max_restarts=3, pg_timeout_s=600)
    started = time.monotonic()
    done = _run(procs, config, {"FAULTY_SCRIPT": "0:before"}, timeout=120)
    assert done.rc == ExitCode.FAILED, done.out
    assert time.monotonic() - started < 60, done.out
    last = done.out.strip().splitlines()[-2]
    assert "FileNotFoundError" in last and "(rank 0, in the script, before torch_batch_process)" in last, last


# -- a stuck batch ---------------------------------------------------------------------------------


def test_a_stuck_batch_fails_the_job_promptly(tmp_path: Path, procs: Procs) -> None:
    started = time.monotonic()
    done = _run(procs, _config(tmp_path, max_restarts=2), {"FAULTY_SLEEP_AT": "1:5:300", "FAULTY_TIMEOUT": "3"},
                timeout=120)
    elapsed = time.monotonic() - started
    assert done.rc == ExitCode.FAILED, done.out
    assert elapsed < 60, f"took {elapsed:.0f}s: it waited for a timeout other than batch_timeout_s"
    assert "Thread 0x" in done.out and "most recent call first" in done.out  # faulthandler's dump
    assert done.out.count("WORKER rank=1") == 1  # not restarted
    last = done.out.strip().splitlines()[-2]
    assert "BatchTimeoutError" in last and "global batch 5" in last and "rank 1" in last, last
