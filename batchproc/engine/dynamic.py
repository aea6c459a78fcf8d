"""``schedule="dynamic"``: ranks claim global batches from a shared counter; no rank waits for the slowest.

One attempt on one rank::

    rank 0 folds every earlier rank record into one (batchproc.engine.rank_records); the others wait
    loop:  claim the next remaining batch (c10d store.add, done by the loader's batch sampler as it
           asks for work, so claims run ahead only as far as the loader prefetches)
           process it; every checkpoint_interval of this rank's own batches: commit on its own
           (on_checkpoint_start -> uploads joined -> its immutable rank record -> publish)
    stop:  a preemption (signal, ``batchproc stop``, a bound, a failure) adds STOP to the counter,
           so every rank's next claim fails: each finishes its current batch and commits
    end:   a rank with nothing left commits, then all ranks meet once (one gather): rank 0 folds
           the attempt's records into the final record, metrics, status, then on_finish

There is no collective per batch. A batch claimed but never committed (a crash, a stop) is not in
any record, so the next attempt's fold leaves it in the remaining batches and it is redone.
``max_bad_samples`` and ``max_bad_batches`` bound counts kept in the store, so they are job-wide.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, cast

from torch.utils.data import default_collate

from batchproc.distributed import WorkerEnv
from batchproc.engine import checkpoint, verdict
from batchproc.engine.batch_faults import BatchRunner, Watchdog
from batchproc.engine.policy import ErrorRecord, Skipped
from batchproc.engine.preempt import PreemptionWatcher, clear_stop_request
from batchproc.engine.rank_records import (FOLD_EVERY, Folded, LiveFold, RankRecord, Remaining, count, merge, of_batches,
                                           open_fold, write_rank_record)
from batchproc.engine.sharding import batch_indices
from batchproc.errors import PeerFailedError, TooManyBadBatchesError, TooManyBadSamplesError, UserCodeError
from batchproc.plain import to_plain
from batchproc.reducer import ReducerRegistry
from batchproc.rundir import lifecycle
from batchproc.rundir.layout import DYNAMIC_RECORDS, RECORDS, STAGING
from batchproc.rundir.lifecycle import Phase, RunState, Where
from batchproc.rundir.storage import RunDir, Stager, check_lease

if TYPE_CHECKING:
    from batchproc.engine.run import BatchProcessResult, _Job

#: Added to the claim counter by a rank that stops: every later claim is past it, and fails.
STOP = 1 << 40


def check_schedule(run_dir: RunDir, schedule: str) -> None:
    """A run keeps its schedule: the other one's records would be ignored and its work redone."""
    has_dynamic = bool(run_dir.listdir(DYNAMIC_RECORDS))
    has_static = any(n.startswith("ckpt-") for n in run_dir.listdir(RECORDS))
    other = "dynamic" if schedule == "static" and has_dynamic else "static" if schedule == "dynamic" and has_static else None
    if other is not None:
        raise ValueError(f"run directory {run_dir.url} was started with schedule={other!r}; it cannot be resumed "
                         f"with schedule={schedule!r}. Resume it with schedule={other!r}, or start over with "
                         "`batchproc run ... --fresh`.")


class Claims:
    """This attempt's claim counter in the process group's store, and the job-wide counts beside it."""

    def __init__(self, store: Any, attempt: str, remaining: Remaining) -> None:
        self.store = store
        self.prefix = f"dynamic/{attempt}"
        self.remaining = remaining
        self.stopped = False  #: a claim found the STOP mark: some rank stopped the attempt
        self._stop_sent = False

    def next(self) -> Optional[int]:
        """The next remaining global batch for this rank, or None when none is left (or a stop)."""
        if self.stopped:
            return None
        k = int(self.store.add(f"{self.prefix}/claims", 1)) - 1
        if k >= STOP:
            self.stopped = True
            return None
        return self.remaining[k] if k < len(self.remaining) else None

    def stop_all(self) -> None:
        """Every rank's next claim fails (idempotent per rank)."""
        if not self._stop_sent:
            self._stop_sent = True
            self.store.add(f"{self.prefix}/claims", STOP)

    def add(self, name: str, n: int) -> int:
        """Add ``n`` to a job-wide count of this attempt; its new value."""
        return int(self.store.add(f"{self.prefix}/{name}", n))


class ClaimingBatchSampler:
    """A ``batch_sampler`` that claims each batch only when the DataLoader asks for the next one."""

    def __init__(self, claims: Claims, dataset_len: int, batch_size: int) -> None:
        self.claims, self.dataset_len, self.batch_size = claims, dataset_len, batch_size

    def __len__(self) -> int:
        return len(self.claims.remaining)  # an upper bound: the DataLoader only sizes its workers by it

    def __iter__(self) -> Iterator[List[int]]:
        while (g := self.claims.next()) is not None:
            yield list(batch_indices(g, self.batch_size, self.dataset_len))


