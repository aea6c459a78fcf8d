"""batchproc.plain.to_plain, the one tensor-to-plain converter: what rows and metrics become.

Rows (JSONL/Parquet) keep shapes: a one-element tensor of shape (1,) stays a one-item list, so a
column has one type whatever a batch holds. Metrics become numbers where a torch tensor holds one
value; numpy arrays keep their shape; what JSON cannot hold becomes its repr.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from batchproc.plain import to_plain


@pytest.mark.parametrize("value,row,metric", [
    (torch.tensor(3.5), 3.5, 3.5),                       # 0-d tensor: a number in both
    (torch.tensor(7), 7, 7),
    (torch.tensor([3.5]), [3.5], 3.5),                   # one element: a list in rows, a number in metrics
    (torch.tensor([[2]]), [[2]], 2),
    (torch.tensor([1.0, 2.0]), [1.0, 2.0], [1.0, 2.0]),  # more: a list in both
    (torch.zeros(0), [], []),
    (np.float32(1.5), 1.5, 1.5),                         # numpy scalars: numbers
    (np.int64(4), 4, 4),
    (np.bool_(True), True, True),
    (np.array([1.5]), [1.5], [1.5]),                     # numpy arrays keep their shape in both
    (np.arange(4).reshape(2, 2), [[0, 1], [2, 3]], [[0, 1], [2, 3]]),
    ("text", "text", "text"),
    (None, None, None),
])
def test_tensors_and_numpy_values(value, row, metric):
    got_row, got_metric = to_plain(value), to_plain(value, for_metrics=True)
    assert got_row == row and type(got_row) is type(row)
    assert got_metric == metric and type(got_metric) is type(metric)


def test_nested_dicts_and_lists():
    value = {"a": [torch.tensor([1]), (np.int32(2), {"b": torch.tensor(3.0)})], 5: torch.tensor([[1, 2]])}
    assert to_plain(value) == {"a": [[1], [2, {"b": 3.0}]], "5": [[1, 2]]}
    assert to_plain(value, for_metrics=True) == {"a": [1, [2, {"b": 3.0}]], "5": [[1, 2]]}
    json.dumps(to_plain(value, for_metrics=True))


def test_other_values_pass_in_rows_and_become_repr_in_metrics():
    class Thing:
        def __repr__(self) -> str:
            return "Thing()"

    thing = Thing()
    assert to_plain({"t": thing, "b": b"\x00"}) == {"t": thing, "b": b"\x00"}  # Arrow/json decide
    assert to_plain({"t": thing, "b": b"\x00"}, for_metrics=True) == {"t": "Thing()", "b": "b'\\x00'"}
