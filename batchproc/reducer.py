"""Metric reducers (Determined's API) and the registry that reduces them across slots and attempts.

A slot is one rank of one attempt. At every checkpoint each rank's ``per_slot_reduce()`` is stored
in the record; the final metrics are ``cross_slot_reduce(slots of earlier attempts + current
slots)``, so they equal an uninterrupted run's whatever the world sizes were.
"""

from __future__ import annotations

import abc
import itertools
import numbers
from typing import Any, Callable, Dict, List, Optional, TypeVar

import torch

from batchproc.errors import UserCodeError


class MetricReducer(abc.ABC):
    """A metric computed over all the batches of all workers.

    Subclasses add their own ``update(...)``, called from ``process_batch``.
    """

    @abc.abstractmethod
    def reset(self) -> None:
        """Clear the state (called once when wrapped)."""

    @abc.abstractmethod
    def per_slot_reduce(self) -> Any:
        """This worker's partial result: tensors, numbers, strings, lists and dicts of them."""

    @abc.abstractmethod
    def cross_slot_reduce(self, per_slot_metrics: List[Any]) -> Any:
        """Combine the partial results of every slot into the metric (a dict if unnamed)."""


R = TypeVar("R", bound=MetricReducer)


class SimpleReducer(MetricReducer):
    """A function over every value passed to :meth:`update` on every slot (Determined's simple API).

    The values are kept until the end (and in every checkpoint): meant for modest amounts, e.g.
    one score per batch, as Determined says of its own. Every commit gathers, saves and reduces
    all of them again, so a long job pays quadratically; a :class:`MetricReducer` that keeps
    running sums is bounded (README, "What a reducer costs").
    """

    def __init__(self, fn: Callable[[List[Any]], Any]) -> None:
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        self.values: List[Any] = []

    def update(self, value: Any) -> None:
        self.values.append(value)

    def per_slot_reduce(self) -> Any:
        return self.values

    def cross_slot_reduce(self, per_slot_metrics: List[Any]) -> Any:
        # Interleaved, as Determined does: with one update() per batch, batches were dealt
        # round-robin, so this is the dataset's order within an attempt.
        missing = object()
        rounds = itertools.zip_longest(*per_slot_metrics, fillvalue=missing)
        return self.fn([v for values in rounds for v in values if v is not missing])


def _storable(value: Any) -> Any:
    """Turn numpy values into numbers/tensors so states load with ``torch.load(weights_only=True)``."""
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_storable(v) for v in value)
    if type(value).__module__ == "numpy":
        if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
            return torch.as_tensor(value)
        return value.item()
    if isinstance(value, (torch.Tensor, numbers.Number, str, bytes, type(None), bool)):
        return value
    raise TypeError(f"a value of type {type(value).__name__} cannot be stored in a checkpoint; "
                    "return tensors, numbers, strings, lists or dicts from per_slot_reduce()")


class ReducerRegistry:
    """The reducers a processor wrapped, keyed by metric name (``None`` names merge into metrics)."""

    def __init__(self) -> None:
        self._reducers: Dict[str, MetricReducer] = {}
        self._named: Dict[str, bool] = {}

    def wrap(self, reducer: "R", name: Optional[str]) -> "R":
        if not isinstance(reducer, MetricReducer):
            raise TypeError(f"wrap_reducer() needs a MetricReducer, got {type(reducer).__name__}")
        key = name if name is not None else f"<{type(reducer).__name__}#{len(self._reducers)}>"
        if key in self._reducers:
            raise ValueError(f"a reducer named {name!r} was already wrapped; give each a unique name")
        if any(r is reducer for r in self._reducers.values()):  # its updates would count twice
            raise ValueError(f"this {type(reducer).__name__} object was already wrapped; wrap a new one for "
                             f"{name or 'each metric'}")
        self._call(reducer, key, "reset")
        self._reducers[key] = reducer
        self._named[key] = name is not None
        return reducer

    def _call(self, reducer: MetricReducer, key: str, method: str, *args: Any) -> Any:
        try:
            return getattr(reducer, method)(*args)
        except Exception as e:
            raise UserCodeError(f"{type(reducer).__name__}.{method}() of metric {key!r} raised "
                                f"{type(e).__name__}: {e}") from e

    def slot_states(self) -> Dict[str, Any]:
        """This rank's ``per_slot_reduce()`` of every reducer, in storable form."""
        out = {}
        for key, r in self._reducers.items():
            state = self._call(r, key, "per_slot_reduce")
            try:
                out[key] = _storable(state)
            except TypeError as e:
                raise UserCodeError(f"{type(r).__name__}.per_slot_reduce() of metric {key!r}: {e}") from None
        return out

    def reduce(self, slots: Dict[str, List[Any]]) -> Dict[str, Any]:
        """Metrics from the per-slot states of every slot (archived and current)."""
        metrics: Dict[str, Any] = {}
        for key, r in self._reducers.items():
            value = self._call(r, key, "cross_slot_reduce", list(slots.get(key, [])))
            if self._named[key]:
                metrics[key] = value
            elif isinstance(value, dict):
                metrics.update(value)
            else:
                raise UserCodeError(f"{type(r).__name__} was wrapped without a name, so its "
                                    f"cross_slot_reduce() must return a dict; it returned {type(value).__name__}")
        return metrics
