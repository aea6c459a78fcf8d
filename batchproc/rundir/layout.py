"""Every name in a run directory, and the tag that published outputs carry: their one owner.

A run directory (``<storage root>/<experiment name>/``, any fsspec URL) holds::

    fingerprint.json            what the checkpoints are valid for (dataset length, batch size, inputs)
    inputs/manifest.npz         the inputs frozen at the first attempt
    checkpoints/ckpt-<seq>.json the checkpoint records (the commit points), each created once ...
    checkpoints/ckpt-<seq>.states.pt   ... and the reducer states each one points to
    staging/<attempt>/r<rank>/u<n>/...  files written in upload_path(), not yet committed
    dynamic/rank-<attempt>-r<rank>-<seq>.pt  schedule="dynamic": one rank's commit records ...
    dynamic/folded-<gen>.pt     ... and the earlier attempts' records folded into one
    outputs/...                 published outputs, each name tagged <stem>.<attempt>-r<rank>-u<n>.<suffix>
    rejected/...                outputs and records set aside after a damaged record
    status.json  failures/      the run's state (one writer) and the ranks' failure reports
    metrics.json errors.jsonl   final metrics, skipped samples and batches (assembled from errors/)
    errors/err-<seq>-<attempt>.jsonl  the skips each checkpoint committed, one immutable part each
    stop-request                ``batchproc stop``'s request
    tensorboard/                TensorBoard files and report_metrics' metrics.jsonl
    model_sources.jsonl         report_task_using_model_version's records
    .lock .lock.holder lock.json  the run's lock (filelock locally, a conditionally written lease on object stores)
    .lock.job .lock.workers     held by every process (every worker) of the running job

No imports of batchproc's: every plane may ask this module, and it asks nobody.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional, Tuple

OUTPUTS = "outputs"
STAGING = "staging"
REJECTED = "rejected"
RECORDS = "checkpoints"
DYNAMIC_RECORDS = "dynamic"
FINGERPRINT_FILE = "fingerprint.json"
MANIFEST_FILE = "inputs/manifest.npz"
STATUS_FILE = "status.json"
FAILURES = "failures"
METRICS_FILE = "metrics.json"
ERRORS_FILE = "errors.jsonl"
ERRORS_PARTS = "errors"
STOP_FILE = "stop-request"
TENSORBOARD_DIR = "tensorboard"
REPORTED_METRICS = "metrics.jsonl"  #: under TENSORBOARD_DIR
MODEL_SOURCES = "model_sources.jsonl"
LOCAL_LOCK = ".lock"
LOCAL_LOCK_HOLDER = ".lock.holder"
LEASE = "lock.json"
JOB_LOCK = ".lock.job"  #: shared by every process of the running job (batchproc.rundir.job_lock)
WORKERS_LOCK = ".lock.workers"  #: shared by its workers
LOCK_FILES: Tuple[str, ...] = (LOCAL_LOCK, LOCAL_LOCK_HOLDER, LEASE, JOB_LOCK, WORKERS_LOCK)
#: The attempt tag of files written during on_finish: the same on every run of it.
FINISH_TAG = "ffffffff"
#: In the supervisor's verdict folder (not the run directory): which run directory a script opened.
#: Not ``*.json``: those are the ranks' verdicts.
ANNOUNCED_RUN_DIR = "run_dir.announced"

_RECORD_RE = re.compile(r"^ckpt-(\d{8})\.json$")
_ERRORS_PART_RE = re.compile(r"^err-(\d{8})-([0-9a-f]{8})\.jsonl$")
_RANK_RECORD_RE = re.compile(r"^rank-([0-9a-f]{8})-r(\d{5})-(\d{8})\.pt$")
_FOLDED_RE = re.compile(r"^folded-(\d{8})\.pt$")
_TAG_RE = re.compile(r"\.([0-9a-f]{8})-r(\d+)-u(\d+)(\.|$)")


def record_name(seq: int) -> str:
    return f"{RECORDS}/ckpt-{seq:08d}.json"


def states_name(seq: int) -> str:
    return f"{RECORDS}/ckpt-{seq:08d}.states.pt"


def record_seq(name: str) -> Optional[int]:
    """The seq of a record's file name (``ckpt-00000007.json`` -> 7); None for any other name."""
    m = _RECORD_RE.match(name)
    return int(m.group(1)) if m else None


def errors_part_name(seq: int, attempt: str) -> str:
    """The skips that checkpoint ``seq`` of ``attempt`` commits (the attempt keeps a retried seq's
    name unique: a part is never written twice)."""
    return f"{ERRORS_PARTS}/err-{seq:08d}-{attempt}.jsonl"


def errors_part_of(name: str) -> Optional[Tuple[int, str]]:
    """(seq, attempt) of an errors part's file name; None for any other name."""
    m = _ERRORS_PART_RE.match(name.rsplit("/", 1)[-1])
    return (int(m.group(1)), m.group(2)) if m else None
def rank_record_name(attempt: str, rank: int, seq: int) -> str:
    """One commit of one rank under the dynamic schedule."""
    return f"{DYNAMIC_RECORDS}/rank-{attempt}-r{rank:05d}-{seq:08d}.pt"


def parse_rank_record(name: str) -> Optional[Tuple[str, int, int]]:
    """``(attempt, rank, seq)`` of a rank record's file name; None for any other name."""
    m = _RANK_RECORD_RE.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def folded_name(gen: int) -> str:
    """The dynamic schedule's folded record of generation ``gen``."""
    return f"{DYNAMIC_RECORDS}/folded-{gen:08d}.pt"


def parse_folded(name: str) -> Optional[int]:
    m = _FOLDED_RE.match(name)
    return int(m.group(1)) if m else None


def rejected_name(rel: str) -> str:
    """Where a file set aside after a damaged record goes."""
    return f"{REJECTED}/{rel}"


def staging_prefix(attempt: str, rank: int) -> str:
    return f"{STAGING}/{attempt}/r{rank}"


def staged_name(attempt: str, rank: int, upload: int, rel: str) -> str:
    """Where file ``rel`` of one rank's upload ``upload`` is staged."""
    return f"{staging_prefix(attempt, rank)}/u{upload}/{rel}"


def staged_relpath(staged: str) -> str:
    """The user's path of a staged file: ``staging/<attempt>/r<rank>/u<n>/<rel>`` -> ``<rel>``."""
    return staged.split("/", 4)[4]


class OutputTag(NamedTuple):
    """Which attempt, rank and upload published an output."""

    attempt: str
    rank: int
    upload: int


def published_name(relpath: str, attempt: str, rank: int, upload: int) -> str:
    """The path under ``outputs/`` of a staged file, unique per attempt, rank and upload.

    The tag goes before the first suffix so ``preds.parquet`` stays a ``.parquet`` file.
    """
    directory, _, base = relpath.rpartition("/")
    stem, dot, suffix = base.partition(".")
    tagged = f"{stem}.{attempt}-r{rank}-u{upload}{dot}{suffix}"
    return f"{OUTPUTS}/{directory}/{tagged}" if directory else f"{OUTPUTS}/{tagged}"


def parse_tag(name: str) -> Optional[OutputTag]:
    """The tag in a published file's name (a path or a base name), or None if it carries none."""
    m = _TAG_RE.search(name.rsplit("/", 1)[-1])
    return OutputTag(m.group(1), int(m.group(2)), int(m.group(3))) if m else None
