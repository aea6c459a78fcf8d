"""TableRows (batchproc.tables): rows of Parquet, JSON Lines and CSV files, frozen per run.

Unit: row order over several files, columns, each format (an empty file included), the errors
for files of another format, describe_sample. Then real runs: a file rewritten between attempts
is bad samples naming it under "skip" and an error naming it under "raise"; Parquet on S3
(moto's server) read by ranged requests, counted on the server; and a 2-rank job through
torchrun, preempted then resumed, outputs every id exactly once.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchproc import torch_batch_process
from batchproc.data.inputs import Manifest
from batchproc.data.writers import read_rows
from batchproc.errors import BadSampleError
from batchproc.tables import TableRows
from batchproc.data.tables import CHUNKS_AHEAD

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "scripts" / "table_job.py"
_spec = importlib.util.spec_from_file_location("table_job", JOB)
assert _spec and _spec.loader
table_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table_job)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for k in list(os.environ):
        if k.startswith("BATCHPROC_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                "TORCHELASTIC_RESTART_COUNT"):
            monkeypatch.delenv(k)
    return monkeypatch


def assert_third_file_skipped(result: Any, run: Path, changed: Path) -> None:
    """Four files of 100 rows in batches of 50, the third (rows 200-299) ``changed`` after the first
    attempt: the run completed, every other row is output once, and each of those 100 is a bad
    sample in errors.jsonl, named by the file and its row there."""
    assert result.completed and result.total_batches == 8
    ids = collections.Counter(r["id"] for r in read_rows(str(run)))
    assert sorted(ids) == [i for i in range(400) if not 200 <= i < 300] and set(ids.values()) == {1}
    errors = errors_of(run)
    assert sorted(e["index"] for e in errors) == list(range(200, 300))
    for e in errors:
        assert f"{changed} row {e['index'] - 200}" in e["sample"] and "InputChangedError" in e["error"], e


def rows_of(ids: range) -> List[Dict[str, Any]]:
    return [{"id": i, "text": f"doc {i}, \"quoted\"\nsecond line", "score": i / 4} for i in ids]


def write_table(path: Path, rows: List[Dict[str, Any]], row_group_size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.name.split(".", 1)[1]
    if fmt == "parquet":
        schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("score", pa.float64())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["id", "text", "score"])
            w.writeheader()
            w.writerows(rows)


# Three files out of name order on disk, of 300, 0 and 2500 rows (the middle one empty): the
# JSON Lines and CSV files span several chunks of 1,024 rows.
SPLIT = {"b": range(300, 2800), "a": range(0, 300), "a2": range(300, 300)}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_rows_follow_sorted_paths_with_columns_and_an_empty_file(tmp_path: Path, fmt: str) -> None:
    for name, ids in SPLIT.items():
        write_table(tmp_path / "t" / f"{name}.{fmt}", rows_of(ids))
    (tmp_path / "t" / "README.md").write_text("not rows")  # a folder's other files are left out
    (tmp_path / "t" / "_SUCCESS").write_text("")
    ds = TableRows(tmp_path / "t")
    assert len(ds) == 2800 and list(ds.rows_per_file) == [300, 0, 2500]
    assert [Path(p).name for p in ds.files] == [f"a.{fmt}", f"a2.{fmt}", f"b.{fmt}"]
    every = ds.__getitems__(list(range(len(ds))))
    assert every == rows_of(range(2800))
    assert ds[2799] == rows_of(range(2799, 2800))[0] and ds[-1] == ds[2799]
    some = [2700, 5, 1500, 299, 300]  # any order, across files and chunks
    assert ds.__getitems__(some) == [rows_of(range(i, i + 1))[0] for i in some]
    assert ds.describe_sample(300) == f"{tmp_path / 't' / f'b.{fmt}'} row 0"
    assert ds.describe_sample(2799) == f"{tmp_path / 't' / f'b.{fmt}'} row 2499"
    ids = TableRows(tmp_path / "t", columns=["id"])
    assert ids[1234] == {"id": 1234}
    glob = TableRows(str(tmp_path / "t" / f"b.{fmt}"), columns=["score", "id"])
    assert len(glob) == 2500 and glob[0] == {"score": 75.0, "id": 300}
    with pytest.raises(IndexError):
        ds[2800]


def test_the_manifest_is_columnar_and_round_trips(tmp_path: Path) -> None:
    for k in range(3):
        write_table(tmp_path / f"p{k}.parquet", rows_of(range(k * 200, k * 200 + 200)), row_group_size=50)
    ds = TableRows(str(tmp_path / "*.parquet"))
    m = ds.batchproc_list_inputs()
    assert len(m) == 3 and all(isinstance(a, np.ndarray) for a in m.extra.values())
    assert list(m.extra["chunk_row"]) == list(range(0, 601, 50))  # one chunk per row group
    back = Manifest.from_bytes(m.to_bytes())
    assert sorted(back.extra) == sorted(m.extra)
    assert all(np.array_equal(back.extra[k], m.extra[k]) for k in m.extra)
    other = TableRows(str(tmp_path / "*.parquet"))
    other.batchproc_use_inputs(back)
    assert other[599]["id"] == 599


def test_files_of_another_format_are_errors_naming_them(tmp_path: Path) -> None:
    write_table(tmp_path / "a.parquet", rows_of(range(10)))
    write_table(tmp_path / "b.csv", rows_of(range(10)))
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match=r"b\.csv is csv, but .*a\.parquet is parquet"):
        len(TableRows(str(tmp_path / "[ab].*")))
    with pytest.raises(ValueError, match=r"c\.txt has no table suffix.*format="):
        len(TableRows(str(tmp_path / "[ac].*")))
    with pytest.raises(ValueError, match=r"b\.csv is csv by its suffix, not parquet"):
        len(TableRows(str(tmp_path / "[ab].*"), format="parquet"))
    with pytest.raises(ValueError, match=r"c\.txt is not a Parquet file"):
        len(TableRows(str(tmp_path / "c.txt"), format="parquet"))
    with pytest.raises(ValueError, match=r"a\.parquet has no column 'nope'"):
        len(TableRows(str(tmp_path / "a.parquet"), columns=["nope"]))
    with pytest.raises(ValueError, match="format must be one of"):
        TableRows(str(tmp_path), format="xlsx")
    with pytest.raises(FileNotFoundError, match="no such file"):
        TableRows(str(tmp_path / "missing"))
    (tmp_path / "rows.txt").write_text('{"id": 1}\n\n{"id": 2}\n')
    assert TableRows(str(tmp_path / "rows.txt"), format="jsonl").__getitems__([0, 1]) == [{"id": 1}, {"id": 2}]


# -- frozen inputs through real runs -------------------------------------------------------------


def run_job(source: str, storage: str, *, stop_at: Optional[int] = None, bad_samples: str = "skip",
            num_workers: int = 0, env: pytest.MonkeyPatch) -> Any:
    if stop_at is None:
        env.delenv("BATCHPROC_FAULT", raising=False)
    else:
        env.setenv("BATCHPROC_FAULT", f"stop@step={stop_at}")
    return torch_batch_process(table_job.Ids, TableRows(source, columns=["id"]), batch_size=50,
                               checkpoint_interval=100, storage=storage, bad_samples=bad_samples,
                               dataloader_kwargs={"num_workers": num_workers})


def errors_of(run: Path) -> List[Dict[str, Any]]:
    f = run / "errors.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_file_rewritten_between_attempts_is_bad_samples_naming_it(tmp_path: Path, clean_env: pytest.MonkeyPatch,
                                                                    fmt: str) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    for k in range(4):
        write_table(data / f"part{k}.{fmt}", rows_of(range(k * 100, k * 100 + 100)), row_group_size=25)
    first = run_job(str(data), str(run), stop_at=1, env=clean_env)  # batches 0-1 (part0) committed
    assert first.preempted and first.steps_completed == 2
    changed = data / f"part2.{fmt}"
    write_table(changed, rows_of(range(900, 1000)), row_group_size=25)  # the same row count, other rows
    write_table(data / f"part9.{fmt}", rows_of(range(5000, 5100)))  # added later: not part of the run
    os.utime(changed, (1, 1))  # a rewrite within the mtime's resolution still differs
    second = run_job(str(data), str(run), num_workers=1, env=clean_env)
    assert_third_file_skipped(second, run, changed)


def test_a_file_rewritten_between_attempts_under_raise_is_an_error_naming_it(tmp_path: Path,
                                                                           clean_env: pytest.MonkeyPatch) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    for k in range(4):
        write_table(data / f"part{k}.csv", rows_of(range(k * 100, k * 100 + 100)))
    assert run_job(str(data), str(run), stop_at=1, bad_samples="raise", env=clean_env).preempted
    changed = data / "part3.csv"
    write_table(changed, rows_of(range(700, 790)))
    with pytest.raises(BadSampleError, match=rf"{changed} row 0\).*changed since the run's inputs were frozen"):
        run_job(str(data), str(run), bad_samples="raise", env=clean_env)


# -- on S3 (moto's server) ---------------------------------------------------------------------


def test_parquet_on_s3_is_read_by_row_group_and_checked(tmp_path: Path, clean_env: pytest.MonkeyPatch,
                                                        s3_server: Dict[str, Any], s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": s3_server["endpoint"]})
    local = tmp_path / "local"
    for k in range(3):
        write_table(local / f"p{k}.parquet", rows_of(range(k * 100, k * 100 + 100)), row_group_size=20)
        fs.put_file(str(local / f"p{k}.parquet"), f"{s3_bucket}/t/p{k}.parquet")
    ds = TableRows(f"{s3_bucket}/t", columns=["id", "text"])
    assert len(ds) == 300 and ds.manifest.version_kind == "etag"
    assert ds.__getitems__(list(range(300))) == [{"id": r["id"], "text": r["text"]} for r in rows_of(range(300))]
    assert ds.describe_sample(150) == f"{s3_bucket}/t/p1.parquet row 50"
    # Replaced with as many rows: its ETag tells. Only its rows fail, each naming it.
    write_table(local / "p1.parquet", rows_of(range(600, 700)), row_group_size=20)
    fs.put_file(str(local / "p1.parquet"), f"{s3_bucket}/t/p1.parquet")
    fresh = TableRows(f"{s3_bucket}/t", columns=["id"])
    fresh.batchproc_use_inputs(ds.manifest)  # the frozen listing
    got = fresh.load_samples([0, 120, 299])
    assert got[0] == {"id": 0} and got[2] == {"id": 299}
    assert isinstance(got[1], Exception) and "p1.parquet changed since" in str(got[1])
    # A whole run from S3 with a loader worker fetching ahead: every row once.
    run = tmp_path / "run"
    fs.put_file(str(local / "p1.parquet"), f"{s3_bucket}/t/p1.parquet")
    assert run_job(f"{s3_bucket}/t", str(run), num_workers=1, env=clean_env).completed
    assert sorted(r["id"] for r in read_rows(str(run))) == [*range(100), *range(200, 300), *range(600, 700)]


def test_each_row_group_is_one_ranged_request(tmp_path: Path, s3_server: Dict[str, Any], s3_bucket: str) -> None:
    """Counted on the server: the footer once, then one GET per row group a batch touches (and
    one for the row group after them, read ahead)."""
    from tests.test_manifest import CountingS3Server

    counting = CountingS3Server()
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": counting.endpoint})
        write_table(tmp_path / "p.parquet", rows_of(range(1000)), row_group_size=100)
        fs.put_file(str(tmp_path / "p.parquet"), f"{s3_bucket}/p.parquet")
        ds = TableRows(f"{s3_bucket}/p.parquet", columns=["id"], storage_options={
            "client_kwargs": {"endpoint_url": counting.endpoint}})
        len(ds)

        def reads(suffix: str) -> int:  # ranged GETs answer 206; the reads ahead in flight counted once done
            for pending in list(ds._reader.pending.values()) if ds._reader else []:
                pending.exception()
            return sum(1 for m, path, _, status in counting.requests
                       if m == "GET" and path.endswith(suffix) and status in (200, 206))

        before = reads("p.parquet")
        assert [r["id"] for r in ds.__getitems__(list(range(150, 350)))] == list(range(150, 350))
        ahead = CHUNKS_AHEAD
        assert ahead <= 4  # of the file's 10 row groups, one is left for the window to move onto
        assert reads("p.parquet") - before == 1 + 3 + ahead  # footer, row groups 1, 2, 3, and the next read ahead
        ds.__getitems__(list(range(350, 450)))  # 3 is still decoded, 4 was fetched: only one more is read (ahead)
        assert reads("p.parquet") - before == 1 + 3 + ahead + 1
    finally:
        counting.stop()


# -- through the launcher ----------------------------------------------------------------------


def test_two_ranks_preempted_then_resumed_output_every_id_once(procs: Any, tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    for k, fmt in enumerate(["parquet"] * 3):
        write_table(data / f"p{k}.{fmt}", rows_of(range(k * 200, k * 200 + 200)), row_group_size=30)
    args = [str(JOB), str(data), str(run), "20", "2", "skip", "1"]
    from tests.support import base_env

    first = procs.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "--max-restarts=0", "--monitor-interval=0.2", *args],
                      env=base_env({"BATCHPROC_FAULT": "stop@step=4"}), timeout=180)
    assert first.rc == 0 and '"preempted": true' in first.out, first.out
    done = len(read_rows(str(run)))
    assert 0 < done < 600
    second = procs.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "--max-restarts=0", "--monitor-interval=0.2", *args], env=base_env(), timeout=180)
    assert second.rc == 0 and '"completed": true' in second.out, second.out
    ids = collections.Counter(r["id"] for r in read_rows(str(run)))
    assert sorted(ids) == list(range(600)) and set(ids.values()) == {1}
    assert not (run / "errors.jsonl").exists()
