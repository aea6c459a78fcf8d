"""The run directory on any fsspec URL: layout, atomic writes, staging, publication, locking.

Atomicity: on a local filesystem a file is written to a temporary name *beside* its target and
renamed (``os.replace``), so it is atomic even when the system temp dir is elsewhere; on object
stores one PUT of the whole object to its final name is the atomic step.

Transient errors: on object stores every operation is retried with backoff when it fails for a
reason that says nothing about the request (connection refused or reset, timeout, a 5xx); one
that keeps failing raises :class:`StorageUnavailableError`, never taken for a missing or damaged
file. A missing file or a denied access fails at once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from batchproc.errors import LeaseLostError, RunDirLockedError
from batchproc.rundir import layout
from batchproc.rundir.layout import LOCK_FILES, published_name

T = TypeVar("T")


class StorageUnavailableError(OSError):
    """An object-store operation kept failing with transient errors until its retries ran out."""


class PreconditionFailed(OSError):
    """A conditional write or delete (``If-Match``) found another version than the one it named."""


def _is_precondition_failure(error: BaseException) -> bool:
    """S3's 412 PreconditionFailed, which s3fs turns into a bare EINVAL OSError."""
    cause = error.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code == "PreconditionFailed" or "pre-conditions you specified did not hold" in str(error)


def _etag(response: Any) -> str:
    return str(response["ETag"]) if isinstance(response, dict) and "ETag" in response else ""


