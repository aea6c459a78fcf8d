"""Exception types. Each message names the user's file, key, sample or run and says what to do."""

from __future__ import annotations


class BatchProcError(Exception):
    """Base class of every error batchproc raises on purpose."""


class ConfigError(BatchProcError, ValueError):
    """An experiment config is invalid (unknown key, wrong type, missing key)."""


class RunDirLockedError(BatchProcError):
    """Another job holds the run directory."""


class FingerprintMismatchError(BatchProcError):
    """The run directory belongs to a job over other data (dataset length, batch size, ...)."""


class CorruptCheckpointError(BatchProcError):
    """No checkpoint record of the run directory can be trusted."""


class BadSampleError(BatchProcError):
    """Loading one dataset sample raised; the message names the sample index (and file, if known)."""


class TooManyBadSamplesError(BatchProcError):
    """More samples were skipped than ``max_bad_samples`` allows."""


class UserCodeError(BatchProcError):
    """The user's processor or reducer raised; the message names the object and the batch."""
