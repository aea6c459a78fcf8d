"""``torch_batch_process``: wires the flow together, in order.

worker init -> open the run (resume point) -> sharded loader -> processor -> checkpoint/commit ->
reduce/report.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import sys
import uuid
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, cast

from torch.utils.data import Dataset, default_collate

from batchproc.engine import checkpoint, dynamic, sharding
from batchproc.distributed import WorkerEnv, init_worker
from batchproc.engine import verdict
from batchproc.engine import entry
from batchproc.engine.entry import REPORTED
from batchproc.engine.batch_faults import BatchRunner, Watchdog
from batchproc.errors import (RunDirLockedError, RunDirUnwritableError, BatchTimeoutError, PeerFailedError, TooManyBadBatchesError, TooManyBadSamplesError,
                              UserCodeError)
from batchproc.engine.fault_injection import fault_hooks
from batchproc.engine.policy import BadWorkPolicy, ErrorRecord, Skipped
from batchproc.data.inputs import freeze_inputs
from batchproc.engine.loader import build_loader, check_dataloader_kwargs
from batchproc.engine.prefetch import DevicePrefetcher, device_prefetch_enabled
from batchproc.engine.progress import Progress
from batchproc.engine.preempt import PreemptionWatcher, clear_stop_request
from batchproc.processor import (EngineHandle, TensorBoardMirror, TorchBatchProcessor, TorchBatchProcessorContext,
                                 default_tensorboard_path)
from batchproc.reducer import ReducerRegistry
from batchproc.rundir import lifecycle
from batchproc.rundir.lifecycle import BEFORE_FIRST_BATCH, IN_ON_FINISH, Phase, RunState, Where
from batchproc.rundir.layout import ERRORS_FILE, FINISH_TAG, METRICS_FILE, STAGING
from batchproc.rundir.report import write_metrics
from batchproc.settings import PREEMPTION_SIGNALS, SCHEDULES, RunSettings
from batchproc.lifeline import die_with_parent, under_torchrun
from batchproc.rundir.job_lock import JobMembership, lock_root
from batchproc.rundir.lifecycle import ExitCode
from batchproc.rundir.storage import RunDir, RunLock, Stager, acquire_run_lock, check_lease

DETERMINISTIC = verdict.DETERMINISTIC


def _user_call(fn: Any, name: str, *args: Any) -> Any:
    """Call the user's ``name`` (e.g. ``MyProcessor.on_finish``); its exception becomes a
    :class:`UserCodeError` naming it."""
    try:
        return fn(*args)
    except Exception as e:
        if verdict.is_collective_failure(e):  # a peer died under the user's collective: not their error
            raise
        raise UserCodeError(f"{name}() raised {type(e).__name__}: {e}. Fix the error and run again; "
                            "committed work is kept.") from e


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


DEFAULT_BATCH_SIZE = 1  # Determined's, when neither batch_size nor dataloader_kwargs["batch_size"] is given


def torch_batch_process(
    batch_processor_cls: Type[TorchBatchProcessor],
    dataset: "Dataset[Any]",
    batch_size: Optional[int] = None,
    max_batches: Optional[int] = None,
    checkpoint_interval: int = 5,
    dataloader_kwargs: Optional[Dict[str, Any]] = None,
    distributed_context: Any = None,
    *,
    storage: Optional[str] = None,
    storage_options: Optional[Dict[str, Any]] = None,
    bad_samples: str = "raise",
    max_bad_samples: Optional[int] = None,
    bad_batches: str = "raise",
    max_bad_batches: Optional[int] = None,
    batch_timeout_s: Optional[float] = None,
    schedule: Optional[str] = None,
) -> BatchProcessResult:
    """Run ``batch_processor_cls`` over ``dataset`` on every rank, checkpointed and resumable.

    The positional parameters are Determined's, in its order and with its defaults; ours are
    keyword-only. The loop, on every rank ``r`` of ``W``, from the committed watermark ``G``::

        for step in range(ceil((B - G) / W)):        # the same count on every rank
            g = G + step * W + r                      # exact round-robin, no padding
            if g < B: processor.process_batch(load(g), batch_idx=g // W)
            if step hits checkpoint_interval or a stop is agreed (one all-reduce):
                commit: on_checkpoint_start -> uploads joined -> record -> publish
        final commit (on_checkpoint_start -> ... -> publish)    # state: finishing
        every rank has published; metrics final -> on_finish()  # at-least-once
        every rank's on_finish returned                         # state: completed

    Args:
        batch_processor_cls: your :class:`TorchBatchProcessor` subclass.
        dataset: a map-style dataset with ``__len__``.
        batch_size: samples per batch; ``None`` takes ``dataloader_kwargs["batch_size"]``, else 1.
        max_batches: cap on the batches each worker processes (``<= 0``: no cap, with a warning).
        checkpoint_interval: steps between checkpoints.
        dataloader_kwargs: passed to ``DataLoader`` (no shuffle, sampler or batch_sampler).
        distributed_context: Determined's ``DistributedContext`` (or any object with
            ``get_rank()`` and ``get_size()``); batchproc takes ranks from torchrun or an
            initialized process group, and checks that they agree with it.
        storage: fsspec URL or path of the run directory; default from ``batchproc run``, else
            ``./runs/<script name>``.
        storage_options: fsspec options for ``storage``.
        bad_samples: ``"raise"`` (fail naming the sample) or ``"skip"`` (drop and record it).
        max_bad_samples: with ``"skip"``, fail once more samples than this were skipped.
        bad_batches: ``"raise"`` (fail naming the batch) or ``"skip"`` (record a batch whose
            ``process_batch`` raised in ``errors.jsonl`` and go on). Either way a batch that runs
            out of memory is split in halves and retried first (see :mod:`batchproc.engine.batch_faults`).
        max_bad_batches: with ``"skip"``, fail once more batches than this were skipped.
        batch_timeout_s: a rank whose batch runs longer dumps its threads' stacks and fails the
            job at once (off by default).
        schedule: ``"static"`` (the loop above, Determined's call counts) or ``"dynamic"``: ranks
            claim the remaining global batches one at a time, so a faster rank does more of them,
            and each rank commits on its own (:mod:`batchproc.engine.dynamic`). ``None``: the
            experiment's ``schedule`` key, else ``"static"``. A run keeps the schedule it started with.
    """
    loader_kwargs = check_dataloader_kwargs(dataloader_kwargs, batch_size is not None)
    if batch_size is None:
        batch_size = loader_kwargs.pop("batch_size", DEFAULT_BATCH_SIZE)
    max_batches = _check_arguments(dataset, batch_size, checkpoint_interval, max_batches)
    policy = BadWorkPolicy.from_arguments(bad_samples, max_bad_samples, bad_batches, max_bad_batches, batch_timeout_s)
    settings = RunSettings.from_env()
    schedule = _check_schedule(schedule if schedule is not None else settings.schedule or "static")
    if under_torchrun():
        die_with_parent(started_by_supervisor=False)  # torchrun SIGKILLed: this worker checkpoints and stops
    env = init_worker(settings.pg_timeout_s)
    run_dir = RunDir(*_resolve_storage(storage, storage_options, settings))
    lock: Optional[RunLock] = None
    member: Optional[JobMembership] = None
    job: Optional[_Job] = None
    try:
        _check_distributed_context(distributed_context, env)
        try:
            if env.is_chief and not settings.lock_held:
                lock = acquire_run_lock(run_dir, holder=f"{' '.join(sys.argv)}")
                lock.on_lost = _stop_now  # this rank holds the lease, and another job took it over
            member = _join_job(run_dir)
        except RunDirLockedError:
            raise
        except OSError as e:  # a read-only or full run directory: named, not a traceback from os
            raise RunDirUnwritableError.wrap(run_dir.url, e) from None
        job = _Job(env, run_dir, settings, dataset, batch_processor_cls, batch_size,
                   checkpoint_interval, max_batches, loader_kwargs, policy, _lease_check(run_dir, lock, settings),
                   schedule, lock.lease_id if lock is not None else settings.lease_id)
        result = job.run()
        entry.returned()
        return result
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code == 0:
            raise  # a clean exit after a verdict (batchproc.engine.verdict): recorded already
        phase = job.phase if job is not None else BEFORE_FIRST_BATCH
        _record_failure(run_dir, e, env, job)
        verdict.handle(e, env.rank, phase)  # leaves cleanly when a restart could not help
        try:
            setattr(e, REPORTED, True)  # batchproc.engine.entry: decided here, not to be reported again
        except Exception:
            pass
        raise
    finally:
        if member is not None:
            member.leave()
        if lock is not None:
            lock.release()
        env.shutdown()


def _lease_check(run_dir: RunDir, lock: Optional[RunLock], settings: RunSettings) -> Callable[[], None]:
    """What rank 0 calls before each checkpoint record: the object-store lease is still this job's.
    Our own lock when rank 0 holds it, else the supervisor's lease by its id (one GET)."""
    if lock is not None:
        return lock.verify
    lease_id = settings.lease_id
    if run_dir.is_local or lease_id is None:
        return lambda: None  # a local run directory's lock is a filelock: nobody takes it over
    return lambda: check_lease(run_dir, lease_id, f"the job of {' '.join(sys.argv)}")


def _stop_now(message: str) -> None:
    """The lease is lost (the heartbeat said why on stderr): stop this rank at once, committing
    nothing; its peers see it gone. Called from the heartbeat thread, hence no exception."""
    sys.stderr.flush()
    os._exit(int(ExitCode.LOCKED))


def _join_job(run_dir: RunDir) -> JobMembership:
    """Hold the run directory as a worker of this job (batchproc.rundir.job_lock), so that a
    supervisor starting the next job on this machine waits for this process to be gone."""
    return JobMembership(lock_root(run_dir), worker=True).join()


def _record_failure(run_dir: RunDir, error: BaseException, env: WorkerEnv, job: Optional["_Job"]) -> None:
    """Every failing rank reports its error and phase; rank 0 also marks the run FAILED.

    The supervisor (``batchproc run`` / the launcher) later replaces rank 0's error by the root
    cause among all the reports: a rank whose peer failed first only sees its collective break.
    """
    phase = job.phase if job is not None else BEFORE_FIRST_BATCH
    attempt = job.attempt if job is not None else None
    try:
        failure = lifecycle.report_failure(run_dir, error, env.rank, phase, attempt)
        if env.is_chief:
            lifecycle.record_failure(run_dir, failure)
    except Exception:  # the original error matters more than the status file
        pass


def _check_arguments(dataset: Any, batch_size: Any, interval: Any, max_batches: Optional[int]) -> Optional[int]:
    """Validate the arguments; returns ``max_batches`` as it will be used."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"torch_batch_process needs a map-style dataset with __len__ and __getitem__; "
                         f"got {type(dataset).__name__}")
    for name, value in (("batch_size", batch_size), ("checkpoint_interval", interval)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_batches is not None:
        if not isinstance(max_batches, int) or isinstance(max_batches, bool):
            raise ValueError(f"max_batches must be an int or None, got {max_batches!r}")
        if max_batches <= 0:
            # Determined's behaviour, kept so that ported scripts run the same.
            warnings.warn(f"max_batches={max_batches} is not positive; processing the whole dataset",
                          stacklevel=3)
            max_batches = None
    return max_batches


def _check_schedule(schedule: Any) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    return str(schedule)


def _check_distributed_context(context: Any, env: WorkerEnv) -> None:
    if context is None:
        return
    try:
        rank, size = int(context.get_rank()), int(context.get_size())
    except AttributeError:
        raise TypeError(f"distributed_context must have get_rank() and get_size() (Determined's "
                        f"DistributedContext); got {type(context).__name__}") from None
    if (rank, size) != (env.rank, env.world_size):
        raise ValueError(f"distributed_context says rank {rank} of {size}, but this process is rank "
                         f"{env.rank} of {env.world_size} (from torchrun's environment or the initialized "
                         "process group). Launch with torchrun (python -m launch.torch_distributed), or "
                         "initialize torch.distributed to match before calling torch_batch_process.")


def _resolve_storage(storage: Optional[str], options: Optional[Dict[str, Any]],
                     settings: RunSettings) -> Tuple[str, Dict[str, Any]]:
    if storage is not None:
        return str(storage), options or {}
    if settings.run_dir is not None:
        return settings.run_dir, settings.storage_options
    script = os.path.splitext(os.path.basename(sys.argv[0] or "batchproc"))[0] or "batchproc"
    return os.path.abspath(os.path.join("runs", script)), {}


class _Job:
    """One attempt of a job on one rank."""

    def __init__(self, env: WorkerEnv, run_dir: RunDir, settings: RunSettings, dataset: "Dataset[Any]",
                 processor_cls: Type[TorchBatchProcessor], batch_size: int, interval: int,
                 max_batches: Optional[int], loader_kwargs: Dict[str, Any],
                 policy: BadWorkPolicy = BadWorkPolicy(), verify_lease: Callable[[], None] = lambda: None,
                 schedule: str = "static", lease_id: Optional[str] = None) -> None:
        self.env, self.run_dir, self.settings = env, run_dir, settings
        self.verify_lease = verify_lease
        self.lease_id = lease_id  #: the object-store lease this job holds (its id), for every rank's check
        self.dataset, self.processor_cls = dataset, processor_cls
        self.batch_size, self.interval, self.max_batches = batch_size, interval, max_batches
        self.loader_kwargs, self.policy, self.schedule = loader_kwargs, policy, schedule
        self._watcher: Optional[PreemptionWatcher] = None
        self.hooks = fault_hooks(env.rank, self._stop_requested)  # test fault injection; a no-op otherwise
        self.phase: Where = BEFORE_FIRST_BATCH  #: where a failure happened, for its report
        self.attempt: Optional[str] = None
        self.tb_mirror: Optional[TensorBoardMirror] = None

    def _fingerprint(self) -> checkpoint.Fingerprint:
        """The job's fingerprint, its inputs frozen (batchproc.data.inputs); every rank calls it."""
        recorded = checkpoint.recorded_inputs(self.run_dir) if self.env.is_chief else None
        frozen = freeze_inputs(self.dataset, self.run_dir, self.env, recorded)  # first: len() must not list the source
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.loader_kwargs.get("drop_last"):
            n -= n % self.batch_size  # as a DataLoader with drop_last=True would: the tail is not processed
        fingerprint = checkpoint.Fingerprint(
            dataset_len=n, batch_size=self.batch_size, max_batches=self.max_batches,
            total_batches=sharding.num_batches(n, self.batch_size, self.max_batches, self.env.world_size),
            inputs=frozen.get("inputs"))
        per_worker = -(-n // (self.batch_size * self.env.world_size))
        if self.max_batches is not None and self.max_batches > per_worker and self.env.is_chief:
            warnings.warn(f"max_batches={self.max_batches} is more than the {per_worker} batches each of the "
                          f"{self.env.world_size} worker(s) has; processing the whole dataset", stacklevel=3)
        return fingerprint

    def _open(self) -> "tuple[checkpoint.Resumed, checkpoint.Fingerprint, str]":
        """Rank 0 reads the resume point; every rank receives it (or rank 0's error)."""
        fingerprint = self._fingerprint()
        opened: Any = None
        if self.env.is_chief:
            try:
                self.run_dir.makedirs("")
                if self.settings.run_dir is None and verdict.verdict_dir() is not None:
                    verdict.announce_run_dir(self.run_dir.url, lifecycle.read_status(self.run_dir).updated)
                dynamic.check_schedule(self.run_dir, "static")
                resumed = checkpoint.open_run(self.run_dir, fingerprint, self.env.restart_count)
                fingerprint.total_batches = resumed.total_batches
                if not resumed.completed:
                    clear_stop_request(self.run_dir)
                    lifecycle.transition(
                        self.run_dir, RunState.FINISHING if resumed.all_committed else RunState.RUNNING,
                        attempts=resumed.attempts, restarts=resumed.restarts, world_size=self.env.world_size,
                        committed_batches=resumed.watermark, total_batches=resumed.total_batches)
                opened = (resumed, fingerprint, uuid.uuid4().hex[:8])
            except BaseException as e:
                opened = e
        opened = self.env.broadcast(opened)
        if isinstance(opened, BaseException):
            raise opened
        return cast("tuple[checkpoint.Resumed, checkpoint.Fingerprint, str]", opened)

    def run(self) -> BatchProcessResult:
        if self.schedule == "dynamic":
            return dynamic.DynamicAttempt(self).run()
        resumed, fingerprint, attempt = self._open()
        self.attempt = attempt
        if resumed.completed:
            metrics = self._completed_metrics(resumed)
            return self._result(resumed.watermark, resumed.total_batches, metrics, completed=True)

        over_budget = self._over_budget(Skipped(resumed.skipped_samples, resumed.skipped_batches))
        if over_budget is not None:  # it failed past a bound that this start did not raise
            raise over_budget
        env = self.env
        reducers = ReducerRegistry()
        stager = Stager(self.run_dir, attempt, env.rank)
        tb_path = self._tensorboard_path()
        tb_mirror = None if self.run_dir.is_local else TensorBoardMirror(self.run_dir, tb_path, env.is_chief)
        context = TorchBatchProcessorContext(env, stager, reducers, self.settings.hparams, tb_path, self.run_dir.url)
        engine = EngineHandle(context)
        self.context, self.tb_mirror = context, tb_mirror
        batches: Any = None
        try:
            if not resumed.all_committed:
                # The loader workers start first: they fetch and decode the first batches while the
                # processor builds (loads its model), and they are forked before it touches a GPU.
                batches = self._start_loader(resumed, fingerprint)
            processor = _user_call(self.processor_cls, f"{self.processor_cls.__name__}.__init__", context)
            if resumed.all_committed:
                # Every batch was committed and on_finish did not complete: run only on_finish.
                metrics = env.broadcast(resumed.metrics if env.is_chief else None)
                return self._finish(processor, engine, resumed.total_batches, metrics, steps=0)
            ckpt = checkpoint.Checkpointer(self.run_dir, env, stager, reducers, resumed, fingerprint, attempt,
                                           self.hooks, self.verify_lease)
            try:
                steps, preempted, reason = self._process(processor, engine, ckpt, resumed, fingerprint, batches)
            finally:
                stager.close()
            G, total, W = resumed.watermark, resumed.total_batches, env.world_size
            metrics = env.broadcast(ckpt.metrics_so_far)
            if not preempted:
                return self._finish(processor, engine, total, metrics, steps=steps)
            env.barrier()  # every rank has published before the run is called preempted
            if env.is_chief:
                self.run_dir.rm(STAGING, recursive=True)  # only empty folders are left
                lifecycle.transition(self.run_dir, RunState.PREEMPTED, reason=reason)
            return self._result(sharding.watermark_after(G, total, W, steps), total, metrics, preempted=True,
                                steps=steps)
        finally:
            # Shut loader workers down now: left to the garbage collector, each waits 5 s.
            getattr(batches, "_shutdown_workers", lambda: None)()
            engine.close()
            if tb_mirror is not None:
                tb_mirror.close()

    def _start_loader(self, resumed: checkpoint.Resumed, fingerprint: checkpoint.Fingerprint) -> Any:
        """This rank's remaining batches, its loader workers started."""
        env = self.env
        sampler = sharding.RankBatchSampler(fingerprint.dataset_len, self.batch_size, resumed.total_batches,
                                            resumed.watermark, env.world_size, env.rank)
        return self._iterate_loader(sampler)

    def _iterate_loader(self, sampler: Any) -> Any:
        """A loader over ``sampler``'s batches, its workers started."""
        env = self.env
        loader = build_loader(self.dataset, sampler, self.loader_kwargs, self.policy.samples, env.device,
                              env.local_world_size)
        # Loader workers are forked with the preemption signals blocked: one arriving before a
        # worker has set them to SIG_IGN (loader._WorkerInit) would kill it. The main process gets
        # the signal when the mask is restored.
        masked = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        # Frozen, the objects the workers inherit are skipped by their garbage collections, which
        # would otherwise write to every one of them and copy the rank's whole heap page by page
        # (a forked worker took 0.37 s instead of 0.09 s to build its S3 client). Python's gc docs
        # advise it before a fork; the rank unfreezes as soon as its workers exist.
        gc.freeze()
        try:
            return iter(loader)
        finally:
            gc.unfreeze()
            signal.pthread_sigmask(signal.SIG_SETMASK, masked)

    def _stop_requested(self, reason: str) -> None:
        """A stop asked for by a fault hook: the loop checkpoints and stops as on a preemption."""
        if self._watcher is not None:
            self._watcher.request(reason)

    def _process(self, processor: TorchBatchProcessor, engine: EngineHandle,
                 ckpt: checkpoint.Checkpointer, resumed: checkpoint.Resumed,
                 fingerprint: checkpoint.Fingerprint, batches: Any) -> "tuple[int, bool, Optional[str]]":
        """The batches, checkpointed; ends with the final commit unless stopped. Returns
        (steps run, preempted, why it was stopped).

        One all-reduce per step agrees on what comes next: go on, stop (a preemption request), or
        fail (a rank met an error that a restart would meet again: every rank leaves together). The
        same all-reduce sums the samples and batches skipped in the step, so ``max_bad_samples`` and
        ``max_bad_batches`` bound the whole job's count, the same on every rank.
        """
        env = self.env
        G, total, W = resumed.watermark, resumed.total_batches, env.world_size
        steps = sharding.steps_per_rank(G, total, W)
        timeout_s = self.policy.batch_timeout_s
        watchdog = Watchdog(timeout_s, self._batch_timed_out) if timeout_s else None
        collate = self.loader_kwargs.get("collate_fn")
        runner = BatchRunner(processor, engine, env.rank, W, self.policy.batches,
                             splittable=collate is None or collate is default_collate, watchdog=watchdog)
        new_errors: List[ErrorRecord] = []
        step = 0
        progress = Progress(env.is_chief, G, total, self.batch_size, fingerprint.dataset_len)
        try:
            with PreemptionWatcher(env, self.run_dir) as watcher:
                self._watcher = watcher
                items = self._with_device_copies(batches)
                for step in range(steps):
                    g = sharding.global_batch(G, W, env.rank, step)
                    failure: Optional[BaseException] = None
                    bad = (0, 0)
                    try:
                        if g < total:
                            bad = self._step(items, engine, runner, g, new_errors)
                    except DETERMINISTIC as e:
                        failure = e
                    self.hooks.at("stop", step)
                    self.hooks.at("kill", step)
                    progress.advance(G + step * W, G + (step + 1) * W)
                    done = step + 1
                    last = done == steps
                    failed, stopping, bad_samples, bad_batches = env.sum_ints(
                        [failure is not None, watcher.requested is not None and not last, *bad])
                    if failed:
                        ckpt.flush_errors()
                        raise failure or PeerFailedError(
                            f"rank {env.rank} stops: another rank failed in step {step} (its error is the cause)")
                    # Past a bound, every rank commits what the job did so far (errors.jsonl then names
                    # every skip) and fails with the same error.
                    over_budget = self._over_budget(ckpt.add_skipped(bad_samples, bad_batches))
                    stop = stopping > 0 and over_budget is None
                    if last or stop or over_budget is not None or done % self.interval == 0:
                        final = last and over_budget is None
                        state = RunState.FINISHING if final else RunState.PREEMPTED if stop else RunState.RUNNING
                        self.phase = Where(Phase.CHECKPOINT, "in the final checkpoint" if final else f"in the checkpoint after step {done}")
                        ckpt.commit(processor, sharding.watermark_after(G, total, W, done), new_errors, state)
                        new_errors = []
                        if self.tb_mirror is not None:
                            self.tb_mirror.sync()
                    if over_budget is not None:
                        self.phase = Where(Phase.OVER_BOUND, f"after step {done}, past a bound on skipped work")
                        ckpt.flush_errors()
                        raise over_budget
                    if stop:
                        return done, True, watcher.requested
                return steps, False, None
        finally:
            self._watcher = None
            getattr(batches, "_shutdown_workers", lambda: None)()  # before on_finish, not after it
            progress.close()
            if watchdog is not None:
                watchdog.close()

    def _step(self, items: Any, engine: EngineHandle, runner: BatchRunner, g: int,
              new_errors: List[ErrorRecord]) -> "tuple[int, int]":
        """Load global batch ``g`` and process it under the sample and batch policies; returns how
        many of its samples failed to load and whether it failed in ``process_batch`` (0 or 1: a
        batch split after running out of memory counts once, however many of its pieces failed)."""
        self.phase = Where(Phase.LOADING, f"loading global batch {g}")
        loaded, copies = next(items)
        engine.set_device_copies(copies)
        records = loaded.sample_errors(self.policy.samples) if loaded.bad else []
        new_errors.extend(records)
        failed_batch = 0
        if loaded.batch is not None:
            self.phase = Where(Phase.BATCH, f"in global batch {g}")
            runner.run(loaded.batch, loaded.indices, g)
            pieces = runner.take_records()
            new_errors.extend(pieces)
            failed_batch = 1 if pieces else 0
        return len(records), failed_batch

    def _over_budget(self, skipped: Skipped) -> Optional[Exception]:
        """The error for a job past ``max_bad_samples`` or ``max_bad_batches``, else None."""
        where = f"{self.run_dir.url}/{ERRORS_FILE}"
        samples, batches = self.policy.samples, self.policy.batches
        if samples.over(skipped.samples):
            return TooManyBadSamplesError(
                f"{skipped.samples} samples failed to load, more than max_bad_samples={samples.max_bad}; "
                f"each is named in {where}. Work committed so far is kept: fix the data or raise the bound, "
                "then run again to resume.")
        if batches.over(skipped.batches):
            return TooManyBadBatchesError(
                f"{skipped.batches} batches failed in process_batch, more than "
                f"max_bad_batches={batches.max_bad}; each is named in {where}. Work committed so far is "
                "kept: fix the cause or raise the bound, then run again to resume.")
        return None

    def _batch_timed_out(self, g: int, timeout_s: float) -> None:
        """On the watchdog's thread: record the stuck batch, then end this process at once."""
        error = BatchTimeoutError(
            f"rank {self.env.rank}: global batch {g} ran longer than batch_timeout_s={timeout_s:g}; every "
            "thread's stack is in this rank's log. Committed work is kept.")
        phase = Where(Phase.STUCK, f"stuck in global batch {g}")
        try:
            failure = lifecycle.report_failure(self.run_dir, error, self.env.rank, phase, self.attempt)
            if self.env.is_chief:
                lifecycle.record_failure(self.run_dir, failure)
        except Exception:  # the verdict and the log say it too
            pass
        print(f"batchproc: {error}", file=sys.stderr, flush=True)
        # Exit code 0 under a supervisor (it reads the verdict; torchrun must not restart a stuck
        # batch), else 1. os._exit: the main thread is stuck, and no cleanup may wait for it.
        os._exit(0 if verdict.write(f"BatchTimeoutError: {error}", self.env.rank, phase) else 1)

    def _finish(self, processor: TorchBatchProcessor, engine: EngineHandle, total: int,
                metrics: Dict[str, Any], steps: int) -> BatchProcessResult:
        """Determined's end: after the final commit of every rank, ``on_finish`` on every rank.

        The run is FINISHING (all outputs published, metrics final) until every rank's
        ``on_finish`` returned, then COMPLETED. Files written in ``upload_path()`` during
        ``on_finish`` are published when this rank's ``on_finish`` returns, under names that are
        the same on every run of it (tag ``ffffffff``), so a rerun after a crash replaces them
        instead of adding copies.
        """
        env = self.env
        self.phase = Where(Phase.FINAL, "after the final checkpoint")
        env.barrier()  # every rank has published: on_finish may read any rank's outputs
        if env.is_chief:
            self.run_dir.rm(STAGING, recursive=True)
            write_metrics(self.run_dir, metrics)
            lifecycle.transition(self.run_dir, RunState.FINISHING, metrics=metrics)
        env.barrier()  # staging is cleared before any rank's on_finish stages files in it
        engine.context.metrics = metrics
        finish_stager = Stager(self.run_dir, FINISH_TAG, env.rank)
        engine.swap_stager(finish_stager)
        self.phase = IN_ON_FINISH
        try:
            self.hooks.at("kill-in-finish")
            _user_call(processor.on_finish, f"{type(processor).__name__}.on_finish")
            for staged, final in finish_stager.join():
                self.run_dir.publish(staged, final)
        finally:
            finish_stager.close()
        self.phase = Where(Phase.AFTER_ON_FINISH, "after on_finish")
        env.barrier()  # every rank's on_finish returned
        if env.is_chief:
            self.run_dir.rm(STAGING, recursive=True)
            lifecycle.transition(self.run_dir, RunState.COMPLETED)
        return self._result(total, total, metrics, completed=True, steps=steps)

    def _with_device_copies(self, batches: Any) -> Any:
        """``(loaded batch, device copies of its tensors)`` items; the copies come from the side-stream
        prefetcher when it is on, else there are none and ``to_device`` copies on demand."""
        if not device_prefetch_enabled(self.env.device):
            return ((loaded, {}) for loaded in batches)
        return DevicePrefetcher(batches, self.env.device, batch_of=lambda loaded: loaded.batch)

    def _completed_metrics(self, resumed: checkpoint.Resumed) -> Dict[str, Any]:
        """A run found complete: report its metrics, writing only what a crash at the end left out."""
        metrics: Any = None
        if self.env.is_chief:
            metrics = resumed.metrics
            if not self.run_dir.exists(METRICS_FILE):
                write_metrics(self.run_dir, metrics)
        return cast(Dict[str, Any], self.env.broadcast(metrics))

    def _tensorboard_path(self) -> Any:
        return default_tensorboard_path(self.run_dir.root, self.run_dir.is_local, self.env.rank)

    def _result(self, watermark: int, total: int, metrics: Dict[str, Any], completed: bool = False,
                preempted: bool = False, steps: int = 0) -> BatchProcessResult:
        return BatchProcessResult(completed=completed, preempted=preempted, steps_completed=watermark,
                                  total_batches=total, metrics=metrics, run_dir=self.run_dir.url,
                                  steps_this_attempt=steps)
