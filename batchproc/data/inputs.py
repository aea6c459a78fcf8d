"""Inputs frozen at the first attempt: the protocol, and the columnar manifest it stores.

Exactly-once needs every rank of every attempt to see the same samples in the same order. A
dataset built from a listing (a folder, a glob, a bucket) takes part through three methods::

    batchproc_source() -> str                  # where the inputs come from (compared across attempts)
    batchproc_list_inputs() -> Manifest        # list that source (called once per run)
    batchproc_use_inputs(manifest) -> None     # adopt the run's manifest; __len__ follows it

At the start of each attempt (:func:`freeze_inputs`), rank 0 reads ``inputs/manifest.npz`` from
the run directory, or, at the first attempt, lists the source and writes it; then every other
rank reads the same file (its digest is checked). A later start over another source fails
naming both. Datasets without the protocol keep the length check, plus the string their
``batchproc_fingerprint()`` returns when they have one.

The manifest holds numpy arrays, not per-item Python objects: forked loader workers share its
pages instead of copying those whose refcounts they touch (pytorch/pytorch#13246).

File names are bytes on POSIX, and not always UTF-8 (``caf\\xe9.png`` from an old Latin-1 system).
Python lists them as ``str`` with each undecodable byte kept as a lone surrogate
(``surrogateescape``, :pep:`383`); the manifest stores those names' exact bytes, so they read back
as the same ``str`` that ``open()`` accepts. Messages name them through :func:`printable`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import operator
from typing import (TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence,
                    Tuple, Union, overload, runtime_checkable)

import numpy as np
from numpy.typing import ArrayLike, NDArray

from batchproc.errors import FingerprintMismatchError, InputSourceMismatchError
from batchproc.rundir.layout import MANIFEST_FILE

if TYPE_CHECKING:
    from batchproc.distributed import WorkerEnv
    from batchproc.rundir.storage import RunDir

FORMAT = 1
UNKNOWN_SIZE = -1
UNKNOWN_VERSION = 0
VERSION_KINDS = ("none", "etag", "mtime")  # what ``versions`` holds: nothing, ETag hashes, mtimes (µs)


#: How names are stored: UTF-8, a file name's undecodable bytes kept as they are (PEP 383).
NAME_ERRORS = "surrogateescape"


def printable(name: str) -> str:
    """``name`` as valid Unicode for messages and reports: a byte of a file name that is not UTF-8
    shows as ``\\xNN`` (``caf\\xe9.png``); any other name is returned unchanged."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", NAME_ERRORS).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def index_in(i: int, n: int, noun: str) -> int:
    """``i`` as an index into ``n`` items (negatives count from the end); IndexError naming ``noun``
    when out of range."""
    i = operator.index(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for {n} {noun}")
    return i


class StringColumn(Sequence[str]):
    """Strings stored as one UTF-8 buffer plus offsets: two arrays, whatever the count.

    A file name's bytes that are not UTF-8 (lone surrogates under ``surrogateescape``) are stored
    as those bytes, and read back as the same string.
    """

    __slots__ = ("data", "offsets")

    def __init__(self, data: "NDArray[np.uint8]", offsets: "NDArray[np.int64]") -> None:
        self.data = data
        self.offsets = offsets

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> "StringColumn":
        encoded = []
        for s in items:
            try:
                encoded.append(s.encode("utf-8", NAME_ERRORS))
            except UnicodeEncodeError as e:
                raise ValueError(f"cannot store the name '{printable(s)}': it holds a surrogate that is no "
                                 f"file name's byte ({e.reason})") from None
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return cls(data, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> List[str]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[str, List[str]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = index_in(i, len(self), "strings")
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", NAME_ERRORS)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        # A column equals a list of the same strings, so callers can compare it like one.
        if isinstance(other, StringColumn):
            return bool(np.array_equal(self.offsets, other.offsets) and np.array_equal(self.data, other.data))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"StringColumn([{head}{', ...' if len(self) > 3 else ''}], {len(self)} strings)"


class IntColumn(Sequence[int]):
    """A read-only view of a 1-D integer array whose items are Python ints (and which equals a list)."""

    __slots__ = ("array",)

    def __init__(self, array: "NDArray[np.integer[Any]]") -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> List[int]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[int, List[int]]:
        if isinstance(i, slice):
            return [int(x) for x in self.array[i]]
        return int(self.array[i])

    def __iter__(self) -> Iterator[int]:
        for start in range(0, len(self.array), 4096):  # chunks: no million-int list at once
            yield from self.array[start:start + 4096].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IntColumn):
            return bool(np.array_equal(self.array, other.array))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> "NDArray[Any]":
        return self.array if dtype is None else self.array.astype(dtype)

    def __repr__(self) -> str:
        return f"IntColumn({self.array!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class Manifest:
    """The inputs of a run, one entry per sample, in sample order.

    ``paths`` are relative to ``root`` (a path on the source's filesystem; the common prefix is
    stored once). ``sizes`` are in bytes (-1 unknown); ``versions`` identify a file's content
    (hashes of ETags, or modification times in µs, per ``version_kind``; 0 unknown); ``labels``
    index ``classes`` (-1 none). ``extra``: further named arrays a dataset keeps per run (e.g.
    :class:`~batchproc.data.tables.TableRows`' row counts and byte offsets), of any length.
    """

    source: str
    paths: StringColumn
    sizes: "NDArray[np.int64]"
    versions: "NDArray[np.int64]"
    labels: "NDArray[np.int32]"
    classes: Tuple[str, ...] = ()
    root: str = ""
    version_kind: str = "none"
    extra: Mapping[str, "NDArray[Any]"] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.paths)
        for name, dtype in (("sizes", np.int64), ("versions", np.int64), ("labels", np.int32)):
            a = getattr(self, name)
            if a.dtype != dtype or a.shape != (n,):
                raise ValueError(f"manifest column {name} must be {np.dtype(dtype).name}[{n}], got {a.dtype}{list(a.shape)}")
        if self.version_kind not in VERSION_KINDS:
            raise ValueError(f"version_kind must be one of {VERSION_KINDS}, got {self.version_kind!r}")

    @classmethod
    def build(cls, source: str, paths: Sequence[str], *, sizes: Optional[ArrayLike] = None,
              versions: Optional[ArrayLike] = None, labels: Optional[ArrayLike] = None,
              classes: Sequence[str] = (), root: str = "", version_kind: str = "none",
              extra: Optional[Mapping[str, ArrayLike]] = None) -> "Manifest":
        """A manifest from per-entry sequences (lists or arrays); missing columns are unknown."""
        n = len(paths)

        def column(values: Optional[ArrayLike], dtype: Any, fill: int) -> "NDArray[Any]":
            if values is None:
                return np.full(n, fill, dtype=dtype)
            return np.asarray(values, dtype=dtype).reshape(n)

        return cls(source, paths if isinstance(paths, StringColumn) else StringColumn.from_strings(paths),
                   column(sizes, np.int64, UNKNOWN_SIZE), column(versions, np.int64, UNKNOWN_VERSION),
                   column(labels, np.int32, -1), tuple(classes), root.rstrip("/") if root != "/" else root,
                   version_kind, {k: np.asarray(v) for k, v in (extra or {}).items()})

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        """Entry ``i``'s path on the source's filesystem (``root/relative``)."""
        rel = self.paths[i]
        if not self.root:
            return rel
        return f"{self.root}{rel}" if self.root.endswith("/") else f"{self.root}/{rel}"

    @property
    def nbytes(self) -> int:
        """Memory held by the columns."""
        return (self.paths.nbytes + int(self.sizes.nbytes + self.versions.nbytes + self.labels.nbytes)
                + sum(int(a.nbytes) for a in self.extra.values()))

    def to_bytes(self) -> bytes:
        """The stored form: a compressed ``.npz`` of plain arrays (read back without pickle)."""
        meta = {"format": FORMAT, "source": self.source, "root": self.root, "classes": list(self.classes),
                "version_kind": self.version_kind, "entries": len(self), "extra": sorted(self.extra)}
        buf = io.BytesIO()
        arrays: Dict[str, Any] = {f"extra_{k}": v for k, v in self.extra.items()}
        np.savez_compressed(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                            path_data=self.paths.data, path_offsets=self.paths.offsets, sizes=self.sizes,
                            versions=self.versions, labels=self.labels, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, name: str = "manifest") -> "Manifest":
        """Parse :meth:`to_bytes`' output; a damaged or foreign file raises ``ValueError`` naming ``name``."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
                paths = StringColumn(z["path_data"], z["path_offsets"])
                extra = {k: z[f"extra_{k}"] for k in meta.get("extra", [])}
                manifest = cls(meta["source"], paths, z["sizes"], z["versions"], z["labels"],
                               tuple(meta["classes"]), meta["root"], meta["version_kind"], extra)
            if len(manifest) != meta["entries"] or paths.offsets[-1] != len(paths.data):
                raise ValueError("its columns disagree with its entry count")
        except Exception as e:
            raise ValueError(f"{name} is not a readable batchproc manifest ({type(e).__name__}: {e})") from None
        return manifest


def etag_version(etag: str) -> int:
    """An ETag as a version number (64 bits of its hash; quotes ignored, never 0)."""
    digest = hashlib.blake2b(etag.strip('"').encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def mtime_version(mtime: float) -> int:
    """A modification time (``st_mtime``, seconds) as a version number in µs (never 0)."""
    return int(mtime * 1_000_000) or 1


# -- the protocol --------------------------------------------------------------------------


@runtime_checkable
class FrozenInputs(Protocol):
    """A dataset whose inputs are listed from a source that may change between attempts."""

    def batchproc_source(self) -> str:
        """Where the inputs come from (a URL, plus options that change the listing); never lists."""
        ...

    def batchproc_list_inputs(self) -> Manifest:
        """List the source now (batchproc calls it once per run, on one process)."""
        ...

    def batchproc_use_inputs(self, manifest: Manifest) -> None:
        """Serve exactly ``manifest``'s entries from now on (``len()`` and indices follow it)."""
        ...


def has_frozen_inputs(dataset: Any) -> bool:
    return all(callable(getattr(dataset, m, None))
               for m in ("batchproc_source", "batchproc_list_inputs", "batchproc_use_inputs"))


def content_fingerprint(dataset: Any) -> Optional[str]:
    """The dataset's own ``batchproc_fingerprint()``, if it has one."""
    fn = getattr(dataset, "batchproc_fingerprint", None)
    return str(fn()) if callable(fn) else None


def freeze_inputs(dataset: Any, run_dir: "RunDir", env: "WorkerEnv",
                  recorded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Make ``dataset`` serve the run's frozen inputs, on every rank; the fingerprint entries to record.

    Called by every rank at the start of every attempt, before anything asks the dataset for its
    length. Rank 0 loads the run's manifest or, at the first attempt, lists the source and
    writes one; then the other ranks read that file. Every rank raises rank 0's error.
    ``recorded``: rank 0's copy of the inputs entry of the run's fingerprint, if it has one (a
    missing manifest is then an error, unless a new listing is identical to the one it names).
    """
    if not has_frozen_inputs(dataset):
        fp = content_fingerprint(dataset)
        return {} if fp is None else {"inputs": {"fingerprint": fp}}
    outcome: Any = None
    if env.is_chief:
        try:
            outcome = _freeze_on_chief(dataset, run_dir, recorded)
        except BaseException as e:
            outcome = e
    outcome = env.broadcast(outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    error: Optional[BaseException] = None
    if not env.is_chief:
        try:
            dataset.batchproc_use_inputs(read_manifest(run_dir, expect_sha256=outcome["sha256"]))
        except BaseException as e:
            error = e
    if env.any_true(error is not None):  # one rank without its inputs would leave the others waiting
        raise error or RuntimeError(f"another rank could not read {run_dir.url}/{MANIFEST_FILE}; see its log")
    return {"inputs": outcome}


def _freeze_on_chief(dataset: Any, run_dir: "RunDir", recorded: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    source = dataset.batchproc_source()
    try:
        blob: Optional[bytes] = run_dir.read_bytes(MANIFEST_FILE)
    except FileNotFoundError:
        blob = None
    listed = blob is None
    if blob is not None:
        manifest = Manifest.from_bytes(blob, f"{run_dir.url}/{MANIFEST_FILE}")
        if manifest.source != source:
            raise InputSourceMismatchError(
                f"run directory {run_dir.url} was started over the inputs of {manifest.source!r}, but this "
                f"job's dataset reads {source!r}. A run keeps the inputs frozen at its first attempt; to "
                f"process the other source start over with `batchproc run ... --fresh`, or use another "
                f"experiment name.")
    else:
        manifest = dataset.batchproc_list_inputs()
        if manifest.source != source:
            raise ValueError(f"{type(dataset).__name__}.batchproc_list_inputs() returned a manifest of "
                             f"{manifest.source!r}, but its batchproc_source() is {source!r}")
        blob = manifest.to_bytes()
    sha256 = hashlib.sha256(blob).hexdigest()
    if listed:
        _check_not_lost(run_dir, sha256, recorded)
        run_dir.write_atomic(MANIFEST_FILE, blob, durable=True)
    dataset.batchproc_use_inputs(manifest)
    return {"source": source, "entries": len(manifest), "sha256": sha256}


def _check_not_lost(run_dir: "RunDir", listed_sha256: str, recorded: Optional[Dict[str, Any]]) -> None:
    """No manifest: a first attempt, unless the run's fingerprint says one was frozen and it is
    gone; a listing identical to it (same bytes) stands in for it, any other is an error."""
    if isinstance(recorded, dict) and recorded.get("sha256") not in (None, listed_sha256):
        raise FileNotFoundError(
            f"run directory {run_dir.url} froze {recorded.get('entries')} inputs of {recorded.get('source')!r} at "
            f"its first attempt, but their manifest {MANIFEST_FILE} is gone: which files the run must process "
            f"is no longer known. Restore the file, or start over with `batchproc run ... --fresh`.")


def read_manifest(run_dir: "RunDir", expect_sha256: Optional[str] = None) -> Manifest:
    """The run's manifest; with ``expect_sha256``, exactly the file rank 0 froze or loaded."""
    blob = run_dir.read_bytes(MANIFEST_FILE)
    if expect_sha256 is not None and hashlib.sha256(blob).hexdigest() != expect_sha256:
        raise RuntimeError(f"{run_dir.url}/{MANIFEST_FILE} differs from the one rank 0 read moments ago; "
                           f"is another job writing to this run directory?")
    return Manifest.from_bytes(blob, f"{run_dir.url}/{MANIFEST_FILE}")


def check_inputs_fingerprint(recorded: Dict[str, Any], current: Dict[str, Any], run_url: str) -> None:
    """Part of the fingerprint check: the inputs recorded at the first attempt against this job's.

    A run recorded before inputs were fingerprinted has nothing to compare (its length still is).
    """
    if "inputs" not in recorded:
        return
    old, new = recorded["inputs"], current.get("inputs")
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict) and "fingerprint" in old and "fingerprint" in new:
        what = f"a dataset whose batchproc_fingerprint() was {old['fingerprint']!r}; this job's is {new['fingerprint']!r}"
    else:
        what = f"inputs {old!r}; this job's dataset gives {new!r}"
    raise FingerprintMismatchError(
        f"run directory {run_url} was started with {what}. Its checkpoints cannot be resumed with other "
        f"data. Start over with `batchproc run ... --fresh`, or use another experiment name.")


__all__ = ["FrozenInputs", "Manifest", "StringColumn", "IntColumn", "freeze_inputs", "read_manifest",
           "check_inputs_fingerprint", "has_frozen_inputs", "content_fingerprint", "etag_version",
           "mtime_version", "printable", "MANIFEST_FILE"]
