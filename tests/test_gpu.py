"""CUDA paths: run only where a GPU is present (CI has none; see docs/BENCHMARKS.md, row h)."""

from __future__ import annotations

import pytest
import torch

from batchproc import MetricReducer, TorchBatchProcessor, torch_batch_process
from batchproc.settings import ENV_DEVICE_PREFETCH

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Rows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int):
        return {"x": torch.full((64,), float(i)), "i": i}


class _Sum(MetricReducer):
    def reset(self):
        self.total, self.where = 0.0, set()

    def update(self, total, where):
        self.total += total
        self.where.add(where)

    def per_slot_reduce(self):
        return self.total, sorted(self.where)

    def cross_slot_reduce(self, slots):
        return {"sum": sum(s[0] for s in slots), "devices": sorted({d for s in slots for d in s[1]})}


class _Proc(TorchBatchProcessor):
    def __init__(self, context):
        super().__init__(context)
        self.sum = context.wrap_reducer(_Sum())

    def process_batch(self, batch, batch_idx):
        x = self.context.to_device(batch["x"])
        torch.cuda._sleep(1_000_000)  # keep the stream busy so a missing wait would show
        self.sum.update(float(x.sum().item()), x.device.type)


@pytest.mark.parametrize("prefetch", ["0", "1"])
def test_cuda_run_sums_every_sample_once_with_and_without_prefetch(tmp_path, monkeypatch, prefetch):
    monkeypatch.setenv(ENV_DEVICE_PREFETCH, prefetch)
    result = torch_batch_process(_Proc, _Rows(), batch_size=32, checkpoint_interval=7, storage=str(tmp_path / "run"))
    assert result.completed
    assert result.metrics["devices"] == ["cuda"]
    assert result.metrics["sum"] == 64 * sum(range(1000))
