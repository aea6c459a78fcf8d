"""Run a text example (``examples/embed_texts.py``, ``examples/generate_texts.py``) with test hooks.

The example's code runs unchanged; this only wraps two of its functions so that a signal lands
where a test wants it (tests/test_text_jobs.py). Knobs (environment):

``TEXT_JOB_MARK``
    prefix of the marker files below (required with either hook).
``TEXT_JOB_PAUSE_AFTER=N``
    after its N-th batch of this attempt, each rank writes ``<mark>.paused.r<rank>`` and waits
    (up to 120 s) for a SIGTERM, so that a preemption lands with some but not all batches done.
``TEXT_JOB_BLOCK_UPSERT=1``
    after the first Chroma upsert of ``on_finish``, rank 0 writes ``<mark>.blocked`` and sleeps,
    so that a SIGKILL lands between upserts.

Usage: text_job.py EXAMPLE.py [ARGS...]
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from batchproc import TorchBatchProcessor


def _rank() -> str:
    return os.environ.get("RANK", "0")


def _touch(suffix: str) -> None:
    Path(f"{os.environ['TEXT_JOB_MARK']}.{suffix}").write_text(str(os.getpid()))


def _wait_for_sigterm(limit_s: float = 120) -> None:
    got = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        got.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    try:
        _touch(f"paused.r{_rank()}")
        deadline = time.monotonic() + limit_s
        while not got.is_set() and time.monotonic() < deadline:
            got.wait(0.1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if got.is_set() and not callable(previous):  # batchproc's handler was not a Python one: resend
            os.kill(os.getpid(), signal.SIGTERM)


def _pause_after(cls: type, n: int) -> None:
    original = cls.process_batch
    done = [0]

    def process_batch(self: Any, batch: Any, batch_idx: int) -> None:
        original(self, batch, batch_idx)
        done[0] += 1
        if done[0] == n:
            _wait_for_sigterm()

    cls.process_batch = process_batch  # type: ignore[attr-defined]


def _block_after_first_upsert(module: Any) -> None:
    original = module.upsert_rows
    calls = [0]

    def upsert_rows(collection: Any, rows: Any) -> None:
        original(collection, rows)
        calls[0] += 1
        if calls[0] == 1:
            _touch("blocked")
            while True:
                time.sleep(1)

    module.upsert_rows = upsert_rows


def main() -> int:
    example = Path(sys.argv[1]).resolve()
    sys.argv = [str(example), *sys.argv[2:]]
    spec = importlib.util.spec_from_file_location(example.stem, example)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[example.stem] = module
    spec.loader.exec_module(module)
    processors = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, TorchBatchProcessor)
                  and v is not TorchBatchProcessor and v.__module__ == module.__name__]
    assert len(processors) == 1, processors
    if os.environ.get("TEXT_JOB_PAUSE_AFTER"):
        _pause_after(processors[0], int(os.environ["TEXT_JOB_PAUSE_AFTER"]))
    if os.environ.get("TEXT_JOB_BLOCK_UPSERT"):
        _block_after_first_upsert(module)
    rc: int = module.main()
    return rc


if __name__ == "__main__":
    sys.exit(main())
