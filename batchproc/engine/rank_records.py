"""The dynamic schedule's commit records: per-rank immutable records, batch intervals, and the fold.

Under ``schedule="dynamic"`` no rank waits for another to commit, so there is no single
watermark. Each rank writes its own immutable records::

    dynamic/rank-<attempt>-r<rank>-<seq>.pt   one per commit of one rank: the global batches it
                                              committed (new since its last record), its reducer
                                              slot state (cumulative over the attempt), the
                                              (staged, published) pairs it publishes next, and
                                              the samples and batches it skipped; or a fence
                                              (``fenced_by``): the name another job took first
    dynamic/folded-<gen>.pt                   every record folded so far: committed intervals,
                                              the slot states of every slot, errors, and the last
                                              record of each (attempt, rank) it holds

A batch is committed when a record lists it. Every name is created once, never replaced
(create-only writes). The fold reads only what was written since the last fold:

* at the start of an attempt (rank 0, before any claim): the records after the last folded one of
  each rank of the attempt before (found by name: ``folded.live`` names that attempt and its world
  size) and of any other rank the listing shows; their publication finished, staged files no
  record lists removed;
* during an attempt (rank 0, every :data:`FOLD_EVERY` records of the whole job): the records the
  ranks have published (their count per rank is in the store), so the next start reads at most
  about that many, however long the attempt ran;
* at the end of the attempt (the ranks' meeting): the rest, and the final metrics.

Each fold writes the next generation and then deletes the records it holds. On object stores the
start fold is also the fence against the attempt before it, if that one was only frozen (as
``checkpoint._fence`` is for the static schedule): it creates the next record name of each of its
ranks first, so that a rank coming back finds its next name taken and stops without publishing
(every rank also checks the lease before each record); a record created before the fence is read
by the fold, which publishes it. Each file is ``torch.save`` of plain values and tensors, loaded
with ``weights_only=True``.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from batchproc.errors import CorruptCheckpointError, RecordTakenError
from batchproc.rundir.layout import DYNAMIC_RECORDS, ERRORS_FILE, STAGING, folded_name, parse_folded, parse_rank_record, rank_record_name
from batchproc.rundir import errors_log
from batchproc.rundir.storage import RunDir, StorageUnavailableError

FORMAT = 1  #: of rank records
FOLDED_FORMAT = 2  #: of folded records (1: no per-rank seqs; read as written by a fold at an attempt's start)
FOLD_EVERY = 32  #: records of the whole job between two folds during an attempt
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
    fenced_by: Optional[str] = None  #: a fence: the attempt that took this name first; commits nothing
    format: int = FORMAT

    def meta(self) -> Dict[str, Any]:
        body = dataclasses.asdict(self)
        del body["slots"]
        return body


def _key(attempt: str, rank: int) -> str:
    return f"{attempt}/r{rank}"


@dataclasses.dataclass
class Folded:
    """Everything committed by the records folded so far."""

    gen: int = -1
    committed: List[Interval] = dataclasses.field(default_factory=list)
    slots: Dict[str, List[Any]] = dataclasses.field(default_factory=dict)  #: every closed slot's state
    #: attempt/rank -> the slot state of its last folded record, while its attempt may still commit
    open_slots: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    errors: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped_samples: int = 0
    skipped_batches: int = 0
    committed_samples: int = 0
    folded_attempts: List[str] = dataclasses.field(default_factory=list)  #: whose rank records it holds
    #: attempt/rank -> the seq of its last record folded (a fence included): later ones are new
    seqs: Dict[str, int] = dataclasses.field(default_factory=dict)
    live: Optional[Dict[str, Any]] = None  #: the attempt that may still write: {"attempt", "world_size"}
    fences: List[str] = dataclasses.field(default_factory=list)  #: the fence records this run's last start made
    rank_batches: Dict[str, int] = dataclasses.field(default_factory=dict)  #: rank -> batches (last attempt)
    metrics: Optional[Dict[str, Any]] = None  #: set once every batch is committed
    format: int = FOLDED_FORMAT

    def meta(self) -> Dict[str, Any]:
        body = dataclasses.asdict(self)
        del body["slots"], body["open_slots"]
        return body

    def copy(self) -> "Folded":
        return Folded(**{f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(Folded)})

    def every_slot(self) -> Dict[str, List[Any]]:
        """The states of every slot: the closed ones, then those of the attempt still open."""
        every = {k: list(v) for k, v in self.slots.items()}
        for key in sorted(self.open_slots, key=lambda k: (k.rsplit("/r", 1)[0], int(k.rsplit("/r", 1)[1]))):
            for metric, value in self.open_slots[key].items():
                every.setdefault(metric, []).append(value)
        return every

    def close(self) -> None:
        """The open attempt's slots join the closed ones: that attempt commits nothing more."""
        self.slots = self.every_slot()
        self.open_slots = {}


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _dump(meta: Dict[str, Any], slots: Any, open_slots: Any = None) -> bytes:
    buf = io.BytesIO()
    body = {"meta": json.dumps(meta, sort_keys=True), "slots": slots}
    if open_slots:
        body["open_slots"] = open_slots
    torch.save(body, buf)
    return buf.getvalue()


