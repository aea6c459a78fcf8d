"""Determined's ``DistributedContext`` (``context.distributed``), over torch.distributed.

Determined's processors reach their place in the job and a few object collectives through
``context.distributed`` (its ``core.DistributedContext``). This is the same surface, built on the
process group torchrun's workers already share: rank, size, local and cross (node) positions, and
``gather``/``allgather``/``broadcast`` of picklable objects, job-wide or within the node.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch

from batchproc.distributed import WorkerEnv


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
