"""TableRows.load_batch: batches built from Arrow columns are what the default collate makes of the rows.

batchproc's loader asks a dataset with ``load_batch`` for the whole batch when the collate
function is the default one; these tests hold it to ``default_collate(ds.__getitems__(indices))``
(same keys in the same order, same dtypes, same values, the same error where the rows have no
collate), and check through real runs that a user's ``collate_fn`` still gets row dicts and that
a bad JSON line is one bad sample.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data._utils.collate import default_collate

from batchproc import TorchBatchProcessor, torch_batch_process
from batchproc.tables import TableRows
from tests.test_tables import SPLIT, clean_env, errors_of, rows_of, write_table  # noqa: F401  # clean_env: a fixture


def same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_a_batch_is_the_default_collate_of_its_rows(tmp_path: Path, fmt: str) -> None:
    for name, ids in SPLIT.items():
        write_table(tmp_path / f"{name}.{fmt}", rows_of(ids))
    for columns in (None, ["score", "id"]):
        ds = TableRows(tmp_path, columns=columns)
        # within a chunk, across chunks and files, out of order, the last rows, one row
        for idx in (list(range(256)), list(range(250, 1400)), [2700, 5, 1500, 299, 300], list(range(2790, 2800)), [7]):
            got = ds.load_batch(idx)
            assert got.good == list(range(len(idx))) and not got.errors
            same(got.batch, default_collate(ds.__getitems__(idx)))
        got = ds.load_batch([5, 9999, 6])  # not in range: that row alone fails
        assert got.good == [0, 2] and [k for k, _ in got.errors] == [1]
        assert isinstance(got.errors[0][1], IndexError)


def test_arrow_types_collate_as_their_python_values_do(tmp_path: Path) -> None:
    n = 10
    pq.write_table(pa.table({
        "i32": pa.array(range(n), pa.int32()), "u8": pa.array(range(n), pa.uint8()),
        "f32": pa.array([x / 3 for x in range(n)], pa.float32()), "b": [x % 2 == 0 for x in range(n)],
        "s": ["a", None] * (n // 2), "lst": [[1, 2]] * n,
        "u64": pa.array([2**63 + 5] * n, pa.uint64()), "nulls": pa.array([None] + list(range(n - 1)), pa.int64()),
    }), tmp_path / "t.parquet", row_group_size=4)
    idx = list(range(n))
    ds = TableRows(tmp_path, columns=["i32", "u8", "f32", "b", "s", "lst"])
    same(ds.load_batch(idx).batch, default_collate(ds.__getitems__(idx)))
    for column, error in (("u64", ValueError), ("nulls", TypeError)):  # no tensor for these rows either
        ds = TableRows(tmp_path, columns=[column])
        with pytest.raises(error):
            default_collate(ds.__getitems__(idx))
        with pytest.raises(error):
            ds.load_batch(idx)


class Seen(TorchBatchProcessor):
    batches: List[Any] = []

    def process_batch(self, batch: Any, batch_idx: int) -> None:
        Seen.batches.append((list(self.context.batch_indices), batch))


def test_a_users_collate_fn_gets_row_dicts_and_a_bad_json_line_is_one_bad_sample(
        tmp_path: Path, clean_env: Any) -> None:  # noqa: F811
    data = tmp_path / "data"
    write_table(data / "a.jsonl", rows_of(range(30)))
    lines = (data / "a.jsonl").read_text().splitlines()
    lines[12] = "{not json"
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    Seen.batches = []
    torch_batch_process(Seen, TableRows(data, columns=["id"]), batch_size=10, storage=str(tmp_path / "run1"),
                        bad_samples="skip", dataloader_kwargs={"collate_fn": lambda rows: rows, "num_workers": 0})
    assert [b for _, b in Seen.batches][0] == [{"id": i} for i in range(10)]
    assert Seen.batches[1][1] == [{"id": i} for i in range(10, 20) if i != 12]
    Seen.batches = []
    torch_batch_process(Seen, TableRows(data, columns=["id"]), batch_size=10, storage=str(tmp_path / "run2"),
                        bad_samples="skip", dataloader_kwargs={"num_workers": 1})
    assert [i for i, _ in Seen.batches][1] == [i for i in range(10, 20) if i != 12]
    assert torch.equal(Seen.batches[1][1]["id"], torch.tensor([i for i in range(10, 20) if i != 12]))
    errors = errors_of(tmp_path / "run2")
    assert [e["index"] for e in errors] == [12]
    assert f"{data / 'a.jsonl'} row 12" in errors[0]["sample"] and "not a JSON line" in errors[0]["error"]
