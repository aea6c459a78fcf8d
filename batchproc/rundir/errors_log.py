"""Skipped samples and batches: one immutable part per checkpoint, and ``errors.jsonl`` built from them.

Each checkpoint that has new skips writes ``errors/err-<seq>-<attempt>.jsonl`` (durable) before
its record; the record keeps only counts, the name of the newest part and which seqs each attempt
committed, so its size does not grow with the number of skips. ``errors.jsonl`` is the
concatenation, in seq order, of the committed parts: each commit appends its part to it locally.
An object store has no append, and writing the whole file again at every commit with new skips
would make a commit's cost grow with the job (quadratic bytes over it), so there :class:`Appender`
holds committed parts back and writes the file whole only once they add up to what it already
holds (all writes together then stay within twice its final size), and at the commit that ends an
attempt (final, preempting, or past a bound). In between it may lag the record, as after a crash;
``status.json`` keeps the exact counts, and the next start rebuilds it from the parts.

On resume the file is checked against the record (its size, and the newest part at its end): a
file cut short, missing or edited is rebuilt from the parts; one that goes on past the record
(the record after it was damaged, or not listed) is cut back to it. Parts that no valid record
commits are set aside under ``rejected/``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from batchproc.rundir import layout
from batchproc.rundir.layout import ERRORS_FILE, ERRORS_PARTS
from batchproc.rundir.storage import RunDir, fsync_dir


def encode(rows: Sequence[Dict[str, Any]]) -> bytes:
    """The ``errors.jsonl`` lines of ``rows``."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def write_part(run_dir: RunDir, seq: int, attempt: str, blob: bytes) -> str:
    """Write the part of checkpoint ``seq`` (before its record: the record is the commit point)."""
    name = layout.errors_part_name(seq, attempt)
    run_dir.write_atomic(name, blob, durable=True)
    return name


def is_committed(name: str, seq: int, commits: Dict[str, List[int]]) -> bool:
    """Whether the record of ``seq``, whose attempts committed the seqs in ``commits``
    (attempt -> [first, last]), commits the part ``name``."""
    parsed = layout.errors_part_of(name)
    if parsed is None:
        return False
    part_seq, attempt = parsed
    span = commits.get(attempt)
    return span is not None and span[0] <= part_seq <= min(span[1], seq)


def split_parts(run_dir: RunDir, seq: int, commits: Dict[str, List[int]]) -> Tuple[List[str], List[str]]:
    """The parts under ``errors/`` that record ``seq`` commits (in seq order) and the others."""
    committed: List[str] = []
    others: List[str] = []
    for name in run_dir.listdir(ERRORS_PARTS):
        (committed if is_committed(name, seq, commits) else others).append(f"{ERRORS_PARTS}/{name}")
    committed.sort(key=lambda n: layout.errors_part_of(n) or (0, ""))
    return committed, others


def append(run_dir: RunDir, size: int, blob: bytes) -> None:
    """Make ``errors.jsonl`` its first ``size`` bytes (what is committed before) followed by ``blob``."""
    if run_dir.is_local:
        path = run_dir.path(ERRORS_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies, as to every run file
        try:
            os.lseek(fd, size, os.SEEK_SET)  # at the committed end, whatever a crash left after it
            os.write(fd, blob)
            os.ftruncate(fd, size + len(blob))
            os.fsync(fd)
        finally:
            os.close(fd)
        if size == 0:
            fsync_dir(os.path.dirname(path))
        return
    # Object stores cannot append: the file is written whole, but only at commits with new skips.
    head = run_dir.read_bytes(ERRORS_FILE)[:size] if size else b""
    run_dir.write_atomic(ERRORS_FILE, head + blob)


class Appender:
    """``errors.jsonl`` as commits extend it: at once on a local disk, in doubling steps on an
    object store (see the module docstring); :meth:`flush` writes what is held back."""

    MIN_BATCH = 1 << 20  #: on an object store, bytes held back before a write, at least

    def __init__(self, run_dir: RunDir, committed: int) -> None:
        self.run_dir = run_dir
        self.written = committed  # what the file holds (the resume made it the committed parts)
        self.held: List[bytes] = []

    def add(self, blob: bytes, *, flush: bool = False) -> None:
        """Extend the file by a committed part (after its record)."""
        if self.run_dir.is_local:
            append(self.run_dir, self.written, blob)
            self.written += len(blob)
            return
        self.held.append(blob)
        if flush or sum(map(len, self.held)) >= max(self.written, self.MIN_BATCH):
            self.flush()

    def flush(self) -> None:
        if not self.held:
            return
        blob = b"".join(self.held)
        append(self.run_dir, self.written, blob)
        self.written += len(blob)
        self.held = []


def reconcile(run_dir: RunDir, parts: List[str], size: int, newest: str) -> None:
    """On resume: make ``errors.jsonl`` exactly the committed ``parts`` (``size`` bytes in all,
    ``newest`` the last of them), reading the parts only when the file does not already hold them."""
    if not parts:
        run_dir.rm(ERRORS_FILE)
        return
    try:
        current = run_dir.read_bytes(ERRORS_FILE)
    except FileNotFoundError:
        current = None
    if current is not None and len(current) >= size:
        tail = _read_or_none(run_dir, newest)
        if tail is not None and current[size - len(tail):size] == tail:
            if len(current) > size:  # a later record's skips, that record damaged or not listed
                append(run_dir, size, b"")
            return
    blob = b"".join(_read_or_none(run_dir, p) or b"" for p in parts)
    if len(blob) != size:
        print(f"batchproc: warning: the committed parts under {run_dir.url}/{ERRORS_PARTS} hold {len(blob)} "
              f"bytes, the checkpoint record says {size}; {ERRORS_FILE} names the skips they hold "
              "(status.json keeps the exact counts)", file=sys.stderr, flush=True)
    run_dir.write_atomic(ERRORS_FILE, blob, durable=run_dir.is_local)


def _read_or_none(run_dir: RunDir, rel: str) -> Optional[bytes]:
    try:
        return run_dir.read_bytes(rel)
    except FileNotFoundError:
        return None


def set_aside(run_dir: RunDir, names: List[str]) -> None:
    """Parts that no valid record commits: kept under ``rejected/``, out of ``errors.jsonl``."""
    for name in names:
        run_dir.move(name, layout.rejected_name(name))