class _Watcher(PreemptionWatcher):
    """A stop request (signal, ``batchproc stop`` seen by rank 0's poller, a fault hook) also puts
    the STOP mark in the counter at once, so the other ranks stop claiming."""

    def __init__(self, env: WorkerEnv, run_dir: RunDir, claims: Claims) -> None:
        self._claims = claims
        self._requested: Optional[str] = None
        super().__init__(env, run_dir)

    @property
    def requested(self) -> Optional[str]:
        return self._requested

    @requested.setter
    def requested(self, value: Optional[str]) -> None:
        self._requested = value
        if value is not None:
            try:
                self._claims.stop_all()
            except Exception:  # the loop sends it again after its batch
                self._claims._stop_sent = False


class RankCommitter:
    """One rank's commits: on_checkpoint_start, uploads joined, its record, publication."""

    def __init__(self, job: "_Job", stager: Stager, reducers: ReducerRegistry, claims: Claims,
                 folded: Folded, total: int, attempt: str, dataset_len: int, verify_lease: Callable[[], None],
                 live: Optional[LiveFold]) -> None:
        self.job, self.stager, self.reducers, self.claims = job, stager, reducers, claims
        self.folded, self.total, self.attempt, self.dataset_len = folded, total, attempt, dataset_len
        #: Before each record: LeaseLostError once another job holds the run (object stores).
        self.verify_lease = verify_lease
        self.live = live  #: rank 0's folds during the attempt; None on the other ranks
        self.seq = 0
        self.committed: List[int] = []  #: global batches this rank committed in this attempt
        self.slots: Optional[Dict[str, Any]] = None  #: its slot state as its last record holds it
        self.started = time.time()

    def commit(self, processor: Any, batches: List[int], errors: List[ErrorRecord], skipped: Tuple[int, int]) -> None:
        env, run_dir = self.job.env, self.job.run_dir
        try:
            processor.on_checkpoint_start()
        except Exception as e:
            raise UserCodeError(f"{type(processor).__name__}.on_checkpoint_start() raised {type(e).__name__}: {e} "
                                f"(rank {env.rank}, its commit {self.seq}). Work committed before is kept; fix the "
                                "error and run again to resume.") from e
        pairs = self.stager.join()
        if not batches and not pairs and not errors:
            return
        fp = self.job.batch_size, self.dataset_len
        record = RankRecord(
            attempt=self.attempt, rank=env.rank, seq=self.seq, batches=of_batches(batches),
            publish=[list(p) for p in pairs], errors=[e.to_json() for e in errors],
            skipped_samples=skipped[0], skipped_batches=skipped[1],
            committed_samples=sum(len(batch_indices(g, *fp)) for g in batches),
            slots=self.reducers.slot_states())
        self.job.hooks.at("kill-after-stage")
        self.verify_lease()
        write_rank_record(run_dir, record)  # the commit point of these batches (created once)
        self.seq += 1
        self.committed.extend(batches)
        self.slots = record.slots
        self.job.hooks.at("kill-after-record")
        for staged, final in pairs:
            run_dir.publish(staged, final)
        self.claims.add(f"records/r{env.rank}", 1)  # published: rank 0 may fold it
        done = self.claims.add("committed", len(batches))
        self.claims.add(f"committed/r{env.rank}", len(batches))
        if env.is_chief:  # the status file has one writer; it learns the others' counts from the store
            self._status(done)
            self._fold_some()

    def _fold_some(self) -> None:
        """Rank 0: fold the records published so far once there are :data:`FOLD_EVERY` of them,
        so that the next start reads at most about that many, however long this attempt runs."""
        live = self.live
        if live is None:
            return
        published = [self.claims.add(f"records/r{r}", 0) for r in range(self.job.env.world_size)]
        if sum(published) - live.held() >= FOLD_EVERY:
            live.fold(published)

    def _status(self, done_this_attempt: int) -> None:
        env, run_dir = self.job.env, self.job.run_dir
        shares = {str(r): self.claims.add(f"committed/r{r}", 0) for r in range(env.world_size)}
        committed = count(self.folded.committed) + done_this_attempt
        elapsed = max(1e-9, time.time() - self.started)
        bs = self.job.batch_size
        lifecycle.transition(run_dir, RunState.RUNNING, committed_batches=committed, total_batches=self.total,
                             committed_samples=min(self.dataset_len, self.folded.committed_samples + done_this_attempt * bs),
                             total_samples=min(self.dataset_len, self.total * bs),
                             samples_per_s=done_this_attempt * bs / elapsed, rank_batches=shares,
                             world_size=env.world_size, attempt=self.attempt, schedule="dynamic")


