"""TableRows over gzip JSON Lines and CSV (``.jsonl.gz``, ``.ndjson.gz``, ``.csv.gz``).

A gzip stream cannot be entered in the middle, so a process reads each file forward from its
start. These check, through the real loader, that the rows are exactly those of the plain files
(a run preempted and resumed included, which starts the stream over), that ``describe_sample``
names the ``.gz`` file, that a file rewritten between attempts is bad samples naming it, and the
same on S3 (moto's server).
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Any, Dict

import pytest

from batchproc.tables import TableRows
from tests.test_tables import SPLIT, assert_third_file_skipped, clean_env, rows_of, run_job, write_table  # noqa: F401  # clean_env: a fixture


def gzip_of(plain: Path, gz: Path) -> None:
    gz.parent.mkdir(parents=True, exist_ok=True)
    with open(plain, "rb") as a, gzip.open(gz, "wb") as b:
        shutil.copyfileobj(a, b)


def write_gz(path: Path, rows: Any) -> None:
    """``rows`` as ``path`` (``x.jsonl.gz``, ``x.csv.gz``): the plain file's bytes, gzipped."""
    plain = path.parent.parent / "plain" / path.name[:-3]  # outside the folder read
    write_table(plain, rows)
    gzip_of(plain, path)
    plain.unlink()


@pytest.mark.parametrize("fmt", ["jsonl", "ndjson", "csv"])
def test_gzip_rows_are_the_plain_files_rows(tmp_path: Path, fmt: str) -> None:
    for name, ids in SPLIT.items():  # 300, 0 and 2,500 rows: several chunks of 1,024
        write_table(tmp_path / "plain" / f"{name}.{'jsonl' if fmt == 'ndjson' else fmt}", rows_of(ids))
        gzip_of(tmp_path / "plain" / f"{name}.{'jsonl' if fmt == 'ndjson' else fmt}", tmp_path / "gz" / f"{name}.{fmt}.gz")
    plain, gz = TableRows(tmp_path / "plain"), TableRows(tmp_path / "gz")
    assert len(gz) == 2800 and list(gz.rows_per_file) == [300, 0, 2500]
    assert gz.__getitems__(list(range(2800))) == plain.__getitems__(list(range(2800)))
    some = [2700, 5, 1500, 299, 300]  # backwards too: the stream is opened again
    assert gz.__getitems__(some) == [rows_of(range(i, i + 1))[0] for i in some]
    assert gz.describe_sample(2799) == f"{tmp_path / 'gz' / f'b.{fmt}.gz'} row 2499"
    assert TableRows(tmp_path / "gz", columns=["id"])[1234] == {"id": 1234}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_gzip_run_resumed_outputs_every_row_once_and_a_rewritten_file_is_bad_samples(
        tmp_path: Path, clean_env: pytest.MonkeyPatch, fmt: str) -> None:  # noqa: F811
    data, run = tmp_path / "data", tmp_path / "run"
    for k in range(4):
        write_gz(data / f"part{k}.{fmt}.gz", rows_of(range(k * 100, k * 100 + 100)))
    first = run_job(str(data), str(run), stop_at=2, env=clean_env)  # batches 0-2 committed
    assert first.preempted and first.steps_completed == 3
    changed = data / f"part2.{fmt}.gz"
    write_gz(changed, rows_of(range(900, 1000)))  # as many rows, other ones
    os.utime(changed, (1, 1))
    second = run_job(str(data), str(run), num_workers=1, env=clean_env)  # resumes inside part1
    assert_third_file_skipped(second, run, changed)


def test_gzip_on_s3_is_read_and_checked(tmp_path: Path, s3_server: Dict[str, Any], s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": s3_server["endpoint"]})
    for k in range(2):
        write_gz(tmp_path / f"p{k}.jsonl.gz", rows_of(range(k * 1500, k * 1500 + 1500)))
        fs.put_file(str(tmp_path / f"p{k}.jsonl.gz"), f"{s3_bucket}/gz/p{k}.jsonl.gz")
    ds = TableRows(f"{s3_bucket}/gz", columns=["id"])
    assert len(ds) == 3000 and ds.manifest.version_kind == "etag"
    assert ds.__getitems__(list(range(3000))) == [{"id": i} for i in range(3000)]
    write_gz(tmp_path / "p1.jsonl.gz", rows_of(range(5000, 6500)))  # its ETag tells
    fs.put_file(str(tmp_path / "p1.jsonl.gz"), f"{s3_bucket}/gz/p1.jsonl.gz")
    fresh = TableRows(f"{s3_bucket}/gz", columns=["id"])
    fresh.batchproc_use_inputs(ds.manifest)
    got = fresh.load_samples([0, 1600, 1499])
    assert got[0] == {"id": 0} and got[2] == {"id": 1499}
    assert isinstance(got[1], Exception) and "p1.jsonl.gz changed since" in str(got[1])


def test_a_gz_file_that_is_not_gzip_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl.gz").write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl\.gz is not a readable gzip file"):
        len(TableRows(tmp_path))
