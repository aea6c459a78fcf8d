"""batchproc: checkpointed, distributed batch processing (batch inference first) for PyTorch."""

from batchproc.processor import TorchBatchProcessor, TorchBatchProcessorContext
from batchproc.reducer import MetricReducer
from batchproc.run import BatchProcessResult, torch_batch_process

__all__ = ["TorchBatchProcessor", "TorchBatchProcessorContext", "torch_batch_process",
           "MetricReducer", "BatchProcessResult"]
__version__ = "0.1.0"