def _load(run_dir: RunDir, rel: str, formats: Tuple[int, ...] = (FORMAT,)) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    try:
        # Never unpickle arbitrary objects from shared storage.
        raw = torch.load(io.BytesIO(run_dir.read_bytes(rel)), weights_only=True)
        meta = json.loads(raw["meta"])
        if meta.get("format") not in formats:
            raise ValueError(f"format {meta.get('format')!r}, expected {' or '.join(map(str, formats))}")
        return meta, raw
    except (StorageUnavailableError, FileNotFoundError):
        raise
    except (ValueError, KeyError, OSError, RuntimeError, EOFError, TypeError) as e:
        raise CorruptCheckpointError(
            f"the dynamic-schedule record {run_dir.path(rel)} cannot be read ({type(e).__name__}: {e}). "
            "Nothing can be resumed safely without it; restore it, or start over with "
            "`batchproc run ... --fresh`.") from e


def _taken(run_dir: RunDir, rel: str) -> RecordTakenError:
    return RecordTakenError(
        f"the dynamic-schedule record {run_dir.path(rel)} was written already by another job; records are never "
        "replaced, so this job stops without committing. Only one job may run on a run directory at a time: "
        "see `batchproc status` for the one that holds it.")


def write_rank_record(run_dir: RunDir, record: RankRecord) -> None:
    """The commit point of one rank's batches: durable before any of its files is published, and
    created once (a name taken by another job's fence is RecordTakenError: nothing is committed)."""
    rel = rank_record_name(record.attempt, record.rank, record.seq)
    try:
        run_dir.create(rel, _dump(record.meta(), record.slots))
    except FileExistsError:
        raise _taken(run_dir, rel) from None


def write_folded(run_dir: RunDir, folded: Folded) -> None:
    rel = folded_name(folded.gen)
    try:
        run_dir.create(rel, _dump(folded.meta(), folded.slots, folded.open_slots))
    except FileExistsError:
        raise _taken(run_dir, rel) from None


def load_folded(run_dir: RunDir, names: List[str]) -> Folded:
    gens = sorted(g for n in names if (g := parse_folded(n)) is not None)
    if not gens:
        return Folded()
    meta, raw = _load(run_dir, folded_name(gens[-1]), (1, FOLDED_FORMAT))
    known = {f.name for f in dataclasses.fields(Folded)}
    folded = Folded(**{k: v for k, v in meta.items() if k in known})
    folded.committed = [(int(a), int(b)) for a, b in folded.committed]
    folded.slots = {k: list(v) for k, v in raw["slots"].items()}
    folded.open_slots = {k: dict(v) for k, v in raw.get("open_slots", {}).items()}
    return folded


def has_records(run_dir: RunDir) -> bool:
    return bool(run_dir.listdir(DYNAMIC_RECORDS))


