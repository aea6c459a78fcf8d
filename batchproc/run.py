"""``torch_batch_process``: wires the flow together, in order.

worker init -> open the run (resume point) -> sharded loader -> processor -> checkpoint/commit ->
reduce/report.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import uuid
from typing import Any, Dict, List, Optional, Type

import torch
from torch.utils.data import Dataset

from batchproc import checkpoint, sharding
from batchproc.distributed import WorkerEnv, init_worker
from batchproc.errors import TooManyBadSamplesError, UserCodeError
from batchproc.faults import Faults
from batchproc.loader import build_loader, check_dataloader_kwargs, describe_sample
from batchproc.prefetch import DevicePrefetcher, device_prefetch_enabled
from batchproc.progress import Progress
from batchproc.preempt import SIGNALS as PREEMPT_SIGNALS, PreemptionWatcher, clear_stop_request
from batchproc.processor import (TensorBoardMirror, TorchBatchProcessor, TorchBatchProcessorContext,
                                 default_tensorboard_path)
from batchproc.reducer import ReducerRegistry
from batchproc.report import METRICS_FILE, RunState, write_metrics, write_state
from batchproc.settings import RunSettings
from batchproc.storage import STAGING, RunDir, RunLock, Stager, acquire_run_lock


@dataclasses.dataclass(frozen=True)
class BatchProcessResult:
    """What ``torch_batch_process`` returns, on every rank."""

    completed: bool
    preempted: bool
    steps_completed: int  #: global batches committed so far (the watermark)
    total_batches: int
    metrics: Dict[str, Any]
    run_dir: str
    steps_this_attempt: int = 0  #: steps this rank ran in this call


def torch_batch_process(
    batch_processor_cls: Type[TorchBatchProcessor],
    dataset: Dataset,
    batch_size: int = 64,
    checkpoint_interval: int = 5,
    max_batches: Optional[int] = None,
    dataloader_kwargs: Optional[Dict[str, Any]] = None,
    *,
    storage: Optional[str] = None,
    storage_options: Optional[Dict[str, Any]] = None,
    bad_samples: str = "raise",
    max_bad_samples: Optional[int] = None,
) -> BatchProcessResult:
    """Run ``batch_processor_cls`` over ``dataset`` on every rank, checkpointed and resumable.

    The loop, on every rank ``r`` of ``W``, from the committed watermark ``G``::

        for step in range(ceil((B - G) / W)):        # the same count on every rank
            g = G + step * W + r                      # exact round-robin, no padding
            if g < B: processor.process_batch(load(g), batch_idx=g // W)
            if step hits checkpoint_interval or a stop is agreed (one all-reduce):
                commit: on_checkpoint_start -> uploads joined -> record -> publish
        on_finish(); final commit; metrics = cross_slot_reduce(every slot, every attempt)

    Args:
        batch_processor_cls: your :class:`TorchBatchProcessor` subclass.
        dataset: a map-style dataset with ``__len__``.
        batch_size: samples per batch.
        checkpoint_interval: steps between checkpoints.
        max_batches: cap on the batches each worker processes.
        dataloader_kwargs: passed to ``DataLoader`` (no shuffle, sampler, batch_sampler or batch_size).
        storage: fsspec URL or path of the run directory; default from ``batchproc run``, else
            ``./runs/<script name>``.
        bad_samples: ``"raise"`` (fail naming the sample) or ``"skip"`` (drop and record it).
        max_bad_samples: with ``"skip"``, fail once more samples than this were skipped.
    """
    _check_arguments(dataset, batch_size, checkpoint_interval, max_batches, bad_samples)
    loader_kwargs = check_dataloader_kwargs(dataloader_kwargs)
    settings = RunSettings.from_env()
    env = init_worker(settings.pg_timeout_s)
    run_dir = RunDir(*_resolve_storage(storage, storage_options, settings))
    lock: Optional[RunLock] = None
    try:
        if env.is_chief and not settings.lock_held:
            lock = acquire_run_lock(run_dir, holder=f"{' '.join(sys.argv)}")
        return _Job(env, run_dir, settings, dataset, batch_processor_cls, batch_size,
                    checkpoint_interval, max_batches, loader_kwargs, bad_samples, max_bad_samples).run()
    except BaseException as e:
        if env.is_chief:
            _record_failure(run_dir, e)
        raise
    finally:
        if lock is not None:
            lock.release()
        env.shutdown()


def _record_failure(run_dir: RunDir, error: BaseException) -> None:
    try:
        write_state(run_dir, RunState.FAILED, error=f"{type(error).__name__}: {error}"[:2000])
    except Exception:  # the original error matters more than the status file
        pass


def _check_arguments(dataset: Any, batch_size: int, interval: int, max_batches: Optional[int],
                     bad_samples: str) -> None:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"torch_batch_process needs a map-style dataset with __len__ and __getitem__; "
                         f"got {type(dataset).__name__}")
    for name, value in (("batch_size", batch_size), ("checkpoint_interval", interval)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if bad_samples not in ("raise", "skip"):
        raise ValueError(f"bad_samples must be 'raise' or 'skip', got {bad_samples!r}")


def _resolve_storage(storage: Optional[str], options: Optional[Dict[str, Any]],
                     settings: RunSettings) -> tuple:
    if storage is not None:
        return str(storage), options or {}
    if settings.run_dir is not None:
        return settings.run_dir, settings.storage_options
    script = os.path.splitext(os.path.basename(sys.argv[0] or "batchproc"))[0] or "batchproc"
    return os.path.abspath(os.path.join("runs", script)), {}


class _Job:
    """One attempt of a job on one rank."""

    def __init__(self, env: WorkerEnv, run_dir: RunDir, settings: RunSettings, dataset: Dataset,
                 processor_cls: Type[TorchBatchProcessor], batch_size: int, interval: int,
                 max_batches: Optional[int], loader_kwargs: Dict[str, Any], bad_samples: str,
                 max_bad_samples: Optional[int]) -> None:
        self.env, self.run_dir, self.settings = env, run_dir, settings
        self.dataset, self.processor_cls = dataset, processor_cls
        self.batch_size, self.interval, self.max_batches = batch_size, interval, max_batches
        self.loader_kwargs, self.bad_samples, self.max_bad_samples = loader_kwargs, bad_samples, max_bad_samples
        self.faults = Faults(env.rank)

    def _open(self) -> "tuple[checkpoint.Resumed, Dict[str, Any], str]":
        """Rank 0 reads the resume point; every rank receives it (or rank 0's error)."""
        n = len(self.dataset)  # type: ignore[arg-type]
        fingerprint = {"dataset_len": n, "batch_size": self.batch_size, "max_batches": self.max_batches,
                       "total_batches": sharding.num_batches(n, self.batch_size, self.max_batches, self.env.world_size)}
        opened: Any = None
        if self.env.is_chief:
            try:
                self.run_dir.makedirs("")
                resumed = checkpoint.open_run(self.run_dir, fingerprint, self.env.restart_count)
                fingerprint["total_batches"] = resumed.total_batches
                if not resumed.completed:
                    clear_stop_request(self.run_dir)
                    write_state(self.run_dir, RunState.RUNNING, attempts=resumed.attempts,
                                restarts=resumed.restarts, world_size=self.env.world_size,
                                committed_batches=resumed.watermark, total_batches=resumed.total_batches)
                opened = (resumed, fingerprint, uuid.uuid4().hex[:8])
            except BaseException as e:
                opened = e
        opened = self.env.broadcast(opened)
        if isinstance(opened, BaseException):
            raise opened
        return opened

    def run(self) -> BatchProcessResult:
        resumed, fingerprint, attempt = self._open()
        if resumed.completed:
            metrics = self._finished_metrics(resumed)
            return self._result(resumed.watermark, resumed.total_batches, metrics, completed=True)

        env = self.env
        reducers = ReducerRegistry()
        stager = Stager(self.run_dir, attempt, env.rank)
        tb_path = self._tensorboard_path()
        tb_mirror = None if self.run_dir.is_local else TensorBoardMirror(self.run_dir, tb_path, env.is_chief)
        context = TorchBatchProcessorContext(env, stager, reducers, self.settings.hparams, tb_path, self.run_dir.url)
        self.context = context
        processor = self.processor_cls(context)
        ckpt = checkpoint.Checkpointer(self.run_dir, env, stager, reducers, resumed, fingerprint, attempt, self.faults)

        G, total, W = resumed.watermark, resumed.total_batches, env.world_size
        steps = sharding.steps_per_rank(G, total, W)
        sampler = sharding.RankBatchSampler(fingerprint["dataset_len"], self.batch_size, total, G, W, env.rank)
        loader = build_loader(self.dataset, sampler, self.loader_kwargs, self.bad_samples, env.device,
                              env.local_world_size)
        batches: Any = None
        new_errors: List[Dict[str, Any]] = []
        skipped_total = resumed.skipped_samples
        preempted = False
        step = 0
        progress = Progress(env.is_chief, G, total, self.batch_size, fingerprint["dataset_len"])
        try:
            with PreemptionWatcher(env, self.run_dir) as watcher:
                # Loader workers are forked here with the preemption signals blocked: one arriving
                # before a worker has set them to SIG_IGN (loader._WorkerInit) would kill it. The
                # main process gets the signal when the mask is restored, as a stop request.
                masked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
                try:
                    batches = iter(loader)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, masked)
                items = self._with_device_copies(batches)
                for step in range(steps):
                    g = sharding.global_batch(G, W, env.rank, step)
                    if g < total:
                        loaded, context._device_copies = next(items)
                        if loaded.bad:
                            records = loaded.bad_records()
                            new_errors.extend(records)
                            skipped_total += len(records)
                            self._check_bad_budget(skipped_total)
                        if loaded.batch is not None:
                            context.global_batch_idx, context.batch_indices = g, loaded.indices
                            self._process(processor, loaded.batch, g)
                    if self.faults.fires("stop", step):
                        watcher.request("fault hook")
                    self.faults.maybe_kill("kill", step)
                    progress.advance(G + step * W, G + (step + 1) * W)
                    done = step + 1
                    if done == steps:
                        break
                    stop = watcher.should_stop()
                    if stop or done % self.interval == 0:
                        ckpt.commit(processor, sharding.watermark_after(G, total, W, done), new_errors,
                                    RunState.PREEMPTED if stop else RunState.RUNNING)
                        new_errors = []
                        if tb_mirror is not None:
                            tb_mirror.sync()
                    if stop:
                        preempted = True
                        break
                if not preempted:
                    processor.on_finish()
                    ckpt.commit(processor, total, new_errors, RunState.RUNNING)
        finally:
            # Shut loader workers down now: left to the garbage collector, each waits 5 s.
            getattr(batches, "_shutdown_workers", lambda: None)()
            progress.close()
            stager.close()
            context._close()
            if tb_mirror is not None:
                tb_mirror.close()
        watermark = total if not preempted else sharding.watermark_after(G, total, W, step + 1)
        env.barrier()  # every rank has published before the run is called done
        if env.is_chief:
            self.run_dir.rm(STAGING, recursive=True)  # only empty folders are left
            if preempted:
                write_state(self.run_dir, RunState.PREEMPTED, reason=watcher.requested)
            else:
                write_metrics(self.run_dir, ckpt.metrics_so_far)
                write_state(self.run_dir, RunState.COMPLETED)
        metrics = env.broadcast(ckpt.metrics_so_far)
        return self._result(watermark, total, metrics, completed=not preempted, preempted=preempted,
                            steps=step + 1 if preempted else steps)

    def _with_device_copies(self, batches: Any) -> Any:
        """``(loaded batch, device copies of its tensors)`` items; the copies come from the side-stream
        prefetcher when it is on, else there are none and ``to_device`` copies on demand."""
        if not device_prefetch_enabled(self.env.device):
            return ((loaded, {}) for loaded in batches)
        return DevicePrefetcher(batches, self.env.device, batch_of=lambda loaded: loaded.batch)

    def _process(self, processor: TorchBatchProcessor, batch: Any, g: int) -> None:
        try:
            processor.process_batch(batch, g // self.env.world_size)
        except Exception as e:
            indices = self._describe_indices(self.context.batch_indices)
            raise UserCodeError(
                f"{type(processor).__name__}.process_batch() raised {type(e).__name__}: {e} "
                f"(rank {self.env.rank}, global batch {g}, dataset indices {indices}). "
                f"Work committed before this batch is kept; fix the error and run again to resume.") from e

    def _describe_indices(self, indices: List[int]) -> str:
        if indices and indices == list(range(indices[0], indices[-1] + 1)):
            return f"{indices[0]}..{indices[-1]}"
        return str(indices)

    def _check_bad_budget(self, skipped: int) -> None:
        if self.max_bad_samples is not None and skipped > self.max_bad_samples:
            raise TooManyBadSamplesError(
                f"{skipped} samples failed to load, more than max_bad_samples={self.max_bad_samples}; "
                f"see {self.run_dir.url}/errors.jsonl for those committed so far. Fix the data or raise the bound.")

    def _finished_metrics(self, resumed: checkpoint.Resumed) -> Dict[str, Any]:
        """A run found complete: report its metrics, writing only what a crash at the end left out."""
        metrics: Any = None
        if self.env.is_chief:
            metrics = resumed.metrics
            if not self.run_dir.exists(METRICS_FILE):
                write_metrics(self.run_dir, metrics)
                write_state(self.run_dir, RunState.COMPLETED)
        return self.env.broadcast(metrics)

    def _tensorboard_path(self):
        return default_tensorboard_path(self.run_dir.root, self.run_dir.is_local, self.env.rank)

    def _result(self, watermark: int, total: int, metrics: Dict[str, Any], completed: bool = False,
                preempted: bool = False, steps: int = 0) -> BatchProcessResult:
        return BatchProcessResult(completed=completed, preempted=preempted, steps_completed=watermark,
                                  total_batches=total, metrics=metrics, run_dir=self.run_dir.url,
                                  steps_this_attempt=steps)
