"""``schedule="dynamic"`` on moto's real S3 server: a holder frozen past its lease (SIGSTOP of every
process of its job) comes back to a run directory that another job took over, and commits no
per-rank record from then on: every rank checks the lease before its records, and the new job's
start fenced each rank of the frozen attempt (its next record name taken). Every sample's output
exactly once, as in tests/test_lease.py for the static schedule."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest
import s3fs

from batchproc.rundir import layout
from tests.support import PY, Procs, assert_exactly_once, job_cmd, s3_storage, write_config
from tests.test_lease import TTL_S, _freeze, _thaw, _wait


def _names(fs: Any, url: str, folder: str) -> List[str]:
    fs.invalidate_cache()
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{url}/{folder}"))
    except FileNotFoundError:
        return []


def _attempt_outputs(fs: Any, url: str, attempts: Set[str]) -> Set[str]:
    return {n for n in _names(fs, url, "outputs") if (t := layout.parse_tag(n)) is not None and t.attempt in attempts}


@pytest.mark.parametrize("holder", ["batchproc run", "rank 0"])
def test_a_frozen_dynamic_holder_commits_no_rank_record_after_another_job_took_over(
        holder: str, procs: Procs, s3_server: Dict[str, Any], s3_bucket: str, tmp_path: Path) -> None:
    n, bs, interval = 48, 2, 1  # 24 batches, a rank record after each
    bucket = s3_bucket.removeprefix("s3://")
    cfg = write_config(tmp_path / "job.yaml", [n, bs, interval], s3_storage(bucket, "runs", s3_server["endpoint"]),
                       name="frozen", slots=2)
    cfg.write_text(cfg.read_text() + "schedule: dynamic\n")
    url = f"{s3_bucket}/runs/frozen"
    env = dict(s3_server["env"], BATCHPROC_LEASE_TTL_S=str(TTL_S), SUM_JOB_SLEEP="0.4")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    cmd = ([PY, "-m", "batchproc", "run", str(cfg)] if holder == "batchproc run"
           else job_cmd(2, "--schedule", "dynamic", n, bs, interval, "-", url))
    first = procs.start(cmd, env=env)
    _wait(lambda: len([x for x in _names(fs, url, "dynamic") if x.startswith("rank-")]) >= 2 or first.poll() is not None,
          what="the first job's commits")
    assert first.poll() is None, first.output
    frozen = _freeze(first, signal.SIGSTOP)
    try:
        time.sleep(TTL_S * 2)  # past the lease: the second job may take it over
        firsts = {p.split("-")[1] for p in _names(fs, url, "dynamic") if p.startswith("rank-")}
        folded = [x for x in _names(fs, url, "dynamic") if x.startswith("folded-")]
        second = procs.start(cmd, env=env)
        _wait(lambda: second.poll() is not None
              or [x for x in _names(fs, url, "dynamic") if x.startswith("folded-")] != folded,
              what="the second job's fold")
        time.sleep(2)  # a few of its commits
        # What the first job committed, published by it or by the second job's fold: none may be added.
        before = _attempt_outputs(fs, url, firsts)
        assert before
    finally:
        _thaw(frozen)
    a = procs.finish(first, timeout=180)
    b = procs.finish(second, timeout=240)
    assert b.rc == 0, b.out
    assert a.rc != 0, a.out
    assert "lost the lease" in a.out or "written already by another job" in a.out, a.out
    assert _attempt_outputs(fs, url, firsts) == before  # the frozen job published nothing more
    local = tmp_path / "run"
    fs.invalidate_cache()
    fs.get(url + "/", str(local), recursive=True)
    assert_exactly_once(local, n)
    assert not fs.exists(url + "/" + layout.LEASE)  # the second job released its own lease
