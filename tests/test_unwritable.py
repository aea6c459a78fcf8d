"""A run directory that cannot be written: named at once, never replayed, nothing committed lost.

A read-only bind mount of a real folder stands in for a read-only or remounted volume (root
ignores file modes, so a chmod would prove nothing); EROFS is what the kernel really returns.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import PY, Procs, assert_exactly_once, shared_fs, sum_job_metrics, write_config

N, BS = 60, 2


class ReadOnlyView:
    """``view`` shows ``src``; :meth:`freeze` makes it read-only, :meth:`thaw` writable again."""

    def __init__(self, src: Path, view: Path) -> None:
        self.src, self.view = src, view
        src.mkdir(parents=True)
        view.mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(src), str(view)], check=True, capture_output=True)

    def freeze(self) -> None:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(self.view)], check=True, capture_output=True)

    def thaw(self) -> None:
        subprocess.run(["mount", "-o", "remount,bind,rw", str(self.view)], check=True, capture_output=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.view)], capture_output=True)


@pytest.fixture
def view(tmp_path: Path) -> Iterator[ReadOnlyView]:
    if os.geteuid() != 0:
        pytest.skip("bind mounts need root")
    try:
        v = ReadOnlyView(tmp_path / "src", tmp_path / "view")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot bind-mount here: {e}")
    yield v
    v.close()


def test_a_read_only_run_directory_is_named_before_anything_starts(procs: Procs, tmp_path: Path,
                                                                   view: ReadOnlyView) -> None:
    view.freeze()
    config = write_config(tmp_path / "exp.yaml", (N, BS, 3), shared_fs(view.view), name="ro")
    done = procs.run([PY, "-m", "batchproc", "run", str(config)], timeout=120)
    assert done.rc == 73, done.out
    assert "Read-only file system" in done.out and str(view.view / "ro") in done.out, done.out
    assert "Traceback" not in done.out, done.out


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a real filesystem that can be filled up mid-run."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def test_a_run_directory_that_fills_up_mid_run_fails_at_once_and_resumes_once_freed(
        procs: Procs, tmp_path: Path, small_disk: Path) -> None:
    """ENOSPC in a commit would fail every restart the same way: the first attempt says so and stops."""
    config = write_config(tmp_path / "exp.yaml", (N, BS, 3), shared_fs(small_disk), name="full", max_restarts=2)
    job = procs.start([PY, "-m", "batchproc", "run", str(config)], env={"SUM_JOB_SLEEP": "0.1"})
    procs.wait_for(job, r"PROGRESS 1[0-9]\b")
    _fill(small_disk / "filler")
    done = procs.finish(job, timeout=180)
    assert done.rc not in (0, 75), done.out
    assert "No space left on device" in done.out, done.out
    assert done.out.count("WORKER rank=0") == 1, f"replayed by torchrun:\n{done.out}"
    (small_disk / "filler").unlink()
    again = procs.run([PY, "-m", "batchproc", "run", str(config)], timeout=240)
    assert again.rc == 0, again.out
    assert again.result()["metrics"] == sum_job_metrics(N)
    assert_exactly_once(small_disk / "full", N)
