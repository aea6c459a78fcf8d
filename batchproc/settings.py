"""The launcher -> worker contract: the one place that spells the ``BATCHPROC_*`` environment names.

``batchproc run`` (and ``launch.torch_distributed``) put a :class:`RunSettings` into the
environment of the processes they start; :func:`batchproc.torch_batch_process` reads it back.
A script run with plain ``python script.py`` sees no settings and uses the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, MutableMapping, Optional

ENV_NAME = "BATCHPROC_NAME"
ENV_RUN_DIR = "BATCHPROC_RUN_DIR"
ENV_STORAGE_OPTIONS = "BATCHPROC_STORAGE_OPTIONS"
ENV_HPARAMS = "BATCHPROC_HPARAMS"
ENV_SLOTS = "BATCHPROC_SLOTS_PER_TRIAL"
ENV_MAX_RESTARTS = "BATCHPROC_MAX_RESTARTS"
ENV_PG_TIMEOUT = "BATCHPROC_PG_TIMEOUT_S"
ENV_LOCK_HELD = "BATCHPROC_LOCK_HELD"
#: "1": show rank 0's progress bar even though stderr is a pipe (the launcher's is a terminal).
ENV_PROGRESS = "BATCHPROC_PROGRESS"
#: Test-only fault injection (see ``batchproc.faults``); never set in production.
ENV_FAULT = "BATCHPROC_FAULT"


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
        )

    def apply(self, environ: MutableMapping[str, str]) -> None:
        """Write these settings into ``environ`` (e.g. a child's environment)."""
        environ.update(self.to_env())
