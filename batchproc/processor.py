"""The user surface: :class:`TorchBatchProcessor` and its :class:`TorchBatchProcessorContext`.

The context delegates to storage (uploads), the reducer registry (metrics) and report
(TensorBoard / reported metrics); it holds no loop logic.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import time
import warnings
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, TypeVar, overload

import torch

from batchproc.distributed import DistributedContext
from batchproc.distributed import WorkerEnv
from batchproc.plain import to_plain
from batchproc.reducer import MetricReducer, ReducerRegistry, SimpleReducer
from batchproc.rundir.layout import MODEL_SOURCES, REPORTED_METRICS, TENSORBOARD_DIR
from batchproc.rundir.storage import RunDir, Stager


R = TypeVar("R", bound=MetricReducer)


class TorchBatchProcessorContext:
    """What a processor can ask of the framework (Determined's methods, plus batch positions)."""

    def __init__(self, env: WorkerEnv, stager: Stager, reducers: ReducerRegistry,
                 hparams: Dict[str, Any], tensorboard_path: pathlib.Path, run_dir_url: str) -> None:
        self._env = env
        #: Determined's ``DistributedContext``: rank, size, local/cross positions, object collectives.
        self.distributed = DistributedContext.from_worker(env)
        self._stager = stager
        self._reducers = reducers
        self._hparams = hparams
        self._tb_path = tensorboard_path
        self._tb_writer: Any = None
        self.run_dir = run_dir_url
        #: Global index of the batch being processed (stable across resumes and world sizes).
        self.global_batch_idx: int = -1
        #: Dataset indices of the samples in the batch being processed (bad samples excluded).
        self.batch_indices: List[int] = []
        # Device copies of this batch's tensors, made ahead on a side stream (batchproc.engine.prefetch).
        self._device_copies: Dict[int, Any] = {}
        self._warned_types: Set[type] = set()
        self._metrics: Optional[Dict[str, Any]] = None
        self._run_dir: RunDir = stager.run_dir
        self._model_sources: List[Dict[str, Any]] = []
        self._model_registry_noted = False
        self._batch_buffers: List[Any] = []

    # -- placement --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` under a GPU launcher, else ``cpu``."""
        return self._env.device

    def to_device(self, data: Any, warned_types: Optional[Set[type]] = None) -> Any:
        """Move ``data`` to :attr:`device`, as Determined does: tensors, numpy arrays (made
        tensors), and any object with a ``.to()`` method (a HuggingFace ``BatchEncoding``), inside
        nested dicts, lists and tuples. Other objects are returned as they are, with one warning per
        type (``warned_types`` collects the types warned about; numbers, strings and None are
        returned without one)."""
        return _to_device(data, self._env.device, self._device_copies,
                          self._warned_types if warned_types is None else warned_types)

    def prepare_model_for_inference(self, model: torch.nn.Module, *, channels_last: bool = False) -> torch.nn.Module:
        """Eval mode, on :attr:`device`, with gradients off (no autograd graph is built).

        ``channels_last=True`` stores 4-D weights as NHWC, which convolution kernels run faster
        on (cuDNN tensor cores on GPUs, oneDNN on CPUs: ResNet-18 on 2 CPU cores, 15% less time
        per batch). Inputs need no change: a convolution with NHWC weights converts its input.
        """
        model.eval()
        model.requires_grad_(False)
        model = model.to(self._env.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    # -- outputs and metrics -----------------------------------------------------------------

    @contextlib.contextmanager
    def upload_path(self) -> Iterator[pathlib.Path]:
        """A folder to write output files into; they are published under ``outputs/`` at commit.

        Published names carry a tag (``preds.<attempt>-r<rank>-u<n>.parquet``) so they never
        collide across ranks or attempts; files of work that is not committed are discarded.
        """
        folder, seq = self._stager.open_upload()
        yield pathlib.Path(folder)
        self._stager.close_upload(folder, seq)

    @overload
    def wrap_reducer(self, reducer: R, name: Optional[str] = None, for_training: bool = True,
                     for_validation: bool = True) -> R: ...

    @overload
    def wrap_reducer(self, reducer: Callable[[List[Any]], Any], name: Optional[str] = None,
                     for_training: bool = True, for_validation: bool = True) -> SimpleReducer: ...

    def wrap_reducer(self, reducer: Any, name: Optional[str] = None, for_training: bool = True,
                     for_validation: bool = True) -> Any:
        """Register a metric: its result is ``metrics[name]`` (or merged in, if ``name`` is None).

        ``reducer`` is a :class:`MetricReducer`, returned as it is, or a function of the flat list
        of every value passed to ``update()`` on the returned reducer, on every rank (Determined's
        simple API). ``for_training``/``for_validation`` are accepted for Determined's sake: a batch
        job has one kind of workload, and every wrapped reducer is reported.
        """
        if not isinstance(reducer, MetricReducer) and callable(reducer):
            reducer = SimpleReducer(reducer)
        return self._reducers.wrap(reducer, name)

    @property
    def metrics(self) -> Optional[Dict[str, Any]]:
        """The run's final metrics, from ``on_finish`` on (None before: they are not final)."""
        return self._metrics

    @metrics.setter
    def metrics(self, value: Dict[str, Any]) -> None:
        self._metrics = value

    def report_task_using_model_version(self, model_version: Any) -> None:
        """Record which model version this run uses (in ``<run_dir>/model_sources.jsonl``).

        Determined links it in its model registry; batchproc has none, so it records what it can
        read off the object (uuid, name, version) for the run's provenance."""
        self._report_model_source("model_version", model_version)

    def report_task_using_checkpoint(self, checkpoint: Any) -> None:
        """Record which checkpoint this run uses (in ``<run_dir>/model_sources.jsonl``); see
        :meth:`report_task_using_model_version`."""
        self._report_model_source("checkpoint", checkpoint)

    def _report_model_source(self, kind: str, obj: Any) -> None:
        if not self._env.is_chief:
            return
        entry: Dict[str, Any] = {"kind": kind, "repr": repr(obj)[:500], "attempt": self._stager.attempt,
                                 "time": time.time()}
        for attr in ("uuid", "name", "model_id", "model_version", "version"):
            value = getattr(obj, attr, None)
            if isinstance(value, (str, int, float)):
                entry[attr] = value
        checkpoint_uuid = getattr(getattr(obj, "checkpoint", None), "uuid", None)
        if isinstance(checkpoint_uuid, str):
            entry["checkpoint_uuid"] = checkpoint_uuid
        if not self._model_registry_noted:
            self._model_registry_noted = True
            # Object stores cannot append: the file is rewritten whole, earlier attempts' lines first.
            earlier = self._run_dir.read_bytes(MODEL_SOURCES) if self._run_dir.exists(MODEL_SOURCES) else b""
            self._model_sources = [json.loads(line) for line in earlier.decode().splitlines() if line.strip()]
            print(f"batchproc: there is no model registry; report_task_using_{kind}() is recorded in "
                  f"{self.run_dir}/{MODEL_SOURCES}", file=sys.stderr)
        self._model_sources.append(entry)
        self._run_dir.write_atomic(MODEL_SOURCES, "".join(json.dumps(e, sort_keys=True) + "\n"
                                                          for e in self._model_sources).encode())

    def report_metrics(self, group: str, steps_completed: int, metrics: Dict[str, Any]) -> None:
        """Log metrics to TensorBoard (if installed) and ``<tensorboard path>/metrics.jsonl`` (rank 0)."""
        if not self._env.is_chief:
            return
        self._tb_path.mkdir(parents=True, exist_ok=True)
        with open(self._tb_path / REPORTED_METRICS, "a") as f:
            f.write(json.dumps({"group": group, "steps_completed": steps_completed,
                                "metrics": to_plain(metrics, for_metrics=True)}) + "\n")
        writer = self._tensorboard_writer()
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
                    writer.add_scalar(f"{group}/{k}", float(v), steps_completed)
            writer.flush()

    def _tensorboard_writer(self) -> Any:
        if self._tb_writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._tb_writer = False
            else:
                self._tb_writer = SummaryWriter(str(self._tb_path))
        return self._tb_writer or None

    # -- job facts ---------------------------------------------------------------------------

    def get_distributed_rank(self) -> int:
        return self._env.rank

    def get_distributed_size(self) -> int:
        return self._env.world_size

    def get_hparams(self) -> Dict[str, Any]:
        """The experiment's ``hyperparameters`` (empty without ``batchproc run``)."""
        return dict(self._hparams)

    def get_tensorboard_path(self) -> pathlib.Path:
        return self._tb_path

    # -- batch boundaries, for buffers that must not keep half of a failed batch ------------------

    def _watch_batches(self, buffer: Any) -> None:
        """``buffer`` (a :class:`batchproc.data.writers.RowWriter`) hears when a batch starts
        (``_batch_started``) and when its work is dropped (``_batch_dropped``: it raised)."""
        self._batch_buffers.append(buffer)



class EngineHandle:
    """The engine's side of a :class:`TorchBatchProcessorContext` (not for processors): what the
    loop sets on it between batches, so that no engine module reaches into its private state."""

    def __init__(self, context: TorchBatchProcessorContext) -> None:
        self.context = context

    def begin_batch(self, global_batch_idx: int, indices: List[int]) -> None:
        """A batch (or a piece of one, after an out-of-memory split) starts: its position, and the
        buffers watching batch boundaries hear of it."""
        context = self.context
        context.global_batch_idx, context.batch_indices = global_batch_idx, indices
        for buffer in context._batch_buffers:
            buffer._batch_started()

    def drop_batch(self) -> None:
        """The batch begun last raised: the buffers forget its work."""
        for buffer in self.context._batch_buffers:
            buffer._batch_dropped()

    def set_device_copies(self, copies: Dict[int, Any]) -> None:
        """Device copies of the next batch's tensors, made ahead (batchproc.engine.prefetch)."""
        self.context._device_copies = copies

    def swap_stager(self, stager: Stager) -> None:
        """``upload_path()`` stages into ``stager`` from now on (on_finish's own)."""
        self.context._stager = stager

    def close(self) -> None:
        if self.context._tb_writer:
            self.context._tb_writer.close()


_PLAIN = (str, bytes, int, float, bool, type(None))


def _to_device(data: Any, device: torch.device, copies: Dict[int, Any], warned: Set[type]) -> Any:
    if isinstance(data, torch.Tensor):
        ahead = copies.get(id(data))
        if ahead is not None and ahead[0] is data:
            return ahead[1]
        return data.to(device, non_blocking=data.is_pinned())
    if isinstance(data, dict):
        moved = {k: _to_device(v, device, copies, warned) for k, v in data.items()}
        try:
            return type(data)(moved)
        except TypeError:  # a dict subclass built otherwise (defaultdict): a plain dict, as Determined
            return moved
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(_to_device(v, device, copies, warned) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_to_device(v, device, copies, warned) for v in data)
    numpy = sys.modules.get("numpy")  # an ndarray implies numpy was imported
    if numpy is not None and isinstance(data, numpy.ndarray):  # memmaps and 0-d arrays too
        try:
            return torch.from_numpy(data).to(device)
        except TypeError:  # object or string arrays: no tensor dtype; warned about below
            pass
    if callable(getattr(data, "to", None)) and not isinstance(data, _PLAIN):
        return data.to(device)  # BatchEncoding, torch_geometric Data, ...
    if not isinstance(data, _PLAIN) and type(data) not in warned:
        warned.add(type(data))
        warnings.warn(f"to_device(): cannot move an object of type {type(data).__name__} to {device}; "
                      "it is returned as it is", stacklevel=3)
    return data


class TorchBatchProcessor(abc.ABC):
    """Subclass this: ``process_batch`` runs on every batch of this worker's shard."""

    def __init__(self, context: TorchBatchProcessorContext) -> None:
        self.context = context

    @abc.abstractmethod
    def process_batch(self, batch: Any, batch_idx: int) -> None:
        """Process one batch. ``batch_idx`` is this worker's batch index (Determined's meaning);
        ``context.global_batch_idx`` and ``context.batch_indices`` locate it in the dataset."""

    def on_checkpoint_start(self) -> None:
        """Flush buffered outputs through ``context.upload_path()``; called at every checkpoint."""

    def on_finish(self) -> None:
        """Called on every rank once all the work is committed: after the final
        ``on_checkpoint_start()`` and the final commit of every rank (every rank's outputs are
        published under ``<run_dir>/outputs/``; ``context.metrics`` holds the final metrics).
        Not called on preemption. At-least-once: a run stopped during it runs it again on the
        next start (loading no batch), so make it idempotent."""


def default_tensorboard_path(run_dir_url: str, is_local: bool, rank: int) -> pathlib.Path:
    """TensorBoard files go in the run directory when it is local, else a local temp folder
    (SummaryWriter needs a local path) that :class:`TensorBoardMirror` uploads."""
    if is_local:
        return pathlib.Path(run_dir_url.removeprefix("file://")) / TENSORBOARD_DIR
    return pathlib.Path(tempfile.gettempdir()) / f"batchproc-tb-{os.getpid()}-r{rank}"


class TensorBoardMirror:
    """Keeps ``<run_dir>/tensorboard/`` up to date with this rank's local TensorBoard folder,
    for run directories on object stores (SummaryWriter needs a local path).

    Rank 0 first fetches the run's ``metrics.jsonl``, so this attempt appends to it as a local run
    directory's attempts do. :meth:`sync` runs after each checkpoint and uploads only the files
    that changed; a failure warns, since outputs and metrics are already committed.
    """

    def __init__(self, run_dir: RunDir, local: pathlib.Path, chief: bool) -> None:
        self.run_dir, self.local = run_dir, local
        self._sent: Dict[str, Tuple[int, int]] = {}
        rel = f"{TENSORBOARD_DIR}/{REPORTED_METRICS}"
        if chief and run_dir.exists(rel):
            local.mkdir(parents=True, exist_ok=True)
            (local / REPORTED_METRICS).write_bytes(run_dir.read_bytes(rel))
            self._sent[REPORTED_METRICS] = self._stamp(local / REPORTED_METRICS)

    @staticmethod
    def _stamp(path: pathlib.Path) -> Tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def sync(self) -> bool:
        if not self.local.is_dir():
            return True
        try:
            for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
                rel, stamp = path.relative_to(self.local).as_posix(), self._stamp(path)
                if self._sent.get(rel) != stamp:
                    self.run_dir.put_file(str(path), f"{TENSORBOARD_DIR}/{rel}")
                    self._sent[rel] = stamp
        except Exception as e:
            warnings.warn(f"batchproc: TensorBoard files in {self.local} were not uploaded to "
                          f"{self.run_dir.url}/{TENSORBOARD_DIR}: {e}", stacklevel=2)
            return False
        return True

    def close(self) -> None:
        """Last upload; the local copy goes once it is safely uploaded."""
        if self.sync():
            shutil.rmtree(self.local, ignore_errors=True)


__all__: Sequence[str] = ("TorchBatchProcessor", "TorchBatchProcessorContext")
