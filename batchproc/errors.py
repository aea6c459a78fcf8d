"""Exception types. Each message names the user's file, key, sample or run and says what to do."""

from __future__ import annotations


class BatchProcError(Exception):
    """Base class of every error batchproc raises on purpose."""


class ConfigError(BatchProcError, ValueError):
    """An experiment config is invalid (unknown key, wrong type, missing key)."""


class RunDirLockedError(BatchProcError):
    """Another job holds the run directory."""


class RunDirUnwritableError(BatchProcError, OSError):
    """The run directory cannot be written (read-only, full, not ours); carries the errno."""

    @classmethod
    def wrap(cls, url: str, error: OSError) -> "RunDirUnwritableError":
        where = error.filename or url
        return cls(error.errno, f"cannot write the run directory {url} ({where}: {error.strerror or error}). "
                   "Make it writable (or free space), or point the storage elsewhere; nothing committed there is "
                   "lost, and running again resumes.")

    def __str__(self) -> str:
        return str(self.strerror)
class LeaseLostError(RunDirLockedError):
    """Another job took over this job's object-store lease (this one was frozen or cut off past its
    lifetime): this job stops without committing; the message names the other holder."""


class RecordTakenError(BatchProcError, FileExistsError):
    """A checkpoint record's name was written already by another writer: records are never replaced."""


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


class InputSourceMismatchError(FingerprintMismatchError):
    """The run's inputs were frozen from another source (folder, glob, bucket) than this job's dataset."""


class InputChangedError(BatchProcError):
    """A file of the run's frozen inputs is gone, or its size or version changed since it was listed."""


class TooManyBadBatchesError(BatchProcError):
    """More batches were skipped than ``max_bad_batches`` allows."""


class BatchTimeoutError(BatchProcError):
    """A batch ran longer than ``batch_timeout_s``."""


class PeerFailedError(BatchProcError):
    """Another rank failed for good; this one stops with it (the other rank's error is the cause)."""


class ImageTooLargeError(BatchProcError, ValueError):
    """An image's header claims more pixels than the limit (``max_pixels``); it is not decoded."""