class RunDir:
    """A run directory: ``<storage root>/<experiment name>`` on any fsspec filesystem."""

    def __init__(self, url: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        #: The store does conditional writes itself (S3's If-None-Match / If-Match); other fsspec
        #: stores get the same checks made before the write, which only narrows the race.
        self.conditional = type(self.fs).__module__.split(".")[0] == "s3fs"
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _fresh(self) -> None:
        # Object-store clients cache listings; other processes write here, so never trust them.
        if not self.is_local:
            self.fs.invalidate_cache()

    def _io(self, what: str, rel: str, fn: Callable[[], T]) -> T:
        """Run one storage operation; on object stores, retry its transient errors."""
        if self.is_local:
            return fn()
        return _retry(fn, what=f"{what} {self.path(rel)}")

    # -- reads ------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        self._fresh()
        return bool(self._io("checking", rel, lambda: self.fs.exists(self.path(rel))))

    def read_bytes(self, rel: str) -> bytes:
        return bytes(self._io("reading", rel, lambda: self.fs.cat_file(self.path(rel))))

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
            entries = self._io("listing", rel, lambda: self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def find(self, rel: str) -> List[str]:
        """Every file under ``rel``, as paths relative to the run directory."""
        self._fresh()
        base = self.path(rel)
        try:
            found = self._io("listing", rel, lambda: self.fs.find(base))
        except FileNotFoundError:
            return []
        prefix = self.root + "/"
        return sorted(p[len(prefix):] if p.startswith(prefix) else p.lstrip("/") for p in found)

    # -- writes -----------------------------------------------------------------------------

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)

    def write_atomic(self, rel: str, data: bytes, durable: bool = False) -> None:
        """Write ``data`` to ``rel`` so that readers see the old file or the whole new one.

        ``durable`` also survives a power loss (fsync before the rename): the commit protocol asks
        it for checkpoint records and their states only; a crashed process loses nothing either way.
        """
        target = self.path(rel)
        if self.is_local:
            directory = os.path.dirname(target)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(target))
            try:
                os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the run from its group
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    if durable:
                        os.fsync(f.fileno())
                os.replace(tmp, target)
                if durable:
                    fsync_dir(directory)  # the rename itself survives a power loss
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self._io("writing", rel, lambda: self.fs.pipe_file(target, data))

    def write_json(self, rel: str, obj: Any, durable: bool = False) -> None:
        self.write_atomic(rel, json.dumps(obj, indent=1, sort_keys=True).encode(), durable)

    # -- conditional writes (records and the lease): never replace what another writer wrote --

    def create(self, rel: str, data: bytes) -> Optional[str]:
        """Write ``rel`` only if no file has that name; FileExistsError otherwise. Durable.

        Locally the data is written and fsynced under a temporary name, then hard-linked to
        ``rel`` (``link`` fails on an existing name, unlike ``rename``). On object stores one
        create-only PUT (``If-None-Match: *``); a retry whose first try went through finds our
        own bytes there, which is success. Returns the object's ETag (None locally).
        """
        target = self.path(rel)
        if self.is_local:
            directory = os.path.dirname(target)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(target))
            try:
                os.fchmod(fd, 0o666 & ~_umask())
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, target)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                        raise
                    _write_exclusive(target, data)  # no hard links here (some FUSE and SMB mounts)
            finally:
                os.unlink(tmp)
            fsync_dir(directory)
            return None
        try:
            out = self._io("creating", rel, lambda: self.fs.pipe_file(target, data, mode="create"))
        except FileExistsError:
            try:
                if self.read_bytes(rel) == data:
                    return self.read_versioned(rel)[1] if self.conditional else hashlib.sha256(data).hexdigest()
            except FileNotFoundError:
                pass
            raise FileExistsError(errno.EEXIST, f"{target} exists already: another writer created it") from None
        return _etag(out) if self.conditional else hashlib.sha256(data).hexdigest()

    def read_versioned(self, rel: str) -> Tuple[bytes, str]:
        """An object's bytes and the ETag of that same version (one GET). Object stores only;
        where the store has no conditional writes, the "ETag" is the bytes' digest."""
        if not self.conditional:
            data = self.read_bytes(rel)
            return data, hashlib.sha256(data).hexdigest()
        bucket, key, _ = self.fs.split_path(self.path(rel))
        fs = self.fs

        async def get() -> Tuple[bytes, str]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                data = await body.read()
            return bytes(data), str(resp["ETag"])

        from fsspec.asyn import sync

        found: Tuple[bytes, str] = self._io("reading", rel, lambda: sync(fs.loop, get))
        return found

    def replace_if(self, rel: str, data: bytes, etag: str) -> str:
        """Overwrite ``rel`` only if its ETag is still ``etag`` (``If-Match``); returns the new
        ETag. :class:`PreconditionFailed` when another writer changed it, FileNotFoundError when
        it is gone. Object stores only."""
        target = self.path(rel)
        if not self.conditional:
            if self.read_versioned(rel)[1] != etag:
                raise PreconditionFailed(f"{target} changed since it was read")
            self._io("writing", rel, lambda: self.fs.pipe_file(target, data))
            return hashlib.sha256(data).hexdigest()
        try:
            out = self._io("replacing", rel, lambda: self.fs.pipe_file(target, data, IfMatch=etag))
        except OSError as e:
            if _is_precondition_failure(e):
                raise PreconditionFailed(f"{target} changed since it was read (ETag {etag})") from e
            raise
        return _etag(out)

    def rm_if(self, rel: str, etag: str) -> None:
        """Delete ``rel`` only if its ETag is still ``etag``; :class:`PreconditionFailed` otherwise."""
        if not self.conditional:
            try:
                if self.read_versioned(rel)[1] != etag:
                    raise PreconditionFailed(f"{self.path(rel)} changed since it was read")
            except FileNotFoundError:
                return
            self.rm(rel)
            return
        bucket, key, _ = self.fs.split_path(self.path(rel))
        try:
            self._io("deleting", rel, lambda: self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag))
        except FileNotFoundError:
            pass
        except OSError as e:
            if _is_precondition_failure(e):
                raise PreconditionFailed(f"{self.path(rel)} changed since it was read (ETag {etag})") from e
            raise

    def rm(self, rel: str, recursive: bool = False) -> None:
        try:
            self._io("deleting", rel, lambda: self.fs.rm(self.path(rel), recursive=recursive))
        except FileNotFoundError:
            pass

    def move(self, src_rel: str, dst_rel: str) -> bool:
        """Move a file; idempotent, so an interrupted publication can simply be run again.
        False if there was nothing to move."""
        src, dst = self.path(src_rel), self.path(dst_rel)
        if self.is_local:
            if os.path.exists(src):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
                # The file's data was made durable before the record that lists it (Stager.join);
                # this makes its new name durable. A rename lost to a power loss is redone anyway:
                # the record still lists it, and publication is replayed on resume.
                fsync_dir(os.path.dirname(dst))
                return True
            return False
        if self._io("checking", src_rel, lambda: self.fs.exists(src)):
            # Copy then delete: a crash in between leaves both, and the rerun copies again.
            self._io("copying to " + dst, src_rel, lambda: self.fs.copy(src, dst))
            try:
                self._io("deleting", src_rel, lambda: self.fs.rm(src))
            except FileNotFoundError:  # a retried delete whose first try went through
                pass
            return True
        return False

    def publish(self, staged_rel: str, published_rel: str) -> None:
        """Publish a committed file (:meth:`move`, idempotent); one found under neither name was
        lost after its record committed it, which no resume can redo: an error naming both."""
        if not self.move(staged_rel, published_rel) and not self.exists(published_rel):
            raise FileNotFoundError(
                f"{self.path(staged_rel)} is committed by a checkpoint record, but neither it nor its published "
                f"name {self.path(published_rel)} exists: the output was deleted or moved by hand. Restore it, "
                "or start over with `batchproc run ... --fresh`.")

    def put_file(self, local_path: str, rel: str) -> None:
        self._io(f"uploading {local_path} to", rel, lambda: self.fs.put_file(local_path, self.path(rel)))

    def remove_all(self) -> None:
        """Delete the run's contents (``--fresh``), keeping the lock of the job that asked."""
        for name in self.listdir(""):
            if name not in LOCK_FILES:
                self.rm(name, recursive=True)


