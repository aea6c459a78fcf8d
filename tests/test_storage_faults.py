"""Object-store outages, for real: the S3 server (moto, 127.0.0.1) is stopped mid-run and started again.

A short outage is retried (``RunDir`` retries transient errors with backoff) and the job completes
exactly once; one that outlasts the retries fails the job with a message naming the operation,
and nothing committed before it is lost: running again resumes and completes exactly once.
Stopping the real server, rather than mocking our own code, exercises the errors the client
libraries really raise (botocore's connection errors are no OSError). botocore's own retries
(~7 s of a refused connection) are turned off here, so that ours are what carries a job
through, and the outages can be short.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from tests.support import PY, Procs, S3Server, fsspec_storage, sum_job_metrics, write_config as _write_config

N, BS = 80, 2
# One try per call in botocore; s3fs still retries for ~2 s, then batchproc (0.5 + 1 + 2 s).
CLIENT_OPTIONS = {"config_kwargs": {"retries": {"max_attempts": 1}}}


class Outage:
    """moto's server, to stop and start again (same port, same data), with a bucket on it."""

    def __init__(self, server: S3Server) -> None:
        self.server = server
        self.bucket = f"outage-{uuid.uuid4().hex[:10]}"  # moto's data is per process, not per server
        self.fs = server.fs()
        self.fs.mkdir(self.bucket)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def env(self) -> Dict[str, str]:
        return self.server.env

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Outage]:
    server = S3Server().start()  # a server of its own: the session's would be stopped for others too
    for k, v in server.env.items():
        monkeypatch.setenv(k, v)
    yield Outage(server)
    server.stop()


def write_config(tmp_path: Path, s3: Outage, interval: int = 2) -> Path:
    options = dict(CLIENT_OPTIONS, client_kwargs={"endpoint_url": s3.endpoint})
    return _write_config(tmp_path / "exp.yaml", (N, BS, interval), fsspec_storage(f"s3://{s3.bucket}/runs", options),
                         max_restarts=None)


def outputs(s3: Outage) -> Tuple[List[str], List[int]]:
    """(file names, sorted sample indices) under the run's outputs/."""
    s3.fs.invalidate_cache()
    files = sorted(s3.fs.find(f"{s3.bucket}/runs/sums/outputs"))
    rows = [json.loads(line)["index"] for f in files for line in s3.fs.cat_file(f).decode().splitlines()]
    return files, sorted(rows)


def test_rundir_retries_through_an_outage(s3: Outage, capsys: pytest.CaptureFixture[str]) -> None:
    from batchproc.rundir.storage import RunDir

    rd = RunDir(f"s3://{s3.bucket}/unit", CLIENT_OPTIONS)
    rd.write_json("a.json", {"v": 1})
    s3.stop()
    restart = threading.Timer(3.0, s3.start)
    restart.start()
    try:
        t0 = time.monotonic()
        rd.write_json("b.json", {"v": 2})
        assert time.monotonic() - t0 > 2.5
        assert rd.read_json("b.json") == {"v": 2} and rd.read_json("a.json") == {"v": 1}
    finally:
        restart.join()
    assert "retrying in" in capsys.readouterr().err
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):  # permanent: not retried
        rd.read_bytes("missing.json")
    assert time.monotonic() - t0 < 5


def test_short_outage_is_retried_and_job_completes_exactly_once(procs: Procs, tmp_path: Path, s3: Outage) -> None:
    p = procs.start([PY, "-m", "batchproc", "run", str(write_config(tmp_path, s3))],
                    env=dict(s3.env, SUM_JOB_SLEEP="0.2"))
    procs.wait_for(p, r"PROGRESS [4-9]\b")
    s3.stop()
    time.sleep(3)  # shorter than the 7.5 s that batchproc's retries wait in all
    s3.start()
    out = procs.finish(p, timeout=300)
    assert out.rc == 0, out.out
    assert "retrying in" in out.out  # our retries, not only the client's, carried it through
    files, indices = outputs(s3)
    assert indices == list(range(N))
    assert all(re.search(r"/rows\.[0-9a-f]{8}-r\d-u\d+\.jsonl$", f) for f in files)
    assert not s3.fs.find(f"{s3.bucket}/runs/sums/staging")
    assert json.loads(s3.fs.cat_file(f"{s3.bucket}/runs/sums/metrics.json")) == sum_job_metrics(N)


def test_long_outage_fails_clearly_and_loses_nothing_committed(procs: Procs, tmp_path: Path, s3: Outage) -> None:
    cfg = write_config(tmp_path, s3)
    p = procs.start([PY, "-m", "batchproc", "run", str(cfg)], env=dict(s3.env, SUM_JOB_SLEEP="0.2"))
    procs.wait_for(p, r"PROGRESS [4-9]\b")
    s3.stop()
    try:
        procs.wait_for(p, r"failed after \d+ tries", timeout=120)  # the retries ran out
    finally:
        s3.start()  # the outage ends after the job gave up
    out = procs.finish(p, timeout=300)
    assert out.rc not in (0, 75), out.out
    assert "StorageUnavailableError" in out.out and "Could not connect to the endpoint" in out.out
    assert "nothing committed was lost" in out.out
    committed_files, committed = outputs(s3)
    assert len(set(committed)) == len(committed)  # publication may be unfinished, never doubled

    done = procs.run([PY, "-m", "batchproc", "run", str(cfg)], env=s3.env)
    assert done.rc == 0, done.out
    files, indices = outputs(s3)
    assert indices == list(range(N))
    assert set(committed_files) <= set(files)  # committed outputs were kept, not redone
    assert json.loads(s3.fs.cat_file(f"{s3.bucket}/runs/sums/metrics.json")) == sum_job_metrics(N)


def test_lease_of_a_killed_holder_is_taken_over_but_a_live_one_stands() -> None:
    """On object stores the lock is a lease (no flock). A job killed before releasing it used to
    lock the run out for the lease's 90 s; a holder known dead (same machine boot and pid
    namespace, pid gone) no longer does. A live holder, or one elsewhere, still does."""
    import subprocess

    from batchproc.errors import RunDirLockedError
    from batchproc.rundir.storage import RunDir, RunLock, _pid_space, acquire_run_lock

    rd = RunDir(f"memory://lease-{uuid.uuid4().hex[:8]}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    lease = {"holder": "batchproc run x.yaml", "host": socket.gethostname(), "since": time.time(),
             "heartbeat": time.time(), "id": "old", "pid_space": _pid_space()}
    rd.write_json("lock.json", dict(lease, pid=dead.pid))
    acquire_run_lock(rd, holder="me").release()
    for held in (dict(lease, pid=os.getpid()), dict(lease, pid=dead.pid, pid_space="another-machine/1")):
        rd.write_json("lock.json", held)
        with pytest.raises(RunDirLockedError, match="in use by"):
            RunLock(rd, holder="me").acquire()
