"""Two nodes on networks of their own: each node's ``batchproc run`` in a Linux network namespace,
with one address on a private veth link to a bridge; c10d rendezvous at node 1's address.

``tests/test_multinode.py`` runs its nodes on loopback and loses one by killing it, so its peers
see the connections close. Here a node is lost the way machines usually are: its link goes down
(at the bridge, as a failed switch port would) and nothing arrives any more, no FIN, no RST; its
processes keep running, cut off, until the test kills them.

What detects the loss, with the short timeouts these tests set (:data:`RDZV_CONF`):

* the rendezvous: a node whose torchrun agent sent no keep-alive for ``keep_alive_interval`` x
  ``keep_alive_max_attempt`` (1 s x 3 here; 5 s x 3 by default) is dropped, and the survivors'
  launchers say which (``batchproc: lost node ADDRESS``) and restart their workers at once;
* torchrun stops those workers, stuck in a collective with the lost node: SIGTERM, then SIGKILL
  30 s later (fixed in torch 2.14);
* the new round completes ``last_call_timeout`` (10 s) after the smallest world ``--nnodes``
  allows has joined, or fails after ``join_timeout`` (20 s) if it never does;
* the process-group timeout (``process_group_timeout_s``, 60 s here; 1800 s by default) ends a
  collective stuck without the rendezvous noticing: the cut node's own workers, for one.

Needs root and iproute2: skipped otherwise, with the reason.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest

from tests.support import PY, Procs, Tracked, assert_exactly_once, shared_fs

N, BS, INTERVAL = 200, 2, 3
NPROC = 2  # processes per node: every collective crosses the link and the node's own loopback
SLOW = {"SUM_JOB_SLEEP": "0.1"}
PORT = 29400
KEEP_ALIVE_S, KEEP_ALIVE_TRIES, LAST_CALL_S, JOIN_S, READ_S = 1, 3, 10, 20, 30
RDZV_CONF = (f"keep_alive_interval={KEEP_ALIVE_S},keep_alive_max_attempt={KEEP_ALIVE_TRIES},"
             f"last_call_timeout={LAST_CALL_S},join_timeout={JOIN_S},read_timeout={READ_S}")
PG_TIMEOUT_S = 60
STOP_S = 30  #: torchrun's grace between SIGTERM and SIGKILL when it restarts its workers
#: From the cut to the lost node's name on the survivor: the keep-alive silence, plus the slack of
#: a loaded 2-core machine (monitor interval, state syncs).
DETECT_BOUND_S = KEEP_ALIVE_S * KEEP_ALIVE_TRIES + 30
#: From the cut to the survivor's exit: detection, the workers' stop, the rendezvous round, a
#: fresh start of the workers, the rest of the job, the launcher's wait for the cut node's
#: workers (they hold the shared run directory until their process-group timeout).
END_BOUND_S = DETECT_BOUND_S + STOP_S + JOIN_S + PG_TIMEOUT_S + 120


# -- the network -----------------------------------------------------------------------------

NS_PREFIX = "bpnet-"
NODE_IF = "eth0"  # the node's end of its link, inside its namespace


def _ip(*args: str, check: bool = True) -> str:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip() or p.returncode}")
    return p.stdout


def unavailable() -> Optional[str]:
    """Why network namespaces cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "the network-namespace tests need root (ip netns, veth, bridge)"
    if shutil.which("ip") is None or shutil.which("ss") is None:
        return "the network-namespace tests need iproute2 (`ip`, `ss`)"
    probe = f"{NS_PREFIX}probe-{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` does not work here: {e}"
    _ip("netns", "del", probe, check=False)
    return None


