"""This node's own address on a multi-node job, and listeners bound to it rather than to every interface.

The launcher asks the kernel which local address it would use to reach the rendezvous host
(:func:`source_address`, a routing look-up: no packet is sent), binds torchrun's stores to it and
publishes it as the node's address (``--local-addr``). gloo is told the interface holding it
(:func:`interface_of`), and the workers' own store listens on it (:func:`listening_socket`). Leaf
module: no torch, nothing of batchproc's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import socket
import time
from typing import Optional

#: How long the launcher waits for the rendezvous host's name to resolve: on Kubernetes, node 0's
#: DNS record may appear only once its pod runs, after the other pods started.
RESOLVE_WAIT_S = 120.0


def source_address(host: str, port: int, wait_s: float = RESOLVE_WAIT_S) -> str:
    """The local address this machine would send from to reach ``host:port``.

    For a ``host`` that is one of this node's own addresses, that address itself. Raises
    ValueError naming the host if it does not resolve within ``wait_s`` or has no route.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            break
        except socket.gaierror as e:
            if time.monotonic() >= deadline:
                raise ValueError(f"the rendezvous host {host!r} does not resolve ({e}) after {wait_s:g} s") from None
            time.sleep(1.0)
    errors = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            try:
                s.connect(sockaddr)  # UDP: a routing decision, nothing goes on the wire
            except OSError as e:
                errors.append(f"{sockaddr[0]}: {e.strerror or e}")
                continue
            address: str = s.getsockname()[0]
            return address
    raise ValueError(f"no route from this node to the rendezvous host {host!r} ({'; '.join(errors)})")


class _SockAddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 26)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)), ("name", ctypes.c_char_p), ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)), ("netmask", ctypes.POINTER(_SockAddr)),
    ("broadaddr", ctypes.POINTER(_SockAddr)), ("data", ctypes.c_void_p),
]


def _address_of(sa: "_SockAddr") -> Optional[ipaddress._BaseAddress]:
    raw = bytes(sa.data)
    if sa.family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[2:6])  # after the port
    if sa.family == socket.AF_INET6:
        return ipaddress.IPv6Address(raw[6:22])  # after the port and the flow info
    return None


def interface_of(address: str) -> Optional[str]:
    """The name of the interface holding ``address`` (as ``getifaddrs`` lists it, which is how gloo's
    ``GLOO_SOCKET_IFNAME`` finds it), or None if no interface of this machine holds it."""
    try:
        wanted = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        return None
    try:
        entry = head
        while entry:
            ifa = entry.contents
            if ifa.addr and _address_of(ifa.addr.contents) == wanted and ifa.name:
                name: str = ifa.name.decode()
                return name
            entry = ifa.next
        return None
    finally:
        libc.freeifaddrs(head)


def listening_socket(host: str, port: int) -> Optional[socket.socket]:
    """A TCP socket listening on ``host:port`` only (port 0: any free one), for a ``TCPStore`` server
    to take over (``master_listen_fd=sock.detach()``); None if ``host`` is not an address of this
    machine, or the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(512)
        except OSError:
            sock.close()
            continue
        return sock
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that was free a moment ago (torchrun's ``--standalone`` picks one so)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
