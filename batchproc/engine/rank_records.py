"""The dynamic schedule's commit records: per-rank immutable records, batch intervals, and the fold.

Under ``schedule="dynamic"`` no rank waits for another to commit, so there is no single
watermark. Each rank writes its own immutable records::

    dynamic/rank-<attempt>-r<rank>-<seq>.pt   one per commit of one rank: the global batches it
                                              committed (new since its last record), its reducer
                                              slot state (cumulative over the attempt), the
                                              (staged, published) pairs it publishes next, and
                                              the samples and batches it skipped
    dynamic/folded-<gen>.pt                   every earlier attempt's records, folded: committed
                                              intervals, the slot states of every slot, errors

A batch is committed when a record lists it. At the start of an attempt rank 0 alone folds every
rank record into a new folded record (finishing their publication, removing staged files no
record lists), then deletes them: the next fold reads only what was written since. Each file is
``torch.save`` of plain values and tensors, written atomically and loaded with
``weights_only=True``.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from batchproc.errors import CorruptCheckpointError
from batchproc.rundir.layout import DYNAMIC_RECORDS, ERRORS_FILE, STAGING, folded_name, parse_folded, parse_rank_record, rank_record_name
from batchproc.rundir import errors_log
from batchproc.rundir.storage import RunDir, StorageUnavailableError

FORMAT = 1
Interval = Tuple[int, int]  #: [start, stop) of global batches


# -- intervals -------------------------------------------------------------------------------


def merge(intervals: Iterable[Sequence[int]]) -> List[Interval]:
    """Sorted, disjoint, non-adjacent intervals covering the same batches."""
    out: List[Interval] = []
    for start, stop in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def of_batches(batches: Iterable[int]) -> List[Interval]:
    return merge((g, g + 1) for g in batches)


def count(intervals: Sequence[Interval]) -> int:
    return sum(b - a for a, b in intervals)


class Remaining:
    """The batches of ``[0, total)`` not in ``committed``, in order, indexable in O(log gaps):
    claim ``k`` of an attempt is ``remaining[k]``, so no list of every batch is ever built."""

    def __init__(self, committed: Sequence[Interval], total: int) -> None:
        gaps: List[Interval] = []
        at = 0
        for a, b in merge(committed):
            if a > at:
                gaps.append((at, min(a, total)))
            at = max(at, b)
        if at < total:
            gaps.append((at, total))
        self.gaps = [g for g in gaps if g[1] > g[0]]
        self.offsets: List[int] = []
        n = 0
        for a, b in self.gaps:
            self.offsets.append(n)
            n += b - a
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> int:
        if not 0 <= k < self.n:
            raise IndexError(k)
        i = bisect.bisect_right(self.offsets, k) - 1
        return self.gaps[i][0] + k - self.offsets[i]


# -- records ---------------------------------------------------------------------------------


@dataclasses.dataclass
class RankRecord:
    """One commit of one rank (immutable once written)."""

    attempt: str
    rank: int
    seq: int
    batches: List[Interval]  #: committed by this record (new since the rank's previous one)
    publish: List[List[str]]  #: (staged, published) pairs this record commits
    errors: List[Dict[str, Any]]  #: errors.jsonl rows of the skips it commits
    skipped_samples: int  #: skipped in these batches
    skipped_batches: int
    committed_samples: int  #: samples of these batches
    slots: Dict[str, Any] = dataclasses.field(default_factory=dict)  #: cumulative over the attempt
    format: int = FORMAT

    def meta(self) -> Dict[str, Any]:
        body = dataclasses.asdict(self)
        del body["slots"]
        return body


@dataclasses.dataclass
class Folded:
    """Everything committed by the attempts folded so far."""

    gen: int = -1
    committed: List[Interval] = dataclasses.field(default_factory=list)
    slots: Dict[str, List[Any]] = dataclasses.field(default_factory=dict)  #: every slot's state
    errors: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped_samples: int = 0
    skipped_batches: int = 0
    committed_samples: int = 0
    folded_attempts: List[str] = dataclasses.field(default_factory=list)  #: whose rank records it holds
    rank_batches: Dict[str, int] = dataclasses.field(default_factory=dict)  #: rank -> batches (last attempt)
    metrics: Optional[Dict[str, Any]] = None  #: set once every batch is committed
    format: int = FORMAT

    def meta(self) -> Dict[str, Any]:
        body = dataclasses.asdict(self)
        del body["slots"]
        return body


def _dump(meta: Dict[str, Any], slots: Any) -> bytes:
    buf = io.BytesIO()
    torch.save({"meta": json.dumps(meta, sort_keys=True), "slots": slots}, buf)
    return buf.getvalue()


def _load(run_dir: RunDir, rel: str) -> Tuple[Dict[str, Any], Any]:
    try:
        # Never unpickle arbitrary objects from shared storage.
        raw = torch.load(io.BytesIO(run_dir.read_bytes(rel)), weights_only=True)
        meta = json.loads(raw["meta"])
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        return meta, raw["slots"]
    except StorageUnavailableError:
        raise
    except (ValueError, KeyError, OSError, RuntimeError, EOFError, TypeError) as e:
        raise CorruptCheckpointError(
            f"the dynamic-schedule record {run_dir.path(rel)} cannot be read ({type(e).__name__}: {e}). "
            "Nothing can be resumed safely without it; restore it, or start over with "
            "`batchproc run ... --fresh`.") from e


def write_rank_record(run_dir: RunDir, record: RankRecord) -> None:
    """The commit point of one rank's batches: durable before any of its files is published."""
    run_dir.write_atomic(rank_record_name(record.attempt, record.rank, record.seq),
                         _dump(record.meta(), record.slots), durable=True)


