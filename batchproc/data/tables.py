"""Rows of Parquet, JSON Lines and CSV files as a map-style dataset, from any fsspec URL.

``TableRows("s3://bucket/docs/*.parquet", columns=["id", "text"])``: row ``i`` is the ``i``-th
row of the files taken in sorted path order, and ``ds[i]`` a dict of its columns.

The listing is frozen per run (:mod:`batchproc.data.inputs`): one process of the first attempt
lists the files and reads only their metadata, concurrently: a Parquet file's footer (one ranged
read: its row groups' row counts), or one streaming pass over a JSON Lines or CSV file that counts
its rows and keeps the byte offset of every :data:`ROWS_PER_OFFSET`-th. The manifest keeps these
as numpy arrays. Each unit of reading (a *chunk*) is a Parquet row group or such a run of text
rows; a batch is served with one ranged read per chunk it touches (Parquet: only the bytes of the
columns asked for), the chunks of the next batches fetched while this one decodes on object
stores, and a few decoded chunks kept per process. A file changed since it was listed (size, ETag
or mtime) fails its rows as bad samples naming it.

Gzip JSON Lines and CSV (``.jsonl.gz``, ``.ndjson.gz``, ``.csv.gz``) are listed by the same pass
over the decompressed stream, but no read can start inside a gzip stream: each process reads a
file forward from its start through one open decompressing stream, skipping (decompressing) the
rows before its own, and starts again only when asked for an earlier row. A rank's reads of a
gzip file are thus a forward scan of it up to its last row, in each loader worker; nothing is
fetched ahead. Split big tables into many files, or use Parquet, where reads are ranged.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gzip
import io
import json
import os
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from numpy.typing import NDArray
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from batchproc.data.listing import MAX_IN_FLIGHT, FileSource, PrefixedColumn, info_version, join_prefix, reader_kind
from batchproc.data.listing import version_kind
from batchproc.data.inputs import Manifest, etag_version, mtime_version
from batchproc.data.samples import BatchLoads, CollatedBatch, collate_samples
from batchproc.errors import InputChangedError

FORMATS = ("parquet", "jsonl", "csv")
#: File name endings and the format they mean.
SUFFIXES: Dict[str, str] = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
                            ".csv": "csv", ".jsonl.gz": "jsonl", ".ndjson.gz": "jsonl", ".csv.gz": "csv"}
#: JSON Lines and CSV: the manifest keeps the byte offset of every this-many-th row (a chunk).
ROWS_PER_OFFSET = 1024
#: Decoded chunks a process keeps (at least those of the batch being served).
DECODED_CHUNKS = 4
#: Local Parquet files a process keeps open (a batch's row groups come from one or two files).
OPEN_FILES = 4
#: Chunks fetched ahead past the last one the loader's read-ahead hints name (object stores): at
#: +20 ms per request one was not enough to hide it once batches came from Arrow columns.
CHUNKS_AHEAD = 4
#: ... but past the first of them, only while their bytes (estimated) stay under this, so that big
#: row groups keep a worker's memory to a few of them.
AHEAD_BYTES = 32 << 20
#: Files whose metadata the listing reads at once.
LISTING_THREADS = 32
FOOTER_GUESS = 64 * 1024  # a Parquet footer's bytes read at first (a larger one costs a second read)
SCAN_BLOCK = 4 << 20
_FORMAT_CODE = {f: i for i, f in enumerate(FORMATS)}


def gzipped(path: str) -> bool:
    """Whether a text file is read through gzip (its name ends with ``.gz``)."""
    return path.lower().endswith(".gz")


def format_of(path: str) -> Optional[str]:
    """The format a file name's ending says, or None."""
    lower = path.lower()
    return next((f for s, f in SUFFIXES.items() if lower.endswith(s)), None)


