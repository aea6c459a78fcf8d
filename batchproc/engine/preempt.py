"""Preemption requests: signals and ``batchproc stop``, agreed on by every rank at the same step.

A signal (SIGTERM from Kubernetes or torchrun, SIGINT from Ctrl-C, SIGUSR1 from Slurm) only sets a
local flag; rank 0 also polls the run directory's stop-request file on a thread. At each step
:meth:`PreemptionWatcher.should_stop` runs one all-reduce, so all ranks stop at the same step and
checkpoint together. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional

from batchproc.distributed import WorkerEnv
from batchproc.rundir.layout import STOP_FILE
from batchproc.settings import PREEMPTION_SIGNALS
from batchproc.rundir.storage import RunDir


class PreemptionWatcher:
    """Collects local stop requests; ``should_stop()`` turns them into a job-wide decision."""

    def __init__(self, env: WorkerEnv, run_dir: Optional[RunDir], poll_s: float = 1.0) -> None:
        self.env = env
        self.run_dir = run_dir
        self.poll_s = poll_s
        self.requested: Optional[str] = None
        self._previous: Dict[int, Any] = {}
        self._stop_polling = threading.Event()
        self._poller: Optional[threading.Thread] = None

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.env.is_chief and self.run_dir is not None:
            self._poller = threading.Thread(target=self._poll, name="batchproc-stop-poll", daemon=True)
            self._poller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._stop_polling.set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == signal.Signals.SIGINT.name:
            raise KeyboardInterrupt  # the user insists
        self.requested = signal.Signals(signum).name

    def _poll(self) -> None:
        assert self.run_dir is not None
        while not self._stop_polling.wait(self.poll_s):
            try:
                if self.run_dir.exists(STOP_FILE):
                    self.requested = "batchproc stop"
                    return
            except Exception:  # storage hiccup: try again next poll
                continue

    def request(self, reason: str) -> None:
        self.requested = reason

    def should_stop(self) -> bool:
        """One collective: True on every rank if any rank was asked to stop."""
        return self.env.any_true(self.requested is not None)


def clear_stop_request(run_dir: RunDir) -> None:
    """A new attempt starts: an old ``batchproc stop`` must not stop it."""
    run_dir.rm(STOP_FILE)


