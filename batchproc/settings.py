"""The launcher -> worker contract, and the one place for batchproc's constants and switches.

``batchproc run`` (and ``launch.torch_distributed``) put a :class:`RunSettings` into the
environment of the processes they start; :func:`batchproc.torch_batch_process` reads it back.
A script run with plain ``python script.py`` sees no settings and uses the defaults.

Also defined here, once: every ``BATCHPROC_*`` environment name and its reader, the torchrun
variables batchproc reads besides the rank ones (``TORCHELASTIC_RESTART_COUNT``), the preemption
signals, and the affinity-aware core count. A leaf module: it imports nothing of batchproc's and
not torch, so the CLI and the launcher can use it without paying for torch's import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any, Dict, Mapping, Optional, Tuple

ENV_NAME = "BATCHPROC_NAME"
ENV_RUN_DIR = "BATCHPROC_RUN_DIR"
ENV_STORAGE_OPTIONS = "BATCHPROC_STORAGE_OPTIONS"
ENV_HPARAMS = "BATCHPROC_HPARAMS"
ENV_SLOTS = "BATCHPROC_SLOTS_PER_TRIAL"
ENV_MAX_RESTARTS = "BATCHPROC_MAX_RESTARTS"
ENV_PG_TIMEOUT = "BATCHPROC_PG_TIMEOUT_S"
ENV_SCHEDULE = "BATCHPROC_SCHEDULE"
#: torch_batch_process's schedules: Determined's lock-step round-robin, or ranks pulling batches.
SCHEDULES = ("static", "dynamic")
ENV_LOCK_HELD = "BATCHPROC_LOCK_HELD"
#: The id of the object-store lease a supervisor holds for its workers (rank 0 checks it before each record).
ENV_LEASE_ID = "BATCHPROC_LEASE_ID"
#: The object-store lease's lifetime without a heartbeat, in seconds (default 90; short in tests).
ENV_LEASE_TTL = "BATCHPROC_LEASE_TTL_S"
#: "1": show rank 0's progress bar even though stderr is a pipe (the launcher's is a terminal).
ENV_PROGRESS = "BATCHPROC_PROGRESS"
#: "1": copy the next batch to the GPU on a side stream (``batchproc.engine.prefetch``; CUDA only, opt-in).
ENV_DEVICE_PREFETCH = "BATCHPROC_DEVICE_PREFETCH"
#: Test-only fault injection (see ``batchproc.engine.fault_injection``); never set in production.
ENV_FAULT = "BATCHPROC_FAULT"
#: Set by the supervisor (batchproc.control.supervisor.supervise): a folder where a rank that failed for a
#: reason a restart cannot fix (an error in user code, bad data, a stuck batch) leaves its verdict
#: before exiting cleanly, so that torchrun does not replay the failure (see batchproc.engine.verdict).
ENV_VERDICT_DIR = "BATCHPROC_VERDICT_DIR"
#: ``torchrun``: start a one-node, one-slot job under torchrun's agent too, instead of the agent
#: of our own that spares its torch import (:mod:`batchproc.control.solo_agent`).
ENV_AGENT = "BATCHPROC_AGENT"
#: Set by torchrun in each worker: how many times its agent restarted the worker group.
ENV_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"

#: The signals that mean "checkpoint, stop, run again to resume": Kubernetes' and torchrun's
#: SIGTERM, Ctrl-C's SIGINT, Slurm's SIGUSR1. Workers turn them into a preemption request.
PREEMPTION_SIGNALS: Tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: What ``batchproc run`` and the launcher record and forward to their child: the preemption
#: signals, and SIGHUP (a closed terminal), which would otherwise kill them with the run unrecorded.
FORWARDED_SIGNALS: Tuple[signal.Signals, ...] = PREEMPTION_SIGNALS + (signal.SIGHUP,)
#: What an agent (torchrun's, or ours for one slot) passes on to its workers: the forwarded signals and SIGQUIT.
AGENT_SIGNALS: Tuple[signal.Signals, ...] = FORWARDED_SIGNALS + (signal.SIGQUIT,)
#: torchrun's ``--signals-to-handle``: :data:`AGENT_SIGNALS`.
TORCHRUN_SIGNALS_TO_HANDLE = ",".join(s.name for s in AGENT_SIGNALS)


def cpu_count() -> int:
    """The cores this process may run on (Slurm, cgroups, taskset), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def restart_count(environ: Optional[Mapping[str, str]] = None) -> int:
    """torchrun's restart count of this worker group (0 without torchrun)."""
    env = os.environ if environ is None else environ
    return int(env.get(ENV_RESTART_COUNT) or 0)


def progress_forced(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether the launcher asked rank 0 to show its progress bar on a pipe (``BATCHPROC_PROGRESS``)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_PROGRESS) == "1"


def device_prefetch_requested(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether the side-stream device prefetch was turned on (``BATCHPROC_DEVICE_PREFETCH=1``)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_DEVICE_PREFETCH, "0") == "1"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What a worker needs to know about the run it belongs to."""

    name: Optional[str] = None
    run_dir: Optional[str] = None
    storage_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    hparams: Dict[str, Any] = dataclasses.field(default_factory=dict)
    slots_per_trial: Optional[int] = None
    max_restarts: int = 0
    pg_timeout_s: float = 1800.0
    lock_held: bool = False
    lease_id: Optional[str] = None  #: the supervisor's object-store lease (ENV_LEASE_ID)
    schedule: Optional[str] = None  #: the experiment's ``schedule`` key (None: not given)

    def to_env(self) -> Dict[str, str]:
        env = {
            ENV_HPARAMS: json.dumps(self.hparams),
            ENV_STORAGE_OPTIONS: json.dumps(self.storage_options),
            ENV_MAX_RESTARTS: str(self.max_restarts),
            ENV_PG_TIMEOUT: str(self.pg_timeout_s),
        }
        if self.name is not None:
            env[ENV_NAME] = self.name
        if self.run_dir is not None:
            env[ENV_RUN_DIR] = self.run_dir
        if self.slots_per_trial is not None:
            env[ENV_SLOTS] = str(self.slots_per_trial)
        if self.lock_held:
            env[ENV_LOCK_HELD] = "1"
        if self.lease_id is not None:
            env[ENV_LEASE_ID] = self.lease_id
        if self.schedule is not None:
            env[ENV_SCHEDULE] = self.schedule
        return env

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "RunSettings":
        env = os.environ if environ is None else environ
        slots = env.get(ENV_SLOTS)
        return cls(
            name=env.get(ENV_NAME) or None,
            run_dir=env.get(ENV_RUN_DIR) or None,
            storage_options=json.loads(env.get(ENV_STORAGE_OPTIONS) or "{}"),
            hparams=json.loads(env.get(ENV_HPARAMS) or "{}"),
            slots_per_trial=int(slots) if slots else None,
            max_restarts=int(env.get(ENV_MAX_RESTARTS) or 0),
            pg_timeout_s=float(env.get(ENV_PG_TIMEOUT) or 1800.0),
            lock_held=env.get(ENV_LOCK_HELD) == "1",
            lease_id=env.get(ENV_LEASE_ID) or None,
            schedule=env.get(ENV_SCHEDULE) or None,
        )
