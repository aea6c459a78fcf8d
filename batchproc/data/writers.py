"""Row outputs: buffer rows in ``process_batch``, write one shard per checkpoint, read them back.

    self.writer = RowWriter(context, "predictions", format="parquet")   # in __init__
    self.writer.add(rows)                                               # in process_batch
    def on_checkpoint_start(self): self.writer.flush()                  # one shard per checkpoint

Shards go through ``context.upload_path()``, so they are published under ``<run_dir>/outputs/``
only when their checkpoint commits: :func:`read_rows` sees every processed sample exactly once.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

from batchproc.data.inputs import printable
from batchproc.plain import to_plain
from batchproc.rundir.layout import OUTPUTS
from batchproc.rundir.storage import RunDir

FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}


class RowWriter:
    """Buffers rows (dicts) and writes them as one Parquet or JSON Lines shard per :meth:`flush`.

    Values may be numbers, strings, bools, None, lists/dicts of them, or tensors / numpy values
    (converted with ``tolist()``). Parquet needs ``pyarrow`` and infers each shard's schema from
    its rows, so keep a column's type the same in every row.

    A string that is not valid Unicode (a file name whose bytes are not UTF-8, as Python lists it)
    is kept exactly in JSON Lines (as ``\\udcXX`` escapes, which :func:`read_rows` reads back);
    Parquet cannot hold it, and :meth:`flush` raises ``ValueError`` naming the value and the column.
    """

    def __init__(self, context: Any, name: str = "predictions", format: str = "parquet") -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"name must be a plain file name stem, got {name!r}")
        if format == "parquet":
            _pyarrow()  # fail at construction, not at the first checkpoint
        self.context = context
        self.name = name
        self.format = format
        self._rows: List[Dict[str, Any]] = []
        self._batch_start = 0  # rows buffered before the current batch: kept if the batch raises
        watch = getattr(context, "_watch_batches", None)
        if callable(watch):
            watch(self)

    def _batch_started(self) -> None:
        self._batch_start = len(self._rows)

    def _batch_dropped(self) -> None:
        """The current batch raised (it is skipped, or split and retried): forget its rows."""
        del self._rows[self._batch_start:]

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Buffer ``rows`` until the next :meth:`flush`."""
        self._rows.extend(dict(r) for r in rows)

    def add_row(self, row: Mapping[str, Any]) -> None:
        self._rows.append(dict(row))

    def __len__(self) -> int:
        """Rows buffered and not yet flushed."""
        return len(self._rows)

    def flush(self) -> int:
        """Write the buffered rows as one shard (nothing when empty); returns the rows written.

        Call it from ``on_checkpoint_start``: the shard is published when that checkpoint commits.
        """
        if not self._rows:
            return 0
        rows, self._rows = self._rows, []
        self._batch_start = 0
        with self.context.upload_path() as folder:
            target = folder / f"{self.name}{FORMATS[self.format]}"
            if self.format == "parquet":
                pa, pq = _pyarrow()
                plain = [to_plain(r) for r in rows]
                try:
                    table = pa.Table.from_pylist(plain)
                except UnicodeEncodeError:
                    raise _not_unicode(plain, self.name) from None
                pq.write_table(table, str(target))
            else:
                with open(target, "wb") as f:
                    f.writelines(_json_line(to_plain(r)) for r in rows)
        return len(rows)


def _json_line(row: Any) -> bytes:
    """One JSON Lines row as UTF-8. A string that is not valid Unicode (a file name whose bytes are
    not UTF-8, kept as lone surrogates) is written as JSON ``\\udcXX`` escapes: valid JSON, and
    ``json.loads`` (so :func:`read_rows`) gives the same string back, which ``open()`` accepts."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode("ascii")


def _not_unicode(rows: List[Any], name: str) -> ValueError:
    """The error for a Parquet shard whose rows hold a string that is not valid Unicode, naming it."""
    for i, row in enumerate(rows):
        for column, value in (row.items() if isinstance(row, dict) else ()):
            for text in _strings(value):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return ValueError(
                        f"RowWriter({name!r}, format='parquet'): column {column!r} of row {i} of this shard holds "
                        f"'{printable(text)}', which is not valid Unicode (a file name whose bytes are not UTF-8), "
                        f"and Parquet strings are UTF-8. Write printable(value) (batchproc.data.inputs) or "
                        f"os.fsencode(value) bytes in that column, or use format='jsonl', which keeps such "
                        f"strings exactly")
    return ValueError(f"RowWriter({name!r}, format='parquet'): a row holds a string that is not valid Unicode")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def list_outputs(run_dir_url: str, storage_options: Optional[Dict[str, Any]] = None,
                 *, name: Optional[str] = None) -> List[str]:
    """Every committed output file of a run (local paths, or URLs on remote storage), sorted.

    ``name`` keeps only the shards of one :class:`RowWriter` (``<name>.<tag>.<ext>``).
    """
    run_dir = RunDir(run_dir_url, storage_options)
    found = []
    for rel in run_dir.find(OUTPUTS):
        base = rel.rsplit("/", 1)[-1]
        if base.startswith(".") or (name is not None and not base.startswith(name + ".")):
            continue
        path = run_dir.path(rel)
        found.append(path if run_dir.is_local else run_dir.fs.unstrip_protocol(path))
    return found


def read_rows(run_dir_url: str, storage_options: Optional[Dict[str, Any]] = None,
              *, name: Optional[str] = None) -> List[Dict[str, Any]]:
    """The rows of every committed ``.parquet`` and ``.jsonl`` shard under ``<run_dir>/outputs/``.

    Shards are read in file-name order, which is not dataset order: sort by a column (such as a
    dataset index) if order matters.
    """
    run_dir = RunDir(run_dir_url, storage_options)
    rows: List[Dict[str, Any]] = []
    for url in list_outputs(run_dir_url, storage_options, name=name):
        if url.endswith(".parquet"):
            pa, pq = _pyarrow()
            rows.extend(pq.read_table(pa.BufferReader(run_dir.fs.cat_file(url))).to_pylist())
        elif url.endswith(".jsonl"):
            text = run_dir.fs.cat_file(url).decode("utf-8")
            rows.extend(json.loads(line) for line in text.splitlines() if line.strip())
    return rows


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("RowWriter(format='parquet') needs pyarrow: pip install pyarrow "
                          "(or `pip install batchproc[examples]`), or use format='jsonl'") from None
    return pa, pq


__all__ = ["RowWriter", "read_rows", "list_outputs"]
