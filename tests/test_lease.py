"""Exclusive object-store writes (issue 19, item 2), on moto's real S3 server through s3fs.

A holder frozen past its lease (SIGSTOP of every process of its job, as a VM pause would) comes
back to a run directory that another job took over: exactly one of them commits from then on,
the other stops naming it, and every sample is output exactly once. Unit-level: the lease's
conditional writes and create-only records on the same server.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import s3fs

from fsspec.implementations.local import LocalFileSystem

from batchproc.engine.checkpoint import Fingerprint, create_record, open_run
from batchproc.errors import RecordTakenError
from batchproc.rundir import layout
from batchproc.rundir.storage import RunDir, RunLock
from tests.support import (PY, Procs, Tracked, assert_exactly_once, descendants, job_cmd, s3_storage,
                           write_config)

TTL_S = 2.0  # BATCHPROC_LEASE_TTL_S: short, so that a freeze of a few seconds outlives the lease


def _fs() -> Any:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def _wait(check: Any, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _records(fs: Any, url: str) -> List[str]:
    fs.invalidate_cache()
    try:
        return sorted(p for p in fs.ls(url + "/checkpoints", detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []


def _freeze(t: Tracked, sig: int) -> List[int]:
    """``sig`` to the command and every process below it (their own process groups included)."""
    pids = [t.pid, *descendants(t.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def _thaw(pids: List[int]) -> None:
    """SIGCONT to the processes :func:`_freeze` stopped (those still there)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("holder,frozen_at", [("batchproc run", "two records"), ("rank 0", "two records"),
                                              ("batchproc run", "its first batch")])
def test_a_holder_frozen_past_its_lease_commits_nothing_after_another_job_took_over(
        holder: str, frozen_at: str, procs: Procs, s3_server: Dict[str, Any], s3_bucket: str,
        tmp_path: Path) -> None:
    """``batchproc run`` holds the lease for its workers; a script run alone holds it on rank 0.
    Frozen at its first batch, the job has not committed yet: a run's first attempt on an object
    store writes record 0 at watermark 0 (the fence of a fresh run), so its own first commit can
    only take a name that the job which took over has claimed already."""
    # 24 batches on 2 slots: 12 steps, a record after each (after the 8th and the last when frozen early)
    n, bs, interval = 48, 2, 1 if frozen_at == "two records" else 8
    bucket = s3_bucket.removeprefix("s3://")
    cfg = write_config(tmp_path / "job.yaml", [n, bs, interval], s3_storage(bucket, "runs", s3_server["endpoint"]),
                       name="frozen", slots=2)
    url = f"{s3_bucket}/runs/frozen"
    env = dict(s3_server["env"], BATCHPROC_LEASE_TTL_S=str(TTL_S), SUM_JOB_SLEEP="0.4")
    fs = _fs()
    cmd = [PY, "-m", "batchproc", "run", str(cfg)] if holder == "batchproc run" else job_cmd(0, n, bs, interval, "-", url)
    first = procs.start(cmd, env=env)
    if frozen_at == "two records":
        _wait(lambda: len(_records(fs, url)) >= 2 or first.poll() is not None, what="the first job's commits")
    else:
        # Only the output is polled here: a listing on a loaded machine can outlast the batches
        # before the first commit (8 batches, 3.2 s). The check that nothing was committed follows the freeze.
        _wait(lambda: "PROGRESS 0" in first.output or first.poll() is not None, what="the first job's first batch")
    assert first.poll() is None, first.output
    frozen = _freeze(first, signal.SIGSTOP)
    try:
        if frozen_at == "its first batch":
            assert len(_records(fs, url)) <= 1, _records(fs, url)  # at most the fence: nothing committed yet
        time.sleep(TTL_S * 2)  # past the lease: the second job may take it over
        second = procs.start(cmd, env=env)
        top = _records(fs, url)[-1]
        _wait(lambda: second.poll() is not None or _records(fs, url)[-1] != top, what="the second job's fence")
        time.sleep(2)  # a few of its commits
        # What the first job (and any attempt before it) had committed: none of it may grow from here on.
        latest = json.loads(fs.cat_file(_records(fs, url)[-1]))
    finally:
        _thaw(frozen)
    a = procs.finish(first, timeout=180)
    b = procs.finish(second, timeout=240)
    assert b.rc == 0, b.out
    assert a.rc != 0, a.out
    assert f"pid {second.pid} on" in a.out and "lost the lease" in a.out, a.out  # names the other holder
    local = tmp_path / "run"
    fs.invalidate_cache()
    fs.get(url + "/", str(local), recursive=True)
    assert_exactly_once(local, n)
    final = json.loads(sorted((local / "checkpoints").glob("ckpt-*.json"))[-1].read_text())
    for attempt, counts in latest["upload_counters"].items():  # the frozen job committed nothing more
        if attempt != final["attempt"]:
            assert final["upload_counters"][attempt] == counts, (attempt, latest, final)
    lease = fs.exists(url + "/" + layout.LEASE)
    assert not lease  # the second job released its own lease; the first left it alone


HOLDER = """
import os, sys, time
from batchproc.rundir.storage import RunDir, acquire_run_lock
lock = acquire_run_lock(RunDir(sys.argv[1]), holder="job A")
print("held", lock.info["id"], flush=True)
while lock.lost is None:
    time.sleep(0.1)
lock.release()
print("released", flush=True)
"""


