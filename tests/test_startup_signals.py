"""A preemption signal during start-up is a preemption too: exit 75, state "preempted", and a rerun
resumes with every output exactly once. Real ``batchproc run`` / launcher / torchrun processes, real
signals, 127.0.0.1 only.

The windows are made wide and deterministic rather than hit by timing: a config file that is a
FIFO holds ``batchproc run`` in its config load (before any child exists) until the test writes it;
a wrapper entrypoint sleeps before importing the job, or in the processor's constructor (after
rank 0 wrote RUNNING, before the ranks install their own handlers), and says so first.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List

from tests.support import PY, SCRIPTS, Finished, Procs, assert_exactly_once, config_text, output_rows, shared_fs

N, BS, INTERVAL = 40, 2, 4

# The job of tests/scripts/sum_job.py, slowed down where SLOW_START says. It prints STARTING
# before anything else, so the test knows the window is open (torchrun prefixes "[rankR]: ").
WRAPPER = f"""
import os, sys, time
print(f"STARTING rank={{os.environ.get('RANK')}}", flush=True)
slow = os.environ.get("SLOW_START", "")
if slow == "import":
    time.sleep(300)  # as a long import of torch or of a model's code: the signal comes meanwhile
sys.path.insert(0, {str(SCRIPTS)!r})
import sum_job
if slow == "init":
    build = sum_job.Processor.__init__
    def slow_init(self, context):
        print("LOADING", flush=True)
        time.sleep(300)  # as a model loading its weights
        build(self, context)
    sum_job.Processor.__init__ = slow_init
sum_job.main()
"""


def write_config(tmp_path: Path, nproc: int = 2) -> str:
    """The config's text (written to exp.yaml too); its run directory is tmp_path/runs/sums."""
    wrapper = tmp_path / "slow_start.py"
    wrapper.write_text(WRAPPER)
    text = config_text((N, BS, INTERVAL), shared_fs(tmp_path / "runs"), script=wrapper, slots=nproc)
    (tmp_path / "exp.yaml").write_text(text)
    return text


def batchproc(*args: object) -> List[str]:
    return [PY, "-m", "batchproc", *map(str, args)]


def status_of(run_dir: Path) -> Dict[str, Any]:
    status: Dict[str, Any] = json.loads((run_dir / "status.json").read_text())
    return status


def rows_of(run_dir: Path) -> List[Any]:
    return sorted((r["index"], r["y"]) for r in output_rows(run_dir))


def run_with_fifo_config(procs: Procs, tmp_path: Path, text: str, sig: int) -> Finished:
    """``batchproc run`` on a config that is a FIFO: ``sig`` reaches it while it is loading it.

    Our end of the FIFO opens only once batchproc has opened its own, i.e. is in its config load,
    after its handlers are installed and before any child exists; it waits there for the text.
    """
    fifo = tmp_path / "fifo.yaml"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    p = procs.start(batchproc("run", fifo))
    deadline = time.monotonic() + 60
    while True:
        try:  # non-blocking: a batchproc that died before opening it must fail the test, not hang it
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:  # ENXIO: no reader yet
            assert p.poll() is None, procs.finish(p).out
            assert time.monotonic() < deadline, "batchproc never opened its config"
            time.sleep(0.01)
    try:
        os.kill(p.pid, sig)
        time.sleep(0.2)  # let the handler run while the reader is still blocked on our end
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return procs.finish(p)


def started_anything(out: str) -> bool:
    return "STARTING" in out or "WORKER" in out


def test_signal_while_the_workers_start_is_a_preemption(procs: Procs, tmp_path: Path) -> None:
    """(b): batchproc, the launcher and torchrun run; the ranks have not installed their handlers.

    Three attempts on one run directory, each stopped in its own window, then a resume:
    "import" (no rank wrote anything yet) with SIGTERM; "init" (rank 0 wrote RUNNING) with SIGTERM,
    which kills the ranks, and with SIGINT, which raises KeyboardInterrupt in them (rank 0 records
    it as the attempt's failure). Each is a preemption: exit 75, the signal named, nothing lost.
    """
    run_dir = tmp_path / "runs" / "sums"
    write_config(tmp_path)
    for attempt, (slow, sig) in enumerate([("import", signal.SIGTERM), ("init", signal.SIGTERM),
                                           ("init", signal.SIGINT)], start=1):
        p = procs.start(batchproc("run", tmp_path / "exp.yaml"), env={"SLOW_START": slow})
        procs.wait_for(p, "LOADING" if slow == "init" else "STARTING")
        os.kill(p.pid, sig)
        out = procs.finish(p, timeout=120)
        assert out.rc == 75, (slow, sig, out.out)
        assert "preempted; progress saved" in out.out and "WORKER" not in out.out, out.out
        status = status_of(run_dir)
        name = signal.Signals(sig).name
        assert status["state"] == "preempted" and status["reason"].startswith(f"signal {name}"), (slow, status)
        assert status["exit_code"] == 75 and not rows_of(run_dir), status

    again = procs.run(batchproc("run", tmp_path / "exp.yaml"))
    assert again.rc == 0, again.out
    assert_exactly_once(run_dir, N)