class DynamicAttempt:
    """One attempt of a dynamic-schedule job on one rank; uses its :class:`_Job`'s pieces."""

    def __init__(self, job: "_Job") -> None:
        self.job = job

    # -- open: rank 0 folds, the others wait --------------------------------------------------

    def _open(self) -> Tuple[Folded, checkpoint.Fingerprint, str, bool, Optional[str]]:
        job, env = self.job, self.job.env
        fingerprint = job._fingerprint()
        opened: Any = None
        if env.is_chief:
            try:
                run_dir = job.run_dir
                run_dir.makedirs("")
                if job.settings.run_dir is None and verdict.verdict_dir() is not None:
                    verdict.announce_run_dir(run_dir.url, lifecycle.read_status(run_dir).updated)
                check_schedule(run_dir, "dynamic")
                recorded = checkpoint.check_fingerprint(run_dir, fingerprint)
                fingerprint.total_batches = recorded.total_batches
                attempt = uuid.uuid4().hex[:8]
                # Object stores: the fold fences the attempt before, in case it was only frozen.
                folded = open_fold(run_dir, attempt, env.world_size, fence=not run_dir.is_local)
                status = lifecycle.read_status(run_dir)
                finished = status.state is RunState.COMPLETED
                done = count(folded.committed)
                if not (finished and done >= recorded.total_batches):
                    clear_stop_request(run_dir)
                    lifecycle.transition(
                        run_dir, RunState.FINISHING if done >= recorded.total_batches else RunState.RUNNING,
                        attempts=status.attempts + 1, restarts=status.restarts + env.restart_count,
                        world_size=env.world_size, committed_batches=done, total_batches=recorded.total_batches,
                        skipped_samples=folded.skipped_samples, skipped_batches=folded.skipped_batches,
                        schedule="dynamic", rank_batches={})
                opened = (folded, fingerprint, attempt, finished, job.lease_id)
            except BaseException as e:
                opened = e
        opened = env.broadcast(opened)  # the others wait here until the fold is done
        if isinstance(opened, BaseException):
            raise opened
        return cast("Tuple[Folded, checkpoint.Fingerprint, str, bool, Optional[str]]", opened)

    # -- the attempt ------------------------------------------------------------------------

    def run(self) -> "BatchProcessResult":
        from batchproc.engine.run import _user_call
        from batchproc.processor import EngineHandle, TensorBoardMirror, TorchBatchProcessorContext

        job, env = self.job, self.job.env
        folded, fingerprint, attempt, finished, lease_id = self._open()
        job.attempt = attempt
        total = fingerprint.total_batches
        done_before = count(folded.committed)
        if finished and done_before >= total:
            metrics = env.broadcast(folded.metrics if env.is_chief else None) or {}
            return job._result(total, total, metrics, completed=True)
        over = job._over_budget(Skipped(folded.skipped_samples, folded.skipped_batches))
        if over is not None:
            raise over
        remaining = Remaining(folded.committed, total)
        claims = Claims(env.store, attempt, remaining)
        reducers = ReducerRegistry()
        stager = Stager(job.run_dir, attempt, env.rank)
        tb_path = job._tensorboard_path()
        tb_mirror = None if job.run_dir.is_local else TensorBoardMirror(job.run_dir, tb_path, env.is_chief)
        context = TorchBatchProcessorContext(env, stager, reducers, job.settings.hparams, tb_path, job.run_dir.url)
        engine = EngineHandle(context)
        job.context, job.tb_mirror = context, tb_mirror
        batches: Any = None
        try:
            if len(remaining):
                batches = job._iterate_loader(ClaimingBatchSampler(claims, fingerprint.dataset_len, job.batch_size))
            processor = _user_call(job.processor_cls, f"{job.processor_cls.__name__}.__init__", context)
            live = LiveFold(job.run_dir, folded, attempt) if env.is_chief else None
            if not len(remaining):  # every batch committed, on_finish did not complete: only on_finish
                metrics = self._final_metrics(reducers, live, folded)
                return job._finish(processor, engine, total, metrics, steps=0)
            committer = RankCommitter(job, stager, reducers, claims, folded, total, attempt, fingerprint.dataset_len,
                                      self._lease_check(lease_id), live)
            try:
                steps, stopped, failure = self._process(processor, engine, committer, claims, batches)
            finally:
                stager.close()
            return self._meet(processor, engine, committer, folded, total, steps, stopped, failure, reducers, live)
        finally:
            getattr(batches, "_shutdown_workers", lambda: None)()
            engine.close()
            if tb_mirror is not None:
                tb_mirror.close()

    def _process(self, processor: Any, engine: Any, committer: RankCommitter, claims: Claims,
                 batches: Any) -> Tuple[int, Optional[str], Optional[BaseException]]:
        """This rank's batches until none is left or it stops. Returns (batches processed, why it
        stopped or None, the error that stopped it or None). The last commit is done."""
        job, env = self.job, self.job.env
        timeout_s = job.policy.batch_timeout_s
        watchdog = Watchdog(timeout_s, job._batch_timed_out) if timeout_s else None
        collate = job.loader_kwargs.get("collate_fn")
        runner = BatchRunner(processor, engine, env.rank, env.world_size, job.policy.batches,
                             splittable=collate is None or collate is default_collate, watchdog=watchdog)
        since: List[int] = []
        errors: List[ErrorRecord] = []
        skipped = [0, 0]
        steps = 0
        stopped: Optional[str] = None
        failure: Optional[BaseException] = None

        def commit(why: str) -> None:
            nonlocal since, errors, skipped
            job.phase = Where(Phase.CHECKPOINT, why)
            committer.commit(processor, since, errors, (skipped[0], skipped[1]))
            since, errors, skipped = [], [], [0, 0]
            if job.tb_mirror is not None:
                job.tb_mirror.sync()

        try:
            with _Watcher(env, job.run_dir, claims) as watcher:
                job._watcher = watcher
                items = job._with_device_copies(batches)
                while True:
                    if watcher.requested is not None:
                        stopped = watcher.requested
                        break
                    if claims.stopped:
                        stopped = "another rank stopped"
                        break
                    job.phase = Where(Phase.LOADING, f"loading batch {steps} of rank {env.rank}")
                    try:
                        loaded, copies = next(items)
                    except StopIteration:
                        break
                    g = min(list(loaded.indices) + [b.index for b in loaded.bad]) // job.batch_size
                    try:
                        bad = self._step(loaded, copies, engine, runner, g, steps, errors)
                    except verdict.DETERMINISTIC as e:
                        failure = e
                        break
                    since.append(g)
                    skipped[0] += bad[0]
                    skipped[1] += bad[1]
                    job.hooks.at("stop", steps)
                    job.hooks.at("kill", steps)
                    steps += 1
                    over = self._count_skips(claims, committer.folded, bad)
                    if over is not None:
                        commit(f"in the commit after global batch {g}, past a bound")
                        failure = over
                        break
                    if len(since) >= job.interval:
                        commit(f"in rank {env.rank}'s commit after global batch {g}")
                if failure is None:
                    commit("in the final commit" if stopped is None else "in the commit before stopping")
        except BaseException:
            try:
                claims.stop_all()  # the others stop claiming: this attempt ends for all
            except Exception:
                pass
            raise
        finally:
            job._watcher = None
            getattr(batches, "_shutdown_workers", lambda: None)()
            if watchdog is not None:
                watchdog.close()
        if stopped is not None or failure is not None:
            claims.stop_all()
        return steps, stopped, failure

    def _step(self, loaded: Any, copies: Any, engine: Any, runner: BatchRunner, g: int, batch_idx: int,
              errors: List[ErrorRecord]) -> Tuple[int, int]:
        """Process global batch ``g`` under the sample and batch policies (as the static loop does);
        returns (samples that failed to load, 1 if the batch failed in process_batch else 0)."""
        engine.set_device_copies(copies)
        records = loaded.sample_errors(self.job.policy.samples) if loaded.bad else []
        errors.extend(records)
        failed = 0
        if loaded.batch is not None:
            self.job.phase = Where(Phase.BATCH, f"in global batch {g}")
            runner.run(loaded.batch, loaded.indices, g, batch_idx)
            pieces = runner.take_records()
            errors.extend(pieces)
            failed = 1 if pieces else 0
        return len(records), failed

    def _count_skips(self, claims: Claims, folded: Folded, bad: Tuple[int, int]) -> Optional[Exception]:
        """Add this batch's skips to the job-wide counts in the store; the error past a bound."""
        if not bad[0] and not bad[1]:
            return None
        samples = folded.skipped_samples + claims.add("bad_samples", bad[0])
        batches = folded.skipped_batches + claims.add("bad_batches", bad[1])
        return self.job._over_budget(Skipped(samples, batches))

    # -- the end: all ranks meet once ---------------------------------------------------------

    def _lease_check(self, lease_id: Optional[str]) -> Callable[[], None]:
        """What each rank calls before its records: rank 0 the job's own check (its lock, or the
        supervisor's lease), the others the lease by the id rank 0 sent (one GET on object stores)."""
        job = self.job
        if job.env.is_chief:
            return job.verify_lease
        if job.run_dir.is_local or lease_id is None:
            return lambda: None
        return lambda: check_lease(job.run_dir, lease_id, f"rank {job.env.rank} of the job of {' '.join(sys.argv)}")

    def _metrics(self, reducers: ReducerRegistry, live: Optional[LiveFold]) -> Dict[str, Any]:
        """Rank 0: ``cross_slot_reduce`` over every slot folded so far (earlier attempts' and this
        one's), as the static schedule reduces its record's slots; on every rank."""
        metrics: Any = None
        if live is not None:
            metrics = to_plain(reducers.reduce(live.folded.every_slot()), for_metrics=True)
        return cast(Dict[str, Any], self.job.env.broadcast(metrics))

    def _final_metrics(self, reducers: ReducerRegistry, live: Optional[LiveFold], folded: Folded) -> Dict[str, Any]:
        """The final metrics on every rank; rank 0 writes the final record unless it exists."""
        metrics: Any = None
        if live is not None:
            metrics = folded.metrics
            if metrics is None or live.held():
                metrics = to_plain(reducers.reduce(live.folded.every_slot()), for_metrics=True)
                live.write(final_metrics=metrics)  # the final record
        return cast(Dict[str, Any], self.job.env.broadcast(metrics))

    def _meet(self, processor: Any, engine: Any, committer: RankCommitter, folded: Folded, total: int,
              steps: int, stopped: Optional[str], failure: Optional[BaseException],
              reducers: ReducerRegistry, live: Optional[LiveFold]) -> "BatchProcessResult":
        job, env = self.job, self.job.env
        job.phase = Where(Phase.FINAL, "meeting the other ranks after its last commit")
        error = None if failure is None else (type(failure).__name__, str(failure))
        mine = {"batches": of_batches(committer.committed), "stopped": stopped, "error": error,
                "count": len(committer.committed), "records": committer.seq}
        gathered = env.gather(mine)
        decision: Any = None
        if env.is_chief:
            assert gathered is not None and live is not None
            committed = merge(list(folded.committed) + [tuple(i) for o in gathered for i in o["batches"]])
            errors = [(r, o["error"]) for r, o in enumerate(gathered) if o["error"] is not None]
            shares = {str(r): o["count"] for r, o in enumerate(gathered)}
            reasons = [o["stopped"] for o in gathered if o["stopped"]]
            decision = {"errors": errors, "done": count(committed), "shares": shares,
                        "reason": next((r for r in reasons if r != "another rank stopped"), reasons[0] if reasons else None)}
            # Every rank has published its last record: the rest of this attempt's records are read,
            # so that the next start has none of them to read.
            live.absorb([o["records"] for o in gathered])
            if decision["done"] < total or errors:  # (the final record is written below)
                live.write()  # errors.jsonl names every committed skip, also when the job fails
        decision = env.broadcast(decision)
        if decision["errors"]:
            if failure is not None:
                raise failure
            rank, (kind, message) = decision["errors"][0]
            if kind in (TooManyBadSamplesError.__name__, TooManyBadBatchesError.__name__):
                raise (TooManyBadSamplesError if kind == TooManyBadSamplesError.__name__ else TooManyBadBatchesError)(message)
            raise PeerFailedError(f"rank {env.rank} stops: rank {rank} failed ({kind}; its error is the cause)")
        done = decision["done"]
        if done >= total:
            if env.is_chief:
                lifecycle.transition(job.run_dir, RunState.RUNNING, committed_batches=total, total_batches=total,
                                     committed_samples=min(committer.dataset_len, total * job.batch_size),
                                     rank_batches=decision["shares"], schedule="dynamic")
            metrics = self._final_metrics(reducers, live, folded)
            return job._finish(processor, engine, total, metrics, steps=steps)
        metrics = self._metrics(reducers, live)  # what is committed so far, as the static schedule returns
        if env.is_chief:
            job.run_dir.rm(STAGING, recursive=True)  # every rank has published; what is left, no record lists
            lifecycle.transition(job.run_dir, RunState.PREEMPTED, reason=decision["reason"] or "stopped",
                                 committed_batches=done, total_batches=total, rank_batches=decision["shares"],
                                 metrics=metrics)
        return job._result(done, total, metrics, preempted=True, steps=steps)