def test_release_leaves_the_lease_of_the_job_that_took_it_over(
        procs: Procs, s3_server: Dict[str, Any], s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{s3_bucket}/runs/lease"
    monkeypatch.setenv("BATCHPROC_LEASE_TTL_S", str(TTL_S))
    a = procs.start([PY, "-c", HOLDER, url], env=dict(s3_server["env"], BATCHPROC_LEASE_TTL_S=str(TTL_S)))
    procs.wait_for(a, r"^held ")
    _freeze(a, signal.SIGSTOP)
    time.sleep(TTL_S * 2)
    b = RunLock(RunDir(url), holder="job B").acquire()  # takes over the stale lease (If-Match)
    try:
        _freeze(a, signal.SIGCONT)
        done = procs.finish(a, timeout=60)
        assert "released" in done.out and "now held by job B" in done.out, done.out
        held = RunDir(url).read_json(layout.LEASE)
        assert held["id"] == b.info["id"]  # A's release() left B's lease in place
        b.verify()
    finally:
        b.release()
    assert not RunDir(url).exists(layout.LEASE)  # B's own release() removes it


def test_a_second_lease_is_refused_naming_the_holder(s3_server: Dict[str, Any], s3_bucket: str) -> None:
    url = f"{s3_bucket}/runs/busy"
    a = RunLock(RunDir(url), holder="job A").acquire()
    try:
        with pytest.raises(Exception, match="in use by job A"):
            RunLock(RunDir(url), holder="job B").acquire()
    finally:
        a.release()


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_record_name_is_never_written_twice(where: str, s3_server: Dict[str, Any], s3_bucket: str,
                                              tmp_path: Path) -> None:
    rd = RunDir(f"{s3_bucket}/runs/records" if where == "s3" else str(tmp_path / "run"))
    create_record(rd, 3, b"states", {"seq": 3, "attempt": "aaaaaaaa", "time": 1.0})
    if where == "s3":  # a retried PUT whose first try went through finds its own bytes: success
        create_record(rd, 3, b"states", {"seq": 3, "attempt": "aaaaaaaa", "time": 1.0})
    with pytest.raises(RecordTakenError, match=r"ckpt-00000003.*attempt aaaaaaaa"):
        create_record(rd, 3, b"other states", {"seq": 3, "attempt": "bbbbbbbb", "time": 2.0})
    with pytest.raises(RecordTakenError, match=r"ckpt-00000003.*attempt aaaaaaaa"):
        create_record(rd, 3, b"states", {"seq": 3, "attempt": "bbbbbbbb", "time": 2.0})
    assert rd.read_json(layout.record_name(3))["attempt"] == "aaaaaaaa"
    assert rd.read_bytes(layout.states_name(3)) == b"states"


class _LaggingListing(LocalFileSystem):
    """A store whose LIST does not show its newest record yet (GET by name does): some S3-protocol
    stores behave so for a while after a write."""

    hidden: str = ""

    def ls(self, path: str, detail: bool = False, **kw: Any) -> Any:
        return [e for e in super().ls(path, detail=detail, **kw)
                if (e["name"] if detail else e).rstrip("/") != self.hidden]


def test_a_record_the_listing_does_not_show_is_resumed_from(procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = procs.run(job_cmd(0, 20, 2, 1, "-", run), env={"BATCHPROC_FAULT": "stop@step=4"})
    assert first.rc == 0 and first.result()["preempted"], first.out
    newest = max(p.name for p in (run / "checkpoints").glob("ckpt-*.json"))
    outputs = sorted(p.name for p in (run / "outputs").rglob("*") if p.is_file())
    rd = RunDir(str(run))
    rd.fs = _LaggingListing(skip_instance_cache=True)
    rd.fs.hidden = str(run / "checkpoints" / newest)
    assert newest not in rd.listdir("checkpoints")
    fingerprint = Fingerprint.from_json(rd.read_json(layout.FINGERPRINT_FILE))
    resumed = open_run(rd, fingerprint, restart_count=0)
    assert layout.record_name(resumed.seq).endswith(newest)  # not the one before it
    assert sorted(p.name for p in (run / "outputs").rglob("*") if p.is_file()) == outputs  # nothing set aside
    second = procs.run(job_cmd(0, 20, 2, 1, "-", run))
    assert second.rc == 0 and second.result()["completed"], second.out
    assert_exactly_once(run, 20)


def test_a_states_file_left_without_its_record_does_not_block_the_next_record(procs: Procs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = procs.run(job_cmd(0, 20, 2, 1, "-", run), env={"BATCHPROC_FAULT": "stop@step=4"})
    assert first.rc == 0 and first.result()["preempted"], first.out
    seqs = sorted(int(p.name[5:13]) for p in (run / "checkpoints").glob("ckpt-*.json"))
    # A crash between the two create-only writes of the next commit leaves its states file alone.
    orphan = run / layout.states_name(seqs[-1] + 1)
    orphan.write_bytes(b"states of a commit that never wrote its record")
    second = procs.run(job_cmd(0, 20, 2, 1, "-", run))
    assert second.rc == 0 and second.result()["completed"], second.out
    assert_exactly_once(run, 20)
    assert (run / layout.rejected_name(layout.states_name(seqs[-1] + 1))).exists()
