"""Rank 0's progress bar (tqdm): batches committed of the total, throughput and ETA.

Shown when a person is watching: stderr is a terminal, or the launcher's is (``BATCHPROC_PROGRESS``;
under torchrun the workers write to pipes, so each refresh is written as its own line). Quiet
otherwise, so logs of batch jobs stay clean.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from batchproc.settings import progress_forced


class _Lines:
    """A file that turns tqdm's carriage returns into newlines (pipes are read line by line)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """Samples done by all ranks (rank 0 counts the others' batches as done at its own pace)."""

    def __init__(self, is_chief: bool, done: int, total: int, batch_size: int, dataset_len: int) -> None:
        self._bar: Optional[Any] = None
        self._batch_size, self._n, self._total = batch_size, dataset_len, total
        if not is_chief or total == 0:
            return
        tty = sys.stderr.isatty()
        if not tty and not progress_forced():
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self._samples(total), initial=self._samples(done), unit="sample", desc="batchproc", dynamic_ncols=tty,
                         file=sys.stderr if tty else _Lines(sys.stderr),
                         mininterval=0.5 if tty else 5.0, smoothing=0.1)

    def _samples(self, batches: int) -> int:
        return min(self._n, min(batches, self._total) * self._batch_size)

    def advance(self, done_before: int, done_after: int) -> None:
        """All ranks moved the global batches ``[done_before, done_after)`` forward."""
        if self._bar is not None:
            self._bar.update(self._samples(done_after) - self._samples(done_before))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
