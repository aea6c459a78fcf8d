"""A single-node job listens on 127.0.0.1 only (torch's TCPStore binds every interface otherwise:
pytorch/pytorch#173909). Checked on a real 2-slot ``batchproc run``, from /proc/net/tcp{,6}."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Set, Tuple

from tests.support import PY, Procs, descendants, shared_fs, write_config

LISTEN = "0A"


def _socket_inodes(pids: List[int]) -> Set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # it ended meanwhile
            continue
    return inodes


def _listeners(inodes: Set[str]) -> List[Tuple[str, str]]:
    """(table, local address in hex) of every listening TCP socket among ``inodes``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.append((table, fields[1]))
    return found


def _is_loopback(table: str, address: str) -> bool:
    host = address.split(":")[0]
    if table.endswith("tcp"):
        return host.endswith("7F")  # 127.x.y.z, little-endian hex
    return host in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")  # ::1, ::ffff:127.0.0.1


def test_single_node_run_listens_on_loopback_only(tmp_path: Path, procs: Procs) -> None:
    config = write_config(tmp_path / "exp.yaml", [], shared_fs(tmp_path / "runs"), name="idle",
                          script="tests/scripts/idle_job.py")
    t = procs.start([PY, "-m", "batchproc", "run", str(config)], {"IDLE_JOB_S": "60"})
    t.wait_for(r"READY rank=1", timeout=120)
    t.wait_for(r"READY rank=0", timeout=30) if "READY rank=0" not in t.output else None
    listeners = _listeners(_socket_inodes([t.pid, *descendants(t.pid)]))
    assert len(listeners) >= 2, listeners  # torchrun's store and the workers' own (gloo) at least
    exposed = [(table, addr) for table, addr in listeners if not _is_loopback(table, addr)]
    assert not exposed, f"listening beyond loopback: {exposed}"
