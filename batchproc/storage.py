"""The run directory on any fsspec URL: layout, atomic writes, staging, publication, locking.

Atomicity: on a local filesystem a file is written to a temporary name *beside* its target and
renamed (``os.replace``), so it is atomic even when the system temp dir is elsewhere; on object
stores one PUT of the whole object to its final name is the atomic step.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from batchproc.errors import RunDirLockedError

OUTPUTS = "outputs"
STAGING = "staging"
LOCK_FILES = (".lock", ".lock.holder", "lock.json")


class RunDir:
    """A run directory: ``<storage root>/<experiment name>`` on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _fresh(self) -> None:
        # Object-store clients cache listings; other processes write here, so never trust them.
        if not self.is_local:
            self.fs.invalidate_cache()

    # -- reads ------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        self._fresh()
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_json_or_none(self, rel: str) -> Any:
        try:
            return self.read_json(rel)
        except (FileNotFoundError, ValueError):
            return None

    def listdir(self, rel: str) -> List[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        self._fresh()
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def find(self, rel: str) -> List[str]:
        """Every file under ``rel``, as paths relative to the run directory."""
        self._fresh()
        base = self.path(rel)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        prefix = self.root + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p.lstrip("/") for p in found)

    # -- writes -----------------------------------------------------------------------------

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` so that readers see the old file or the whole new one."""
        target = self.path(rel)
        if self.is_local:
            directory = os.path.dirname(target)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(target))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_atomic(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def rm(self, rel: str, recursive: bool = False) -> None:
        try:
            self.fs.rm(self.path(rel), recursive=recursive)
        except FileNotFoundError:
            pass

    def move(self, src_rel: str, dst_rel: str) -> None:
        """Move a file; idempotent, so an interrupted publication can simply be run again."""
        src, dst = self.path(src_rel), self.path(dst_rel)
        if self.is_local:
            if os.path.exists(src):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
            return
        if self.fs.exists(src):
            # Copy then delete: a crash in between leaves both, and the rerun copies again.
            self.fs.copy(src, dst)
            self.fs.rm(src)

    def put_file(self, local_path: str, rel: str) -> None:
        self.fs.put_file(local_path, self.path(rel))

    def remove_all(self) -> None:
        """Delete the run's contents (``--fresh``), keeping the lock of the job that asked."""
        for name in self.listdir(""):
            if name not in LOCK_FILES:
                self.rm(name, recursive=True)


# -- staging and publication ---------------------------------------------------------------


def published_name(relpath: str, attempt: str, rank: int, seq: int) -> str:
    """The path under ``outputs/`` of a staged file, unique per attempt, rank and upload.

    The tag goes before the first suffix so ``preds.parquet`` stays a ``.parquet`` file.
    """
    directory, _, base = relpath.rpartition("/")
    stem, dot, suffix = base.partition(".")
    tagged = f"{stem}.{attempt}-r{rank}-u{seq}{dot}{suffix}"
    return f"{OUTPUTS}/{directory}/{tagged}" if directory else f"{OUTPUTS}/{tagged}"


class Stager:
    """One rank's uploads: files written in ``upload_path()`` are staged, then listed at commit.

    On a local run directory the user writes straight into the staging folder (nothing to copy);
    elsewhere files are written to a local temp folder and uploaded by a background thread that
    the commit joins, so the processing loop never waits for storage.
    """

    def __init__(self, run_dir: RunDir, attempt: str, rank: int) -> None:
        self.run_dir = run_dir
        self.attempt = attempt
        self.rank = rank
        self._seq = 0
        self._pending: List[Tuple[str, str]] = []
        self._queue: "queue.Queue[Optional[Tuple[str, List[Tuple[str, str]]]]]" = queue.Queue()
        self._errors: List[BaseException] = []
        self._thread: Optional[threading.Thread] = None

    @property
    def uploads_opened(self) -> int:
        return self._seq

    def staging_prefix(self) -> str:
        return f"{STAGING}/{self.attempt}/r{self.rank}"

    def open_upload(self) -> Tuple[str, int]:
        """A fresh folder for the user to write into, and its upload sequence number."""
        seq = self._seq
        self._seq += 1
        if self.run_dir.is_local:
            folder = self.run_dir.path(f"{self.staging_prefix()}/u{seq}")
            os.makedirs(folder, exist_ok=True)
        else:
            folder = tempfile.mkdtemp(prefix=f"batchproc-upload-r{self.rank}-")
        return folder, seq

    def close_upload(self, folder: str, seq: int) -> None:
        """Stage every file the user wrote into ``folder``."""
        pairs: List[Tuple[str, str]] = []
        for dirpath, _, files in os.walk(folder):
            for f in sorted(files):
                rel = os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/")
                staged = f"{self.staging_prefix()}/u{seq}/{rel}"
                pairs.append((staged, published_name(rel, self.attempt, self.rank, seq)))
        self._pending.extend(pairs)
        if not self.run_dir.is_local:
            self._ensure_thread()
            self._queue.put((folder, pairs))

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._upload_loop, name="batchproc-uploader", daemon=True)
            self._thread.start()

    def _upload_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                folder, pairs = item
                for staged, _ in pairs:
                    rel = staged.split("/", 4)[4]  # staging/<attempt>/r<rank>/u<seq>/<rel>
                    local = os.path.join(folder, *rel.split("/"))
                    _retry(lambda: self.run_dir.put_file(local, staged), what=f"upload of {local} to {self.run_dir.path(staged)}")
                shutil.rmtree(folder, ignore_errors=True)
            except BaseException as e:  # reported at the next commit
                self._errors.append(e)
            finally:
                self._queue.task_done()

    def join(self) -> List[Tuple[str, str]]:
        """Wait for pending uploads; return and forget the (staged, published) pairs since the last call."""
        if self._thread is not None:
            self._queue.join()
        if self._errors:
            err = self._errors[0]
            self._errors.clear()
            raise RuntimeError(f"rank {self.rank}: uploading outputs to {self.run_dir.url} failed: {err}") from err
        pairs, self._pending = self._pending, []
        return pairs

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None


def _retry(fn, what: str, attempts: int = 4, delay_s: float = 0.5):
    """Run ``fn``, retrying transient storage errors with exponential backoff."""
    for i in range(attempts):
        try:
            return fn()
        except (OSError, TimeoutError) as e:
            if isinstance(e, (FileNotFoundError, PermissionError)) or i == attempts - 1:
                raise OSError(f"{what} failed after {i + 1} tries: {e}") from e
            time.sleep(delay_s * (2 ** i))


# -- locking -------------------------------------------------------------------------------


class RunLock:
    """Exclusive use of a run directory by one job."""

    LEASE_TTL_S = 90.0

    def __init__(self, run_dir: RunDir, holder: str) -> None:
        self.run_dir = run_dir
        self.info = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
                     "since": time.time(), "id": uuid.uuid4().hex}
        self._file_lock = None
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    def acquire(self) -> "RunLock":
        rd = self.run_dir
        if rd.is_local:
            import filelock

            os.makedirs(rd.root, exist_ok=True)
            lock = filelock.FileLock(rd.path(".lock"))
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                raise RunDirLockedError(self._busy_message(rd.read_json_or_none(".lock.holder"))) from None
            self._file_lock = lock
            rd.write_json(".lock.holder", self.info)
            return self
        # Object stores have no flock: a lease object refreshed by a heartbeat stands in for it.
        held = rd.read_json_or_none("lock.json")
        if held and held.get("id") != self.info["id"] and time.time() - held.get("heartbeat", 0) < self.LEASE_TTL_S:
            raise RunDirLockedError(self._busy_message(held))
        self._write_lease()
        self._heartbeat = threading.Thread(target=self._beat, name="batchproc-lease", daemon=True)
        self._heartbeat.start()
        return self

    def _write_lease(self) -> None:
        self.run_dir.write_json("lock.json", dict(self.info, heartbeat=time.time()))

    def _beat(self) -> None:
        while not self._stop.wait(self.LEASE_TTL_S / 3):
            try:
                self._write_lease()
            except Exception:  # a missed beat only shortens the lease
                pass

    def _busy_message(self, held: Optional[Dict[str, Any]]) -> str:
        who = "another job"
        if held:
            who = f"{held.get('holder', '?')} (pid {held.get('pid', '?')} on {held.get('host', '?')}, since {time.ctime(held.get('since', 0))})"
        return (f"run directory {self.run_dir.url} is in use by {who}. Wait for that job to end, "
                f"stop it with `batchproc stop {self.run_dir.url}`, or choose another experiment name.")

    def release(self) -> None:
        self._stop.set()
        if self._file_lock is not None:
            self.run_dir.rm(".lock.holder")
            self._file_lock.release()
            self._file_lock = None
        elif self._heartbeat is not None:
            self.run_dir.rm("lock.json")
            self._heartbeat = None


def acquire_run_lock(run_dir: RunDir, holder: str) -> RunLock:
    """Take the run directory for this job, or raise :class:`RunDirLockedError` naming the holder."""
    return RunLock(run_dir, holder).acquire()
