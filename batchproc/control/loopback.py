"""``python -m launch.loopback [--bind=ADDRESS] TORCHRUN_ARGS...``: torchrun whose TCP stores listen
on one address only: 127.0.0.1 (the default), or the node's own address on several nodes.

torch's ``TCPStore`` binds every interface whatever host it is given (pytorch/pytorch#173909):
torchrun's rendezvous store and the store it shares with the workers would be open,
unauthenticated, to every network the machine is on. This wrapper makes every store server this
process creates listen on a socket bound to ``ADDRESS`` (``master_listen_fd``), then runs
torchrun's own ``main``. Our launcher uses it on one node (127.0.0.1), and on several nodes with
the address this node reaches the rendezvous host from (see :mod:`batchproc.control.launcher`).

On several nodes it also

* counts the rendezvous endpoint as this node's when its host is ``ADDRESS``. torchrun decides
  whether its agent hosts the rendezvous store by comparing the endpoint's host with the machine's
  hostname and the addresses that name resolves to; a node whose address is not what its
  hostname resolves to (a second interface, a container network, a network namespace) would
  otherwise host nothing, and every node would wait for a store nobody serves.
* names a lost node: when the rendezvous drops a node whose agent sent no keep-alive heartbeat
  for ``keep_alive_interval`` x ``keep_alive_max_attempt`` seconds, a line on stderr says which
  (its address and agent's pid), and again if torchrun then fails.
* restarts this node's workers when a node of their round is lost, as torchrun does when one
  joins: they are stuck in a collective with it, which a silent link (no FIN, no RST) would
  otherwise end only after the process-group timeout.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from typing import Any, Callable, Dict, List, Optional

from batchproc.netaddr import listening_socket

LOOPBACK = "127.0.0.1"
BIND_FLAG = "--bind"
#: The prefix of the lines naming a lost node (tests and log readers look for it).
LOST_NODE = "batchproc: lost node"

_lost: Dict[str, str] = {}  # node descriptor -> its address, in the order they were lost
_round_size: Dict[int, int] = {}  # id(rendezvous handler) -> nodes in the round it last joined
_settings: Any = None  # the rendezvous settings of the last round this process joined (or tried)


def _bound_store_class(address: str) -> type:
    from torch._C._distributed_c10d import TCPStore

    base: Any = TCPStore
    params = ["host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant",
              "master_listen_fd", "use_libuv"]

    class BoundTCPStore(base):  # type: ignore[misc]
        """A ``TCPStore`` whose server, if it is one, listens on ``address`` only."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(zip(params, args))
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
                sock = listening_socket(address, int(kwargs.get("port") or 0))
                if sock is None:
                    raise RuntimeError(f"cannot listen on {address}:{kwargs.get('port') or 0} for torchrun's store: "
                                       "the address is not this node's, or the port is taken")
                kwargs["port"] = sock.getsockname()[1]
                kwargs["master_listen_fd"] = sock.detach()  # the store owns the descriptor from now on
            super().__init__(**kwargs)

    return BoundTCPStore


