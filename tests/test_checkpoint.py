"""The commit protocol under crashes between its steps, and damaged checkpoint records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator, List

import pytest

from tests.support import Procs, assert_exactly_once, job_cmd, output_indices, sum_job_metrics

N, BS = 40, 2


@pytest.mark.parametrize("fault", [
    "kill@rank=1@step=5",          # mid-interval: uncommitted work is redone
    "kill-after-stage@rank=0",     # files staged and gathered, no record yet
    "kill-after-record@rank=1",    # record written, publication not done by rank 1
    "kill-after-record@rank=0",    # record written, rank 0 dies before publishing
])
def test_crash_at_each_commit_step_is_exactly_once(procs: Procs, tmp_path: Path, fault: str) -> None:
    run_dir = tmp_path / "run"
    out = procs.run(job_cmd(2, N, BS, 3, "-", run_dir, max_restarts=1), env={"BATCHPROC_FAULT": fault})
    assert out.rc == 0, out.out
    assert out.result()["completed"]
    assert out.result()["metrics"] == sum_job_metrics(N)
    assert_exactly_once(run_dir, N)
    assert json.loads((run_dir / "status.json").read_text())["restarts"] == 1


def test_nothing_is_published_before_its_record(procs: Procs, tmp_path: Path) -> None:
    """Both ranks staged and handed in their files, rank 0 dies before writing the first record,
    and there is no restart: outputs/ must show nothing (no record commits anything yet)."""
    run_dir = tmp_path / "run"
    out = procs.run(job_cmd(2, N, BS, 3, "-", run_dir), env={"BATCHPROC_FAULT": "kill-after-stage@rank=0"})
    assert out.rc != 0, out.out
    assert not list((run_dir / "checkpoints").glob("ckpt-*.json"))
    assert not (run_dir / "outputs").exists() or not [p for p in (run_dir / "outputs").rglob("*") if p.is_file()]
    assert json.loads((run_dir / "status.json").read_text())["committed_batches"] == 0


@pytest.fixture(scope="module")
def stopped_twice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A run directory stopped twice (two valid records at least), made once (see SHARES_STOPPED_TWICE)."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    procs = Procs()
    try:
        for step, watermark in ((2, 6), (1, 10)):  # 3 steps of 2 ranks, then 2 more
            out = procs.run(job_cmd(2, N, BS, 2, "-", run_dir), env={"BATCHPROC_FAULT": f"stop@step={step}"})
            assert out.rc == 0 and out.result()["preempted"], out.out
            assert out.result()["steps_completed"] == watermark
    finally:
        procs.cleanup()
    assert output_indices(run_dir) == list(range(10 * BS))
    assert len(list((run_dir / "checkpoints").glob("ckpt-*.json"))) >= 2
    yield run_dir


def _stop_twice(stopped: Path, run_dir: Path) -> List[Path]:
    """A copy of the run directory stopped twice (the job's paths are relative to it); its records."""
    shutil.copytree(stopped, run_dir)
    return sorted((run_dir / "checkpoints").glob("ckpt-*.json"))


# The tests that copy ``stopped_twice`` share one xdist worker, so that it is made once.
SHARES_STOPPED_TWICE = pytest.mark.xdist_group("stopped-twice")


@SHARES_STOPPED_TWICE
@pytest.mark.parametrize("damage", ["truncate", "edit", "drop-states"])
def test_damaged_latest_record_falls_back_to_previous(procs: Procs, tmp_path: Path, stopped_twice: Path,
                                                      damage: str) -> None:
    run_dir = tmp_path / "run"
    records = _stop_twice(stopped_twice, run_dir)
    latest = records[-1]
    if damage == "truncate":
        latest.write_bytes(latest.read_bytes()[:50])
    elif damage == "edit":
        rec = json.loads(latest.read_text())
        rec["watermark"] += 2  # a silently wrong resume would skip work
        latest.write_text(json.dumps(rec))
    else:
        (run_dir / json.loads(latest.read_text())["states_file"]).unlink()
    out = procs.run(job_cmd(0, N, BS, 2, "-", run_dir))  # one process: the records are what matters
    assert out.rc == 0, out.out
    assert "damaged" in out.out and latest.name in out.out
    assert out.result()["metrics"] == sum_job_metrics(N)
    assert_exactly_once(run_dir, N)  # the damaged record's outputs were set aside
    assert (run_dir / "rejected" / "checkpoints" / latest.name).exists()


@SHARES_STOPPED_TWICE
def test_no_valid_record_is_a_clear_error(procs: Procs, tmp_path: Path, stopped_twice: Path) -> None:
    run_dir = tmp_path / "run"
    for rec in _stop_twice(stopped_twice, run_dir):
        rec.write_text("{")
    before = sorted(p.name for p in (run_dir / "outputs").iterdir())
    out = procs.run(job_cmd(0, N, BS, 2, "-", run_dir))  # one process: the records are what matters
    assert out.rc != 0
    assert "CorruptCheckpointError" in out.out and "--fresh" in out.out
    assert sorted(p.name for p in (run_dir / "outputs").iterdir()) == before  # nothing deleted
