"""One storage suite over every backend: a local path, memory://, and s3:// (moto server on 127.0.0.1)."""

from __future__ import annotations

import os
import uuid

import pytest

from batchproc.errors import RunDirLockedError
from batchproc.rundir.layout import LOCK_FILES, published_name
from batchproc.rundir.storage import RunDir, acquire_run_lock


@pytest.fixture(params=["local", "memory", "s3"])
def run_dir(request, tmp_path):
    if request.param == "local":
        return RunDir(str(tmp_path / "run"))
    if request.param == "memory":
        return RunDir(f"memory://bp-{uuid.uuid4().hex[:8]}/run")
    bucket = request.getfixturevalue("s3_bucket")
    return RunDir(f"{bucket}/run")


class TestRunDir:
    def test_atomic_write_and_read(self, run_dir):
        run_dir.write_json("a/b.json", {"x": 1})
        run_dir.write_json("a/b.json", {"x": 2})
        assert run_dir.read_json("a/b.json") == {"x": 2}
        assert run_dir.exists("a/b.json") and not run_dir.exists("a/c.json")
        assert run_dir.listdir("a") == ["b.json"]

    def test_move_is_idempotent(self, run_dir):
        run_dir.write_atomic("staging/x/f.txt", b"hello")
        run_dir.move("staging/x/f.txt", "outputs/f.txt")
        run_dir.move("staging/x/f.txt", "outputs/f.txt")  # a rerun of an interrupted publication
        assert run_dir.read_bytes("outputs/f.txt") == b"hello"
        assert run_dir.find("outputs") == ["outputs/f.txt"]
        assert not run_dir.exists("staging/x/f.txt")

    def test_remove_all_keeps_nothing_but_locks(self, run_dir: RunDir) -> None:
        lock = acquire_run_lock(run_dir, holder="job one")  # --fresh: the asking job holds the lock
        try:
            run_dir.write_atomic("outputs/a", b"1")
            run_dir.write_atomic("status.json", b"{}")
            held = set(run_dir.find("")) - {"outputs/a", "status.json"}
            assert held and held <= set(LOCK_FILES), held
            run_dir.remove_all()
            assert set(run_dir.find("")) == held
            with pytest.raises(RunDirLockedError, match="job one"):  # still held
                acquire_run_lock(RunDir(run_dir.url), holder="job two")
        finally:
            lock.release()

    def test_lock_names_holder(self, run_dir):
        lock = acquire_run_lock(run_dir, holder="job one")
        try:
            with pytest.raises(RunDirLockedError, match="job one"):
                acquire_run_lock(RunDir(run_dir.url), holder="job two")
        finally:
            lock.release()
        acquire_run_lock(RunDir(run_dir.url), holder="job three").release()


def test_published_names_never_collide():
    names = {published_name(rel, a, r, u) for rel in ("p.parquet", "sub/p.parquet", "p")
             for a in ("0a1b2c3d", "ffffffff") for r in range(3) for u in range(3)}
    assert len(names) == 3 * 2 * 3 * 3
    assert published_name("sub/preds.tar.gz", "0a1b2c3d", 1, 2) == "outputs/sub/preds.0a1b2c3d-r1-u2.tar.gz"


def test_run_directory_files_are_created_with_the_umasks_mode(tmp_path) -> None:
    run_dir = RunDir(str(tmp_path / "run"))
    run_dir.write_json("status.json", {"state": "running"})
    mode = os.stat(tmp_path / "run" / "status.json").st_mode & 0o777
    mask = os.umask(0o022)
    os.umask(mask)
    assert mode == 0o666 & ~mask, oct(mode)


def test_a_committed_output_found_under_neither_name_is_an_error_naming_both(tmp_path) -> None:
    run_dir = RunDir(str(tmp_path / "run"))
    run_dir.write_atomic("staging/a/r0/u0/rows.jsonl", b"{}\n")
    run_dir.publish("staging/a/r0/u0/rows.jsonl", "outputs/rows.a-r0-u0.jsonl")
    run_dir.publish("staging/a/r0/u0/rows.jsonl", "outputs/rows.a-r0-u0.jsonl")  # idempotent: done already
    with pytest.raises(FileNotFoundError, match=r"staging/a/r0/u1/rows.jsonl.*outputs/rows.a-r0-u1.jsonl"):
        run_dir.publish("staging/a/r0/u1/rows.jsonl", "outputs/rows.a-r0-u1.jsonl")