class TableRows(FileSource, BatchLoads, Dataset[Dict[str, Any]]):
    """The rows of Parquet, JSON Lines or CSV files named by a file, a folder, a glob or any fsspec URL.

    ``columns``: the columns each row holds (all when None); ``format``: ``"parquet"``,
    ``"jsonl"`` or ``"csv"`` for every file (else each file's suffix says: ``.parquet``/``.pq``,
    ``.jsonl``/``.ndjson``, ``.csv``, and gzip ones ending ``.gz``, read forward as a stream). A folder is searched recursively for files with these
    suffixes (names starting with ``.`` or ``_`` skipped, as Spark and pyarrow do); a glob takes
    what it matches, and a file in it of another format (or of none) is an error naming it.
    ``storage_options`` go to fsspec. Items are dicts of Python values, so the default collate
    gives tensors for numbers and lists for strings (under batchproc's loader, :meth:`load_batch`
    builds that batch from the Arrow columns directly). :meth:`describe_sample` names a row as
    ``"<path> row <r>"``.
    """

    item_noun = "rows"

    def __init__(self, source: "str | os.PathLike[str]", *, columns: Optional[Sequence[str]] = None,
                 format: Optional[str] = None, storage_options: Optional[Dict[str, Any]] = None) -> None:
        if format is not None and format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS} or None (from each file's suffix), got {format!r}")
        if isinstance(columns, str):
            raise TypeError(f"columns must be a list of column names, got the string {columns!r}")
        self.columns: Optional[List[str]] = None if columns is None else [str(c) for c in columns]
        self.format = format
        self._open_source(source, storage_options)
        self._manifest: Optional[Manifest] = None
        self._plan: Optional[_Plan] = None
        self._listing: Optional[Manifest] = None
        self._reader: Optional[_Reader] = None

    # -- the frozen-inputs protocol ---------------------------------------------------------

    def batchproc_source(self) -> str:
        """The normalized URL, plus ``format=`` when given (it changes what the files are)."""
        where = self._where()
        return f"{where} (format={self.format})" if self.format else where

    def batchproc_list_inputs(self) -> Manifest:
        """List the files and read their metadata (once per process)."""
        if self._listing is None:
            self._listing = _list_tables(self, self.batchproc_source(), self.format, self.columns)
            if not self._local:
                self._fs().invalidate_cache()  # the footers' and text files' info dicts
        if not len(self._listing):
            raise ValueError(f"no table files found at {self.source!r} (a folder is searched for "
                             f"{', '.join(SUFFIXES)}; a glob is taken as is)")
        return self._listing

    def batchproc_use_inputs(self, manifest: Manifest) -> None:
        """Serve ``manifest``'s rows (the run's frozen inputs) from now on."""
        self._serve(manifest)
        self._listing = None

    def _serve(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._plan = _Plan(manifest)
        self._reader = None

    @property
    def manifest(self) -> Manifest:
        """The files served: the run's frozen inputs, or this process's own listing."""
        if self._manifest is None:
            self._serve(self.batchproc_list_inputs())
        assert self._manifest is not None
        return self._manifest

    @property
    def plan(self) -> "_Plan":
        self.manifest
        assert self._plan is not None
        return self._plan

    @property
    def files(self) -> PrefixedColumn:
        """The files, in row order: local paths or full URLs."""
        m = self.manifest
        root = m.root if self._local or not m.root else self._fs().unstrip_protocol(m.root)
        return PrefixedColumn(join_prefix(root), m.paths)

    @property
    def rows_per_file(self) -> "NDArray[np.int64]":
        return self.plan.file_rows

    def __len__(self) -> int:
        return int(self.plan.chunk_row[-1])

    # -- reading ---------------------------------------------------------------------------

    def _get_reader(self) -> "_Reader":
        fs = self._fs()
        if self._reader is None:
            self._reader = _Reader(fs, self.manifest, self.plan, self._local, self.files, self.columns)
        return self._reader

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start fetching the chunks of these rows (on object stores; a no-op on local disk)."""
        reader = self._get_reader()
        if reader.kind in ("local", "sync") or not len(indices):
            return
        arr = np.asarray(indices, dtype=np.int64)
        reader.prefetch(arr[(arr >= 0) & (arr < len(self))].tolist())

    def _in_range(self, indices: Sequence[int]) -> "Optional[NDArray[np.int64]]":
        """``indices`` as an array when they are all ints in range (the loader's batches), else None."""
        try:
            arr = np.asarray(indices, dtype=np.int64)
        except (TypeError, ValueError):
            return None
        if arr.ndim == 1 and (not len(arr) or (arr.min() >= 0 and arr.max() < len(self))):
            return arr
        return None

    def load_samples(self, indices: Sequence[int]) -> List[Any]:
        """Rows ``indices``, one read per chunk they touch; a row that fails is its exception."""
        arr = self._in_range(indices)
        if arr is not None:
            return self._get_reader().rows(arr.tolist())  # no check per row
        out: List[Any] = [None] * len(indices)
        good: List[int] = []
        where: List[int] = []
        for k, i in enumerate(indices):
            try:
                good.append(self._index(i))
                where.append(k)
            except (IndexError, TypeError) as e:
                out[k] = e
        for k, row in zip(where, self._get_reader().rows(good)):
            out[k] = row
        return out

    def load_batch(self, indices: Sequence[int]) -> CollatedBatch:
        """``default_collate`` of rows ``indices`` (those that load), built from the chunks' Arrow
        columns without a dict per row (Parquet, CSV): batchproc's loader calls this when the
        collate function is the default one."""
        arr = self._in_range(indices)
        if arr is None:
            return collate_samples(self.load_samples(indices))
        return self._get_reader().batch(arr)

    def describe_sample(self, i: int) -> str:
        """``"<path> row <r>"``: the file behind row ``i`` and the row's place in it."""
        f, r = self.plan.locate(self._index(i))
        return f"{self.files[f]} row {r}"

    def __repr__(self) -> str:
        if self._manifest is None:
            return f"TableRows({self.source!r}, not listed yet)"
        return f"TableRows({self.source!r}, {len(self)} rows in {len(self._manifest)} files)"


# -- the manifest's layout ---------------------------------------------------------------------


class _Plan:
    """Views of a table manifest's arrays: files, and chunks (row groups or runs of text rows).

    ``chunk_row[c]`` is the first (global) row of chunk ``c`` (one more entry: the row count),
    ``chunk_file[c]`` its file, ``chunk_pos[c]`` its row group (Parquet) or byte offset (text).
    """

    def __init__(self, m: Manifest) -> None:
        x = m.extra
        self.fmt: "NDArray[np.int8]" = x["fmt"]
        self.file_rows: "NDArray[np.int64]" = x["rows"]
        self.footer: "NDArray[np.int64]" = x["footer"]
        self.chunk_row: "NDArray[np.int64]" = x["chunk_row"]
        self.chunk_file: "NDArray[np.int32]" = x["chunk_file"]
        self.chunk_pos: "NDArray[np.int64]" = x["chunk_pos"]
        self.file_row0 = np.zeros(len(self.file_rows) + 1, dtype=np.int64)
        np.cumsum(self.file_rows, out=self.file_row0[1:])
        self.sizes = m.sizes
        # gzip files: their decompressed sizes (-1 for other files); manifests from before gzip had none
        self.unzipped: "NDArray[np.int64]" = x.get("unzipped", np.full(len(self.file_rows), -1, dtype=np.int64))

    def is_gzip(self, f: int) -> bool:
        return bool(self.unzipped[f] >= 0)

    def chunks_of(self, indices: "Union[Sequence[int], NDArray[np.int64]]") -> "NDArray[np.int64]":
        return np.searchsorted(self.chunk_row, np.asarray(indices, dtype=np.int64), side="right") - 1

    def locate(self, i: int) -> Tuple[int, int]:
        """(file, row within it) of global row ``i``."""
        c = int(self.chunks_of([i])[0])
        f = int(self.chunk_file[c])
        return f, i - int(self.file_row0[f])

    def text_range(self, c: int) -> Tuple[int, int]:
        f = self.chunk_file[c]
        end = (self.chunk_pos[c + 1] if c + 1 < len(self.chunk_file) and self.chunk_file[c + 1] == f
               else self.unzipped[f] if self.unzipped[f] >= 0 else self.sizes[f])
        return int(self.chunk_pos[c]), int(end)

    def chunk_bytes(self, c: int) -> int:
        """Chunk ``c``'s share of its file's bytes, by rows (an estimate: no footer needed)."""
        f = int(self.chunk_file[c])
        return int(self.sizes[f]) * int(self.chunk_row[c + 1] - self.chunk_row[c]) // max(1, int(self.file_rows[f]))

    def first_chunk(self, f: int) -> int:
        return int(np.searchsorted(self.chunk_row, self.file_row0[f], side="right") - 1)


# -- listing ---------------------------------------------------------------------------------


def _hidden(name: str) -> bool:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.startswith((".", "_"))


def _formats(fs: Any, paths: List[str], given: Optional[str], strict: bool) -> Tuple[List[int], List[str]]:
    """Which files are read (indices) and their format; a file of another format is an error."""
    keep: List[int] = []
    fmts: List[str] = []
    first: Optional[Tuple[str, str]] = None
    for k, p in enumerate(paths):
        f = format_of(p)
        if f is None and not strict and given is None:
            continue  # a folder's other files (README, _SUCCESS) are not rows
        if f is None and given is None:
            raise ValueError(f"{fs.unstrip_protocol(p)} has no table suffix ({', '.join(SUFFIXES)}); "
                             f"remove it from the glob, or pass format='parquet', 'jsonl' or 'csv'")
        if f is None:
            assert given is not None
            f = given
        if given is not None and f != given:
            raise ValueError(f"{fs.unstrip_protocol(p)} is {f} by its suffix, not {given} (format={given!r}); "
                             f"leave it out of the source or rename it")
        if first is None:
            first = (p, f)
        elif f != first[1]:
            raise ValueError(f"{fs.unstrip_protocol(p)} is {f}, but {fs.unstrip_protocol(first[0])} is {first[1]}: "
                             f"one TableRows reads files of one format; leave it out of the source")
        keep.append(k)
        fmts.append(f)
    return keep, fmts


class _FileMeta(NamedTuple):
    rows: int
    positions: "NDArray[np.int64]"  # row groups' row counts (Parquet) or chunk byte offsets (text)
    footer: int
    unzipped: int = -1  # a gzip file's bytes decompressed (its offsets count those); -1: not gzip


def _read_range(fs: Any, path: str, start: int, end: int) -> bytes:
    if isinstance(fs, LocalFileSystem):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return fs.cat_file(path, start=start, end=end)  # type: ignore[no-any-return]


def _parquet_meta(fs: Any, path: str, size: int, columns: Optional[List[str]]) -> _FileMeta:
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = fs.unstrip_protocol(path)
    if size == 0:
        return _FileMeta(0, np.zeros(0, dtype=np.int64), 0)
    tail = _read_range(fs, path, max(0, size - FOOTER_GUESS), size)
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ValueError(f"{url} is not a Parquet file (it does not end with PAR1)")
    need = int.from_bytes(tail[-8:-4], "little") + 8
    if need > size:
        raise ValueError(f"{url} is not a readable Parquet file: its footer claims {need} of its {size} bytes")
    if need > len(tail):
        tail = _read_range(fs, path, size - need, size)
    try:
        md = pq.read_metadata(pa.BufferReader(tail[-need:]))
    except Exception as e:
        raise ValueError(f"{url} is not a readable Parquet file: {e}") from None
    if columns:
        names = md.schema.to_arrow_schema().names  # top-level columns (schema.names are leaves: a list's "element")
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{url} has no column {', '.join(map(repr, missing))} (its columns: "
                             f"{', '.join(names)}); fix columns=")
    counts = np.asarray([md.row_group(g).num_rows for g in range(md.num_row_groups)], dtype=np.int64)
    return _FileMeta(int(counts.sum()), counts, need)


def _row_bounds(buf: "NDArray[np.uint8]", quoted: bool, parity: int) -> Tuple["NDArray[np.int64]", int]:
    """Positions of the newlines that end rows in ``buf`` (outside quotes for CSV), and the quote
    parity after it."""
    nl = np.flatnonzero(buf == 10)
    if not quoted:
        return nl, 0
    quotes = np.cumsum(buf == 34, dtype=np.int64) + parity
    return nl[(quotes[nl] & 1) == 0], int(quotes[-1] & 1) if len(quotes) else parity


def _text_meta(fs: Any, path: str, fmt: str, columns: Optional[List[str]]) -> _FileMeta:
    """One streaming pass: the rows (non-empty lines; CSV: newlines outside quotes, header
    excluded), and the byte offset of every ROWS_PER_OFFSET-th."""
    url = fs.unstrip_protocol(path)
    quoted = fmt == "csv"
    header = quoted  # the CSV's first non-empty line is its header
    rows, parity, pos, row_start, first_byte = 0, 0, 0, 0, -1
    offsets: List["NDArray[np.int64]"] = []
    header_line = b""
    opener: Any = open(path, "rb") if isinstance(fs, LocalFileSystem) else fs.open(path, "rb", block_size=SCAN_BLOCK)
    if gzipped(path):  # offsets in the decompressed stream
        opener = gzip.GzipFile(fileobj=opener, mode="rb")

    def take(starts: "NDArray[np.int64]", ends: "NDArray[np.int64]", firsts: "NDArray[np.int64]") -> None:
        nonlocal rows, header
        lengths = ends - starts
        content = (lengths > 1) | ((lengths == 1) & (firsts != 13))
        s = starts[content]
        if header and len(s):
            s = s[1:]
            header = False
        ids = rows + np.arange(len(s), dtype=np.int64)
        offsets.append(s[ids % ROWS_PER_OFFSET == 0])
        rows += len(s)

    with opener as f:
        while True:
            try:
                block = f.read(SCAN_BLOCK)
            except (OSError, EOFError) as e:
                if not gzipped(path):
                    raise
                raise ValueError(f"{url} is not a readable gzip file: {type(e).__name__}: {e}") from None
            if not block:
                break
            if header and not header_line:
                header_line = block[:block.find(b"\n")] if b"\n" in block else block
            buf = np.frombuffer(block, dtype=np.uint8)
            ends, parity = _row_bounds(buf, quoted, parity)
            starts = np.empty(len(ends), dtype=np.int64)
            if len(ends):
                starts[0] = row_start
                starts[1:] = ends[:-1] + pos + 1
                local = starts - pos
                firsts = np.where(local >= 0, buf[np.clip(local, 0, len(buf) - 1)], first_byte)
                take(starts, ends + pos, firsts)
                row_start = int(ends[-1]) + pos + 1
                first_byte = -1
            if row_start < pos + len(buf) and first_byte < 0:
                first_byte = int(buf[row_start - pos])
            pos += len(buf)
    if row_start < pos:  # a last row without a newline
        take(np.asarray([row_start]), np.asarray([pos]), np.asarray([first_byte]))
    if quoted and columns:
        import csv

        names = next(csv.reader([header_line.decode("utf-8", "replace").rstrip("\r")]), [])
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{url} has no column {', '.join(map(repr, missing))} (its header: "
                             f"{', '.join(names)}); fix columns=")
    positions = np.concatenate(offsets) if offsets else np.zeros(0, dtype=np.int64)
    return _FileMeta(rows, positions.astype(np.int64), 0, pos if gzipped(path) else -1)


def _list_tables(src: FileSource, source: str, given: Optional[str], columns: Optional[List[str]]) -> Manifest:
    fs = src._fs()
    kind = version_kind(fs, src._local)
    base, found, strict = src._find(_hidden)
    order = sorted(range(len(found.paths)), key=found.paths.__getitem__)
    paths = [found.paths[i] for i in order]
    keep, fmts = _formats(fs, paths, given, strict)
    paths = [paths[k] for k in keep]
    sizes = [found.sizes[order[k]] for k in keep]
    versions = [found.versions[order[k]] for k in keep]

    def meta(k: int) -> _FileMeta:
        if fmts[k] == "parquet":
            return _parquet_meta(fs, paths[k], sizes[k], columns)
        return _text_meta(fs, paths[k], fmts[k], columns)

    with concurrent.futures.ThreadPoolExecutor(max(1, min(LISTING_THREADS, len(paths)))) as pool:
        metas = list(pool.map(meta, range(len(paths))))
    rows = np.asarray([m.rows for m in metas], dtype=np.int64)
    chunk_file = np.concatenate([np.full(len(m.positions), k, dtype=np.int32) for k, m in enumerate(metas)]
                                + [np.zeros(0, dtype=np.int32)])
    if fmts and fmts[0] == "parquet":
        counts = np.concatenate([m.positions for m in metas] + [np.zeros(0, dtype=np.int64)])
        chunk_pos = np.concatenate([np.arange(len(m.positions), dtype=np.int64) for m in metas]
                                   + [np.zeros(0, dtype=np.int64)])
        chunk_row = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=chunk_row[1:])
    else:
        chunk_pos = np.concatenate([m.positions for m in metas] + [np.zeros(0, dtype=np.int64)])
        file_row0 = np.concatenate([[0], np.cumsum(rows)])
        firsts = [file_row0[k] + np.arange(len(m.positions), dtype=np.int64) * ROWS_PER_OFFSET
                  for k, m in enumerate(metas)]
        chunk_row = np.concatenate(firsts + [np.asarray([rows.sum()], dtype=np.int64)]).astype(np.int64)
    cut = len(join_prefix(base))
    extra: Dict[str, Any] = {"fmt": np.asarray([_FORMAT_CODE[f] for f in fmts], dtype=np.int8), "rows": rows,
             "footer": np.asarray([m.footer for m in metas], dtype=np.int64), "chunk_row": chunk_row,
             "chunk_file": chunk_file, "chunk_pos": chunk_pos,
             "unzipped": np.asarray([m.unzipped for m in metas], dtype=np.int64)}
    return Manifest.build(source, [p[cut:] for p in paths], sizes=sizes, versions=versions, root=base,
                          version_kind=kind, extra=extra)


# -- reading chunks ----------------------------------------------------------------------------


class _Ranges(io.RawIOBase):
    """A file of ``size`` bytes of which only some ranges were fetched; a read outside them
    fetches that range (pyarrow reads a row group's column chunks and, for old writers, a
    little padding past them)."""

    def __init__(self, size: int, pieces: List[Tuple[int, bytes]], fetch: Callable[[int, int], bytes]) -> None:
        super().__init__()
        self.size, self.pieces, self.fetch, self.pos = size, pieces, fetch, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        for start, data in self.pieces:
            if start <= self.pos and self.pos + n <= start + len(data):
                b[:n] = data[self.pos - start:self.pos - start + n]
                break
        else:
            data = self.fetch(self.pos, self.pos + n)
            self.pieces.append((self.pos, data))
            b[:n] = data
        self.pos += n
        return n


class _Raw(NamedTuple):
    start: int
    data: bytes
    footer: Any  # Parquet: (offset, bytes, FileMetaData); CSV: the header bytes; JSON Lines: None


class _Reader:
    """One process's reads of one manifest: chunks fetched by ranged reads (on async filesystems
    as requests on fsspec's IO loop, started by :meth:`prefetch`), decoded, a few kept."""

    MIN_PENDING = 8

    def __init__(self, fs: Any, manifest: Manifest, plan: _Plan, local: bool, urls: PrefixedColumn,
                 columns: Optional[List[str]]) -> None:
        self.fs, self.manifest, self.plan, self.urls, self.columns = fs, manifest, plan, urls, columns
        self.kind = reader_kind(fs, local)
        self.pending: "collections.OrderedDict[int, concurrent.futures.Future[_Raw]]" = collections.OrderedDict()
        self.max_pending = self.MIN_PENDING
        self.decoded: "collections.OrderedDict[int, Any]" = collections.OrderedDict()
        self.heads: "collections.OrderedDict[int, Any]" = collections.OrderedDict()  # per-file footers / headers
        self.open_files: "collections.OrderedDict[int, Any]" = collections.OrderedDict()  # local Parquet files
        self.streams: "collections.OrderedDict[int, _Unzipping]" = collections.OrderedDict()  # gzip files being read
        self.limit: Optional[asyncio.Semaphore] = None

    # fetching

    async def _get(self, f: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of file ``f``, checked against its manifest entry."""
        if end <= start:
            return b""
        path = self.manifest.path(f)
        if self.kind == "local":
            self._stat(f)
            with open(path, "rb") as fh:
                fh.seek(start)
                return fh.read(end - start)
        if self.kind == "sync":
            try:
                return self.fs.cat_file(path, start=start, end=end)  # type: ignore[no-any-return]
            except FileNotFoundError:
                raise self._gone(f) from None
        if self.limit is None:
            self.limit = asyncio.Semaphore(MAX_IN_FLIGHT)
        async with self.limit:
            if self.kind == "async":
                try:
                    return await self.fs._cat_file(path, start=start, end=end)  # type: ignore[no-any-return]
                except FileNotFoundError:
                    raise self._gone(f) from None
            return await self._get_s3(f, path, start, end)

    async def _get_s3(self, f: int, path: str, start: int, end: int) -> bytes:
        from batchproc.rundir.storage import is_transient

        bucket, key, version_id = self.fs.split_path(path)
        extra = {"VersionId": version_id} if version_id else {}
        for attempt in range(3):
            try:
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                              **extra)
                try:
                    data = await resp["Body"].read()
                finally:
                    resp["Body"].close()
                total = str(resp.get("ContentRange", "")).rpartition("/")[2]
                etag = resp.get("ETag")
                self._check(f, int(total) if total.isdigit() else None,
                            etag_version(etag) if etag and self.manifest.version_kind == "etag" else None)
                return data  # type: ignore[no-any-return]
            except FileNotFoundError:
                raise self._gone(f) from None
            except InputChangedError:
                raise
            except Exception as e:
                if attempt == 2 or not is_transient(e):
                    raise
                await asyncio.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _stat(self, f: int) -> None:
        try:
            st = os.stat(self.manifest.path(f))
        except FileNotFoundError:
            raise self._gone(f) from None
        self._check(f, st.st_size, mtime_version(st.st_mtime) if self.manifest.version_kind == "mtime" else None)

    def _gone(self, f: int) -> InputChangedError:
        return InputChangedError(f"{self.urls[f]} is gone: it was listed when the run's inputs were frozen")

    def _check(self, f: int, size: Optional[int], version: Optional[int]) -> None:
        expected = int(self.manifest.sizes[f])
        if size is not None and expected >= 0 and size != expected:
            raise InputChangedError(f"{self.urls[f]} changed since the run's inputs were frozen: it has {size} "
                                    f"bytes, {expected} when listed")
        listed = int(self.manifest.versions[f])
        if version is not None and listed and version != listed:
            what = "its ETag is not the one listed then" if self.manifest.version_kind == "etag" else "it was modified since"
            raise InputChangedError(f"{self.urls[f]} changed since the run's inputs were frozen: {what}")

    async def _head(self, f: int) -> Any:
        """File ``f``'s footer (Parquet: offset, bytes, parsed metadata) or CSV header, once per process."""
        got = self.heads.get(f)
        if got is None:
            if self.kind in ("local", "sync"):
                got = await self._read_head(f)
                self.heads[f] = got
            else:
                got = asyncio.ensure_future(self._read_head(f))
                self.heads[f] = got
            while len(self.heads) > 256:
                self.heads.popitem(last=False)
        if isinstance(got, asyncio.Future):
            return await asyncio.shield(got)
        return got

    async def _read_head(self, f: int) -> Any:
        size = int(self.manifest.sizes[f])
        if self.plan.fmt[f] == _FORMAT_CODE["parquet"]:
            import pyarrow as pa
            import pyarrow.parquet as pq

            n = int(self.plan.footer[f])
            data = await self._get(f, size - n, size)
            try:
                md = pq.read_metadata(pa.BufferReader(data))
            except Exception as e:
                raise InputChangedError(f"{self.urls[f]} changed since the run's inputs were frozen: its footer "
                                        f"no longer reads ({e})") from None
            return (size - n, data, md)
        return await self._get(f, 0, int(self.plan.chunk_pos[self.plan.first_chunk(f)]))

    async def _fetch(self, c: int) -> _Raw:
        plan = self.plan
        f = int(plan.chunk_file[c])
        fmt = FORMATS[plan.fmt[f]]
        if fmt == "parquet":
            head = await self._head(f)
            md = head[2]
            g = int(plan.chunk_pos[c])
            if g >= md.num_row_groups or md.row_group(g).num_rows != plan.chunk_row[c + 1] - plan.chunk_row[c]:
                raise InputChangedError(f"{self.urls[f]} changed since the run's inputs were frozen: its row "
                                        f"group {g} is not the one listed then")
            start, end = _column_span(md.row_group(g), self.columns)
            if self.kind == "local":  # pyarrow reads the same ranges itself, natively
                self._stat(f)
                return _Raw(start, b"", head)
            return _Raw(start, await self._get(f, start, end), head)
        start, end = plan.text_range(c)
        if fmt == "csv":
            header = await self._head(f)
            return _Raw(start, await self._get(f, start, end), header)
        return _Raw(start, await self._get(f, start, end), None)

    def prefetch(self, indices: Sequence[int]) -> None:
        if self.kind in ("local", "sync") or not len(indices):
            return
        chunks = list(dict.fromkeys(self.plan.chunks_of(indices).tolist()))
        # And the chunk after the last one hinted: batches are much smaller than row groups, and
        # the batches read ahead end inside the current one more often than not.
        last = max(chunks)
        budget = AHEAD_BYTES
        for c in range(last + 1, min(last + 1 + CHUNKS_AHEAD, len(self.plan.chunk_file))):
            budget -= self.plan.chunk_bytes(c)
            if c > last + 1 and budget < 0:
                break
            chunks.append(c)
        self.max_pending = max(self.max_pending, 2 * len(chunks))
        for c in chunks:
            if c not in self.pending and c not in self.decoded and not self.plan.is_gzip(int(self.plan.chunk_file[c])):
                self.pending[c] = asyncio.run_coroutine_threadsafe(self._fetch(c), self.fs.loop)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)[1].cancel()

    def _raw(self, c: int) -> _Raw:
        if self.plan.is_gzip(int(self.plan.chunk_file[c])):
            return self._unzipped_raw(c)
        if self.kind in ("local", "sync"):
            raw: _Raw = _drive(self._fetch(c))
            return raw
        future = self.pending.pop(c, None)
        if future is None:
            self.prefetch(self.plan.chunk_row[c:c + 1].tolist())
            future = self.pending.pop(c)
        return future.result()

    def _unzipped_raw(self, c: int) -> _Raw:
        """A run of a gzip file's rows: no ranged read can start inside a gzip stream, so each file
        is one decompressing stream per process that moves forward (a rank's batches come in row
        order), opened again only for an earlier row; never prefetched."""
        plan = self.plan
        f = int(plan.chunk_file[c])
        start, end = plan.text_range(c)
        header = None
        if FORMATS[plan.fmt[f]] == "csv":
            header = self.heads.get(f)
            if header is None:
                header = self.heads[f] = self._unzip(f, 0, int(plan.chunk_pos[plan.first_chunk(f)]))
        return _Raw(start, self._unzip(f, start, end), header)

    def _unzip(self, f: int, start: int, end: int) -> bytes:
        """Decompressed bytes [start, end) of gzip file ``f``, checked against its manifest entry."""
        stream = self.streams.get(f)
        try:
            if stream is not None and stream.pos <= start:
                self.streams.move_to_end(f)
                if self.kind == "local":  # as plain files: checked at each chunk
                    self._stat(f)
            else:
                if stream is not None:
                    stream.close()
                stream = self.streams[f] = _Unzipping(self._open_checked(f))
                while len(self.streams) > OPEN_FILES:
                    self.streams.popitem(last=False)[1].close()
            return stream.read(start, end)
        except FileNotFoundError:
            raise self._gone(f) from None
        except (OSError, EOFError) as e:  # a truncated or rewritten stream: gzip's CRC or length check
            self.streams.pop(f, None)
            raise InputChangedError(f"{self.urls[f]} changed since the run's inputs were frozen, or is not gzip: "
                                    f"{type(e).__name__}: {e}") from None

    def _open_checked(self, f: int) -> Any:
        path = self.manifest.path(f)
        if self.kind == "local":
            self._stat(f)
            return open(path, "rb")
        info = self.fs.info(path)
        self._check(f, int(info["size"]), info_version(info, self.manifest.version_kind) or None)
        return self.fs.open(path, "rb", block_size=SCAN_BLOCK)

    # decoding

    def _chunk(self, c: int, keep: int) -> Any:
        """Chunk ``c`` decoded (a pyarrow Table, or a parsed text run), or the exception reading it raised."""
        if c in self.decoded:
            self.decoded.move_to_end(c)
            return self.decoded[c]
        try:
            value: Any = self._decode(c, self._raw(c))
        except Exception as e:
            value = e
        self.decoded[c] = value
        while len(self.decoded) > max(DECODED_CHUNKS, keep):
            self.decoded.popitem(last=False)
        return value

    def _open_parquet(self, f: int, md: Any) -> Any:
        """Local file ``f`` as an open ``ParquetFile`` (the last :data:`OPEN_FILES` kept): opening
        one per row group cost more than reading the row group."""
        import pyarrow.parquet as pq

        pf = self.open_files.get(f)
        if pf is None:
            pf = self.open_files[f] = pq.ParquetFile(self.manifest.path(f), metadata=md)
            while len(self.open_files) > OPEN_FILES:
                self.open_files.popitem(last=False)[1].close()
        else:
            self.open_files.move_to_end(f)
        return pf

    def _decode(self, c: int, raw: _Raw) -> Any:
        plan = self.plan
        f = int(plan.chunk_file[c])
        fmt = FORMATS[plan.fmt[f]]
        expected = int(plan.chunk_row[c + 1] - plan.chunk_row[c])
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            foot_at, foot, md = raw.footer
            if self.kind == "local":  # the file stays open for its next row groups; stat-checked per chunk
                return self._open_parquet(f, md).read_row_group(int(plan.chunk_pos[c]), columns=self.columns,
                                                                use_threads=False)
            ranges = _Ranges(int(self.manifest.sizes[f]), [(raw.start, raw.data), (foot_at, foot)],
                             lambda s, e: _drive_or_run(self, f, s, e))
            table = pq.ParquetFile(pa.PythonFile(ranges, mode="r"), metadata=md).read_row_group(
                int(plan.chunk_pos[c]), columns=self.columns, use_threads=False)
            return table
        lines = _Lines(raw.data, fmt == "csv", raw.footer, self.urls[f], self.columns)
        if len(lines) != expected:
            raise InputChangedError(f"{self.urls[f]} changed since the run's inputs were frozen: bytes "
                                    f"{raw.start}-{raw.start + len(raw.data)} hold {len(lines)} rows, {expected} when listed")
        return lines

    def rows(self, indices: List[int]) -> List[Any]:
        """The rows (dicts) of these global indices, or the exception each one raised."""
        if not indices:
            return []
        self.prefetch(indices)
        chunks = self.plan.chunks_of(indices)
        order = list(dict.fromkeys(chunks.tolist()))
        out: List[Any] = [None] * len(indices)
        for c in order:
            ks = np.flatnonzero(chunks == c)
            value = self._chunk(c, len(order))
            if isinstance(value, Exception):
                for k in ks:
                    out[k] = value
                continue
            local = [indices[k] - int(self.plan.chunk_row[c]) for k in ks]
            for k, row in zip(ks, self._take(value, local)):
                out[k] = row
        return out

    def _take(self, value: Any, local: List[int]) -> List[Any]:
        if isinstance(value, _Lines):
            return [value.row(r, self.columns) for r in local]
        rows: List[Any] = _select(value, np.asarray(local, dtype=np.int64)).to_pylist()
        return rows

    def batch(self, indices: "NDArray[np.int64]") -> CollatedBatch:
        """``default_collate`` of the rows of these global indices that load: Arrow chunks (Parquet
        row groups, CSV runs) become columns at once, JSON Lines rows are collated as rows."""
        if not len(indices):
            return CollatedBatch(None, [], [])
        self.prefetch(indices.tolist())
        chunks = self.plan.chunks_of(indices)
        order = list(dict.fromkeys(chunks.tolist()))
        errors: List[Tuple[int, BaseException]] = []
        pieces: List[Any] = []
        where: List["NDArray[np.int64]"] = []
        rows: Dict[int, Any] = {}
        for c in order:
            ks = np.flatnonzero(chunks == c) if len(order) > 1 else np.arange(len(indices))
            value = self._chunk(c, len(order))
            if isinstance(value, Exception):
                errors.extend((int(k), value) for k in ks)
                continue
            local = indices[ks] - self.plan.chunk_row[c]
            table = value.arrow if isinstance(value, _Lines) else value
            if table is not None:
                pieces.append(_select(table, local))
                where.append(ks)
                continue
            for k, r in zip(ks.tolist(), local.tolist()):
                row = value.row(r, self.columns)
                if isinstance(row, Exception):
                    errors.append((k, row))
                else:
                    rows[k] = row
        errors.sort(key=lambda e: e[0])
        if pieces:
            good = np.concatenate(where)
            try:
                table = _concat(pieces)
            except Exception:  # files of other schemas (int32 here, int64 there): as rows
                for ks, piece in zip(where, pieces):
                    rows.update(zip(ks.tolist(), piece.to_pylist()))
            else:
                if len(good) > 1 and (np.diff(good) < 0).any():  # rows asked for out of chunk order
                    perm = np.argsort(good, kind="stable")
                    table, good = _select(table, perm), good[perm]
                return CollatedBatch(_collate_columns(table), good.tolist(), errors)
        good_rows = sorted(rows)
        batch = default_collate([rows[k] for k in good_rows]) if rows else None  # type: ignore[no-untyped-call]
        return CollatedBatch(batch, good_rows, errors)


def _select(table: Any, local: "NDArray[np.int64]") -> Any:
    """Rows ``local`` of an Arrow table: a slice when they are a run, else a take."""
    if len(local) and local[-1] - local[0] + 1 == len(local) and (len(local) == 1 or (np.diff(local) == 1).all()):
        return table.slice(int(local[0]), len(local))
    import pyarrow as pa

    return table.take(pa.array(local, type=pa.int64()))


def _concat(pieces: List[Any]) -> Any:
    if len(pieces) == 1:
        return pieces[0]
    import pyarrow as pa

    return pa.concat_tables(pieces)


def _collate_columns(table: Any) -> Dict[str, Any]:
    """``default_collate(table.to_pylist())``, column by column: numbers without nulls go from Arrow
    to the tensor that default collate makes of their Python values (ints: int64, floats: float64,
    bools: bool); any other column is default collate of its values (strings: a list)."""
    import pyarrow.types as pt

    out: Dict[str, Any] = {}
    for name, col in zip(table.column_names, table.columns):
        t = col.type
        dtype: Any = None
        if col.null_count == 0:
            if pt.is_integer(t) and not pt.is_uint64(t):  # uint64 may not fit: default collate says so
                dtype = np.int64
            elif pt.is_floating(t):
                dtype = np.float64
            elif pt.is_boolean(t):
                dtype = np.bool_
        if dtype is None:
            out[name] = default_collate(col.to_pylist())  # type: ignore[no-untyped-call]
        else:  # a copy: the decoded chunk's buffers are read-only and stay cached
            out[name] = torch.from_numpy(np.array(col.to_numpy(), dtype=dtype))
    return out


def _drive(coro: Any) -> Any:
    """Run a coroutine that never suspends (the local and sync reads) to its end, without a loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise RuntimeError("a synchronous read suspended")


def _drive_or_run(reader: _Reader, f: int, start: int, end: int) -> bytes:
    """A read outside the fetched ranges, from the decoding thread."""
    if reader.kind in ("local", "sync"):
        data: bytes = _drive(reader._get(f, start, end))
        return data
    return asyncio.run_coroutine_threadsafe(reader._get(f, start, end), reader.fs.loop).result()


def _column_span(rg: Any, columns: Optional[List[str]]) -> Tuple[int, int]:
    """The bytes of a row group's column chunks (only ``columns``' when given): one range."""
    start, end = None, 0
    wanted = set(columns) if columns else None
    for j in range(rg.num_columns):
        col = rg.column(j)
        if wanted is not None and col.path_in_schema.split(".")[0] not in wanted:
            continue
        s = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else col.data_page_offset
        s = min(s, col.data_page_offset)
        start = s if start is None else min(start, s)
        end = max(end, s + col.total_compressed_size)
    return (0, 0) if start is None else (int(start), int(end))


class _Unzipping:
    """A gzip file's decompressed bytes, read forward from where the last read ended."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.stream = gzip.GzipFile(fileobj=raw, mode="rb")
        self.pos = 0

    def read(self, start: int, end: int) -> bytes:
        while self.pos < start:  # skipped: decompressed and dropped, a block at a time
            got = len(self.stream.read(min(SCAN_BLOCK, start - self.pos)))
            if not got:
                raise EOFError(f"the stream ends at byte {self.pos}, before {start}")
            self.pos += got
        data = self.stream.read(end - start)
        self.pos += len(data)
        return data

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


class _Lines:
    """A run of text rows: their bytes and where each row starts and ends (the same rule as the
    listing's count); JSON Lines rows are parsed on access, CSV rows all at once by pyarrow."""

    def __init__(self, data: bytes, csv: bool, header: Optional[bytes], url: str,
                 columns: Optional[List[str]] = None) -> None:
        self.data, self.url = data, url
        buf = np.frombuffer(data, dtype=np.uint8)
        ends, _ = _row_bounds(buf, csv, 0)
        ends = np.concatenate([ends, [len(buf)]]).astype(np.int64) if not len(ends) or ends[-1] != len(buf) - 1 else ends
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        lengths = ends - starts
        firsts = buf[np.clip(starts, 0, max(0, len(buf) - 1))] if len(buf) else np.zeros(len(starts), dtype=np.uint8)
        content = (lengths > 1) | ((lengths == 1) & (firsts != 13))
        self.starts, self.ends = starts[content], ends[content]
        self.arrow: Any = None  # CSV: the run as an Arrow table (columns=' only)
        self.table: Optional[List[Dict[str, Any]]] = None  # its rows, made when a row is asked for
        if csv:
            import pyarrow.csv as pacsv

            try:
                self.arrow = pacsv.read_csv(io.BytesIO((header or b"").rstrip(b"\r\n") + b"\n" + data),
                                            convert_options=pacsv.ConvertOptions(include_columns=columns or []))
            except Exception as e:
                raise ValueError(f"cannot read {url} bytes of rows: {e}") from None
            if self.arrow.num_rows != len(self.starts):
                raise ValueError(f"{url}: pyarrow read {self.arrow.num_rows} rows where the listing counted "
                                 f"{len(self.starts)}")

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, r: int, columns: Optional[List[str]]) -> Any:
        if self.arrow is not None:
            if self.table is None:
                self.table = self.arrow.to_pylist()
            row = self.table[r]
        else:
            try:
                row = json.loads(self.data[self.starts[r]:self.ends[r]])
            except ValueError as e:
                return ValueError(f"{self.url}: not a JSON line ({e})")
            if not isinstance(row, dict):
                return ValueError(f"{self.url}: a JSON line must hold an object, this one holds "
                                  f"{type(row).__name__}")
        if columns is None:
            return row
        return {c: row.get(c) for c in columns}


__all__ = ["TableRows", "FORMATS", "SUFFIXES", "ROWS_PER_OFFSET", "format_of"]
