"""Test-only fault injection, off unless ``BATCHPROC_FAULT`` is set (never in production).

``BATCHPROC_FAULT`` is a comma-separated list of ``point[@rank=R][@step=S]`` entries, e.g.
``stop@step=3`` (request a preemption after step 3), ``kill@rank=1@step=2`` (SIGKILL this
process), ``kill-after-record`` / ``kill-after-stage`` / ``kill-before-errors`` (die in the middle
of a commit).
Each ``kill...`` point has a ``hang...`` twin (``hang@rank=1@step=2``, ``hang-after-stage``, ...)
where the process stops responding instead, as a rank stuck in a driver call would: it sleeps
forever, signals included, so only the process group's timeout frees the other ranks (and
torchrun SIGKILLs it after its 30 s grace); with ``@sigterm=exit`` SIGTERM still ends it.
Only points named here fire; each fires at most once per process.

The engine calls one hook, :meth:`FaultHooks.at`, at each point; :func:`fault_hooks` gives it a
no-op one unless ``BATCHPROC_FAULT`` is set.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, Dict, List, Optional, Protocol, Set

from batchproc.settings import ENV_FAULT, restart_count


def _parse(spec: str) -> List[Dict[str, str]]:
    out = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        point, *conds = entry.split("@")
        fault = {"point": point}
        for c in conds:
            k, _, v = c.partition("=")
            fault[k] = v
        out.append(fault)
    return out


class FaultHooks(Protocol):
    """An observer of the engine's fault points (tests only)."""

    def at(self, point: str, step: Optional[int] = None) -> None:
        """The engine is at ``point`` (``stop`` and ``kill`` after each step, ``kill-after-stage``,
        ...), in loop step ``step`` where there is one."""


class NoFaults:
    """Production: nothing happens at any point."""

    def at(self, point: str, step: Optional[int] = None) -> None:
        pass


def fault_hooks(rank: int, request_stop: Callable[[str], None]) -> FaultHooks:
    """The hooks for this process: :class:`Faults` when ``BATCHPROC_FAULT`` is set, else a no-op.
    ``request_stop(reason)`` asks the loop to checkpoint and stop (the ``stop`` point)."""
    spec = os.environ.get(ENV_FAULT, "")
    return Faults(rank, spec, request_stop) if spec.strip() else NoFaults()


class Faults:
    def __init__(self, rank: int, spec: Optional[str] = None,
                 request_stop: Optional[Callable[[str], None]] = None) -> None:
        self.rank = rank
        self.request_stop = request_stop
        self.faults = _parse(spec if spec is not None else os.environ.get(ENV_FAULT, ""))
        self.fired: Set[int] = set()
        # Restarted workers must not fire the same fault again, or the job never ends.
        self.restart = restart_count()

    def at(self, point: str, step: Optional[int] = None) -> None:
        """``stop`` requests a stop (a checkpoint, then the run is preempted); the ``kill`` points
        kill or hang this process."""
        if point == "stop":
            if self.fires(point, step) and self.request_stop is not None:
                self.request_stop("fault hook")
            return
        self.maybe_kill(point, step)

    def fires(self, point: str, step: Optional[int] = None) -> bool:
        return self.firing(point, step) is not None

    def firing(self, point: str, step: Optional[int] = None) -> Optional[Dict[str, str]]:
        """The first not yet fired fault of ``point`` whose conditions hold here (now marked fired)."""
        for i, f in enumerate(self.faults):
            if i in self.fired or f["point"] != point:
                continue
            if "rank" in f and int(f["rank"]) != self.rank:
                continue
            if "step" in f and (step is None or int(f["step"]) != step):
                continue
            if int(f.get("restart", "0")) != self.restart:
                continue
            self.fired.add(i)
            return f
        return None

    def maybe_kill(self, point: str, step: Optional[int] = None) -> None:
        """SIGKILL this process at ``point`` (``kill...``), or hang there for its ``hang...`` twin."""
        if self.fires(point, step):
            os.kill(os.getpid(), signal.SIGKILL)
        hang = self.firing("hang" + point[len("kill"):], step) if point.startswith("kill") else None
        if hang is not None:
            print(f"batchproc: fault hook: rank {self.rank} hangs at {point} (step {step})", file=sys.stderr, flush=True)
            if hang.get("sigterm") == "exit":  # a hang that SIGTERM still ends (torchrun's stop needs no SIGKILL)
                signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
            while True:  # a signal handler may run, but the process never goes on
                time.sleep(3600)
