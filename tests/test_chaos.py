"""A small, fixed slice of the chaos campaign (``python -m bench.chaos``; see docs/RELIABILITY.md).

Seed 25's first three scenarios (two broken attempts at most) mix SIGTERM to ``batchproc run`` and
to the launcher, SIGKILLed workers, kills in the middle of a commit (after staging, after the
record), truncated records, world sizes 1, 2 and 3, and run directories on the local disk and on
S3 (moto on 127.0.0.1).
"""

from __future__ import annotations

import pytest

from conftest import PY, ROOT


def test_chaos_slice_is_exactly_once(procs, tmp_path):
    out = procs.run([PY, "-m", "bench.chaos", "--scenarios", "3", "--seed", "25", "--s3",
                     "--max-faulty-attempts", "2", "--workdir", str(tmp_path / "chaos")], timeout=900)
    lines = out.out.strip().splitlines()
    assert lines[-1] == "scenarios=3 lost=0 duplicated=0 metric_mismatch=0 hung=0", out.out
    assert out.rc == 0, out.out  # no orphan process, stray file or incomplete run either
    described = "\n".join(l for l in lines if l.startswith("scenario "))
    for fault in ("term(run)", "term(launcher)", "kill(r", "kill-after-stage", "kill-after-record", "truncate",
                  "K1", "K2", "K3", "storage=s3", "storage=local"):
        assert fault in described, described


# -- regressions the campaign found ------------------------------------------------------------


def test_failed_rerun_of_a_completed_run_keeps_it_completed(tmp_path):
    """A rerun of a finished job, signalled while starting (before its workers said anything),
    used to mark the run FAILED; every later rerun then found nothing to do, wrote nothing, and
    exited 1 forever (the campaign's "did not complete in 4 runs")."""
    from batchproc import report
    from batchproc.outcome import resolve_exit_code, status_stamp
    from batchproc.storage import RunDir

    run_dir = RunDir(str(tmp_path / "run"))
    report.write_state(run_dir, report.RunState.COMPLETED)
    before = status_stamp(run_dir)
    assert resolve_exit_code(143, run_dir, before) == 143  # this invocation did fail ...
    assert report.read_state(run_dir) is report.RunState.COMPLETED  # ... the run did not
    assert resolve_exit_code(0, run_dir, status_stamp(run_dir)) == 0  # the next rerun succeeds


@pytest.mark.parametrize("fault", ["kill-after-record@rank=0", "kill-after-record@rank=1"])
def test_crash_between_the_final_record_and_its_publication_is_exactly_once(procs, tmp_path, fault):
    """With no checkpoint before the end (a long interval), the only commit is the final one: the
    record says "complete", a rank dies before publishing its files, and the restarted workers
    found the run complete and returned at once, leaving that rank's outputs in staging/."""
    import json

    from conftest import job_cmd, output_indices

    run_dir = tmp_path / "run"
    out = procs.run(job_cmd(2, 20, 2, 1000, "-", run_dir, max_restarts=1), env={"BATCHPROC_FAULT": fault})
    assert out.rc == 0, out.out
    assert output_indices(run_dir) == list(range(20))
    assert not [p for p in (run_dir / "staging").rglob("*") if p.is_file()] if (run_dir / "staging").exists() else True
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"


def test_completed_run_whose_status_says_failed_heals_on_rerun(procs, tmp_path):
    """However a finished run came to be marked failed (the crash above; or rank 0's failure
    handler after a peer died past its final COMPLETED write), a rerun finds it complete and, as
    it wrote nothing else, used to exit 1 forever. Opening the run now restores COMPLETED."""
    import json

    from conftest import job_cmd

    run_dir = tmp_path / "run"
    assert procs.run(job_cmd(1, 10, 2, 2, "-", run_dir)).rc == 0
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps(dict(status, state="failed")))
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"name: run\nentrypoint: python3 -m launch.torch_distributed python3 tests/scripts/sum_job.py 10 2 2\n"
                   f"checkpoint_storage:\n  type: shared_fs\n  host_path: {tmp_path}\n")
    out = procs.run([PY, "-m", "batchproc", "run", str(cfg)])
    assert out.rc == 0, out.out
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
