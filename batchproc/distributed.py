"""This process's place in the job: worker init from torchrun's environment, the few collectives
the engine needs, and Determined's ``DistributedContext`` over them.

Under torchrun (``RANK``/``WORLD_SIZE`` set) a process group is created: NCCL with
``cuda:LOCAL_RANK`` when CUDA is available, gloo otherwise. Without a launcher the job is a single
process and every collective is a local no-op, so ``python script.py`` just works.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import torch
from torch._C import _distributed_c10d as c10d

from batchproc.netaddr import listening_socket
from batchproc.settings import cpu_count, restart_count as _restart_count


@dataclass
class WorkerEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    restart_count: int
    owns_group: bool = False
    #: The process group's key-value store (an in-process one in a world of one): the dynamic
    #: schedule's claim counter and job-wide counts live there.
    store: Any = None

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives (each a no-op in a world of one) --------------------------------------

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank: one tiny all-reduce (torchtnt's sync_bool)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._coll_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def sum_ints(self, values: Sequence[int]) -> List[int]:
        """Each of ``values`` summed over the ranks: one tiny all-reduce."""
        if not self.distributed:
            return [int(v) for v in values]
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self._coll_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """Gather ``obj`` from every rank to rank 0 (``None`` elsewhere)."""
        if not self.distributed:
            return [obj]
        out: Optional[List[Any]] = [None] * self.world_size if self.is_chief else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_chief else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @property
    def _coll_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def shutdown(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _set_cpu_threads(local_world_size: int) -> None:
    # Ranks on one host share its cores; without this each rank would spawn a thread per core.
    if "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, cpu_count() // max(1, local_world_size)))


def init_worker(pg_timeout_s: float = 1800.0) -> WorkerEnv:
    """Join the job described by torchrun's environment (or run alone without one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    restart_count = _restart_count()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    _set_cpu_threads(local_world_size)

    env = WorkerEnv(rank, world_size, local_rank, local_world_size, device, restart_count)
    if world_size > 1 and not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=pg_timeout_s)
        env.store = _worker_store(rank, world_size, restart_count, timeout)
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            store=env.store,
            rank=rank, world_size=world_size, timeout=timeout,
            device_id=device if use_cuda else None,
        )
        env.owns_group = True
    elif world_size > 1:  # the user's own process group: its store
        from torch.distributed.distributed_c10d import _get_default_store

        env.store = _get_default_store()
    else:
        env.store = c10d.HashStore()
    return env


def _worker_store(rank: int, world_size: int, restart_count: int,
                  timeout: datetime.timedelta) -> "c10d.Store":
    """The process group's store, in a key space of its own per worker group.

    When torchrun's agent hosts the store (``TORCHELASTIC_USE_AGENT_STORE``, its default), the
    same server outlives restarts: with torch 2.14 and gloo, restarted workers can otherwise read
    the dead workers' addresses left there and hang, so each ``TORCHELASTIC_RESTART_COUNT`` gets a
    prefix of its own. Otherwise (our launcher on several nodes, see ``launch.torch_distributed``)
    rank 0 hosts a fresh store on the port the rendezvous picked for this round, and the restart
    count must stay out of the prefix: it differs between a surviving node (restarted its
    workers) and a node started again (0), and the ranks would never meet.
    """
    host = os.environ["MASTER_ADDR"]
    port = int(os.environ["MASTER_PORT"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    is_master = rank == 0 and not agent_hosts
    # TCPStore binds every interface whatever host it is given (pytorch/pytorch#173909): listen
    # on MASTER_ADDR only, this node's own address as the launcher published it (--local-addr).
    sock = listening_socket(host, port) if is_master else None
    store = c10d.TCPStore(
        host, port, world_size, is_master=is_master,
        timeout=timeout, wait_for_workers=False, multi_tenant=not agent_hosts,
        master_listen_fd=sock.detach() if sock is not None else None,
    )
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    prefix = f"batchproc/{run_id}/restart{restart_count}" if agent_hosts else f"batchproc/{run_id}"
    return c10d.PrefixStore(prefix, store)


# -- Determined's context.distributed ------------------------------------------------------
# Determined's ``DistributedContext`` (``context.distributed``), over torch.distributed.
# 
# Determined's processors reach their place in the job and a few object collectives through
# ``context.distributed`` (its ``core.DistributedContext``). This is the same surface, built on the
# process group torchrun's workers already share: rank, size, local and cross (node) positions, and
# ``gather``/``allgather``/``broadcast`` of picklable objects, job-wide or within the node.


class DistributedContext:
    """Where this process is in the job, and object collectives (Determined's members)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1) -> None:
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, max(1, local_size)
        #: This node's index and the number of nodes (homogeneous nodes, as torchrun starts them).
        self.cross_rank, self.cross_size = rank // self.local_size, max(1, size // self.local_size)

    @classmethod
    def from_worker(cls, env: WorkerEnv) -> "DistributedContext":
        return cls(env.rank, env.world_size, env.local_rank, env.local_world_size)

    @classmethod
    def from_torch_distributed(cls) -> "DistributedContext":
        """From torchrun's environment and the initialized process group (as Determined's)."""
        import os

        if not torch.distributed.is_initialized():
            return cls()
        size = torch.distributed.get_world_size()
        return cls(torch.distributed.get_rank(), size, int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", str(size))))

    # -- where we are -------------------------------------------------------------------------

    def get_rank(self) -> int:
        return self.rank

    def get_size(self) -> int:
        return self.size

    def get_local_rank(self) -> int:
        return self.local_rank

    def get_local_size(self) -> int:
        return self.local_size

    def get_cross_rank(self) -> int:
        return self.cross_rank

    def get_cross_size(self) -> int:
        return self.cross_size

    def get_num_agents(self) -> int:
        """Nodes in the job (Determined runs one agent per node)."""
        return self.cross_size

    # -- object collectives ---------------------------------------------------------------------

    def allgather(self, stuff: Any) -> List[Any]:
        """Every rank's ``stuff``, in rank order, on every rank."""
        if self.size == 1:
            return [stuff]
        out: List[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, stuff)
        return out

    def gather(self, stuff: Any) -> Optional[List[Any]]:
        """Every rank's ``stuff`` on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [stuff]
        out: Optional[List[Any]] = [None] * self.size if self.rank == 0 else None
        torch.distributed.gather_object(stuff, out, dst=0)
        return out

    def broadcast(self, stuff: Any) -> Any:
        """Rank 0's ``stuff`` on every rank."""
        if self.size == 1:
            return stuff
        box = [stuff if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # The node-local ones: one job-wide exchange, filtered to this node (they are rarely hot).
    def allgather_local(self, stuff: Any) -> List[Any]:
        """Every rank's ``stuff`` on this node, in local rank order."""
        first = self.cross_rank * self.local_size
        return self.allgather(stuff)[first:first + self.local_size]

    def gather_local(self, stuff: Any) -> Optional[List[Any]]:
        """This node's ``stuff`` on its local rank 0 (None elsewhere). Every rank must call it."""
        gathered = self.allgather_local(stuff)
        return gathered if self.local_rank == 0 else None

    def broadcast_local(self, stuff: Any) -> Any:
        """Local rank 0's ``stuff`` on every rank of this node. Every rank must call it."""
        return self.allgather_local(stuff)[0]

    def close(self) -> None:
        """Nothing to release: batchproc owns the process group."""
