"""The sharded DataLoader: one rank's remaining global batches, with bad-sample handling.

Each item is a :class:`LoadedBatch` carrying the user's collated batch plus the dataset indices it
holds and the samples that failed to load (dropped under ``bad_samples="skip"``).
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from batchproc.errors import BadSampleError
from batchproc.sharding import RankBatchSampler

BAD_SAMPLE_POLICIES = ("raise", "skip")
_REJECTED = {
    "shuffle": "batches are assigned to ranks in dataset order so a resume can skip committed work; "
               "shuffle the dataset itself (e.g. a fixed permutation of indices) if you need another order",
    "sampler": "batchproc builds the sampler that shards the dataset across ranks and skips committed work",
    "batch_sampler": "batchproc builds the batch sampler that shards the dataset across ranks and skips committed work",
    "batch_size": "pass batch_size to torch_batch_process() itself, not in dataloader_kwargs",
    "drop_last": "every sample is processed exactly once; no batch is dropped",
}


def check_dataloader_kwargs(kwargs: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Validate ``dataloader_kwargs``; reject the options that would break sharding or resume."""
    kwargs = dict(kwargs or {})
    for key, why in _REJECTED.items():
        if key not in kwargs:
            continue
        if key == "shuffle" and not kwargs[key]:
            continue
        if key == "drop_last" and not kwargs[key]:
            continue
        raise ValueError(f"dataloader_kwargs[{key!r}] is not supported: {why}.")
    return kwargs


def describe_sample(dataset: Any, index: int) -> str:
    """``sample 12`` or ``sample 12 (/data/x.jpg)`` when the dataset can name its files."""
    name = None
    describe = getattr(dataset, "describe_sample", None)
    if callable(describe):
        try:
            name = describe(index)
        except Exception:
            name = None
    return f"sample {index} ({name})" if name else f"sample {index}"


class _Bad(NamedTuple):
    index: int
    error: str
    description: str


class _IndexedDataset(Dataset):
    """Returns ``(index, sample)``; under "skip" a failing sample becomes a ``_Bad`` marker."""

    def __init__(self, dataset: Dataset, skip_bad: bool) -> None:
        self.dataset = dataset
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return index, self.dataset[index]
        except Exception as e:
            desc = describe_sample(self.dataset, index)
            if self.skip_bad:
                return index, _Bad(index, f"{type(e).__name__}: {e}", desc)
            raise BadSampleError(
                f"loading {desc} of {type(self.dataset).__name__} failed with {type(e).__name__}: {e}. "
                f"Fix or remove it, or pass bad_samples='skip' to drop bad samples and record them "
                f"in errors.jsonl.\n{traceback.format_exc()}") from e


class LoadedBatch(NamedTuple):
    batch: Any  # None when every sample of the batch was bad
    indices: List[int]
    bad: List[Dict[str, Any]]


class _Collate:
    def __init__(self, collate_fn: Callable[[List[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: List[Any]) -> LoadedBatch:
        good, indices, bad = [], [], []
        for index, sample in items:
            if isinstance(sample, _Bad):
                bad.append({"index": sample.index, "sample": sample.description, "error": sample.error})
            else:
                good.append(sample)
                indices.append(index)
        return LoadedBatch(self.collate_fn(good) if good else None, indices, bad)


def build_loader(dataset: Dataset, sampler: RankBatchSampler, dataloader_kwargs: Dict[str, Any],
                 bad_samples: str, device: torch.device) -> DataLoader:
    """A DataLoader over this rank's remaining batches (pinned memory when feeding a GPU)."""
    if bad_samples not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"bad_samples must be one of {BAD_SAMPLE_POLICIES}, got {bad_samples!r}")
    kwargs = dict(dataloader_kwargs)
    collate_fn = kwargs.pop("collate_fn", None) or default_collate
    kwargs.setdefault("pin_memory", device.type == "cuda")
    return DataLoader(_IndexedDataset(dataset, bad_samples == "skip"), batch_sampler=sampler,
                      collate_fn=_Collate(collate_fn), **kwargs)
