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
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from tests.support import PY, Procs, Tracked, assert_exactly_once, free_port

N, BS, INTERVAL = 240, 2, 3
SLOW = {"SUM_JOB_SLEEP": "0.1"}


class Node:
    """One node's launcher (2 processes), its output also in ``<name>.log``."""

    def __init__(self, procs: Procs, tmp_path: Path, name: str, port: int, run_dir: Path, max_restarts: int = 1) -> None:
        self.name = name
        cmd = [PY, "-m", "launch.torch_distributed", "--nnodes=2", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=batchproc-test",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "--",
               "tests/scripts/sum_job.py", str(N), str(BS), str(INTERVAL), "-", str(run_dir)]
        self.t: Tracked = procs.start(cmd, env=SLOW, log_path=tmp_path / f"{name}.log")  # killed at teardown

    @property
    def out(self) -> str:
        return self.t.output

    def wait(self, timeout: float = 240) -> int:
        rc = self.t.wait(timeout)
        if rc is None:
            raise AssertionError(f"{self.name} did not end in {timeout}s:\n{self.out[-5000:]}")
        return rc

    def kill(self) -> None:
        """What losing the machine does: every process of this node dies at once."""
        self.t.kill_all()


def start_two_nodes(procs: Procs, tmp_path: Path, run_dir: Path, port: int, tag: str) -> List[Node]:
    host = Node(procs, tmp_path, f"{tag}-host", port, run_dir)
    deadline = time.monotonic() + 120
    while True:  # the first launcher hosts the rendezvous store: wait until it listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and host.t.poll() is None, host.out
            time.sleep(0.2)
    return [host, Node(procs, tmp_path, f"{tag}-other", port, run_dir)]


def wait_for_checkpoint(run_dir: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("ckpt-*.json")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)


def start_then_lose(procs: Procs, tmp_path: Path, lost: str) -> Tuple[Path, int, Node]:
    """Two nodes run until their first checkpoint; then node ``lost`` ("host" or "other") dies.
    Returns the run directory, the rendezvous port and the surviving node."""
    run_dir, port = tmp_path / "run", free_port()
    host, other = start_two_nodes(procs, tmp_path, run_dir, port, lost)
    wait_for_checkpoint(run_dir)
    dead, survivor = (host, other) if lost == "host" else (other, host)
    dead.kill()
    return run_dir, port, survivor


def assert_completed_on_four_ranks(run_dir: Path) -> Dict[str, Any]:
    status: Dict[str, Any] = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["world_size"] == 4, status
    assert_exactly_once(run_dir, N)
    return status


def test_lost_node_started_again_rejoins_and_the_job_resumes(procs: Procs, tmp_path: Path) -> None:
    # Also the plain two-node case, made stronger: every sample once on 4 ranks across a lost node.
    run_dir, port, host = start_then_lose(procs, tmp_path, "other")
    status = json.loads((run_dir / "status.json").read_text())  # killed mid-run: "running", or "failed"
    assert status["state"] != "completed" and status["committed_batches"] < status["total_batches"], status
    # The surviving node's agent restarts its workers and waits in the next rendezvous round.
    again = Node(procs, tmp_path, "other-again", port, run_dir)
    assert host.wait() == 0, host.out
    assert again.wait() == 0, again.out
    assert assert_completed_on_four_ranks(run_dir)["attempts"] >= 2


def test_lost_host_node_fails_the_other_then_both_started_again_resume(procs: Procs, tmp_path: Path) -> None:
    run_dir, port, other = start_then_lose(procs, tmp_path, "host")
    t0 = time.monotonic()
    assert other.wait(timeout=120) != 0, other.out  # the rendezvous store died with the host node
    assert time.monotonic() - t0 < 90
    for node in start_two_nodes(procs, tmp_path, run_dir, port, "again"):
        assert node.wait() == 0, node.out
    assert assert_completed_on_four_ranks(run_dir)["attempts"] >= 2