class _Reading:
    """The records one fold reads, added to a :class:`Folded` as they come (in seq order per rank)."""

    def __init__(self, run_dir: RunDir, folded: Folded) -> None:
        self.run_dir, self.folded = run_dir, folded
        self.read: List[str] = []  #: names of the records folded (fences included)
        self.batches: List[Interval] = list(folded.committed)
        self.new_errors = False

    def add(self, name: str, meta: Dict[str, Any], raw: Dict[str, Any], publish: bool) -> None:
        f = self.folded
        attempt, rank, seq = str(meta["attempt"]), int(meta["rank"]), int(meta["seq"])
        self.read.append(name)
        f.seqs[_key(attempt, rank)] = seq
        if meta.get("fenced_by"):
            return
        if publish:
            for staged, final in meta["publish"]:
                self.run_dir.publish(staged, final)
        self.batches.extend((int(a), int(b)) for a, b in meta["batches"])
        if meta["errors"]:
            f.errors.extend(meta["errors"])
            self.new_errors = True
        f.skipped_samples += int(meta["skipped_samples"])
        f.skipped_batches += int(meta["skipped_batches"])
        f.committed_samples += int(meta["committed_samples"])
        if attempt not in f.folded_attempts:
            f.folded_attempts.append(attempt)
            f.rank_batches = {}
        f.rank_batches[str(rank)] = f.rank_batches.get(str(rank), 0) + count(meta["batches"])
        f.open_slots[_key(attempt, rank)] = dict(raw["slots"])  # a rank's latest holds its whole attempt

    def finish(self) -> None:
        self.folded.committed = merge(self.batches)


def _walk(run_dir: RunDir, reading: _Reading, attempt: str, rank: int, fence_by: Optional[str],
          listed: Set[str]) -> None:
    """Fold the records of (attempt, rank) after the last one folded. ``fence_by``: on object
    stores, create a fence record at the first free name (the listing is not trusted: a name is
    tried by a create-only write, and one that exists is read); locally, the listing's names."""
    seq = reading.folded.seqs.get(_key(attempt, rank), -1) + 1
    while True:
        name = rank_record_name(attempt, rank, seq)
        if fence_by is not None:
            fence = RankRecord(attempt=attempt, rank=rank, seq=seq, batches=[], publish=[], errors=[],
                               skipped_samples=0, skipped_batches=0, committed_samples=0, fenced_by=fence_by)
            try:
                run_dir.create(name, _dump(fence.meta(), {}))
                reading.folded.seqs[_key(attempt, rank)] = seq
                reading.folded.fences.append(name)
                return
            except FileExistsError:
                pass
        elif name.rsplit("/", 1)[-1] not in listed:
            return
        meta, raw = _load(run_dir, name)
        reading.add(name, meta, raw, publish=True)
        if meta.get("fenced_by"):
            return  # fenced already (by a start that did not get to write its fold)
        seq += 1


