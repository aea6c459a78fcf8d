"""The commit protocol: immutable checkpoint records, publication, and resume.

At each checkpoint (every ``checkpoint_interval`` steps, on preemption, and at the end) all ranks:

1. call ``on_checkpoint_start()`` so the user flushes buffered outputs through ``upload_path()``;
2. finish their pending uploads and send rank 0 their reducer states and staged files;
3. rank 0 writes one immutable record ``checkpoints/ckpt-<seq>.json`` (watermark, world size,
   fingerprint, files to publish, skip counts, a checksum), after the reducer states file it
   points to and the part of ``errors/`` that names its new skips — the record is the commit point;
4. every rank publishes its staged files under ``outputs/`` (idempotent moves).

On start (rank 0 alone, before any work): the latest record whose checksums hold is loaded; the
publication it lists is completed (also when it is the final one); staged files that no record
lists (work after the last checkpoint) are deleted; ``errors.jsonl`` is made to say what the
record commits (batchproc.rundir.errors_log). Only rank 0 touches the records; every rank
publishes its own files.

Record names are created once, never replaced (a lost race is :class:`RecordTakenError`). On
object stores rank 0 checks the lease before each record, and a resume first claims the next
record name (:func:`_fence`); records the listing does not show yet are found by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import torch

from batchproc.distributed import WorkerEnv
from batchproc.errors import (CorruptCheckpointError, FingerprintMismatchError, LeaseLostError, RecordTakenError,
                              UserCodeError)
from batchproc.engine.fault_injection import FaultHooks, NoFaults
from batchproc.engine.policy import ErrorRecord, Skipped
from batchproc.data.inputs import check_inputs_fingerprint
from batchproc.plain import to_plain
from batchproc.reducer import ReducerRegistry
from batchproc.rundir import lifecycle
from batchproc.rundir.lifecycle import RunState
from batchproc.rundir import errors_log, layout
from batchproc.rundir.layout import ERRORS_FILE, FINGERPRINT_FILE, OUTPUTS, RECORDS, STAGING, record_name, states_name
from batchproc.rundir.storage import RunDir, Stager, StorageUnavailableError

#: 2: skips live in errors/ parts, the record keeps their counts (1 carried them whole).
FORMAT = 2
KEEP_RECORDS = 3


def _checksum(record: Dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class Resumed:
    """Where a new attempt starts, as rank 0 read it from the run directory."""

    seq: int = -1
    watermark: int = 0
    total_batches: int = 0
    slots: Dict[str, List[Any]] = dataclasses.field(default_factory=dict)
    errors_count: int = 0  #: rows of errors.jsonl committed
    errors_bytes: int = 0  #: its committed size
    errors_last_part: str = ""  #: the newest committed part of errors/
    commits: Dict[str, List[int]] = dataclasses.field(default_factory=dict)  #: attempt -> [first, last] seq
    skipped_samples: int = 0
    skipped_batches: int = 0
    upload_counters: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
    attempts: int = 0
    restarts: int = 0
    samples_done_before: int = 0
    metrics: Dict[str, Any] = dataclasses.field(default_factory=dict)
    finished: bool = False  #: every rank's on_finish returned (the run's state is COMPLETED)

    @property
    def all_committed(self) -> bool:
        """Every batch is committed: what is left, if anything, is on_finish."""
        return self.seq >= 0 and self.watermark >= self.total_batches

    @property
    def completed(self) -> bool:
        return self.all_committed and self.finished


# -- typed records ---------------------------------------------------------------------------


@dataclasses.dataclass
class Fingerprint:
    """What a run's checkpoints are only valid for (``fingerprint.json``)."""

    dataset_len: int
    batch_size: int
    max_batches: Optional[int]
    total_batches: int
    #: The frozen inputs (batchproc.data.inputs): manifest source and digest, or a content fingerprint.
    inputs: Optional[Dict[str, Any]] = None

    def to_json(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.inputs is None:
            del out["inputs"]
        return out

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "Fingerprint":
        return cls(dataset_len=raw["dataset_len"], batch_size=raw["batch_size"], max_batches=raw.get("max_batches"),
                   total_batches=raw["total_batches"], inputs=raw.get("inputs"))


@dataclasses.dataclass
class CheckpointRecord:
    """One immutable checkpoint record (``checkpoints/ckpt-<seq>.json``): the commit point."""

    seq: int
    attempt: str
    attempts: int
    restarts: int
    time: float
    watermark: int
    total_batches: int
    world_size: int
    fingerprint: Dict[str, Any]
    states_file: str
    states_sha256: str
    publish: List[List[str]]  #: (staged, published) pairs this record commits
    upload_counters: Dict[str, Dict[str, int]]  #: attempt -> rank -> uploads committed
    skipped_samples: int
    committed_samples: int
    metrics: Dict[str, Any]
    skipped_batches: int = 0
    #: The skips committed so far, by count: their rows are in the errors/ parts, never here, so a
    #: record's size does not grow with them. ``commits`` says which parts are committed (those of
    #: each attempt's seqs), so the record needs no list of them either.
    errors_count: int = 0
    errors_bytes: int = 0
    errors_last_part: str = ""
    commits: Dict[str, List[int]] = dataclasses.field(default_factory=dict)
    format: int = FORMAT
    checksum: str = ""

    def sealed(self) -> Dict[str, Any]:
        """The record as written: JSON, with the checksum of everything else."""
        body = dataclasses.asdict(self)
        body["checksum"] = _checksum(body)
        return body

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "CheckpointRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


# -- fingerprint -----------------------------------------------------------------------------


_FINGERPRINT_KEYS = ("dataset_len", "batch_size", "max_batches", "total_batches")


def read_fingerprint(run_dir: RunDir) -> Optional[Dict[str, Any]]:
    """``fingerprint.json`` as written, or None when there is none; a damaged one is an error
    naming it (it is never written over: it is what says which data the run is for)."""
    try:
        blob = run_dir.read_bytes(FINGERPRINT_FILE)
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(blob)
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON {type(raw).__name__}, not an object")
        missing = [k for k in _FINGERPRINT_KEYS if k not in raw]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except ValueError as e:
        raise CorruptCheckpointError(
            f"{run_dir.url}/{FINGERPRINT_FILE} is damaged ({e}), so which data this run is for is not known. "
            f"Delete it to have it restored from the latest checkpoint record, or start over with "
            f"`batchproc run ... --fresh`.") from None
    return cast(Dict[str, Any], raw)


def recorded_inputs(run_dir: RunDir) -> Optional[Dict[str, Any]]:
    """The inputs entry the run recorded (``fingerprint.json``'s, or the newest record's when that
    file is gone), for freezing the inputs before :func:`open_run`; never raises for damage
    (:func:`open_run` does, once every rank listens)."""
    try:
        raw = read_fingerprint(run_dir)
    except CorruptCheckpointError:
        return None
    if raw is None:
        for seq in reversed(record_seqs(run_dir)):
            try:
                raw = _read_record_json(run_dir, seq)["fingerprint"]
                break
            except (ValueError, KeyError, OSError):
                continue
    inputs = (raw or {}).get("inputs")
    return inputs if isinstance(inputs, dict) else None


def _compare_fingerprint(run_dir: RunDir, recorded: Dict[str, Any], fingerprint: Fingerprint, where: str) -> None:
    for key in ("dataset_len", "batch_size", "max_batches"):
        if recorded.get(key) != getattr(fingerprint, key):
            raise FingerprintMismatchError(
                f"run directory {run_dir.url} was started with {key}={recorded.get(key)!r} ({where}), but this job "
                f"has {key}={getattr(fingerprint, key)!r}; its checkpoints cannot be resumed with other data. "
                f"Start over with `batchproc run ... --fresh`, or use another experiment name.")
    check_inputs_fingerprint(recorded, fingerprint.to_json(), run_dir.url)


def check_fingerprint(run_dir: RunDir, fingerprint: Fingerprint,
                      record: Optional["CheckpointRecord"] = None) -> Fingerprint:
    """Record the job's fingerprint, or check it against the one recorded; returns the recorded one.

    ``record``: the latest valid checkpoint record, whose own fingerprint is checked too. A deleted
    ``fingerprint.json`` is restored from it; only a run without records gets the job's values.
    """
    raw = read_fingerprint(run_dir)
    if raw is None:
        raw = record.fingerprint if record is not None else fingerprint.to_json()
        if record is not None:
            print(f"batchproc: warning: {run_dir.url}/{FINGERPRINT_FILE} is gone; restored from "
                  f"{record_name(record.seq)}", file=sys.stderr, flush=True)
        run_dir.write_json(FINGERPRINT_FILE, raw, durable=True)
    _compare_fingerprint(run_dir, raw, fingerprint, FINGERPRINT_FILE)
    if record is not None:
        _compare_fingerprint(run_dir, record.fingerprint, fingerprint, record_name(record.seq))
    return Fingerprint.from_json(raw)


# -- reading records -------------------------------------------------------------------------


def _read_record_json(run_dir: RunDir, seq: int) -> Dict[str, Any]:
    """One record's JSON, its checksum checked; raises ValueError if it is damaged."""
    raw = run_dir.read_bytes(record_name(seq))
    try:
        record = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{record_name(seq)} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("checksum") != _checksum(record):
        raise ValueError(f"{record_name(seq)} fails its checksum (truncated or edited)")
    if record.get("format") != FORMAT:
        raise ValueError(f"{record_name(seq)} has format {record.get('format')!r}, this batchproc reads "
                         f"{FORMAT}: finish the run with the batchproc that started it")
    return cast(Dict[str, Any], record)


def _load_record(run_dir: RunDir, seq: int) -> Tuple[CheckpointRecord, Dict[str, List[Any]]]:
    """One record and its reducer states; raises ValueError if either is damaged."""
    record = _read_record_json(run_dir, seq)
    blob = run_dir.read_bytes(record["states_file"])
    if hashlib.sha256(blob).hexdigest() != record["states_sha256"]:
        raise ValueError(f"{record['states_file']} fails its checksum")
    # Never unpickle arbitrary objects from shared storage.
    states = torch.load(io.BytesIO(blob), weights_only=True)
    return CheckpointRecord.from_json(record), states["slots"]


def record_seqs(run_dir: RunDir) -> List[int]:
    return sorted(seq for n in run_dir.listdir(RECORDS) if (seq := layout.record_seq(n)) is not None)


def load_latest(run_dir: RunDir) -> Optional[Tuple[CheckpointRecord, Dict[str, List[Any]], List[int]]]:
    """The newest valid record, its states, and the seqs of newer damaged records (to set aside)."""
    seqs = record_seqs(run_dir)
    damaged: List[int] = []
    for seq in reversed(seqs):
        try:
            record, slots = _load_record(run_dir, seq)
            return record, slots, damaged
        except StorageUnavailableError:
            raise  # storage is down, the record may be fine: never set it aside for that
        except (ValueError, KeyError, OSError, RuntimeError, EOFError) as e:
            print(f"batchproc: warning: checkpoint {record_name(seq)} of {run_dir.url} is damaged ({e}); "
                  f"falling back to the one before it", file=sys.stderr)
            damaged.append(seq)
    if damaged:
        raise CorruptCheckpointError(
            f"no checkpoint record of {run_dir.url} is valid (damaged: {', '.join(record_name(s) for s in damaged)}). "
            f"Nothing can be resumed safely; start over with `batchproc run ... --fresh`.")
    return None


def _set_aside_damaged(run_dir: RunDir, damaged: List[int], counters: Dict[str, Dict[str, int]]) -> None:
    """A damaged record may have published files; move those that the valid record does not cover.

    Outputs carry their (attempt, rank, upload) tag, and records keep the committed upload count
    of every attempt and rank, so the uncommitted ones are found without the damaged record.
    """
    for rel in run_dir.find(OUTPUTS):
        tag = layout.parse_tag(rel)
        if tag and tag.upload >= counters.get(tag.attempt, {}).get(str(tag.rank), 0):
            run_dir.move(rel, layout.rejected_name(rel))
    for seq in damaged:
        for name in (record_name(seq), states_name(seq)):
            run_dir.move(name, layout.rejected_name(name))


def _probe(run_dir: RunDir, seq: int) -> Optional[Tuple[CheckpointRecord, Dict[str, List[Any]]]]:
    """Record ``seq`` read by name, not found by listing; None if it does not exist.
    Raises ValueError (and the like) when it exists but is damaged."""
    try:
        return _load_record(run_dir, seq)
    except FileNotFoundError:
        if not run_dir.exists(record_name(seq)):
            return None
        raise ValueError(f"{record_name(seq)} exists but its states file {states_name(seq)} does not") from None


def _beyond_listing(run_dir: RunDir, record: CheckpointRecord, slots: Dict[str, List[Any]],
                    damaged: List[int]) -> Tuple[CheckpointRecord, Dict[str, List[Any]]]:
    """The newest record, also when the listing does not show it yet (stores whose LIST lags
    behind their writes, which a GET by name does not): resuming from the one before would
    publish its batches twice. Costs one GET of a missing name per resume. Hidden records that
    are damaged join ``damaged``, so that their outputs are set aside by the upload counters."""
    newest = max([record.seq, *damaged])
    while True:
        seq = newest + 1
        try:
            found = _probe(run_dir, seq)
        except StorageUnavailableError:
            raise
        except (ValueError, KeyError, OSError, RuntimeError, EOFError) as e:
            print(f"batchproc: warning: checkpoint {record_name(seq)} of {run_dir.url}, which the listing did not "
                  f"show, is damaged ({e}); setting it aside", file=sys.stderr)
            damaged.append(seq)
            newest = seq
            continue
        if found is None:
            _clear_orphan_states(run_dir, seq)
            return record, slots
        print(f"batchproc: warning: the listing of {run_dir.url} does not show {record_name(seq)} yet; resuming "
              "from it all the same", file=sys.stderr)
        record, slots = found
        damaged[:] = [d for d in damaged if d > seq]
        newest = seq


def _clear_orphan_states(run_dir: RunDir, seq: int) -> None:
    """A states file without its record (a crash between the two writes) holds nothing committed;
    set it aside, since records and their states are created once and never replaced."""
    run_dir.move(states_name(seq), layout.rejected_name(states_name(seq)))


def _fence(run_dir: RunDir, record: CheckpointRecord, slots: Dict[str, List[Any]]) -> CheckpointRecord:
    """Object stores: claim the next record name before touching anything, with a copy of the
    record resumed from (same watermark, same files to publish).

    Record names are created once, so this is the fence against the job we took the lease from,
    if it was only frozen: its next record has this name and fails, and if it wrote that record
    first, this job stops here (a lost race naming it) before deleting its staged files.
    Costs one record and one states write per resume.
    """
    buf = io.BytesIO()
    torch.save({"slots": slots}, buf)
    blob = buf.getvalue()
    seq = record.seq + 1
    fence = dataclasses.replace(record, seq=seq, time=time.time(), states_file=states_name(seq),
                                states_sha256=hashlib.sha256(blob).hexdigest())
    create_record(run_dir, seq, blob, fence.sealed())
    _drop_old_records(run_dir, seq)
    return fence


def _first_fence(run_dir: RunDir, recorded: Fingerprint) -> CheckpointRecord:
    """Object stores, a run with no record yet: record 0 at watermark 0, so that a job frozen
    before its first record (whose first record is record 0) is fenced off too (:func:`_fence`)."""
    empty = CheckpointRecord(
        seq=-1, attempt="", attempts=0, restarts=0, time=time.time(), watermark=0,
        total_batches=recorded.total_batches, world_size=0, fingerprint=recorded.to_json(), states_file="",
        states_sha256="", publish=[], upload_counters={}, skipped_samples=0, committed_samples=0, metrics={})
    return _fence(run_dir, empty, {})


def _drop_old_records(run_dir: RunDir, seq: int) -> None:
    """Keep the last few records only (the one before the latest is the fallback if the latest is
    damaged): storage stays bounded and listing them on resume stays O(1)."""
    if seq >= KEEP_RECORDS:  # no record has a negative seq
        for old in (record_name(seq - KEEP_RECORDS), states_name(seq - KEEP_RECORDS)):
            run_dir.rm(old)


def create_record(run_dir: RunDir, seq: int, blob: bytes, sealed: Dict[str, Any]) -> None:
    """Create record ``seq`` after its states file, each with a create-only write: a name that
    exists already was written by another job, and it is never replaced (RecordTakenError)."""
    for name, data in ((states_name(seq), blob), (record_name(seq), json.dumps(sealed, indent=1, sort_keys=True).encode())):
        try:
            run_dir.create(name, data)
        except FileExistsError:
            raise RecordTakenError(
                f"checkpoint {run_dir.path(name)} was written already by {_other_writer(run_dir, seq)}; records are "
                "never replaced, so this job stops without committing. Only one job may run on a run directory "
                "at a time: see `batchproc status` for the one that holds it.") from None


def _other_writer(run_dir: RunDir, seq: int) -> str:
    """Who wrote record ``seq``, as far as the run directory says: its attempt, and the lease's holder."""
    from batchproc.rundir.storage import describe_holder

    raw = run_dir.read_json_or_none(record_name(seq))
    who = (f"attempt {raw.get('attempt')} at {time.ctime(raw.get('time', 0))}" if isinstance(raw, dict)
           else "another writer")
    held = None if run_dir.is_local else run_dir.read_json_or_none(layout.LEASE)
    return f"{who} (the run directory's lease is held by {describe_holder(held)})" if held else who


def open_run(run_dir: RunDir, fingerprint: Fingerprint, restart_count: int) -> Resumed:
    """Rank 0, before any work: load the latest record, finish its publication, clear the rest."""
    read_fingerprint(run_dir)  # a damaged one is named before anything else is read
    latest = load_latest(run_dir)
    if latest is None and (hidden := _probe(run_dir, 0)) is not None:
        latest = (hidden[0], hidden[1], [])  # a store whose LIST lags: record 0 is there all the same
    recorded = check_fingerprint(run_dir, fingerprint, latest[0] if latest else None)
    if latest is None:
        # Left by records that were all damaged, or by a first commit that never wrote its record:
        # nothing they name is committed.
        _clear_orphan_states(run_dir, 0)
        errors_log.set_aside(run_dir, errors_log.split_parts(run_dir, -1, {})[1])
        run_dir.rm(ERRORS_FILE)
        seq = -1 if run_dir.is_local else _first_fence(run_dir, recorded).seq
        return Resumed(seq=seq, total_batches=recorded.total_batches, attempts=1, restarts=restart_count)
    record, slots, damaged = latest
    record, slots = _beyond_listing(run_dir, record, slots, damaged)
    if damaged:
        _set_aside_damaged(run_dir, damaged, record.upload_counters)
    if not run_dir.is_local:
        record = _fence(run_dir, record, slots)
    resumed = Resumed(
        seq=record.seq, watermark=record.watermark, total_batches=record.total_batches,
        slots=slots, errors_count=record.errors_count, errors_bytes=record.errors_bytes,
        errors_last_part=record.errors_last_part, commits={a: list(s) for a, s in record.commits.items()},
        skipped_samples=record.skipped_samples,
        skipped_batches=record.skipped_batches, upload_counters=record.upload_counters,
        attempts=record.attempts + 1, restarts=record.restarts + restart_count,
        samples_done_before=record.committed_samples, metrics=record.metrics)
    # Even for a finished run: a crash between the final record and the end of its publication
    # must not leave that record's files in staging (idempotent; a no-op when nothing is left).
    for staged, final in record.publish:
        run_dir.publish(staged, final)
    run_dir.rm(STAGING, recursive=True)
    # errors.jsonl catches up after each record: a crash in between, or a fallback to the record
    # before a damaged one, leaves it behind or ahead of the record, and it must say what the
    # record commits. Parts of later commits (never recorded, or damaged) are set aside.
    committed, others = errors_log.split_parts(run_dir, record.seq, record.commits)
    errors_log.set_aside(run_dir, others)
    errors_log.reconcile(run_dir, committed, record.errors_bytes, record.errors_last_part)
    # COMPLETED only once every rank's on_finish returned; all batches committed without it is
    # FINISHING, and this attempt runs on_finish again (at-least-once).
    resumed.finished = lifecycle.read_state(run_dir) is RunState.COMPLETED
    return resumed


# -- committing ------------------------------------------------------------------------------


class Checkpointer:
    """Runs the four commit steps for one attempt; see the module docstring."""

    def __init__(self, run_dir: RunDir, env: WorkerEnv, stager: Stager, reducers: ReducerRegistry,
                 resumed: Resumed, fingerprint: Fingerprint, attempt: str,
                 hooks: FaultHooks = NoFaults(), verify_lease: Callable[[], None] = lambda: None) -> None:
        self.run_dir = run_dir
        #: Rank 0 calls it right before each record: LeaseLostError once another job holds the run.
        self.verify_lease = verify_lease
        self.env = env
        self.stager = stager
        self.reducers = reducers
        self.resumed = resumed
        self.fingerprint = fingerprint
        self.attempt = attempt
        self.hooks = hooks
        self.seq = resumed.seq
        #: errors.jsonl as committed: its rows, its size and its newest part; attempt -> seqs committed.
        self.errors_count = resumed.errors_count
        self.errors_bytes = resumed.errors_bytes
        self.errors_last_part = resumed.errors_last_part
        self.errors_file = errors_log.Appender(run_dir, resumed.errors_bytes)
        self.commits = {a: list(s) for a, s in resumed.commits.items()}
        #: Samples and batches the whole job skipped so far: the counts the records carry.
        self.skipped_samples = resumed.skipped_samples
        self.skipped_batches = resumed.skipped_batches
        self.counters = {a: dict(c) for a, c in resumed.upload_counters.items()}
        self.started = time.time()
        self.start_samples = resumed.samples_done_before
        self.metrics_so_far: Dict[str, Any] = {}

    @property
    def skipped(self) -> Skipped:
        return Skipped(self.skipped_samples, self.skipped_batches)

    def add_skipped(self, samples: int, batches: int) -> Skipped:
        """Count a step's skips, summed over every rank (a batch split after running out of memory
        counts once, however many of its pieces failed); returns the job's counts."""
        self.skipped_samples += samples
        self.skipped_batches += batches
        return self.skipped

    def commit(self, processor: Any, watermark: int, new_errors: List[ErrorRecord],
               state: RunState) -> None:
        # 1) the user flushes buffered outputs
        try:
            processor.on_checkpoint_start()
        except Exception as e:
            raise UserCodeError(f"{type(processor).__name__}.on_checkpoint_start() raised {type(e).__name__}: {e} "
                                f"(rank {self.env.rank}, checkpoint {self.seq + 1}). Work committed before this "
                                "checkpoint is kept; fix the error and run again to resume.") from e
        # 2) pending uploads finish; rank 0 gathers what every rank staged and its reducer states
        pairs = self.stager.join()
        payload = {"files": pairs, "slots": self.reducers.slot_states(), "errors": [e.to_json() for e in new_errors],
                   "uploads": self.stager.uploads_opened}
        gathered = self.env.gather(payload)
        self.hooks.at("kill-after-stage")
        # 3) rank 0 writes the record (the commit point); a failure there stops every rank
        outcome: Any = None
        if self.env.is_chief:
            try:
                self._write_record(watermark, gathered or [], state)
            except BaseException as e:
                code = e.errno if isinstance(e, OSError) else None
                fenced = ("lease" if isinstance(e, LeaseLostError)
                          else "record" if isinstance(e, RecordTakenError) else None)
                outcome = (f"rank 0 could not write checkpoint {self.seq + 1} to {self.run_dir.url}: "
                           f"{type(e).__name__}: {e}", code, fenced)
        outcome = self.env.broadcast(outcome)
        if outcome is not None:
            message, code, fenced = outcome
            if fenced is not None:  # another job holds the run: no restart of this one can commit
                raise (LeaseLostError if fenced == "lease" else RecordTakenError)(message)
            # The errno travels too: a full or read-only disk fails the job at once (verdict).
            cause = OSError(code, message) if code is not None else None
            raise RuntimeError(message + ". Nothing committed before this checkpoint was lost; run again to "
                               "resume.") from cause
        self.seq += 1
        self.hooks.at("kill-after-record")
        # 4) every rank publishes its own staged files
        for staged, final in pairs:
            self.run_dir.publish(staged, final)

    def flush_errors(self) -> None:
        """Bring ``errors.jsonl`` up to the latest record (it may lag on an object store) before
        an attempt ends in an error. Best effort: the error that ends it must not be masked, and
        the next start rebuilds the file from the parts anyway."""
        try:
            self.errors_file.flush()
        except Exception as e:
            print(f"batchproc: warning: could not bring {self.run_dir.url}/{ERRORS_FILE} up to date "
                  f"({type(e).__name__}: {e}); the next run rebuilds it", file=sys.stderr, flush=True)

    def _write_record(self, watermark: int, gathered: List[Dict[str, Any]], state: RunState) -> None:
        seq = self.seq + 1
        slots = {k: list(v) for k, v in self.resumed.slots.items()}
        for p in gathered:
            for key, value in p["slots"].items():
                slots.setdefault(key, []).append(value)
        buf = io.BytesIO()
        torch.save({"slots": slots}, buf)
        blob = buf.getvalue()
        new_errors = [e for p in gathered for e in p["errors"]]
        # Only this commit's skips are written (one immutable part); the record counts them.
        part = errors_log.encode(new_errors)
        last_part = errors_log.write_part(self.run_dir, seq, self.attempt, part) if new_errors else self.errors_last_part
        commits = dict(self.commits)
        commits[self.attempt] = [commits.get(self.attempt, [seq])[0], seq]
        self.counters[self.attempt] = {str(r): p["uploads"] for r, p in enumerate(gathered)}
        total = self.resumed.total_batches
        n, bs = self.fingerprint.dataset_len, self.fingerprint.batch_size
        committed_samples = min(n, watermark * bs)
        self.metrics_so_far = to_plain(self.reducers.reduce(slots), for_metrics=True)
        record = CheckpointRecord(
            seq=seq, attempt=self.attempt, attempts=self.resumed.attempts, restarts=self.resumed.restarts,
            time=time.time(), watermark=watermark, total_batches=total, world_size=self.env.world_size,
            fingerprint=self.fingerprint.to_json(), states_file=states_name(seq),
            states_sha256=hashlib.sha256(blob).hexdigest(),
            publish=[list(f) for p in gathered for f in p["files"]], upload_counters=self.counters,
            skipped_samples=self.skipped_samples, skipped_batches=self.skipped_batches,
            committed_samples=committed_samples, metrics=self.metrics_so_far,
            errors_count=self.errors_count + len(new_errors), errors_bytes=self.errors_bytes + len(part),
            errors_last_part=last_part, commits=commits)
        self.verify_lease()
        create_record(self.run_dir, seq, blob, record.sealed())
        _drop_old_records(self.run_dir, seq)
        if new_errors:
            self.hooks.at("kill-before-errors")
            self.errors_file.add(part)
        if state is not RunState.RUNNING:  # the attempt ends here: errors.jsonl names every skip
            self.errors_file.flush()
        self.errors_count, self.errors_bytes, self.errors_last_part = record.errors_count, record.errors_bytes, last_part
        self.commits = commits
        elapsed = max(1e-9, time.time() - self.started)
        total_samples = min(n, total * bs)
        lifecycle.transition(
            self.run_dir, state, committed_batches=watermark, total_batches=total,
            committed_samples=committed_samples, total_samples=total_samples,
            samples_per_s=(committed_samples - self.start_samples) / elapsed, metrics=self.metrics_so_far,
            restarts=self.resumed.restarts, attempts=self.resumed.attempts, skipped_samples=self.skipped_samples, skipped_batches=self.skipped_batches,
            world_size=self.env.world_size, attempt=self.attempt, checkpoint_seq=seq)
