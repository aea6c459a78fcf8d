"""The sharded DataLoader: one rank's remaining global batches, with bad-sample handling.

Each item is a :class:`LoadedBatch` carrying the user's collated batch plus the dataset indices it
holds and the samples that failed to load (dropped under ``bad_samples="skip"``).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from batchproc.data.inputs import printable
from batchproc.errors import BadSampleError
from batchproc.engine.policy import ErrorRecord, SkipPolicy
from batchproc.settings import PREEMPTION_SIGNALS, cpu_count
from batchproc.engine.sharding import RankBatchSampler, batch_indices

#: Batches a loader process fetches ahead of the one it decodes (datasets with ``prefetch``).
READAHEAD_BATCHES = 2
_REJECTED = {
    "shuffle": "batches are assigned to ranks in dataset order so a resume can skip committed work; "
               "shuffle the dataset itself (e.g. a fixed permutation of indices) if you need another order",
    "sampler": "batchproc builds the sampler that shards the dataset across ranks and skips committed work",
    "batch_sampler": "batchproc builds the batch sampler that shards the dataset across ranks and skips committed work",
    "batch_size": "batch_size was also passed to torch_batch_process(); give it once",
}


def check_dataloader_kwargs(kwargs: Optional[Dict[str, Any]], batch_size_given: bool = False) -> Dict[str, Any]:
    """Validate ``dataloader_kwargs`` as Determined does: reject what would break sharding or
    resume, and ``batch_size`` when ``torch_batch_process`` got one too (else it is taken from here)."""
    kwargs = dict(kwargs or {})
    for key, why in _REJECTED.items():
        if key not in kwargs:
            continue
        if key == "shuffle" and not kwargs[key]:
            continue
        if key == "batch_size" and not batch_size_given:
            continue
        raise ValueError(f"dataloader_kwargs[{key!r}] is not supported: {why}.")
    return kwargs


def describe_sample(dataset: Any, index: int) -> str:
    """``sample 12`` or ``sample 12 (/data/x.jpg)`` when the dataset can name its files."""
    name = None
    describe = getattr(dataset, "describe_sample", None)
    if callable(describe):
        try:
            name = describe(index)
        except Exception:
            name = None
    return f"sample {index} ({printable(name)})" if name else f"sample {index}"


class _Bad(NamedTuple):
    index: int  # type: ignore[assignment]  # shadows tuple.index(), which nothing here calls
    error: str
    description: str
    trace: str = ""


class _IndexedDataset(Dataset[Any]):
    """Returns ``(index, sample)``; a failing sample becomes a ``_Bad`` marker (with its traceback
    under "raise", for the main process to raise).

    The DataLoader's fetcher calls :meth:`__getitems__` with a whole batch. A dataset with
    ``load_samples(indices)`` (each sample, or the exception loading it raised) loads the batch at
    once, and one with ``prefetch(indices)`` is told the batches this worker will load next, so
    their files are fetched while this one decodes (``ImageFiles`` on object stores has both).
    Under the default collate (``collated``), one with ``load_batch(indices)`` (a
    :class:`~batchproc.data.samples.CollatedBatch`) gives the batch already collated: then
    :meth:`__getitems__` returns the :class:`LoadedBatch` itself, which :class:`_Collate` passes on.
    """

    def __init__(self, dataset: Dataset[Any], policy: SkipPolicy, sampler: Optional[RankBatchSampler] = None,
                 readahead: int = READAHEAD_BATCHES, collated: bool = False) -> None:
        self.dataset = dataset
        self.policy = policy
        self.sampler = sampler
        self.readahead = readahead
        self.collated = collated

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return index, self.dataset[index]
        except Exception as e:
            return index, self._bad(index, e)

    def __getitems__(self, indices: List[int]) -> "List[Any] | LoadedBatch":
        whole = getattr(self.dataset, "load_batch", None) if self.collated else None
        if callable(whole):
            self._prefetch_next(indices)
            try:
                got = whole(indices)
                return LoadedBatch(got.batch if got.good else None, [indices[k] for k in got.good],
                                   [self._bad(indices[k], e) for k, e in got.errors])
            except Exception:  # the batch as a whole failed: sample by sample, to find the bad ones
                return [self[i] for i in indices]
        load = getattr(self.dataset, "load_samples", None)
        if not callable(load):
            return [self[i] for i in indices]
        self._prefetch_next(indices)
        try:
            samples = load(indices)
            if len(samples) != len(indices):
                raise RuntimeError(f"load_samples() returned {len(samples)} samples for {len(indices)} indices")
        except Exception:  # the batch as a whole failed: sample by sample, to find the bad ones
            return [self[i] for i in indices]
        return [(i, self._bad(i, s) if isinstance(s, Exception) else s) for i, s in zip(indices, samples)]

    def _bad(self, index: int, e: BaseException) -> _Bad:
        # Returned, not raised, under either policy: raised in a loader worker, the message
        # would reach the user buried under "Caught ... in DataLoader worker process 0".
        trace = "" if self.policy.skips else "".join(traceback.format_exception(type(e), e, e.__traceback__))
        # printable(): a message may quote a file name that is not UTF-8; errors.jsonl, the record
        # and the terminal all need valid Unicode.
        return _Bad(index, printable(f"{type(e).__name__}: {e}"), describe_sample(self.dataset, index),
                    printable(trace))

    def _prefetch_next(self, indices: List[int]) -> None:
        """Hint the batches this process loads after ``indices``: the loader hands a rank's batches
        to its workers in turn, so this worker's next one is ``num_workers`` batches on. A wrong
        guess costs only the fetch."""
        prefetch = getattr(self.dataset, "prefetch", None)
        s = self.sampler
        if not callable(prefetch) or s is None or not indices or not self.readahead:
            return
        batches = s.batches
        g = indices[0] // s.batch_size
        if g not in batches:
            return
        info = get_worker_info()
        stride = info.num_workers if info is not None else 1
        pos = batches.index(g)
        nxt = [batches[p] for p in range(pos + stride, pos + stride * (self.readahead + 1), stride) if p < len(batches)]
        try:
            prefetch(list(indices) + [i for b in nxt for i in batch_indices(b, s.batch_size, s.dataset_len)])
        except Exception:  # a hint; load_samples reports what actually fails
            pass


class LoadedBatch(NamedTuple):
    batch: Any  # None when every sample of the batch was bad
    indices: List[int]
    bad: List[_Bad]

    def sample_errors(self, policy: SkipPolicy) -> List[ErrorRecord]:
        """The samples that failed to load, as records to skip; raises (in the main process) under
        "raise"."""
        for b in self.bad:
            if not policy.skips:
                raise BadSampleError(
                    f"loading {b.description} failed with {b.error}. Fix or remove it, or pass "
                    f"bad_samples='skip' to drop bad samples and record them in errors.jsonl.\n"
                    f"Traceback of the load:\n{b.trace}")
        return [ErrorRecord.for_sample(b.index, b.description, b.error) for b in self.bad]


class _Collate:
    def __init__(self, collate_fn: Callable[[List[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: "List[Any] | LoadedBatch") -> LoadedBatch:
        if isinstance(items, LoadedBatch):  # collated by the dataset (load_batch)
            return items
        good, indices, bad = [], [], []
        for index, sample in items:
            if isinstance(sample, _Bad):
                bad.append(sample)
            else:
                good.append(sample)
                indices.append(index)
        return LoadedBatch(self.collate_fn(good) if good else None, indices, bad)


def default_num_workers(local_world_size: int) -> int:
    """Loader processes per rank when the user did not say: the rank's share of the cores, less
    the one its main process needs, at least 1 (so the next batch loads while this one runs)."""
    return min(8, max(1, cpu_count() // max(1, local_world_size) - 1))


class _WorkerInit:
    """Loader workers ignore the preemption signals. torchrun signals each worker's whole process
    group and Ctrl-C reaches the terminal's; the main process turns the signal into a
    checkpoint-and-stop, which needs the batch in flight, so its loader workers must not die
    first. They die with their rank instead: the kernel kills them when their parent exits
    (``PR_SET_PDEATHSIG`` on Linux). torch's own check compares the worker's parent pid with the
    one it saw at start, so a rank that died while its worker was starting (a signal during
    start-up) left that worker waiting forever, reparented to init.

    The parent depends on the start method (``multiprocessing_context``): the rank under ``fork``
    and ``spawn``; under ``forkserver`` (Python 3.14's default on Linux) the rank's fork server,
    which exits when the rank does, and so takes its workers with it."""

    def __init__(self, user_fn: Optional[Callable[[int], None]]) -> None:
        self.user_fn = user_fn
        self.rank_pid = os.getpid()  # the rank, which starts the workers (itself or through its fork server)

    def __call__(self, worker_id: int) -> None:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)  # blocked by the parent around the fork
        _die_with_parent()
        if not _started_by(self.rank_pid):  # the rank (or its fork server) died before the line above took effect
            os._exit(0)
        if self.user_fn is not None:
            self.user_fn(worker_id)


def _started_by(rank_pid: int) -> bool:
    """Whether this process's parent is the rank (``fork``, ``spawn``) or a child of the rank (its
    ``forkserver``). An orphan's parent is init or a subreaper, neither of them the rank's child."""
    parent = os.getppid()
    if parent == rank_pid:
        return True
    grandparent = _parent_of(parent)
    return grandparent == rank_pid if grandparent is not None else parent != 1


def _parent_of(pid: int) -> Optional[int]:
    """``pid``'s parent, from ``/proc`` (None where it cannot be read: not Linux, or ``pid`` is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the parent exits (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def build_loader(dataset: Dataset[Any], sampler: Any, dataloader_kwargs: Dict[str, Any],
                 samples: SkipPolicy, device: torch.device, local_world_size: int = 1) -> DataLoader[Any]:
    """A DataLoader over this rank's remaining batches: prefetching workers, pinned memory for GPUs.

    ``sampler`` is a batch sampler with ``__len__``: a :class:`RankBatchSampler` (static schedule;
    its known order lets datasets fetch ahead) or the dynamic schedule's claiming one."""
    kwargs = dict(dataloader_kwargs)
    kwargs.pop("drop_last", None)  # applied to the dataset's length (see run._Job._open); the sampler is ours
    collate_fn = kwargs.pop("collate_fn", None) or default_collate
    kwargs.setdefault("pin_memory", device.type == "cuda")
    kwargs.setdefault("num_workers", default_num_workers(local_world_size) if len(sampler) > 1 else 0)
    if kwargs["num_workers"] > 0:
        kwargs["worker_init_fn"] = _WorkerInit(kwargs.get("worker_init_fn"))
    ahead = sampler if isinstance(sampler, RankBatchSampler) else None
    collated = collate_fn is default_collate
    return DataLoader(_IndexedDataset(dataset, samples, ahead, collated=collated), batch_sampler=sampler,
                      collate_fn=_Collate(collate_fn), **kwargs)
