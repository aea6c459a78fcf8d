"""Tensors and numpy values as plain Python values: the one converter for rows and metrics.

A leaf module (no torch import, no batchproc import): ``batchproc.reducer`` (metrics) and
``batchproc.data.writers`` (rows) both use :func:`to_plain`, each with its own ``for_metrics``:

* rows (``for_metrics=False``, written to JSONL or Parquet) keep their shape: a tensor or numpy
  array becomes ``tolist()``, so a one-element tensor of shape ``(1,)`` stays a one-item list and
  a column has one type whatever a batch's sizes; a 0-d tensor or numpy scalar becomes a number.
  Values of other types pass unchanged (Arrow and ``json`` decide what they accept).
* metrics (``for_metrics=True``, ``metrics.json`` and the progress records) are numbers where they
  can be: a one-element *torch* tensor of any shape becomes its number (``.item()``), as reducers
  returning ``x.sum(0, keepdim=True)`` expect; numpy values become ``tolist()`` (a one-element
  array stays a list, as before); values JSON cannot hold become their ``repr``.

In both, dict keys become strings and tuples become lists, recursively.
"""

from __future__ import annotations

from typing import Any


def _is_torch_tensor(value: Any) -> bool:
    return any(c.__module__ == "torch" and c.__name__ == "Tensor" for c in type(value).__mro__)


def to_plain(value: Any, *, for_metrics: bool = False) -> Any:
    """``value`` with tensors and numpy values made plain (see the module's docstring)."""
    if isinstance(value, dict):
        return {str(k): to_plain(v, for_metrics=for_metrics) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, for_metrics=for_metrics) for v in value]
    if isinstance(value, (str, bytes)):
        return value if not (for_metrics and isinstance(value, bytes)) else repr(value)
    if for_metrics and _is_torch_tensor(value) and value.numel() == 1:
        return value.item()
    if hasattr(value, "tolist") and (not for_metrics or _is_torch_tensor(value)
                                     or type(value).__module__ == "numpy"):
        return value.tolist()
    if for_metrics and not isinstance(value, (int, float, bool, type(None))):
        return repr(value)
    return value


__all__ = ["to_plain"]