def test_signal_before_the_child_starts_is_a_preemption_and_a_completed_run_stays_completed(procs: Procs,
                                                                                              tmp_path: Path) -> None:
    """(a): SIGTERM while ``batchproc run`` loads its config. It starts nothing, keeps the committed
    progress, marks the run preempted and exits 75; the next run resumes. On a completed run the
    same signal, or one while the workers start, leaves it completed with exit code 0."""
    run_dir = tmp_path / "runs" / "sums"
    text = write_config(tmp_path)
    # Some committed progress first: a preemption requested after step 3 (both ranks, same step).
    first = procs.run(batchproc("run", tmp_path / "exp.yaml"), env={"BATCHPROC_FAULT": "stop@step=3"})
    assert first.rc == 75, first.out
    before = status_of(run_dir)
    assert before["state"] == "preempted" and 0 < before["committed_batches"] < N // BS
    rows = rows_of(run_dir)
    assert rows

    out = run_with_fifo_config(procs, tmp_path, text, signal.SIGTERM)
    assert out.rc == 75, out.out
    assert "preempted; progress saved" in out.out and not started_anything(out.out)
    status = status_of(run_dir)
    assert status["state"] == "preempted" and status["reason"] == "signal SIGTERM during start-up"
    assert status["committed_batches"] == before["committed_batches"] and status.get("attempts") == before.get("attempts")
    assert rows_of(run_dir) == rows  # nothing committed lost, nothing new

    done = procs.run(batchproc("run", tmp_path / "exp.yaml"))
    assert done.rc == 0, done.out
    assert_exactly_once(run_dir, N)

    # A completed run stays completed, whenever during a rerun's start-up the signal comes.
    out = run_with_fifo_config(procs, tmp_path, text, signal.SIGTERM)
    assert out.rc == 0 and "completed" in out.out and not started_anything(out.out), out.out
    assert_exactly_once(run_dir, N)
    p = procs.start(batchproc("run", tmp_path / "exp.yaml"), env={"SLOW_START": "import"})
    procs.wait_for(p, "STARTING")
    os.kill(p.pid, signal.SIGTERM)
    out = procs.finish(p, timeout=120)
    assert out.rc == 0 and "completed" in out.out, out.out
    assert_exactly_once(run_dir, N)


def caught(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_launcher_signalled_during_its_start_up_is_preempted_and_resumes(procs: Procs, tmp_path: Path) -> None:
    """The launcher alone (its own lock): SIGTERM as soon as it handles SIGTERM at all, i.e. while it
    imports torch for the GPU count, or at the latest while torchrun or the ranks start."""
    run_dir = tmp_path / "run"
    wrapper = tmp_path / "slow_start.py"
    wrapper.write_text(WRAPPER)
    cmd = [PY, "-m", "launch.torch_distributed", "--nproc-per-node", "2", "--",
           PY, wrapper, N, BS, INTERVAL]
    env = {"BATCHPROC_RUN_DIR": str(run_dir), "SLOW_START": "import"}
    p = procs.start(list(map(str, cmd)), env=env)
    deadline = time.monotonic() + 60
    while not caught(p.pid, signal.SIGTERM):
        assert p.poll() is None and time.monotonic() < deadline, procs.finish(p).out
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGTERM)
    out = procs.finish(p, timeout=120)
    assert out.rc == 75, out.out
    status = status_of(run_dir)
    assert status["state"] == "preempted" and status["reason"] == "signal SIGTERM during start-up", status
    assert not rows_of(run_dir)

    env.pop("SLOW_START")
    again = procs.run(list(map(str, cmd)), env=env)
    assert again.rc == 0, again.out
    assert_exactly_once(run_dir, N)
