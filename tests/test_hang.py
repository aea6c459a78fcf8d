"""A rank that stops responding is a failure, not a hang: the others give up after the config's
``process_group_timeout_s`` (config -> RunSettings.pg_timeout_s -> the gloo process group), the
job exits non-zero within a bounded time, and running it again completes exactly once.

The config's ``process_group_timeout_s`` is short here (6 s). torchrun's grace before it SIGKILLs
a rank that ignores its SIGTERM stays 30 s: torch 2.14 applies ``--shutdown-timeout``
(``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) only when the agent itself is signalled, not when it stops a
failed worker group."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.support import PY, Procs, assert_exactly_once, shared_fs, write_config

N, BS = 40, 2
PG_TIMEOUT_S = 6


def test_pg_timeout_flows_from_config_to_workers(procs: Procs, tmp_path: Path) -> None:
    """The config's ``process_group_timeout_s`` is the timeout of the process group every worker
    joins (not the 1800 s default), as the workers themselves read it from torch.distributed."""
    n = 8
    cfg = write_config(tmp_path / "exp.yaml", (n, BS, 2), shared_fs(tmp_path / "runs"),
                       script="tests/scripts/pg_timeout_job.py", pg_timeout_s=12)
    out = procs.run([PY, "-m", "batchproc", "run", cfg])
    assert out.rc == 0, out.out
    reported = dict(re.findall(r"PG_TIMEOUT rank=(\d+) seconds=(\S+)", out.out))
    assert reported == {"0": "12.0", "1": "12.0"}, out.out
    assert_exactly_once(tmp_path / "runs" / "sums", n)


@pytest.mark.parametrize("fault", [
    "hang@rank=1@step=3",          # rank 0 waits in the per-step all-reduce
    # the chief hangs mid-commit; rank 1 waits for it at the next step (SIGTERM ends this hang:
    # torchrun's 30 s grace before its SIGKILL is the case above's, once is enough)
    "hang-after-record@rank=0@sigterm=exit",
])
def test_hung_rank_fails_the_job_in_bounded_time_then_resume_is_exact(procs: Procs, tmp_path: Path, fault: str) -> None:
    cfg = write_config(tmp_path / "exp.yaml", (N, BS, 2), shared_fs(tmp_path / "runs"), pg_timeout_s=PG_TIMEOUT_S)
    t0 = time.monotonic()
    out = procs.run([PY, "-m", "batchproc", "run", cfg], env={"BATCHPROC_FAULT": fault}, timeout=300)
    elapsed = time.monotonic() - t0
    assert out.rc not in (0, 75), out.out
    # a peer hung and gloo gave up after the config's timeout (the hung rank's own "hangs at" line
    # may be lost: torchrun stops copying its log once it is SIGKILLed)
    assert f"Timed out waiting {PG_TIMEOUT_S * 1000}ms" in out.out
    # start-up + the timeout + torchrun's grace before SIGKILL of a hung rank (30 s), with slack
    assert elapsed < 60 + PG_TIMEOUT_S + 30, f"took {elapsed:.0f}s"
    run_dir = tmp_path / "runs" / "sums"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"

    done = procs.run([PY, "-m", "batchproc", "run", cfg])
    assert done.rc == 0, done.out
    assert_exactly_once(run_dir, N)
