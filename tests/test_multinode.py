"""Two nodes on one machine: two launchers, 2 processes each (world size 4), c10d rendezvous on 127.0.0.1.

Recovery as torchrun does it: the launcher whose agent bound the rendezvous endpoint first hosts
the rendezvous store ("host node"). When another node dies, the survivors' agents (with
``--max-restarts``) stop their workers and wait in a new rendezvous round; the user starts the
lost node's launcher again and the job resumes from its last checkpoint. When the host node dies,
the rendezvous is gone with it: the other launchers fail at once, and the user starts every node
again. Either way the result is exact. With several nodes, the worker of global rank 0 holds the
run directory's lock (the launchers do not).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List

from conftest import PY, ROOT, base_env, descendants, output_indices

N, BS, INTERVAL = 240, 2, 3
SLOW = {"SUM_JOB_SLEEP": "0.1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One node's launcher, its output in a log file (a pipe nobody reads could fill and block it)."""

    def __init__(self, procs, tmp_path: Path, name: str, port: int, run_dir: Path, max_restarts: int = 1) -> None:
        self.log_path = tmp_path / f"{name}.log"
        cmd = [PY, "-m", "launch.torch_distributed", "--nnodes=2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=batchproc-test",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "--",
               "tests/scripts/sum_job.py", str(N), str(BS), str(INTERVAL), "-", str(run_dir)]
        with open(self.log_path, "w") as log:
            self.p = subprocess.Popen(cmd, env=base_env(SLOW), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        procs.procs.append(self.p)  # killed with its descendants at teardown

    @property
    def out(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.log_path.name} did not end in {timeout}s:\n{self.out[-5000:]}") from None

    def kill(self) -> None:
        """What losing the machine does: every process of this node dies at once."""
        pids = descendants(self.p.pid)
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.wait(timeout=30)


def start_two_nodes(procs, tmp_path: Path, run_dir: Path, port: int, tag: str) -> List[Node]:
    host = Node(procs, tmp_path, f"{tag}-host", port, run_dir)
    deadline = time.monotonic() + 120
    while True:  # the first launcher hosts the rendezvous store: wait until it listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and host.p.poll() is None, host.out
            time.sleep(0.2)
    return [host, Node(procs, tmp_path, f"{tag}-other", port, run_dir)]


def wait_for_checkpoint(run_dir: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("ckpt-*.json")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)


def check_exact(procs, tmp_path: Path, run_dir: Path) -> None:
    assert output_indices(run_dir) == list(range(N))
    outputs = [p.name for p in (run_dir / "outputs").iterdir()]
    assert outputs and all(n.startswith("rows.") and n.endswith(".jsonl") for n in outputs)
    assert not any(p.is_file() for p in (run_dir / "staging").rglob("*")) if (run_dir / "staging").exists() else True
    ref = procs.run([PY, str(ROOT / "tests/scripts/sum_job.py"), str(N), str(BS), "1000", "-", str(tmp_path / "ref")])
    assert json.loads((run_dir / "metrics.json").read_text()) == ref.result()["metrics"]


def test_two_nodes_complete_exactly_once(procs, tmp_path):
    run_dir = tmp_path / "run"
    nodes = start_two_nodes(procs, tmp_path, run_dir, free_port(), "a")
    for node in nodes:
        assert node.wait() == 0, node.out
    assert "RESULT" in nodes[0].out + nodes[1].out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["world_size"] == 4
    check_exact(procs, tmp_path, run_dir)


def test_lost_node_started_again_rejoins_and_the_job_resumes(procs, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    host, other = start_two_nodes(procs, tmp_path, run_dir, port, "b")
    wait_for_checkpoint(run_dir)
    other.kill()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"  # killed mid-run
    # The surviving node's agent restarts its workers and waits in the next rendezvous round.
    again = Node(procs, tmp_path, "b-other-again", port, run_dir)
    assert host.wait() == 0, host.out
    assert again.wait() == 0, again.out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["world_size"] == 4 and status["attempts"] >= 2
    check_exact(procs, tmp_path, run_dir)


def test_lost_host_node_fails_the_other_then_both_started_again_resume(procs, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    host, other = start_two_nodes(procs, tmp_path, run_dir, port, "c")
    wait_for_checkpoint(run_dir)
    host.kill()
    t0 = time.monotonic()
    assert other.wait(timeout=120) != 0, other.out  # the rendezvous store died with the host node
    assert time.monotonic() - t0 < 90
    for node in start_two_nodes(procs, tmp_path, run_dir, port, "c-again"):
        assert node.wait() == 0, node.out
    assert json.loads((run_dir / "status.json").read_text())["state"] == "completed"
    check_exact(procs, tmp_path, run_dir)
