"""A stop signal that reaches every level of the job (Slurm's step signals and time limit, a
process-group kill) stops it once: torchrun keeps its workers' grace to checkpoint."""

from __future__ import annotations

from pathlib import Path

from tests.support import PY, Procs, assert_exactly_once, children_map, shared_fs, signal_twice, write_config

N, BS = 120, 2


def test_every_level_signalled_at_once_and_again_stops_once_with_exit_75_and_resumes(
        procs: Procs, tmp_path: Path) -> None:
    config = write_config(tmp_path / "exp.yaml", (N, BS, 4), shared_fs(tmp_path / "runs"), name="again")
    # The workers' last flush takes 4 s: the second signal lands while torchrun waits for them.
    job = procs.start([PY, "-m", "batchproc", "run", str(config)],
                      env={"SUM_JOB_SLEEP": "0.1", "SUM_JOB_FLUSH_SLEEP": "4"})
    procs.wait_for(job, r"PROGRESS 1[0-9]\b", timeout=180)
    launcher = children_map()[job.pid][0]
    torchrun = children_map()[launcher][0]
    workers = children_map()[torchrun]
    signal_twice([job.pid, launcher, torchrun, *workers])  # as Slurm does: every process of the step, twice
    done = procs.finish(job, timeout=180)
    assert done.rc == 75, done.out
    # torchrun ends on the first signal's exception, as on any preemption; never on a second one,
    # raised inside its wait for the workers' checkpoint.
    assert done.out.count("SignalException: Process") <= 1, done.out
    assert "again while stopping" in done.out, done.out
    again = procs.run([PY, "-m", "batchproc", "run", str(config)], timeout=240)
    assert again.rc == 0, again.out
    assert_exactly_once(tmp_path / "runs" / "again", N)
