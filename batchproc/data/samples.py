"""What the file datasets (``ImageFiles``, ``TableRows``) share: items served from ``load_samples``.

A dataset that loads a batch at once implements ``load_samples(indices)`` (each sample, or the
exception loading it raised) and ``__len__``; :class:`BatchLoads` gives it torch's item protocol
on top: ``ds[i]`` and ``ds.__getitems__(indices)`` (torch's DataLoader calls the latter with a
whole batch), raising the first failure. batchproc's loader calls ``load_samples`` itself, so a
bad sample is one bad sample there, not a failed batch.

A dataset may also implement ``load_batch(indices) -> CollatedBatch``: the batch as torch's
``default_collate`` would build it from the samples that loaded, without building them one by
one (``TableRows`` goes from Arrow columns straight to tensors). batchproc's loader uses it only
when the collate function is the default one; a user's own ``collate_fn`` gets the samples.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Sequence, Tuple

from torch.utils.data._utils.collate import default_collate

from batchproc.data.inputs import index_in


class CollatedBatch(NamedTuple):
    """A batch already collated. ``batch``: ``default_collate`` of the samples that loaded (None
    when none did); ``good``: their positions in the indices asked for, in order; ``errors``:
    ``(position, exception)`` of each sample that failed."""

    batch: Any
    good: List[int]
    errors: List[Tuple[int, BaseException]]


def collate_samples(samples: Sequence[Any]) -> CollatedBatch:
    """``load_samples``' answer (samples and exceptions) as a :class:`CollatedBatch`."""
    good = [k for k, s in enumerate(samples) if not isinstance(s, BaseException)]
    errors = [(k, s) for k, s in enumerate(samples) if isinstance(s, BaseException)]
    batch = default_collate([samples[k] for k in good]) if good else None  # type: ignore[no-untyped-call]
    return CollatedBatch(batch, good, errors)


class BatchLoads:
    """``__getitem__``, ``__getitems__`` and index checks over ``load_samples`` and ``__len__``."""

    #: What the dataset's items are, for the out-of-range message ("index 9 out of range for 3 rows").
    item_noun = "samples"

    def __len__(self) -> int:
        raise NotImplementedError

    def load_samples(self, indices: Sequence[int]) -> List[Any]:
        raise NotImplementedError

    def _index(self, i: int) -> int:
        """``i`` as a non-negative index (negatives count from the end); IndexError out of range."""
        return index_in(i, len(self), self.item_noun)

    def __getitems__(self, indices: Sequence[int]) -> List[Any]:
        """A batch's samples (torch's DataLoader calls this with the batch's indices)."""
        items = self.load_samples(indices)
        for item in items:
            if isinstance(item, BaseException):
                raise item
        return items

    def __getitem__(self, i: int) -> Any:
        item = self.load_samples([i])[0]
        if isinstance(item, BaseException):
            raise item
        return item


__all__ = ["BatchLoads", "CollatedBatch", "collate_samples"]