# -- staging and publication ---------------------------------------------------------------


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
        return layout.staging_prefix(self.attempt, self.rank)

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
                staged = layout.staged_name(self.attempt, self.rank, seq, rel)
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
                    rel = layout.staged_relpath(staged)
                    local = os.path.join(folder, *rel.split("/"))
                    self.run_dir.put_file(local, staged)  # retried there
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
        if self.run_dir.is_local:
            # Before the record that lists them (the commit point): after a power loss, a record
            # must never name a file whose data never reached the disk (ext4's and XFS's delayed
            # allocation leave such a file empty), or the resume would skip its batches without a
            # word. The record is fsynced after this (write_atomic durable), then its folder.
            folders = set()
            for staged, _ in pairs:
                path = self.run_dir.path(staged)
                fsync_file(path)
                folder = os.path.dirname(path)
                while folder.startswith(self.run_dir.root + os.sep):  # new folders' own entries too
                    folders.add(folder)
                    folder = os.path.dirname(folder)
            for folder in sorted(folders):
                fsync_dir(folder)
        return pairs

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None


# OSErrors that describe the request, not the moment: trying again cannot help.
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                        NotADirectoryError)
_PERMANENT_ERRNOS = (errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EPERM, errno.EEXIST)
_transient: Optional[Tuple[type, ...]] = None


def _transient_types() -> Tuple[type, ...]:
    """OSError and TimeoutError, and the client libraries' own connection errors.

    s3fs turns S3's error replies into OSErrors, but a refused or dropped connection reaches us
    as botocore's (or aiohttp's) exception, which is no OSError.
    """
    global _transient
    if _transient is None:
        found: List[type] = [OSError, TimeoutError]
        try:
            from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
            found += [BotoConnectionError, HTTPClientError]
        except ImportError:
            pass
        try:
            from aiohttp import ClientError
            found.append(ClientError)
        except ImportError:
            pass
        _transient = tuple(found)
    return _transient


