"""What the engine does with bad work: the bad-sample and bad-batch policies, and the typed
record of each skip.

:class:`BadWorkPolicy` is built once from ``torch_batch_process``'s arguments, which it validates,
and is handed to the loader (samples) and the batch runner (batches). Each skip becomes an
:class:`ErrorRecord`, whose :meth:`ErrorRecord.to_json` is its ``errors.jsonl`` row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Literal, NamedTuple, Optional

POLICY_MODES = ("raise", "skip")


def _check_bound(name: str, value: Optional[int]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SkipPolicy:
    """``"raise"`` (fail naming the bad sample or batch) or ``"skip"`` (record it and go on), and with
    ``"skip"`` the most that the whole job may skip (``None``: no bound)."""

    mode: Literal["raise", "skip"] = "raise"
    max_bad: Optional[int] = None

    @property
    def skips(self) -> bool:
        return self.mode == "skip"

    def over(self, count: int) -> bool:
        """Whether ``count`` skips (job-wide) are past the bound."""
        return self.max_bad is not None and count > self.max_bad


@dataclasses.dataclass(frozen=True)
class BadWorkPolicy:
    """The bad-sample and bad-batch policies and the batch timeout, validated once."""

    samples: SkipPolicy = SkipPolicy()
    batches: SkipPolicy = SkipPolicy()
    batch_timeout_s: Optional[float] = None

    @classmethod
    def from_arguments(cls, bad_samples: Any, max_bad_samples: Any, bad_batches: Any, max_bad_batches: Any,
                       batch_timeout_s: Any) -> "BadWorkPolicy":
        """From ``torch_batch_process``'s arguments; raises ValueError naming the first bad one."""
        if bad_samples not in POLICY_MODES:
            raise ValueError(f"bad_samples must be 'raise' or 'skip', got {bad_samples!r}")
        if bad_batches not in POLICY_MODES:
            raise ValueError(f"bad_batches must be 'raise' or 'skip', got {bad_batches!r}")
        _check_bound("max_bad_batches", max_bad_batches)
        timeout_s = batch_timeout_s
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not math.isfinite(timeout_s) or timeout_s <= 0):
            raise ValueError(f"batch_timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
        _check_bound("max_bad_samples", max_bad_samples)
        return cls(SkipPolicy(bad_samples, max_bad_samples), SkipPolicy(bad_batches, max_bad_batches), timeout_s)


class Skipped(NamedTuple):
    """Samples and batches skipped by the whole job so far."""

    samples: int = 0
    batches: int = 0


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """One skipped sample (``kind="sample"``) or one failed piece of a batch (``kind="batch"``)."""

    kind: Literal["sample", "batch"]
    error: str
    index: Optional[int] = None  #: sample: its dataset index
    sample: Optional[str] = None  #: sample: its description (``sample 12 (/data/x.jpg)``)
    global_batch: Optional[int] = None  #: batch
    indices: Optional[List[int]] = None  #: batch: the dataset indices of the failed piece
    traceback: str = ""  #: batch: the head of the traceback

    @classmethod
    def for_sample(cls, index: int, sample: str, error: str) -> "ErrorRecord":
        return cls("sample", error, index=index, sample=sample)

    @classmethod
    def for_batch(cls, global_batch: int, indices: List[int], error: str, traceback: str) -> "ErrorRecord":
        return cls("batch", error, global_batch=global_batch, indices=list(indices), traceback=traceback)

    def to_json(self) -> Dict[str, Any]:
        """The ``errors.jsonl`` row (sample rows carry no ``kind``, as they never did)."""
        if self.kind == "sample":
            return {"index": self.index, "sample": self.sample, "error": self.error}
        return {"kind": "batch", "global_batch": self.global_batch, "indices": list(self.indices or []),
                "error": self.error, "traceback": self.traceback}
