"""One node, one slot: the worker runs under our own agent (batchproc.control.solo_agent), not
torchrun's, and keeps everything torchrun gave it: the worker's environment, restarts up to
``max_restarts``, one stop per signal with the worker's grace to checkpoint, ``[rank0]: `` lines,
and the lifeline (a SIGKILLed agent leaves no worker running beside a rerun)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.support import PY, Procs, assert_exactly_once, children_map, shared_fs, signal_twice, write_config

N, BS = 120, 2


def _tree(pid: int) -> "tuple[int, int, int]":
    """(launcher, agent, worker) below the ``batchproc run`` process ``pid``."""
    launcher = children_map()[pid][0]
    agent = children_map()[launcher][0]
    return launcher, agent, children_map()[agent][0]


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _maps(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def test_one_slot_runs_under_an_agent_without_torch_and_outputs_every_sample_once(
        procs: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "exp.yaml", (N, BS, 4), shared_fs(tmp_path / "runs"), name="solo", slots=1)
    job = procs.start([PY, "-m", "batchproc", "run", str(cfg)], env={"SUM_JOB_SLEEP": "0.05"})
    procs.wait_for(job, r"PROGRESS \d+")
    launcher, agent, worker = _tree(job.pid)
    assert "batchproc.control.solo_agent" in _cmdline(agent), _cmdline(agent)
    assert "libtorch" not in _maps(agent) and "libtorch" in _maps(worker)
    env = dict(e.split("=", 1) for e in open(f"/proc/{worker}/environ").read().split("\0") if "=" in e)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert env["TORCHELASTIC_RESTART_COUNT"] == "0" and env["TORCHELASTIC_RUN_ID"]
    done = procs.finish(job)
    assert done.rc == 0, done.out
    assert "[rank0]: " in done.out and "PROGRESS" in done.out, done.out
    assert_exactly_once(tmp_path / "runs" / "solo", N)


def test_a_killed_worker_is_started_again_up_to_max_restarts(procs: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "exp.yaml", (N, BS, 4), shared_fs(tmp_path / "runs"), name="again", slots=1,
                       max_restarts=1)
    done = procs.run([PY, "-m", "batchproc", "run", str(cfg)], env={"BATCHPROC_FAULT": "kill@step=9"})
    assert done.rc == 0, done.out
    assert "was killed by SIGKILL; starting it again (1 of --max-restarts 1 left)" in done.out, done.out
    status = json.loads((tmp_path / "runs" / "again" / "status.json").read_text())
    assert status["state"] == "completed", status
    assert_exactly_once(tmp_path / "runs" / "again", N)


def test_a_killed_worker_without_restarts_fails_naming_it_and_a_rerun_resumes(procs: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "exp.yaml", (N, BS, 4), shared_fs(tmp_path / "runs"), name="dead", slots=1)
    done = procs.run([PY, "-m", "batchproc", "run", str(cfg)], env={"BATCHPROC_FAULT": "kill@step=9"})
    assert done.rc not in (0, 75), done.out
    assert "was killed by SIGKILL; no restarts left (--max-restarts 0)" in done.out, done.out
    again = procs.run([PY, "-m", "batchproc", "run", str(cfg)])
    assert again.rc == 0, again.out
    assert_exactly_once(tmp_path / "runs" / "dead", N)


def test_every_level_signalled_twice_stops_once_with_exit_75_and_resumes(procs: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "exp.yaml", (N, BS, 4), shared_fs(tmp_path / "runs"), name="twice", slots=1)
    # The worker's last flush takes 4 s: the second round of signals lands while the agent waits for it.
    job = procs.start([PY, "-m", "batchproc", "run", str(cfg)],
                      env={"SUM_JOB_SLEEP": "0.1", "SUM_JOB_FLUSH_SLEEP": "4"})
    procs.wait_for(job, r"PROGRESS 1[0-9]\b", timeout=180)
    signal_twice([job.pid, *_tree(job.pid)])  # as Slurm does: every process of the step, twice
    done = procs.finish(job, timeout=180)
    assert done.rc == 75, done.out
    assert "again while stopping" in done.out, done.out
    again = procs.run([PY, "-m", "batchproc", "run", str(cfg)], timeout=240)
    assert again.rc == 0, again.out
    assert_exactly_once(tmp_path / "runs" / "twice", N)


def test_a_sigkilled_agent_leaves_no_worker_and_a_rerun_outputs_every_sample_once(
        procs: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "exp.yaml", (400, BS, 4), shared_fs(tmp_path / "runs"), name="orphan", slots=1)
    first = procs.start([PY, "-m", "batchproc", "run", str(cfg)], env={"SUM_JOB_SLEEP": "0.1"})
    procs.wait_for(first, r"PROGRESS 8\b")
    _, agent, worker = _tree(first.pid)
    os.kill(agent, signal.SIGKILL)
    deadline = time.monotonic() + 20  # a checkpoint, not the rest of the job
    while first.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not first.leftovers(), f"left running after the agent was killed: {first.leftovers()}"
    ended = procs.finish(first, timeout=30)
    assert ended.rc not in (0,), ended.out
    again = procs.run([PY, "-m", "batchproc", "run", str(cfg)], timeout=240)
    assert again.rc == 0, again.out
    assert_exactly_once(tmp_path / "runs" / "orphan", 400)


def test_batchproc_agent_torchrun_keeps_torchruns_agent_for_one_slot(procs: Procs, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "exp.yaml", (24, BS, 4), shared_fs(tmp_path / "runs"), name="tr", slots=1)
    job = procs.start([PY, "-m", "batchproc", "run", str(cfg)],
                      env={"SUM_JOB_SLEEP": "0.1", "BATCHPROC_AGENT": "torchrun"})
    procs.wait_for(job, r"PROGRESS \d+")
    _, agent, _ = _tree(job.pid)
    assert "batchproc.control.loopback" in _cmdline(agent), _cmdline(agent)
    done = procs.finish(job)
    assert done.rc == 0, done.out
    assert_exactly_once(tmp_path / "runs" / "tr", 24)
