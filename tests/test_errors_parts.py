"""Skips are committed as immutable parts of errors/, records carry only their counts, errors.jsonl
says exactly what the latest valid record commits; and the run's fingerprint is never rewritten
with the current job's values (issue 19, items 5 and 6). Jobs are tests/scripts/faulty_job.py,
whose chosen global batches raise under bad_batches="skip"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Union

from batchproc.rundir.lifecycle import ExitCode
from tests.support import PY, Procs, shared_fs, write_config

N, BS, INTERVAL = 30, 3, 2  # 10 global batches
BAD = [1, 4, 7, 8]


def _batch(g: int) -> List[int]:
    return list(range(g * BS, min(N, (g + 1) * BS)))


def _errors(run_dir: Path) -> List[Dict[str, Any]]:
    path = run_dir / "errors.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _bad_batches(run_dir: Path) -> List[int]:
    return sorted(e["global_batch"] for e in _errors(run_dir))


def _indices(run_dir: Path) -> List[int]:
    rows = [json.loads(line) for f in sorted((run_dir / "outputs").rglob("*.jsonl")) for line in f.read_text().splitlines()]
    return sorted(r["index"] for r in rows)


def _good(n: int = N) -> List[int]:
    return sorted(set(range(n)) - {i for g in BAD for i in _batch(g)})


def _records(run_dir: Path) -> List[Path]:
    return sorted((run_dir / "checkpoints").glob("ckpt-*[0-9].json"))


def _assert_records_hold_no_bodies(run_dir: Path) -> None:
    for path in _records(run_dir):
        rec = json.loads(path.read_text())
        assert "errors" not in rec and "Traceback" not in path.read_text() and "ValueError" not in path.read_text()
    latest = json.loads(_records(run_dir)[-1].read_text())
    assert latest["errors_count"] == len(_errors(run_dir))
    assert latest["errors_bytes"] == (run_dir / "errors.jsonl").stat().st_size


# -- through the launcher -------------------------------------------------------------------------


def test_preempted_twice_each_skipped_batch_is_in_errors_jsonl_once(tmp_path: Path, procs: Procs) -> None:
    """2 slots, stopped twice and resumed: each bad batch is named once, every other sample is output
    once, each commit with skips wrote its own part, and no record carries an error row."""
    config = write_config(tmp_path / "exp.yaml", [N, BS, INTERVAL], shared_fs(tmp_path / "runs"), name="faulty",
                          script="tests/scripts/faulty_job.py", max_restarts=0, slots=2)
    env = {"FAULTY_RAISE": ",".join(map(str, BAD)), "FAULTY_POLICY": "skip"}
    cmd = [PY, "-m", "batchproc", "run", str(config)]
    for _ in range(2):
        stopped = procs.run(cmd, dict(env, BATCHPROC_FAULT="stop@step=1"), timeout=150)
        assert stopped.rc == ExitCode.PREEMPTED, stopped.out
    done = procs.run(cmd, env, timeout=150)
    assert done.rc == ExitCode.COMPLETED, done.out
    run_dir = tmp_path / "runs" / "faulty"
    assert _bad_batches(run_dir) == BAD
    assert _indices(run_dir) == _good()
    parts = sorted((run_dir / "errors").glob("err-*.jsonl"))
    assert 1 < len(parts) <= len(BAD)
    assert b"".join(p.read_bytes() for p in parts) == (run_dir / "errors.jsonl").read_bytes()
    _assert_records_hold_no_bodies(run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["skipped_batches"] == len(BAD)


# -- one process (the records are what matters) -----------------------------------------------


def _job(procs: Procs, run_dir: Union[Path, str], fault: str = "", n: int = N) -> Any:
    env = {"FAULTY_RAISE": ",".join(map(str, BAD)), "FAULTY_POLICY": "skip"}
    if fault:
        env["BATCHPROC_FAULT"] = fault
    return procs.run([PY, "tests/scripts/faulty_job.py", str(n), str(BS), str(INTERVAL), str(run_dir)], env, timeout=120)


def _stopped_at_6(procs: Procs, run_dir: Path) -> None:
    """Records at watermarks 2 (batch 1 skipped), 4 (none) and 6 (batch 4)."""
    out = _job(procs, run_dir, "stop@step=5")
    assert out.rc == 0 and out.result()["preempted"], out.out
    watermarks = [json.loads(p.read_text())["watermark"] for p in _records(run_dir)]
    assert watermarks[-2:] == [4, 6], watermarks
    assert _bad_batches(run_dir) == [1, 4]


def test_a_damaged_latest_record_leaves_errors_jsonl_at_the_record_before(tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    _stopped_at_6(procs, run_dir)
    latest = _records(run_dir)[-1]
    part = json.loads(latest.read_text())["errors_last_part"]
    latest.write_bytes(latest.read_bytes()[:40])
    resumed = _job(procs, run_dir, "stop@step=0")  # opens, redoes batch 4, and stops
    assert resumed.rc == 0 and resumed.result()["preempted"], resumed.out
    assert "damaged" in resumed.out
    assert (run_dir / "rejected" / part).exists() and not (run_dir / part).exists()
    assert _bad_batches(run_dir) == [1, 4]  # batch 4 once: set aside, then redone
    done = _job(procs, run_dir)
    assert done.rc == 0, done.out
    assert _bad_batches(run_dir) == BAD
    assert _indices(run_dir) == _good()
    _assert_records_hold_no_bodies(run_dir)


def test_errors_jsonl_deleted_or_edited_is_rebuilt_from_the_parts(tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    _stopped_at_6(procs, run_dir)
    (run_dir / "errors.jsonl").unlink()
    assert _job(procs, run_dir, "stop@step=0").result()["preempted"]
    assert _bad_batches(run_dir) == [1, 4]
    (run_dir / "errors.jsonl").write_text('{"global_batch": 9}\n' * 40)  # longer, and not the parts
    done = _job(procs, run_dir)
    assert done.rc == 0, done.out
    assert _bad_batches(run_dir) == BAD
    _assert_records_hold_no_bodies(run_dir)


def test_parts_of_a_commit_without_its_record_are_set_aside(tmp_path: Path, procs: Procs) -> None:
    """Killed after the part and the record, before errors.jsonl caught up; then a part that no
    record lists (a commit killed before its record) is left beside them."""
    run_dir = tmp_path / "run"
    first = _job(procs, run_dir, "kill-before-errors")
    assert first.rc == -9, first.out
    assert not (run_dir / "errors.jsonl").exists()
    stray = run_dir / "errors" / "err-00000009-0badf00d.jsonl"
    stray.write_text('{"global_batch": 99}\n')
    done = _job(procs, run_dir)
    assert done.rc == 0, done.out
    assert _bad_batches(run_dir) == BAD
    assert not stray.exists() and (run_dir / "rejected" / "errors" / stray.name).exists()


# -- the fingerprint ---------------------------------------------------------------------------


def test_a_deleted_fingerprint_is_restored_from_the_latest_record(tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    _stopped_at_6(procs, run_dir)
    original = json.loads((run_dir / "fingerprint.json").read_text())
    (run_dir / "fingerprint.json").unlink()
    other = _job(procs, run_dir, n=N + 6)  # other data: refused, naming the key
    assert other.rc != 0
    assert "FingerprintMismatchError" in other.out and "dataset_len=30" in other.out, other.out
    assert json.loads((run_dir / "fingerprint.json").read_text()) == original
    done = _job(procs, run_dir)
    assert done.rc == 0, done.out
    assert _indices(run_dir) == _good() and _bad_batches(run_dir) == BAD


def test_a_damaged_fingerprint_is_an_error_naming_it(tmp_path: Path, procs: Procs) -> None:
    run_dir = tmp_path / "run"
    _stopped_at_6(procs, run_dir)
    (run_dir / "fingerprint.json").write_text('{"dataset_len": 3')
    out = _job(procs, run_dir)
    assert out.rc != 0
    assert "CorruptCheckpointError" in out.out and "fingerprint.json is damaged" in out.out, out.out
    assert "Delete it" in out.out
    assert (run_dir / "fingerprint.json").read_text() == '{"dataset_len": 3'  # never written over


def test_a_fingerprint_rewritten_for_other_data_is_caught_by_the_record(tmp_path: Path, procs: Procs) -> None:
    """fingerprint.json says the new job's length (as the old code left it after a deletion): the
    fingerprint inside the latest record still refuses the resume."""
    run_dir = tmp_path / "run"
    _stopped_at_6(procs, run_dir)
    fp = json.loads((run_dir / "fingerprint.json").read_text())
    fp["dataset_len"] = N + 6
    (run_dir / "fingerprint.json").write_text(json.dumps(fp))
    out = _job(procs, run_dir, n=N + 6)
    assert out.rc != 0
    assert "FingerprintMismatchError" in out.out and "dataset_len=30" in out.out and "ckpt-" in out.out, out.out


# -- on an object store (moto's S3 server): no append, the same outcome --------------------------


def test_on_s3_a_fallback_and_a_resume_leave_each_skip_once(s3_server: Dict[str, Any], s3_bucket: str,
                                                            procs: Procs) -> None:
    fs = s3_server["server"].fs()
    run = f"{s3_bucket}/run"
    out = _job(procs, run, "stop@step=5")
    assert out.rc == 0 and out.result()["preempted"], out.out
    records = sorted(p for p in fs.ls(f"{run}/checkpoints", detail=False) if not p.endswith(".states.pt"))
    latest = records[-1]
    part = json.loads(fs.cat_file(latest))["errors_last_part"]
    fs.pipe_file(latest, fs.cat_file(latest)[:40])
    resumed = _job(procs, run, "stop@step=0")
    assert resumed.rc == 0 and resumed.result()["preempted"], resumed.out
    assert fs.exists(f"{run}/rejected/{part}") and not fs.exists(f"{run}/{part}")
    rows = [json.loads(l) for l in fs.cat_file(f"{run}/errors.jsonl").decode().splitlines()]
    assert sorted(r["global_batch"] for r in rows) == [1, 4]
    done = _job(procs, run)
    assert done.rc == 0, done.out
    rows = [json.loads(l) for l in fs.cat_file(f"{run}/errors.jsonl").decode().splitlines()]
    assert sorted(r["global_batch"] for r in rows) == BAD
    for rec in fs.ls(f"{run}/checkpoints", detail=False):
        assert b"ValueError" not in fs.cat_file(rec)


def test_on_s3_errors_jsonl_names_every_skip_when_an_attempt_ends_past_a_bound(
        s3_server: Dict[str, Any], s3_bucket: str, procs: Procs) -> None:
    """On an object store errors.jsonl is written in doubling steps, not at every commit; an attempt
    that ends (here: past max_bad_batches, after several commits with skips) still leaves it naming
    every committed skip, and a rerun with a higher bound completes with each named once."""
    fs = s3_server["server"].fs()
    run = f"{s3_bucket}/run-bound"
    env = {"FAULTY_RAISE": ",".join(map(str, BAD)), "FAULTY_POLICY": "skip", "FAULTY_MAX_BAD": "3"}
    cmd = [PY, "tests/scripts/faulty_job.py", str(N), str(BS), str(INTERVAL), run]
    over = procs.run(cmd, env, timeout=120)
    assert over.rc != 0 and "max_bad_batches=3" in over.out, over.out
    rows = [json.loads(l) for l in fs.cat_file(f"{run}/errors.jsonl").decode().splitlines()]
    assert sorted(r["global_batch"] for r in rows) == BAD, rows  # 4 > 3: committed, then failed
    done = procs.run(cmd, dict(env, FAULTY_MAX_BAD="4"), timeout=120)
    assert done.rc == 0, done.out
    rows = [json.loads(l) for l in fs.cat_file(f"{run}/errors.jsonl").decode().splitlines()]
    assert sorted(r["global_batch"] for r in rows) == BAD