def _namespaces() -> List[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _networks_in_use() -> Set[ipaddress.IPv4Network]:
    """Every IPv4 network with an address or a route here or in any namespace of this machine."""
    texts = [_ip("-4", "-o", "addr", "show"), _ip("-4", "route", "show", "table", "all")]
    for ns in _namespaces():
        texts += [_ip("-n", ns, "-4", "-o", "addr", "show", check=False),
                  _ip("-n", ns, "-4", "route", "show", "table", "all", check=False)]
    used = set()
    for word in " ".join(texts).split():
        try:
            net = ipaddress.ip_network(word, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and not net.is_loopback and net.prefixlen > 0:
            used.add(net)
    return used


def unused_subnet() -> ipaddress.IPv4Network:
    """A random private 10.x.y.0/24 that overlaps nothing configured on this machine."""
    used, rng = _networks_in_use(), random.SystemRandom()
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{rng.randint(100, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no unused 10.x.y.0/24 found on this machine")


class Network:
    """A hub namespace holding a bridge, and one namespace per node linked to it by a veth pair.

    No route leaves the hub: the nodes reach each other and nothing else. Names carry a random
    part, so that test sessions running at once cannot collide.
    """

    def __init__(self, nodes: int = 2) -> None:
        self.tag, self.subnet = uuid.uuid4().hex[:8], unused_subnet()
        self.hub = f"{NS_PREFIX}{self.tag}-hub"
        self.nodes: List[str] = []  # namespace names, node 1 first
        self.addresses: List[str] = []
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            hosts = self.subnet.hosts()
            for i in range(1, nodes + 1):
                ns, addr = f"{NS_PREFIX}{self.tag}-n{i}", str(next(hosts))
                _ip("netns", "add", ns)
                self.nodes.append(ns)
                _ip("-n", self.hub, "link", "add", self._port(i), "type", "veth", "peer", "name", NODE_IF, "netns", ns)
                _ip("-n", self.hub, "link", "set", self._port(i), "master", "br0")
                _ip("-n", self.hub, "link", "set", self._port(i), "up")
                _ip("-n", ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", NODE_IF)
                _ip("-n", ns, "link", "set", NODE_IF, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.addresses.append(addr)
        except BaseException:
            self.destroy()
            raise

    @staticmethod
    def _port(node: int) -> str:
        return f"port{node}"  # the hub's end of the node's link

    def address(self, node: int) -> str:
        """Node ``node``'s address (nodes count from 1)."""
        return self.addresses[node - 1]

    def run(self, node: int, cmd: Sequence[str]) -> List[str]:
        """``cmd`` run inside node ``node``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.nodes[node - 1], *cmd]

    def cut(self, node: int) -> None:
        """The node's link goes down at the hub: nothing passes either way, and nobody is told."""
        _ip("-n", self.hub, "link", "set", self._port(node), "down")

    def mend(self, node: int) -> None:
        _ip("-n", self.hub, "link", "set", self._port(node), "up")

    def pids(self, node: int) -> List[int]:
        """The processes running in node ``node``'s namespace."""
        return [int(p) for p in _ip("netns", "pids", self.nodes[node - 1], check=False).split() if p.isdigit()]

    def kill_all(self, node: int) -> List[int]:
        """SIGKILL every process in node ``node``'s namespace, by pid; the pids there were."""
        killed: List[int] = []
        for _ in range(50):
            found = self.pids(node)
            if not found:
                return killed
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            killed += [p for p in found if p not in killed]
            time.sleep(0.2)
        raise AssertionError(f"processes still in {self.nodes[node - 1]}: {self.pids(node)}")

    def listeners(self, node: int) -> List[Tuple[str, int, str]]:
        """(local address, port, processes) of every listening TCP socket in node ``node``'s namespace."""
        out = subprocess.run(self.run(node, ["ss", "-ltnpH"]), capture_output=True, text=True, timeout=30,
                             check=True).stdout
        found = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                host, _, port = fields[3].rpartition(":")
                names = re.findall(r'\("([^"]+)"', line)
                found.append((host.strip("[]"), int(port), ",".join(sorted(set(names)))))
        return found

    def destroy(self) -> None:
        """Kill what runs in the namespaces, then delete them (which deletes their links)."""
        for i in range(1, len(self.nodes) + 1):
            try:
                self.kill_all(i)
            except AssertionError:
                pass
        for ns in [*self.nodes, self.hub]:
            if ns in _namespaces():
                _ip("netns", "del", ns, check=False)


@pytest.fixture
def net(procs: Procs) -> Iterator[Network]:
    """Two nodes; torn down before ``procs`` (set up after it), so nothing is left either way."""
    why = unavailable()
    if why:
        pytest.skip(why)
    network = Network(nodes=2)
    yield network
    network.destroy()


# -- the job ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, net: Network, nnodes: str) -> Path:
    """One experiment for every node: the shared run directory is on this machine's disk."""
    overrides = (f"--nnodes={nnodes} --nproc-per-node={NPROC} --rdzv-backend=c10d "
                 f"--rdzv-endpoint={net.address(1)}:{PORT} --rdzv-id=netns-{net.tag} --monitor-interval=0.5 "
                 f"--rdzv-conf={RDZV_CONF}")
    config = tmp_path / "exp.yaml"
    config.write_text(
        "name: netns\n"
        f"entrypoint: python3 -m launch.torch_distributed {overrides} -- "
        f"python3 tests/scripts/sum_job.py {N} {BS} {INTERVAL}\n"
        "max_restarts: 1\n"
        f"process_group_timeout_s: {PG_TIMEOUT_S}\n"
        "checkpoint_storage:\n" + shared_fs(tmp_path / "runs"))
    return config


def start_node(procs: Procs, net: Network, node: int, config: Path, log: Path) -> Tracked:
    return procs.start(net.run(node, [PY, "-m", "batchproc", "run", str(config)]), env=SLOW, log_path=log)


def start_nodes(procs: Procs, net: Network, config: Path, tmp_path: Path, tag: str) -> List[Tracked]:
    """Node 2, then node 1 at once: node 2's agent retries its connection until node 1's hosts the
    rendezvous (``read_timeout``), and joins well within the last call, so the first round has both."""
    second = start_node(procs, net, 2, config, tmp_path / f"{tag}-n2.log")
    return [start_node(procs, net, 1, config, tmp_path / f"{tag}-n1.log"), second]


def wait_exit(t: Tracked, timeout: float, what: str) -> int:
    rc = t.wait(timeout)
    if rc is None:
        raise AssertionError(f"{what} did not end in {timeout:g} s:\n{t.output[-6000:]}")
    return rc


def status(run_dir: Path) -> Dict[str, object]:
    result: Dict[str, object] = json.loads((run_dir / "status.json").read_text())
    return result


def wait_for_checkpoint(run_dir: Path, nodes: Sequence[Tracked], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("ckpt-*.json")):
        assert time.monotonic() < deadline, "no checkpoint was written:\n" + "\n".join(n.output[-3000:] for n in nodes)
        assert all(n.poll() is None for n in nodes), "\n".join(n.output[-3000:] for n in nodes)
        time.sleep(0.2)


# -- the tests -------------------------------------------------------------------------------


def test_two_nodes_complete_and_listen_on_their_own_addresses_only(procs: Procs, net: Network,
                                                                    tmp_path: Path) -> None:
    nodes = start_nodes(procs, net, write_config(tmp_path, net, "2"), tmp_path, "run")
    seen: Dict[int, Set[Tuple[str, int, str]]] = {1: set(), 2: set()}
    # Every listener of a running job, sampled until the job ends: torchrun's rendezvous store,
    # the workers' store (rank 0) and gloo's pairs (one per rank).
    while any(n.poll() is None for n in nodes):
        for i in (1, 2):
            seen[i] |= set(net.listeners(i))
        time.sleep(0.5)
        assert all(n.elapsed < 300 for n in nodes), "the job did not end in 300 s"
    for i, n in enumerate(nodes, 1):
        assert n.wait(30) == 0, n.output
    run_dir = tmp_path / "runs" / "netns"
    assert_exactly_once(run_dir, N)
    assert status(run_dir)["world_size"] == 2 * NPROC
    for i in (1, 2):
        elsewhere = sorted(s for s in seen[i] if s[0] != net.address(i))
        assert not elsewhere, f"node {i} listened beyond its address {net.address(i)}: {elsewhere}"
    # Node 1: the rendezvous store, the workers' store (rank 0) and gloo's listener of each rank;
    # node 2: gloo's of each rank. All were seen, so none escaped the check.
    ports = {i: {port for _, port, _ in seen[i]} for i in (1, 2)}
    assert PORT in ports[1] and len(ports[1]) >= 2 + NPROC and len(ports[2]) >= NPROC, seen


def start_then_cut(procs: Procs, net: Network, tmp_path: Path, nnodes: str) -> Tuple[Path, Tracked, Tracked, float]:
    """Two nodes run to their first checkpoint; then node 2's link goes down. Returns the run
    directory, node 1's and node 2's ``batchproc run``, and when the link went down."""
    config = write_config(tmp_path, net, nnodes)
    first, second = start_nodes(procs, net, config, tmp_path, "cut")
    run_dir = tmp_path / "runs" / "netns"
    wait_for_checkpoint(run_dir, [first, second])
    assert status(run_dir)["world_size"] == 2 * NPROC, "node 1 started without node 2:\n" + second.output
    net.cut(2)
    return run_dir, first, second, time.monotonic()


def assert_lost_node_named(t: Tracked, net: Network, cut_at: float) -> None:
    t.wait_for(rf"batchproc: lost node {re.escape(net.address(2))} ", timeout=DETECT_BOUND_S)
    assert time.monotonic() - cut_at < DETECT_BOUND_S


def cut_node_cleaned_up(net: Network, second: Tracked) -> List[int]:
    """Node 2's processes, cut off: killed by pid, whatever they were doing. Returns those there were."""
    killed = net.kill_all(2)
    assert not net.pids(2)
    second.wait(30)
    assert not second.leftovers(), second.leftovers()
    return killed


def test_a_cut_node_is_dropped_and_the_other_resumes_in_a_smaller_world(procs: Procs, net: Network,
                                                                        tmp_path: Path) -> None:
    run_dir, first, second, cut_at = start_then_cut(procs, net, tmp_path, "1:2")
    assert_lost_node_named(first, net, cut_at)
    assert wait_exit(first, END_BOUND_S, "the surviving node") == 0, first.output
    assert time.monotonic() - cut_at < END_BOUND_S
    assert_exactly_once(run_dir, N)
    final = status(run_dir)
    assert final["world_size"] == NPROC and int(str(final["attempts"])) >= 2, final  # resumed on node 1 alone
    cut_node_cleaned_up(net, second)


def test_a_cut_node_fails_a_job_that_needs_every_node_naming_it(procs: Procs, net: Network,
                                                                 tmp_path: Path) -> None:
    run_dir, first, second, cut_at = start_then_cut(procs, net, tmp_path, "2")
    assert_lost_node_named(first, net, cut_at)
    rc = wait_exit(first, DETECT_BOUND_S + STOP_S + JOIN_S + PG_TIMEOUT_S + 60, "the surviving node")
    assert rc not in (0, 75), first.output
    assert f"lost nodes before this failure: {net.address(2)}" in first.output, first.output
    failed = status(run_dir)
    assert failed["state"] == "failed" and int(str(failed["committed_batches"])) < int(str(failed["total_batches"]))
    # The link comes back and the user starts both nodes again: the job resumes and completes.
    cut_node_cleaned_up(net, second)
    net.mend(2)
    for node in start_nodes(procs, net, write_config(tmp_path, net, "2"), tmp_path, "again"):
        assert wait_exit(node, 300, "a restarted node") == 0, node.output
    assert_exactly_once(run_dir, N)
    assert status(run_dir)["world_size"] == 2 * NPROC
