"""Next-batch copy to the GPU on a side stream, so the host-to-device transfer overlaps compute.

Determined's API hands ``process_batch`` a host batch and lets the processor call
``context.to_device``. To keep that contract, the prefetcher does not replace the batch: it copies
the *next* batch's tensors to the device on a side stream while the current batch runs, and
``to_device`` returns those copies for the very tensor objects it was given (any sub-structure of
the batch). Tensors the processor never moves cost one idle device copy until the next batch.

Opt in with ``BATCHPROC_DEVICE_PREFETCH=1`` (CUDA only). It has not yet been measured on a GPU,
so it stays off by default: see docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

from batchproc.settings import device_prefetch_requested

#: id(host tensor) -> (host tensor, its device copy); the host tensor is held so its id stays unique.
DeviceCopies = Dict[int, Tuple[torch.Tensor, torch.Tensor]]


def device_prefetch_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and device_prefetch_requested()


class DevicePrefetcher:
    """Wraps an iterator of loaded batches; each item comes with its tensors' device copies.

    Like torchtnt's ``CudaDataPrefetcher``: taking item ``i`` starts the copy of item ``i + 1``
    on the side stream, and the compute stream waits for that copy only when ``i + 1`` is taken.
    """

    def __init__(self, items: Iterator[Any], device: torch.device,
                 batch_of: Callable[[Any], Any] = lambda item: item) -> None:
        self._items = items
        self._device = device
        self._batch_of = batch_of
        self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        self._next: Optional[Tuple[Any, DeviceCopies]] = None
        self._preload()

    def _preload(self) -> None:
        try:
            item = next(self._items)
        except StopIteration:
            self._next = None
            return
        copies: DeviceCopies = {}
        with torch.cuda.stream(self._stream):
            _copy_tensors(self._batch_of(item), self._device, copies)
        self._next = (item, copies)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Tuple[Any, DeviceCopies]:
        if self._next is None:
            raise StopIteration
        item, copies = self._next
        current = torch.cuda.current_stream(self._device)
        current.wait_stream(self._stream)
        for _, dev in copies.values():
            dev.record_stream(current)  # allocated on the side stream, used on this one
        self._preload()
        return item, copies


def _copy_tensors(data: Any, device: torch.device, out: DeviceCopies) -> None:
    if isinstance(data, torch.Tensor):
        if data.device.type == "cpu" and id(data) not in out:
            out[id(data)] = (data, data.to(device, non_blocking=data.is_pinned()))
    elif isinstance(data, dict):
        for v in data.values():
            _copy_tensors(v, device, out)
    elif isinstance(data, (list, tuple)):
        for v in data:
            _copy_tensors(v, device, out)
