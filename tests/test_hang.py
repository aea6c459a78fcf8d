"""A rank that stops responding is a failure, not a hang: the others give up after the config's
``process_group_timeout_s`` (config -> RunSettings.pg_timeout_s -> the gloo process group), the
job exits non-zero within a bounded time, and running it again completes exactly once."""

from __future__ import annotations

import json
import time

import pytest

from conftest import PY, ROOT, output_rows

N, BS = 40, 2
PG_TIMEOUT_S = 10


def write_config(tmp_path, max_restarts: int = 0):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
name: sums
entrypoint: python3 -m launch.torch_distributed python3 tests/scripts/sum_job.py {N} {BS} 2
resources:
  slots_per_trial: 2
max_restarts: {max_restarts}
process_group_timeout_s: {PG_TIMEOUT_S}
checkpoint_storage:
  type: shared_fs
  host_path: {tmp_path / 'runs'}
""")
    return cfg


def test_pg_timeout_flows_from_config_to_workers(monkeypatch):
    from batchproc.config import ExperimentConfig
    from batchproc.outcome import child_env
    from batchproc.settings import RunSettings

    config = ExperimentConfig(name="x", entrypoint="python3 x.py", process_group_timeout_s=12)
    env = child_env(config.run_settings(lock_held=False), base={})
    assert RunSettings.from_env(env).pg_timeout_s == 12.0


@pytest.mark.parametrize("fault", [
    "hang@rank=1@step=3",          # rank 0 waits in the per-step all-reduce
    "hang-after-record@rank=0",    # the chief hangs mid-commit; rank 1 waits for it at the next step
])
def test_hung_rank_fails_the_job_in_bounded_time_then_resume_is_exact(procs, tmp_path, fault):
    cfg = write_config(tmp_path)
    t0 = time.monotonic()
    out = procs.run([PY, "-m", "batchproc", "run", str(cfg)], env={"BATCHPROC_FAULT": fault}, timeout=300)
    elapsed = time.monotonic() - t0
    assert out.rc not in (0, 75), out.out
    # a peer hung and gloo gave up after the config's timeout (the hung rank's own "hangs at" line
    # may be lost: torchrun stops copying its log once it is SIGKILLed)
    assert f"Timed out waiting {PG_TIMEOUT_S * 1000}ms" in out.out
    # start-up + the timeout + torchrun's grace before SIGKILL of the hung rank (30 s), with slack
    assert elapsed < 120, f"took {elapsed:.0f}s"
    run_dir = tmp_path / "runs" / "sums"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"

    done = procs.run([PY, "-m", "batchproc", "run", str(cfg)])
    assert done.rc == 0, done.out
    assert sorted(r["index"] for r in output_rows(run_dir)) == list(range(N))
    ref = procs.run([PY, str(ROOT / "tests/scripts/sum_job.py"), str(N), str(BS), "1000", "-", str(tmp_path / "ref")])
    assert json.loads((run_dir / "metrics.json").read_text()) == ref.result()["metrics"]