def open_fold(run_dir: RunDir, attempt: str, world_size: int, fence: bool) -> Folded:
    """Rank 0, at the start of an attempt, before any claim: fold what earlier attempts wrote
    since the last fold into a new folded record, whose ``live`` attempt is ``attempt``.

    Order, so that a crash anywhere leaves a state the next fold reads the same: the fences (object
    stores), each record's publication (idempotent), staged files no record lists removed,
    ``errors.jsonl``, the new folded record (its per-rank seqs say which records it holds, so those
    count once if their deletion was cut short), then the records it holds, the older fences and
    the older generations deleted.
    """
    names = run_dir.listdir(DYNAMIC_RECORDS)
    folded = load_folded(run_dir, names)
    old_fences = list(folded.fences)
    folded.fences = []
    reading = _Reading(run_dir, folded)
    listed = set(names)
    keys: List[Tuple[str, int]] = []
    if folded.live is not None and folded.live.get("attempt") != attempt:
        keys += [(str(folded.live["attempt"]), r) for r in range(int(folded.live["world_size"]))]
    legacy = set(folded.folded_attempts) if folded.format == 1 else set()  # records of those were folded whole
    garbage: List[str] = []
    for name in names:
        key = parse_rank_record(name)
        if key is None:
            continue
        a, r, seq = key
        if a in legacy or seq <= folded.seqs.get(_key(a, r), -1):
            garbage.append(f"{DYNAMIC_RECORDS}/{name}")  # folded already; its deletion was cut short
        elif (a, r) not in keys:
            keys.append((a, r))
    for a, r in sorted(keys):
        _walk(run_dir, reading, a, r, attempt if fence else None, listed)
    reading.finish()
    folded.close()  # every earlier attempt is over: it is fenced, or it was this job's own
    run_dir.rm(STAGING, recursive=True)  # what no record lists: work after a rank's last commit
    changed = bool(reading.read) or folded.format == 1
    if changed:  # rewritten whole from the folded list (object stores cannot append)
        if folded.errors:
            run_dir.write_atomic(ERRORS_FILE, errors_log.encode(folded.errors), durable=True)
        else:
            run_dir.rm(ERRORS_FILE)
    complete = folded.metrics is not None
    if not changed and (not fence or complete):
        for rel in garbage:
            run_dir.rm(rel)
        return folded  # nothing new, and no fence to name: no write
    folded.gen += 1
    folded.format = FOLDED_FORMAT
    folded.live = None if complete else {"attempt": attempt, "world_size": world_size}
    write_folded(run_dir, folded)
    _delete(run_dir, [n for n in reading.read if n not in folded.fences] + garbage + old_fences, names, folded.gen)
    return folded


def _delete(run_dir: RunDir, records: List[str], names: List[str], gen: int) -> None:
    for rel in records:
        run_dir.rm(rel)
    for name in names:
        g = parse_folded(name)
        if g is not None and g < gen:
            run_dir.rm(folded_name(g))


class LiveFold:
    """Rank 0's folds during its attempt: the records every rank has published so far."""

    def __init__(self, run_dir: RunDir, folded: Folded, attempt: str) -> None:
        self.run_dir, self.folded, self.attempt = run_dir, folded.copy(), attempt
        self._read: List[str] = []  #: records absorbed since the last write
        self._new_errors = False

    def held(self) -> int:
        """Records of this attempt that the folded state holds, over every rank."""
        prefix = self.attempt + "/r"
        return sum(s + 1 for k, s in self.folded.seqs.items() if k.startswith(prefix))

    def absorb(self, published: Sequence[int]) -> None:
        """Read records ``[held, published[r])`` of each rank ``r`` (published by their ranks)."""
        folded = self.folded
        reading = _Reading(self.run_dir, folded)
        for rank, n in enumerate(published):
            for seq in range(folded.seqs.get(_key(self.attempt, rank), -1) + 1, n):
                name = rank_record_name(self.attempt, rank, seq)
                try:
                    meta, raw = _load(self.run_dir, name)
                except FileNotFoundError:  # published, so written: another job's start folded it
                    raise RecordTakenError(
                        f"the dynamic-schedule record {self.run_dir.path(name)} was folded by another job, which "
                        "holds the run directory now; this job stops without committing.") from None
                reading.add(name, meta, raw, publish=False)
        reading.finish()
        self._read += reading.read
        self._new_errors = self._new_errors or reading.new_errors

    def write(self, final_metrics: Optional[Dict[str, Any]] = None) -> None:
        """The next generation, if there is anything new (``final_metrics``: the run is done and
        every slot closed), then the records it holds and the generation before deleted."""
        folded, run_dir = self.folded, self.run_dir
        if not self._read and final_metrics is None:
            return
        if self._new_errors:
            run_dir.write_atomic(ERRORS_FILE, errors_log.encode(folded.errors), durable=True)
        if final_metrics is not None:
            folded.close()
            folded.metrics = final_metrics
            folded.live = None
        previous = folded.gen
        folded.gen += 1
        write_folded(run_dir, folded)
        for rel in self._read:
            run_dir.rm(rel)
        if previous >= 0:
            run_dir.rm(folded_name(previous))
        self._read, self._new_errors = [], False

    def fold(self, published: Sequence[int]) -> None:
        self.absorb(published)
        self.write()