def is_transient(error: BaseException) -> bool:
    """Whether a storage operation that raised ``error`` may succeed if tried again."""
    if isinstance(error, StorageUnavailableError):
        return False  # retried already
    if isinstance(error, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(error, OSError) and error.errno in _PERMANENT_ERRNOS:
        return False
    return isinstance(error, _transient_types())


def _retry(fn: Callable[[], T], what: str, attempts: int = 5, delay_s: float = 0.5) -> T:
    """Run ``fn``, retrying transient storage errors with exponential backoff (0.5, 1, 2, 4 s).

    Permanent errors (missing file, access denied) are raised as they are; transient ones that
    outlast the retries raise :class:`StorageUnavailableError` naming the operation.
    """
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if i == attempts - 1:
                raise StorageUnavailableError(
                    f"{what} failed after {attempts} tries: {type(e).__name__}: {e}") from e
            delay = delay_s * (2 ** i)
            print(f"batchproc: warning: {what} failed ({type(e).__name__}: {e}); "
                  f"retrying in {delay:g}s ({i + 1}/{attempts - 1})", file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")


# -- locking -------------------------------------------------------------------------------


class RunLock:
    """Exclusive use of a run directory by one job.

    Locally a ``filelock``. On object stores a lease object (``lock.json``) that only conditional
    writes touch, so two jobs can never both believe they hold it:

    - taking it is a create-only PUT (``If-None-Match: *``); taking over a lease whose heartbeat is
      older than its lifetime is a PUT conditional on the ETag read (``If-Match``): of two jobs
      racing for a stale lease, one wins and the other is told who holds it;
    - each heartbeat is a PUT conditional on our last ETag: one that fails because the ETag changed
      means another job took the lease over (we were frozen or cut off past its lifetime). The
      heartbeat then calls ``on_lost`` with a message naming the new holder, and stops;
    - rank 0 checks the lease (:func:`check_lease`, one GET) before each checkpoint record, and
      records are created with create-only writes, so a job that lost the lease commits nothing;
    - ``release()`` deletes the lease only if its ETag is still ours.

    The lifetime is :attr:`LEASE_TTL_S`, or ``BATCHPROC_LEASE_TTL_S`` from the environment.
    """

    LEASE_TTL_S = 90.0

    def __init__(self, run_dir: RunDir, holder: str) -> None:
        from batchproc.settings import ENV_LEASE_TTL

        self.run_dir = run_dir
        self.info = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
                     "since": time.time(), "id": uuid.uuid4().hex, "pid_space": _pid_space()}
        self.ttl_s = float(os.environ.get(ENV_LEASE_TTL) or self.LEASE_TTL_S)
        self._file_lock: Any = None  # a filelock.FileLock (imported when needed)
        self._member: Any = None  # a batchproc.rundir.job_lock.JobMembership
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None
        #: The object-store lease was taken over from a holder whose process is gone.
        self.holder_died = False
        self._etag: Optional[str] = None  # the lease version we wrote last (object stores)
        self._beat_lock = threading.Lock()  # a heartbeat in flight and release() never interleave
        #: Called once, from the heartbeat thread, with the message naming the job that took over.
        self.on_lost: Optional[Callable[[str], None]] = None
        self.lost: Optional[str] = None

    @property
    def lease_id(self) -> Optional[str]:
        """The id that :func:`check_lease` compares (object stores only)."""
        return None if self.run_dir.is_local else str(self.info["id"])

    def acquire(self, wait_for_earlier_job: bool = False) -> "RunLock":
        rd = self.run_dir
        if rd.is_local:
            import filelock

            os.makedirs(rd.root, exist_ok=True)
            lock = filelock.FileLock(rd.path(layout.LOCAL_LOCK))
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                raise RunDirLockedError(self._busy_message(rd.read_json_or_none(layout.LOCAL_LOCK_HOLDER))) from None
            if wait_for_earlier_job:
                try:
                    from batchproc.rundir import job_lock

                    self._member = job_lock.take_over(rd.root)  # every process of an earlier job is gone
                except BaseException:
                    lock.release()
                    raise
            self._file_lock = lock
            rd.write_json(layout.LOCAL_LOCK_HOLDER, self.info)
            return self
        self._etag = self._take_lease()
        self._heartbeat = threading.Thread(target=self._beat, name="batchproc-lease", daemon=True)
        self._heartbeat.start()
        return self

    def _take_lease(self) -> str:
        """Create the lease, or take over a stale one; the ETag we wrote. A few rounds: between our
        look and our write, another job may release, renew or take it."""
        rd = self.run_dir
        held: Optional[Dict[str, Any]] = None
        for _ in range(4):
            body = self._body()
            try:
                return rd.create(layout.LEASE, body) or ""
            except FileExistsError:
                pass
            try:
                raw, etag = rd.read_versioned(layout.LEASE)
            except FileNotFoundError:
                continue  # released in between: create it
            held = _parse_lease(raw)
            if (held is not None and held.get("id") != self.info["id"]
                    and time.time() - float(held.get("heartbeat", 0)) < self.ttl_s and not self._holder_gone(held)):
                raise RunDirLockedError(self._busy_message(held))
            # A holder whose process is gone (SIGKILLed) may have left workers on this machine
            # (batchproc.rundir.job_lock); a live one past its lease is fenced by the records.
            self.holder_died = held is not None and self._holder_gone(held)
            try:
                return rd.replace_if(layout.LEASE, body, etag)  # take over the stale (or unreadable) lease
            except (PreconditionFailed, FileNotFoundError):
                continue  # renewed, released or taken by another job meanwhile: look again
        raise RunDirLockedError(self._busy_message(held))

    @staticmethod
    def _holder_gone(held: Dict[str, Any]) -> bool:
        """A lease left by a process that no longer exists (killed before it could release it).

        Only decidable for a holder in our own pid space (same boot of the same machine, same pid
        namespace); anywhere else the lease stands until it expires.
        """
        space = _pid_space()
        if space is None or held.get("pid_space") != space or not isinstance(held.get("pid"), int):
            return False
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, someone else's
            return False
        return False

    def _body(self) -> bytes:
        return json.dumps(dict(self.info, heartbeat=time.time()), indent=1, sort_keys=True).encode()

    def _renew(self) -> None:
        """One heartbeat: rewrite the lease if it is still the version we wrote; LeaseLostError if not."""
        assert self._etag is not None
        body = self._body()
        try:
            self._etag = self.run_dir.replace_if(layout.LEASE, body, self._etag)
            return
        except (PreconditionFailed, FileNotFoundError):
            pass
        try:  # a retried PUT whose first try went through finds our own new version: still ours
            raw, etag = self.run_dir.read_versioned(layout.LEASE)
        except FileNotFoundError:
            raw, etag = b"", ""
        if raw == body:
            self._etag = etag
            return
        raise LeaseLostError(lost_message(self.run_dir, _parse_lease(raw), str(self.info["holder"])))

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                with self._beat_lock:
                    if self._stop.is_set():
                        return
                    self._renew()
            except LeaseLostError as e:
                self.lost = str(e)
                print(f"batchproc: error: {e}", file=sys.stderr, flush=True)
                if self.on_lost is not None:
                    self.on_lost(str(e))
                return
            except Exception as e:  # storage down: a missed beat only shortens the lease
                print(f"batchproc: warning: renewing the lease {self.run_dir.path(layout.LEASE)} failed ({e}); "
                      "trying again", file=sys.stderr, flush=True)

    def verify(self) -> None:
        """LeaseLostError unless the lease is still ours (one GET); rank 0's check before a record."""
        if self.lost is not None:
            raise LeaseLostError(self.lost)
        if self.lease_id is not None:
            check_lease(self.run_dir, self.lease_id, str(self.info["holder"]))

    def _busy_message(self, held: Optional[Dict[str, Any]]) -> str:
        return (f"run directory {self.run_dir.url} is in use by {describe_holder(held)}. Wait for that job to end, "
                f"stop it with `batchproc stop {self.run_dir.url}`, or choose another experiment name.")

    def release(self) -> None:
        self._stop.set()
        if self._file_lock is not None:
            self.run_dir.rm(layout.LOCAL_LOCK_HOLDER)
            if self._member is not None:
                self._member.leave()
                self._member = None
            self._file_lock.release()
            self._file_lock = None
        elif self._heartbeat is not None:
            self._heartbeat = None
            if self.lost is not None:
                return  # another job's lease now: never ours to delete
            try:
                with self._beat_lock:
                    self.run_dir.rm_if(layout.LEASE, self._etag or "")
            except PreconditionFailed:
                print(f"batchproc: warning: the lease {self.run_dir.path(layout.LEASE)} is no longer this job's "
                      "(another job took it over); left in place", file=sys.stderr)
            except Exception as e:  # the job's own outcome matters more; the lease expires
                print(f"batchproc: warning: cannot release the lease {self.run_dir.path(layout.LEASE)} ({e}); "
                      f"it expires {self.ttl_s:g} s after its last heartbeat", file=sys.stderr)


def _parse_lease(raw: bytes) -> Optional[Dict[str, Any]]:
    try:
        held = json.loads(raw)
    except ValueError:
        return None
    return held if isinstance(held, dict) else None


def describe_holder(held: Optional[Dict[str, Any]]) -> str:
    """The job a lease names, as an error message says it."""
    if not held:
        return "another job"
    return (f"{held.get('holder', '?')} (pid {held.get('pid', '?')} on {held.get('host', '?')}, "
            f"since {time.ctime(held.get('since', 0))})")


def lost_message(run_dir: RunDir, held: Optional[Dict[str, Any]], mine: str) -> str:
    now = "nobody" if held is None else describe_holder(held)
    return (f"this job ({mine}) lost the lease of run directory {run_dir.url}: it is now held by {now}, which "
            "took it over after this job missed its heartbeats (frozen, paused or cut off from storage past "
            "the lease's lifetime). This job stops without committing; the other job carries on with the run.")


def check_lease(run_dir: RunDir, lease_id: str, mine: str = "this job") -> None:
    """LeaseLostError unless the run directory's lease still has id ``lease_id`` (one GET)."""
    try:
        held = _parse_lease(run_dir.read_bytes(layout.LEASE))
    except FileNotFoundError:
        held = None
    if held is None or held.get("id") != lease_id:
        raise LeaseLostError(lost_message(run_dir, held, mine))


def _write_exclusive(target: str, data: bytes) -> None:
    """Create ``target`` with O_EXCL and write it: never replaces a file, though a crash may leave
    it short (a record's checksum then tells it damaged)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the entries of folder ``path`` (a rename into it, a new file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a folder: nothing more can be done there
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


_UMASK: Optional[int] = None


def _umask() -> int:
    """This process's umask, read once (reading it means setting it, which races other threads)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def _pid_space() -> Optional[str]:
    """This machine's boot and this process's pid namespace: where a pid names one process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def acquire_run_lock(run_dir: RunDir, holder: str, wait_for_earlier_job: bool = False) -> RunLock:
    """Take the run directory for this job, or raise :class:`RunDirLockedError` naming the holder.

    ``wait_for_earlier_job``: a supervisor starting a job also waits until no process of an
    earlier job holds a local run directory (:mod:`batchproc.rundir.job_lock`). Not for rank 0 of
    a job without a supervisor: there the other processes holding it may be its own job's (the
    surviving node of an elastic restart).
    """
    return RunLock(run_dir, holder).acquire(wait_for_earlier_job)
