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


def test_a_preempted_run_returns_the_metrics_of_what_it_committed(procs: Procs, tmp_path: Path) -> None:
    """As the static schedule does: the result of a preempted attempt carries the metrics of every
    batch committed so far (earlier attempts' too), and so does status.json."""
    n, run_dir = 40, tmp_path / "run"
    env = {"BATCHPROC_FAULT": "stop@rank=1@step=3", "SUM_JOB_SLEEP": "0.05"}
    first = procs.run(job_cmd(2, *DYN, n, 2, 2, "-", run_dir), env=env)
    second = procs.run(job_cmd(2, *DYN, n, 2, 2, "-", run_dir), env=dict(env, BATCHPROC_FAULT="stop@rank=0@step=2"))
    for out in (first, second):
        assert out.rc == 0 and out.result()["preempted"], out.out
    done = sorted(r["index"] for r in output_rows(run_dir))
    assert 0 < len(done) < n and len(set(done)) == len(done)
    total = float(sum(done))
    expected = {"sum": total, "count": len(done), "mean": total / len(done),
                "accuracy": sum(1 for i in done if (i * i) % 3 == i % 3) / len(done)}
    assert second.result()["metrics"] == expected
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["metrics"] == expected, status
    assert procs.run(job_cmd(2, *DYN, n, 2, 2, "-", run_dir)).result()["metrics"] == sum_job_metrics(n)


def test_frozen_image_inputs(procs: Procs, tmp_path: Path) -> None:
    """ImageFiles under the dynamic schedule: listed once, by the first attempt; files added later
    are not part of the run, a file replaced since is a bad sample named in errors.jsonl."""
    from tests.test_manifest import JOB, ORIGINAL, bmp, check_exactly_once, original_files, write_files

    data, run = tmp_path / "data", tmp_path / "run"
    originals = original_files()
    write_files(data, originals)
    args = [str(JOB), str(data), str(run), "2", "2"]
    env = {"BATCHPROC_SCHEDULE": "dynamic"}
    first = procs.run(torchrun_cmd(2, *args), env=dict(env, BATCHPROC_FAULT="stop@rank=0@step=1"))
    assert first.rc == 0 and '"preempted": true' in first.out, first.out
    assert not list((run / "checkpoints").glob("ckpt-*")) and list((run / "dynamic").glob("folded-*"))
    published = {json.loads(line)["index"] for f in (run / "outputs").rglob("*.jsonl") for line in f.read_text().splitlines()}
    replaced = next(name for i, name in enumerate(ORIGINAL) if i not in published)
    write_files(data, {"img500.bmp": bmp(500), replaced: bmp(999)})  # one added, one not yet output replaced
    second = procs.run([PY, *args], env=env)  # an elastic resume: 1 process
    assert second.rc == 0 and '"completed": true' in second.out, second.out
    errors = [json.loads(line) for line in (run / "errors.jsonl").read_text().splitlines()]
    check_exactly_once(str(run), lambda name: str(data / name), originals, [replaced], errors)


def _faulty_config(tmp_path: Path) -> Path:
    from tests.test_batch_faults import _config

    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text() + "schedule: dynamic\n")
    return cfg


def test_bad_batches_are_bounded_job_wide(procs: Procs, tmp_path: Path) -> None:
    """max_bad_batches counts the whole job's failed batches (in the store), whichever ranks ran
    them: 2 > 1 fails the job, naming both in errors.jsonl; a rerun with a higher bound finishes."""
    from tests.test_batch_faults import N as FN, _batch, _errors, _indices, _run, _run_dir

    config = _faulty_config(tmp_path)
    env = {"FAULTY_RAISE": "2,3", "FAULTY_POLICY": "skip", "FAULTY_MAX_BAD": "1"}
    done = _run(procs, config, env)
    run_dir = _run_dir(tmp_path)
    assert done.rc != 0, done.out
    assert f"2 batches failed in process_batch, more than max_bad_batches=1; each is named in {run_dir}/errors.jsonl" \
        in done.out, done.out
    assert done.out.count("WORKER rank=0") <= 1, "a deterministic failure must not be restarted"
    assert sorted(e["global_batch"] for e in _errors(run_dir)) == [2, 3]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed", status
    again = _run(procs, config, dict(env, FAULTY_MAX_BAD="2"))
    assert again.rc == 0, again.out
    assert _indices(run_dir) == sorted(set(range(FN)) - _batch(2) - _batch(3))
    assert sorted(e["global_batch"] for e in _errors(run_dir)) == [2, 3]


def _finish_config(tmp_path: Path) -> Path:
    from tests.test_lifecycle import _config

    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text() + "schedule: dynamic\n")
    return cfg


def test_a_stop_during_on_finish_is_resumed_by_running_on_finish_again(procs: Procs, tmp_path: Path) -> None:
    from tests.test_lifecycle import _assert_rerun_runs_only_on_finish

    config = _finish_config(tmp_path)
    env = {"FINISH_JOB_LOG": str(tmp_path / "log"), "FINISH_JOB_SLEEP_IN_FINISH": "60"}
    t = procs.start([PY, "-m", "batchproc", "run", str(config)], env)
    t.wait_for(r"IN_FINISH", timeout=90)
    os.killpg(t.pid, signal.SIGTERM)  # as Kubernetes would: the whole group of `batchproc run`
    first = procs.finish(t, timeout=90)
    assert first.rc == 75, first.out
    _assert_rerun_runs_only_on_finish(tmp_path, procs, config)


def test_sigkill_during_on_finish_reruns_only_on_finish(procs: Procs, tmp_path: Path) -> None:
    from tests.test_lifecycle import _assert_rerun_runs_only_on_finish, _run

    config = _finish_config(tmp_path)
    first = _run(procs, config, {"FINISH_JOB_LOG": str(tmp_path / "log"), "BATCHPROC_FAULT": "kill-in-finish@rank=1"})
    assert first.rc not in (0, 75), first.out
    status = json.loads((tmp_path / "runs" / "fin" / "status.json").read_text())
    assert status["state"] == "failed" and status["phase"] == "in on_finish", status
    _assert_rerun_runs_only_on_finish(tmp_path, procs, config)
