"""One failing batch must not stop the job: the per-batch error policy and out-of-memory splitting.

:class:`BatchRunner` calls ``process_batch`` for one loaded batch:

* ``torch.OutOfMemoryError`` (CUDA or CPU): the batch is split in halves along the batch dimension
  and each half retried, recursively down to one sample, with one warning per split; the
  processor sees each piece with its own ``context.batch_indices``. Splitting needs a batch that
  the default collate function made (tensors, and lists, tuples and dicts of them); after a
  custom ``collate_fn`` the error is handled as any other.
* any other exception (or an OOM of a single sample): ``bad_batches="raise"`` raises it as a
  :class:`UserCodeError` naming the rank, the batch and its dataset indices; ``"skip"`` records it
  (global batch, dataset indices, the error and the head of its traceback) to be committed to
  ``errors.jsonl`` with the next checkpoint, and the job goes on.

Rows that a :class:`batchproc.data.writers.RowWriter` buffered for a piece that then raised are dropped
(``context`` tells the writers when a piece starts and when it is dropped), so its samples have no
output rather than half of one.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from batchproc.processor import EngineHandle
from batchproc.errors import UserCodeError
from batchproc.engine.policy import ErrorRecord, SkipPolicy
from batchproc.engine.verdict import is_collective_failure

TRACEBACK_HEAD = 1500  # characters of a skipped batch's traceback kept in errors.jsonl


def batch_size_of(batch: Any) -> Optional[int]:
    """How many samples a default-collated batch holds, or None if it is not one."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, dict):
        sizes = {batch_size_of(v) for v in batch.values()}
    elif isinstance(batch, (list, tuple)) and batch:
        if all(isinstance(v, (str, bytes, int, float)) for v in batch):
            return len(batch)  # what default_collate makes of strings
        sizes = {batch_size_of(v) for v in batch}
    else:
        return None
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def take(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a default-collated batch."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, dict):
        return type(batch)((k, take(v, start, stop)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(v, (str, bytes, int, float)) for v in batch):
        return type(batch)(batch[start:stop])
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(take(v, start, stop) for v in batch))
    return type(batch)(take(v, start, stop) for v in batch)


@dataclasses.dataclass
class BatchRunner:
    """Runs ``process_batch`` under the batch policy; see the module docstring."""

    processor: Any
    engine: EngineHandle  #: the processor's context, as the engine drives it
    rank: int
    world_size: int
    policy: SkipPolicy = SkipPolicy()
    splittable: bool = True  #: False after a custom collate_fn: its batches' layout is unknown
    watchdog: Optional["Watchdog"] = None
    skipped: List[ErrorRecord] = dataclasses.field(default_factory=list)  #: records since the last take

    def run(self, batch: Any, indices: List[int], g: int, batch_idx: Optional[int] = None) -> None:
        """``batch_idx`` is the worker's index of the batch (default: the static schedule's ``g // W``)."""
        self._run(batch, list(indices), g, g // self.world_size if batch_idx is None else batch_idx)

    def take_records(self) -> List[ErrorRecord]:
        records, self.skipped = self.skipped, []
        return records

    def _run(self, batch: Any, indices: List[int], g: int, batch_idx: int) -> None:
        engine = self.engine
        engine.begin_batch(g, indices)
        if self.watchdog is not None:
            self.watchdog.arm(g)
        try:
            self.processor.process_batch(batch, batch_idx)
        except torch.OutOfMemoryError as e:
            engine.drop_batch()
            if self.splittable and len(indices) > 1 and batch_size_of(batch) == len(indices):
                self._split(batch, indices, g, batch_idx, e)
            else:
                self._failed(e, indices, g)
        except Exception as e:
            engine.drop_batch()
            if is_collective_failure(e):  # a peer died under a collective in process_batch: restartable
                raise
            self._failed(e, indices, g)
        finally:
            if self.watchdog is not None:
                self.watchdog.disarm()

    def _split(self, batch: Any, indices: List[int], g: int, batch_idx: int, error: BaseException) -> None:
        half = len(indices) // 2
        print(f"batchproc: warning: rank {self.rank}: out of memory in global batch {g} with {len(indices)} "
              f"samples ({_describe(indices)}); retrying as {half} + {len(indices) - half} "
              f"({str(error).splitlines()[0][:200] if str(error) else type(error).__name__})",
              file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the failed attempt's blocks
        self._run(take(batch, 0, half), indices[:half], g, batch_idx)
        self._run(take(batch, half, len(indices)), indices[half:], g, batch_idx)

    def _failed(self, error: Exception, indices: List[int], g: int) -> None:
        name = type(self.processor).__name__
        if not self.policy.skips:
            raise UserCodeError(
                f"{name}.process_batch() raised {type(error).__name__}: {error} (rank {self.rank}, global batch "
                f"{g}, dataset indices {_describe(indices)}). Work committed before this batch is kept; fix "
                "the error and run again to resume, or pass bad_batches='skip' to record such batches in "
                "errors.jsonl and go on.") from error
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self.skipped.append(ErrorRecord.for_batch(g, indices, f"{type(error).__name__}: {error}"[:1000],
                                                  tb[:TRACEBACK_HEAD]))
        print(f"batchproc: rank {self.rank}: skipped global batch {g} (dataset indices {_describe(indices)}): "
              f"{type(error).__name__}: {str(error)[:300]}", file=sys.stderr, flush=True)


def _describe(indices: List[int]) -> str:
    if len(indices) == 1:
        return str(indices[0])
    if indices and indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return str(indices)


class Watchdog:
    """``batch_timeout_s``: a rank whose batch runs past the limit dumps every thread's stack and
    ends the job at once, rather than leaving its peers blocked until the process group's timeout.

    ``on_expire(g, seconds)`` runs on the watchdog's thread after the dump; it must end the process.
    """

    def __init__(self, timeout_s: float, on_expire: Callable[[int, float], None]) -> None:
        self.timeout_s = timeout_s
        self.on_expire = on_expire
        self._lock = threading.Condition()
        self._armed: Optional[Tuple[int, float]] = None  # (global batch, deadline)
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="batchproc-batch-watchdog", daemon=True)
        self._thread.start()

    def arm(self, g: int) -> None:
        with self._lock:
            self._armed = (g, time.monotonic() + self.timeout_s)
            self._lock.notify()

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()

    def _watch(self) -> None:
        with self._lock:
            while not self._closed:
                if self._armed is None:
                    self._lock.wait()
                    continue
                g, deadline = self._armed
                left = deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                break
            else:
                return
        sys.stderr.write(f"batchproc: global batch {g} ran past batch_timeout_s={self.timeout_s:g}; "
                         "the stacks of every thread follow\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self.on_expire(g, self.timeout_s)
