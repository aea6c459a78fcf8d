"""batchproc: checkpointed, distributed batch processing (batch inference first) for PyTorch.

The public names are imported lazily so that ``batchproc status`` answers without importing torch.
"""

from typing import TYPE_CHECKING, Any

__all__ = ["TorchBatchProcessor", "TorchBatchProcessorContext", "torch_batch_process",
           "MetricReducer", "BatchProcessResult", "DistributedContext", "get_hparams"]
__version__ = "0.1.0"

_WHERE = {
    "TorchBatchProcessor": "batchproc.processor",
    "TorchBatchProcessorContext": "batchproc.processor",
    "MetricReducer": "batchproc.reducer",
    "torch_batch_process": "batchproc.engine.run",
    "BatchProcessResult": "batchproc.engine.run",
    "DistributedContext": "batchproc.distributed",
}

if TYPE_CHECKING:
    from batchproc.distributed import DistributedContext
    from batchproc.processor import TorchBatchProcessor, TorchBatchProcessorContext
    from batchproc.reducer import MetricReducer
    from batchproc.engine.run import BatchProcessResult, torch_batch_process


def get_hparams() -> "dict[str, Any]":
    """The experiment's hyperparameters, before (or without) a processor's context.

    ``batchproc run`` passes them to the entrypoint; a script run on its own gets ``{}``.
    """
    from batchproc.settings import RunSettings

    return dict(RunSettings.from_env().hparams)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'batchproc' has no attribute {name!r}")
