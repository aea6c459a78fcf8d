"""The dynamic schedule's records, unit-level: the fold reads only what was written since the
last fold, and on object stores a start fences the attempt before it (moto's S3 server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest

from batchproc.engine.rank_records import (FOLD_EVERY, LiveFold, RankRecord, Remaining, count, load_folded, merge,
                                           open_fold, write_rank_record)
from batchproc.errors import RecordTakenError
from batchproc.rundir.layout import DYNAMIC_RECORDS
from batchproc.rundir.storage import RunDir


class CountingRunDir(RunDir):
    """A run directory that counts the rank records it reads."""

    reads: List[str]

    def read_bytes(self, rel: str) -> bytes:
        self.reads.append(rel)
        return super().read_bytes(rel)


def _run_dir(url: str) -> CountingRunDir:
    rd = CountingRunDir(url)
    rd.reads = []
    return rd


def _record(attempt: str, rank: int, seq: int, g: int) -> RankRecord:
    return RankRecord(attempt=attempt, rank=rank, seq=seq, batches=[(g, g + 1)], publish=[], errors=[],
                      skipped_samples=0, skipped_batches=0, committed_samples=2, slots={"n": seq + 1})


def _commit_many(rd: RunDir, attempt: str, world: int, n: int, live: Any = None) -> List[int]:
    """``n`` records over ``world`` ranks (batch g by rank g % world); rank 0 folds as the loop does."""
    seqs = [0] * world
    for g in range(n):
        r = g % world
        write_rank_record(rd, _record(attempt, r, seqs[r], g))
        seqs[r] += 1
        if live is not None and r == 0 and sum(seqs) - live.held() >= FOLD_EVERY:
            live.fold(seqs)
    return seqs


def _rank_reads(rd: CountingRunDir) -> int:
    return sum(1 for r in rd.reads if r.startswith(f"{DYNAMIC_RECORDS}/rank-"))


def test_intervals() -> None:
    assert merge([(3, 4), (0, 2), (2, 3), (7, 9)]) == [(0, 4), (7, 9)]
    rem = Remaining([(0, 4), (7, 9)], 12)
    assert [rem[k] for k in range(len(rem))] == [4, 5, 6, 9, 10, 11]
    assert count([(0, 4), (7, 9)]) == 6


@pytest.mark.parametrize("fence", [False, True])
def test_a_start_reads_only_what_was_written_since_the_last_fold(tmp_path: Path, fence: bool) -> None:
    rd = _run_dir(str(tmp_path / "run"))
    first = open_fold(rd, "aaaaaaaa", 2, fence=fence)
    live = LiveFold(rd, first, "aaaaaaaa")
    seqs = _commit_many(rd, "aaaaaaaa", 2, 300, live)
    rd.reads.clear()
    folded = open_fold(rd, "bbbbbbbb", 2, fence=fence)
    assert folded.committed == [(0, 300)] and folded.committed_samples == 600
    assert _rank_reads(rd) <= FOLD_EVERY + 2, rd.reads  # not 300
    assert sorted(folded.slots["n"]) == sorted(seqs)  # each rank's latest slot state, once
    assert not folded.open_slots
    names = rd.listdir(DYNAMIC_RECORDS)
    assert sum(n.startswith("rank-") for n in names) == (2 if fence else 0), names  # the fences only
    assert sum(n.startswith("folded-") for n in names) == 1


def test_a_record_whose_deletion_was_cut_short_counts_once(tmp_path: Path) -> None:
    rd = _run_dir(str(tmp_path / "run"))
    live = LiveFold(rd, open_fold(rd, "aaaaaaaa", 1, fence=False), "aaaaaaaa")
    _commit_many(rd, "aaaaaaaa", 1, 5)
    kept = rd.read_bytes(f"{DYNAMIC_RECORDS}/rank-aaaaaaaa-r00000-00000002.pt")
    live.fold([5])
    (tmp_path / "run" / DYNAMIC_RECORDS / "rank-aaaaaaaa-r00000-00000002.pt").write_bytes(kept)  # as if not deleted
    folded = open_fold(rd, "bbbbbbbb", 1, fence=False)
    assert folded.committed == [(0, 5)] and folded.committed_samples == 10
    assert folded.slots["n"] == [5]
    assert not [n for n in rd.listdir(DYNAMIC_RECORDS) if n.startswith("rank-")]


def _fenced_attempt(rd: RunDir) -> Dict[str, Any]:
    a = open_fold(rd, "aaaaaaaa", 3, fence=True)  # attempt a: 3 ranks; rank 2 commits nothing
    assert a.live == {"attempt": "aaaaaaaa", "world_size": 3}
    write_rank_record(rd, _record("aaaaaaaa", 0, 0, 0))
    write_rank_record(rd, _record("aaaaaaaa", 1, 0, 1))
    write_rank_record(rd, _record("aaaaaaaa", 0, 1, 2))
    b = open_fold(rd, "bbbbbbbb", 2, fence=True)  # a was frozen; the job of attempt b took over
    return {"b": b}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_start_fences_every_rank_of_the_attempt_before(where: str, tmp_path: Path, request: Any) -> None:
    url = str(tmp_path / "run")
    if where == "s3":
        url = f"{request.getfixturevalue('s3_bucket')}/runs/fence"
    rd = _run_dir(url)
    b = _fenced_attempt(rd)["b"]
    assert b.committed == [(0, 3)]
    for rank, seq in ((0, 2), (1, 1), (2, 0)):  # each rank's next record, the one that never wrote too
        with pytest.raises(RecordTakenError, match="another job"):
            write_rank_record(rd, _record("aaaaaaaa", rank, seq, 10 + rank))
    c = open_fold(rd, "cccccccc", 1, fence=True)
    assert c.committed == [(0, 3)] and c.committed_samples == 6 and sorted(c.slots["n"]) == [1, 2]


def test_a_fold_the_other_job_wrote_first_stops_this_one(tmp_path: Path) -> None:
    rd = _run_dir(str(tmp_path / "run"))
    live = LiveFold(rd, open_fold(rd, "aaaaaaaa", 1, fence=True), "aaaaaaaa")
    _commit_many(rd, "aaaaaaaa", 1, 3)
    other = load_folded(rd, rd.listdir(DYNAMIC_RECORDS))
    open_fold(RunDir(str(tmp_path / "run")), "bbbbbbbb", 1, fence=True)  # takes generation gen + 1
    assert other.gen + 1 == load_folded(rd, rd.listdir(DYNAMIC_RECORDS)).gen
    with pytest.raises(RecordTakenError):
        live.fold([3])
