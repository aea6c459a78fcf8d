"""``python -m launch.loopback TORCHRUN_ARGS...``: torchrun whose TCP stores listen on 127.0.0.1 only.

A single-node job needs no listener that other machines can reach, yet torch's ``TCPStore``
binds every interface whatever host it is given (pytorch/pytorch#173909): torchrun's rendezvous
store and the store it shares with the workers would be open, unauthenticated, to the network.
This wrapper makes every store server this process creates listen on a socket bound to
127.0.0.1 (``master_listen_fd``), then runs torchrun's own ``main``. Our launcher uses it for
single-node runs; multi-node runs keep torchrun, with the endpoint the user gives.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

LOOPBACK = "127.0.0.1"


def _loopback_store_class() -> type:
    from torch._C._distributed_c10d import TCPStore

    base: Any = TCPStore
    params = ["host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant",
              "master_listen_fd", "use_libuv"]

    class LoopbackTCPStore(base):  # type: ignore[misc]
        """A ``TCPStore`` whose server, if it is one, listens on 127.0.0.1 only."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(zip(params, args))
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((LOOPBACK, int(kwargs.get("port") or 0)))
                sock.listen(512)
                kwargs["port"] = sock.getsockname()[1]
                kwargs["master_listen_fd"] = sock.detach()  # the store owns the descriptor from now on
            super().__init__(**kwargs)

    return LoopbackTCPStore


def install() -> None:
    """Make every TCP store server created in this process listen on 127.0.0.1."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    store = _loopback_store_class()
    setattr(dist, "TCPStore", store)  # dynamic_rendezvous, elastic.utils.distributed
    setattr(c10d_rendezvous_backend, "TCPStore", store)  # imported by name there


def main() -> None:
    from batchproc.lifeline import die_with_parent

    die_with_parent()  # torchrun passes the SIGTERM on to the workers, as on any preemption
    install()
    from torch.distributed.run import main as torchrun_main

    torchrun_main(sys.argv[1:])


if __name__ == "__main__":
    main()