def _same_address(host: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")) == ipaddress.ip_address(address)
    except ValueError:
        return False


def _hosts_endpoint_at(address: str, original: Callable[[str], bool]) -> Callable[[str], bool]:
    def matches(host: str) -> bool:
        return _same_address(host, address) or original(host)

    return matches


def _reporting_sanitize(original: Callable[[Any], None]) -> Callable[[Any], None]:
    def sanitize(holder: Any) -> None:
        original(holder)
        settings = holder._settings
        silent_s = settings.keep_alive_interval.total_seconds() * settings.keep_alive_max_attempt
        for node in holder._dead_nodes:
            if str(node) in _lost:
                continue
            _lost[str(node)] = node.addr
            print(f"{LOST_NODE} {node.addr} (torchrun agent pid {node.pid}): no rendezvous heartbeat for "
                  f"{silent_s:g} s (keep_alive_interval={settings.keep_alive_interval.total_seconds():g} s x "
                  f"keep_alive_max_attempt={settings.keep_alive_max_attempt}); the job goes on without it if "
                  "--nnodes allows fewer nodes", file=sys.stderr, flush=True)

    return sanitize


def _recording_round_size(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def next_rendezvous(handler: Any) -> Any:
        global _settings
        _settings = handler._settings
        info = original(handler)
        _round_size[id(handler)] = len(handler._state_holder.state.participants)
        return info

    return next_rendezvous


def _restarting_on_loss(original: Callable[[Any], int]) -> Callable[[Any], int]:
    def num_nodes_waiting(handler: Any) -> int:
        waiting = original(handler)  # syncs the state, which drops the nodes that went silent
        state = handler._state_holder.state
        size = _round_size.get(id(handler), 0)
        if waiting or not (state.complete and not state.closed and handler._this_node in state.participants):
            return waiting
        if len(state.participants) < size:
            # A node of this round is gone. Its peers' workers are stuck in a collective with it
            # until the process-group timeout (30 min by default): restart them now, as torchrun
            # does when a node joins (a membership change, not counted against --max-restarts).
            _round_size[id(handler)] = len(state.participants)
            print(f"batchproc: {size - len(state.participants)} of {size} nodes lost: restarting this node's workers "
                  "in a new rendezvous round", file=sys.stderr, flush=True)
            return 1
        return waiting

    return num_nodes_waiting


def _first_signal_only(original: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    """torchrun's stop handler, once: later copies of a stop signal are noted and ignored.

    A scheduler that signals every process of a job (Slurm's step signals and time limit, a
    process-group kill) reaches torchrun once directly and once more through each level above
    it. The first copy starts the shutdown, which gives the workers their grace to checkpoint;
    torchrun's own handler would raise again inside that wait and cut it short.
    """
    received: List[int] = []

    def handler(signum: int, frame: Any) -> None:
        if received:
            print(f"batchproc: torchrun (pid {os.getpid()}): {signal.Signals(signum).name} again while stopping "
                  f"on {signal.Signals(received[0]).name}; the workers keep their grace", file=sys.stderr, flush=True)
            return
        received.append(signum)
        original(signum, frame)

    return handler


def install(address: str = LOOPBACK) -> None:
    """Make every TCP store server created in this process listen on ``address``; on several
    nodes (any other address), host the rendezvous when its endpoint is ``address``."""
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing import api as elastic_api
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous

    # Looked up by name when the workers start (signal.signal(sig, _terminate_process_handler)).
    setattr(elastic_api, "_terminate_process_handler",
            _first_signal_only(getattr(elastic_api, "_terminate_process_handler")))

    store = _bound_store_class(address)
    setattr(dist, "TCPStore", store)  # dynamic_rendezvous, elastic.utils.distributed
    setattr(c10d_rendezvous_backend, "TCPStore", store)  # imported by name there
    if address != LOOPBACK:
        setattr(c10d_rendezvous_backend, "_matches_machine_hostname",
                _hosts_endpoint_at(address, getattr(c10d_rendezvous_backend, "_matches_machine_hostname")))
    holder = dynamic_rendezvous._BackendRendezvousStateHolder
    setattr(holder, "_sanitize", _reporting_sanitize(holder._sanitize))
    handler = dynamic_rendezvous.DynamicRendezvousHandler
    setattr(handler, "next_rendezvous", _recording_round_size(handler.next_rendezvous))
    setattr(handler, "num_nodes_waiting", _restarting_on_loss(handler.num_nodes_waiting))


def split_bind(argv: List[str]) -> "tuple[str, List[str]]":
    """(the address to bind, torchrun's arguments) from ``[--bind=ADDRESS] TORCHRUN_ARGS...``."""
    if argv and argv[0].startswith(BIND_FLAG + "="):
        return argv[0].split("=", 1)[1], argv[1:]
    return LOOPBACK, argv


def main(argv: Optional[List[str]] = None) -> None:
    from batchproc.lifeline import die_with_parent, exit_without_collecting

    die_with_parent()  # torchrun passes the SIGTERM on to the workers, as on any preemption
    address, args = split_bind(list(sys.argv[1:] if argv is None else argv))
    install(address)
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(args)
    except BaseException:
        if _lost:
            print(f"{LOST_NODE}s before this failure: {', '.join(_lost.values())}{_needs()}", file=sys.stderr,
                  flush=True)
        raise
    finally:
        exit_without_collecting()  # the workers have ended: 1-2 s less before the launcher sees it


def _needs() -> str:
    """Why the job could not go on without them, from the last rendezvous' settings."""
    if _settings is None:
        return ""
    return (f" (the job needs at least {_settings.min_nodes} nodes, and the rendezvous waited "
            f"join_timeout={_settings.timeout.join.total_seconds():g} s for them; start the lost nodes again, "
            "or allow fewer with --nnodes=MIN:MAX)")


if __name__ == "__main__":
    main()