def write_folded(run_dir: RunDir, folded: Folded) -> None:
    run_dir.write_atomic(folded_name(folded.gen), _dump(folded.meta(), folded.slots), durable=True)


def load_folded(run_dir: RunDir, names: List[str]) -> Folded:
    gens = sorted(g for n in names if (g := parse_folded(n)) is not None)
    if not gens:
        return Folded()
    meta, slots = _load(run_dir, folded_name(gens[-1]))
    known = {f.name for f in dataclasses.fields(Folded)}
    folded = Folded(**{k: v for k, v in meta.items() if k in known})
    folded.committed = [(int(a), int(b)) for a, b in folded.committed]
    folded.slots = {k: list(v) for k, v in slots.items()}
    return folded


def has_records(run_dir: RunDir) -> bool:
    return bool(run_dir.listdir(DYNAMIC_RECORDS))


def fold(run_dir: RunDir, final_metrics: Optional[Dict[str, Any]] = None) -> Folded:
    """Rank 0, before any claim: fold every rank record into a new folded record.

    Order, so that a crash anywhere leaves a state the next fold reads the same: publication of
    every record's pairs (idempotent), staged files no record lists removed, the new folded record
    written (it names the attempts it holds, so records it folded count once if their deletion
    was cut short), then the folded records and the older folded generation deleted.
    """
    names = run_dir.listdir(DYNAMIC_RECORDS)
    folded = load_folded(run_dir, names)
    done: Set[str] = set(folded.folded_attempts)
    latest: Dict[Tuple[str, int], Tuple[int, Dict[str, Any]]] = {}
    batches: List[Interval] = list(folded.committed)
    rank_batches: Dict[str, int] = {}
    new_attempts: List[str] = []
    records: List[str] = []
    for name in names:
        key = parse_rank_record(name)
        if key is None:
            continue
        attempt, rank, seq = key
        records.append(name)
        if attempt in done:
            continue  # folded already; its deletion was cut short
        meta, slots = _load(run_dir, f"{DYNAMIC_RECORDS}/{name}")
        for staged, final in meta["publish"]:
            run_dir.publish(staged, final)
        batches.extend((int(a), int(b)) for a, b in meta["batches"])
        folded.errors.extend(meta["errors"])
        folded.skipped_samples += int(meta["skipped_samples"])
        folded.skipped_batches += int(meta["skipped_batches"])
        folded.committed_samples += int(meta["committed_samples"])
        rank_batches[str(rank)] = rank_batches.get(str(rank), 0) + count(meta["batches"])
        if (attempt, rank) not in latest or latest[(attempt, rank)][0] < seq:
            latest[(attempt, rank)] = (seq, slots)
        if attempt not in new_attempts:
            new_attempts.append(attempt)
    # A slot is one rank of one attempt: its latest record holds its state over the whole attempt.
    for (_, _), (_, slots) in sorted(latest.items()):
        for metric, value in slots.items():
            folded.slots.setdefault(metric, []).append(value)
    run_dir.rm(STAGING, recursive=True)  # what no record lists: work after a rank's last commit
    if new_attempts:  # rewritten whole from the folded list (object stores cannot append)
        if folded.errors:
            run_dir.write_atomic(ERRORS_FILE, errors_log.encode(folded.errors), durable=True)
        else:
            run_dir.rm(ERRORS_FILE)
    if not new_attempts and final_metrics is None:
        return folded  # nothing new: no write at all
    folded.gen += 1
    folded.committed = merge(batches)
    folded.folded_attempts = sorted(done | set(new_attempts))
    if rank_batches:
        folded.rank_batches = rank_batches
    if final_metrics is not None:
        folded.metrics = final_metrics
    write_folded(run_dir, folded)
    for name in records:
        run_dir.rm(f"{DYNAMIC_RECORDS}/{name}")
    for name in names:
        gen = parse_folded(name)
        if gen is not None and gen < folded.gen:
            run_dir.rm(folded_name(gen))
    return folded
