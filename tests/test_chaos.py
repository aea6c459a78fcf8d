"""Regressions that the chaos campaign (``python -m bench.chaos``; see docs/RELIABILITY.md) found.

The campaign itself is not a test: CI runs a fixed slice of it as its own step (``.ci/run``:
seed 70's first three scenarios, which must cover (``--require``) SIGTERM to ``batchproc run``
and to the launcher, SIGKILLed workers, kills after staging and after the record, truncated
records, world sizes 1-3, run directories on the local disk and on S3, raising and out-of-memory
batches).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import PY, Procs, assert_exactly_once, job_cmd, shared_fs, write_config


def test_failed_rerun_of_a_completed_run_keeps_it_completed(tmp_path: Path) -> None:
    """A rerun of a finished job, signalled while starting (before its workers said anything),
    used to mark the run FAILED; every later rerun then found nothing to do, wrote nothing, and
    exited 1 forever (the campaign's "did not complete in 4 runs")."""
    from batchproc.rundir import lifecycle
    from batchproc.rundir.lifecycle import RunState
    from batchproc.rundir.storage import RunDir
    from batchproc.control.supervisor import resolve_exit_code, status_stamp

    run_dir = RunDir(str(tmp_path / "run"))
    for state in (RunState.RUNNING, RunState.FINISHING, RunState.COMPLETED):
        assert lifecycle.transition(run_dir, state)
    before = status_stamp(run_dir)
    assert resolve_exit_code(143, run_dir, before) == 143  # this invocation did fail ...
    assert lifecycle.read_state(run_dir) is RunState.COMPLETED  # ... the run did not
    assert resolve_exit_code(0, run_dir, status_stamp(run_dir)) == 0  # the next rerun succeeds


@pytest.mark.parametrize("fault", ["kill-after-record@rank=0", "kill-after-record@rank=1"])
def test_crash_between_the_final_record_and_its_publication_is_exactly_once(procs: Procs, tmp_path: Path,
                                                                            fault: str) -> None:
    """With no checkpoint before the end (a long interval), the only commit is the final one: the
    record says "complete", a rank dies before publishing its files, and the restarted workers
    found the run complete and returned at once, leaving that rank's outputs in staging/."""
    run_dir = tmp_path / "run"
    out = procs.run(job_cmd(2, 20, 2, 1000, "-", run_dir, max_restarts=1), env={"BATCHPROC_FAULT": fault})
    assert out.rc == 0, out.out
    assert_exactly_once(run_dir, 20)
    assert json.loads((run_dir / "status.json").read_text())["restarts"] == 1


def test_completed_run_whose_status_says_failed_heals_on_rerun(procs: Procs, tmp_path: Path) -> None:
    """However a finished run came to be marked failed (the crash above; or rank 0's failure
    handler after a peer died past its final COMPLETED write), a rerun finds it complete and, as
    it wrote nothing else, used to exit 1 forever. Opening the run now restores COMPLETED."""
    run_dir = tmp_path / "run"
    assert procs.run(job_cmd(0, 10, 2, 2, "-", run_dir)).rc == 0
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps(dict(status, state="failed")))
    cfg = write_config(tmp_path / "exp.yaml", (10, 2, 2), shared_fs(tmp_path), name="run", slots=None, max_restarts=None)
    out = procs.run([PY, "-m", "batchproc", "run", cfg])
    assert out.rc == 0, out.out
    assert_exactly_once(run_dir, 10)
