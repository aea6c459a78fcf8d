"""The fsyncs of the commit protocol, in order, through the real filesystem.

A power loss cannot be staged here, but what survives one follows from the order of the system
calls: a file's data is durable once it is fsynced, a rename once its folder is. So a real job
runs under ``strace`` and the test checks, for every commit, that every output file the record
commits was fsynced (its staging folders too) before the record was renamed into place, that the
record itself was fsynced before that rename and its folder after it, and that every published
name's folder was fsynced after the rename into ``outputs/``. Removing any one fsync fails it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest

from tests.support import PY, ROOT, SCRIPTS, base_env

LINE = re.compile(r'^\d+\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$')
FD_PATH = re.compile(r'^\d+<([^>]*)>')
STRINGS = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _calls(trace: str) -> List[Tuple[str, List[str]]]:
    """(syscall, path arguments) of each completed fsync and each started rename or link (a
    record's temp file is linked to its name, which fails if the name exists), in order."""
    calls = []
    for line in trace.splitlines():
        m = LINE.match(line)
        if not m or m.group(1):  # a "resumed" half: its start was already taken
            continue
        name, rest = m.group(2), m.group(3)
        if name in ("fsync", "fdatasync"):
            fd = FD_PATH.match(rest)
            if fd and "= 0" in rest:
                calls.append(("fsync", [fd.group(1)]))
        elif name.startswith("rename") or name in ("link", "linkat"):  # records are linked: never replaced
            calls.append(("rename", STRINGS.findall(rest)[:2]))
    return calls


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
def test_every_commit_fsyncs_data_before_the_record_and_folders_after_each_rename(tmp_path: Path) -> None:
    run = tmp_path / "run"
    trace_file = tmp_path / "trace.txt"
    subprocess.run(["strace", "-f", "-qq", "-y", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat",
                    "-o", str(trace_file), PY, str(SCRIPTS / "sum_job.py"), "24", "2", "2", "-", str(run)],
                   env=base_env(), cwd=ROOT, check=True, capture_output=True, timeout=240)
    calls = _calls(trace_file.read_text())
    synced: List[str] = []  # paths fsynced since the start
    records = publications = 0
    for i, (kind, args) in enumerate(calls):
        if kind == "fsync":
            synced.append(args[0])
            continue
        src, dst = args
        if re.search(r"/checkpoints/ckpt-\d+\.json$", dst):
            records += 1
            assert src in synced, f"record {dst} renamed before its data was fsynced"
            # every file this commit publishes: the renames into outputs/ until the next record
            for kind2, args2 in calls[i + 1:]:
                if kind2 == "rename" and re.search(r"/checkpoints/ckpt-\d+\.json$", args2[1]):
                    break
                if kind2 == "rename" and "/outputs/" in args2[1]:
                    staged = args2[0]
                    assert staged in synced, f"{dst} commits {staged}, never fsynced before it"
                    folder = Path(staged).parent
                    while folder != run:
                        assert str(folder) in synced, f"{dst} commits {staged}, whose folder {folder} was not fsynced"
                        folder = folder.parent
            after = [a[0] for k, a in calls[i + 1:] if k == "fsync"]
            assert after and after[0] == str(run / "checkpoints"), f"the rename of {dst} was not made durable"
        elif "/outputs/" in dst:
            publications += 1
            later = [a[0] for k, a in calls[i + 1:] if k == "fsync"]
            assert str(Path(dst).parent) in later, f"the publication of {dst} was not made durable"
    assert records >= 3 and publications >= 3, (records, publications)
