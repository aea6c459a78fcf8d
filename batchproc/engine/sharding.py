"""Exact round-robin batch sharding: pure arithmetic over (watermark G, world size W, rank r).

Global batches ``g = 0 .. B-1`` cover the dataset in order. After a resume the remaining work is
``[G, B)``; rank ``r`` of ``W`` takes ``g = G + k*W + r`` for ``k = 0, 1, ...``. Every rank runs
:func:`steps_per_rank` steps; at the last step a rank may have no batch and only takes part in the
collectives. After ``k`` steps on every rank, all batches below ``G + k*W`` are done, so that is
the next watermark (:func:`watermark_after`).

Gotchas, stated plainly (as Determined's ``DistributedBatchSampler`` does):
* ranks may differ by one batch; no sample is padded or duplicated to even them out;
* the last global batch may be short (``N`` not divisible by ``batch_size``).
"""

from __future__ import annotations

from typing import Iterator, List, Optional


def num_batches(dataset_len: int, batch_size: int, max_batches: Optional[int] = None,
                world_size: int = 1) -> int:
    """Total global batches of a job: ``ceil(N / batch_size)``, capped at ``max_batches * W``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = -(-dataset_len // batch_size)
    if max_batches is not None:
        total = min(total, max_batches * world_size)
    return total


def steps_per_rank(watermark: int, total: int, world_size: int) -> int:
    """Steps every rank runs to finish ``[watermark, total)``: ``ceil((total - G) / W)``."""
    return max(0, -(-(total - watermark) // world_size))


def global_batch(watermark: int, world_size: int, rank: int, step: int) -> int:
    """The global batch that ``rank`` processes at ``step`` (may be >= total at the last step)."""
    return watermark + step * world_size + rank


def rank_batches(watermark: int, total: int, world_size: int, rank: int) -> range:
    """Global batch ids of ``rank``, in processing order."""
    return range(watermark + rank, total, world_size)


def watermark_after(watermark: int, total: int, world_size: int, steps: int) -> int:
    """The committed watermark once every rank has run ``steps`` steps from ``watermark``."""
    return min(total, watermark + steps * world_size)


def batch_indices(g: int, batch_size: int, dataset_len: int) -> range:
    """Dataset indices of global batch ``g``."""
    start = g * batch_size
    return range(start, min(start + batch_size, dataset_len))


class RankBatchSampler:
    """A ``batch_sampler`` yielding the dataset indices of one rank's remaining global batches.

    Skipping committed work is O(1): batches below the watermark are never produced, so none of
    their samples are loaded.
    """

    def __init__(self, dataset_len: int, batch_size: int, total: int, watermark: int,
                 world_size: int, rank: int) -> None:
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.batches = rank_batches(watermark, total, world_size, rank)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[List[int]]:
        for g in self.batches:
            yield list(batch_indices(g, self.batch_size, self.dataset_len))
