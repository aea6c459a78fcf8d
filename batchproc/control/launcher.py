"""``python -m launch.torch_distributed [TORCHRUN_OVERRIDES... --] SCRIPT...``

Starts ``SCRIPT`` on every slot through torchrun (``python -m torch.distributed.run``) with the
run's settings: ``--nproc-per-node`` (slots_per_trial, else (``auto``) the GPU count, else 1),
``--max-restarts``, SIGUSR1 among the forwarded signals (Slurm), rank-prefixed output lines,
``--standalone`` on one node, where every listener binds 127.0.0.1. A job of one node and one
local slot without overrides runs under :mod:`batchproc.control.solo_agent` instead, which
starts the worker as torchrun would, without torchrun's torch import. On several nodes every
listener binds the node's own address (:func:`node_address`; see :mod:`batchproc.control.loopback`
and :mod:`batchproc.netaddr`). Overrides before ``--`` are torchrun flags checked against
torchrun's own parser; each replaces our default for the same flag. The exit code is 0 completed,
75 preempted (run again to resume), anything else failed (see :mod:`batchproc.control.supervisor`).

The command line itself is built in :mod:`batchproc.control.torchrun_args`. ``launch.torch_distributed``
(DESIGN.md's name) and ``python -m batchproc.control.launcher`` both run :func:`main`.
"""

from __future__ import annotations

import glob
import os
import shlex
import sys
from typing import TYPE_CHECKING, Optional, Sequence

from batchproc.control import solo_agent
from batchproc.control.supervisor import PreemptionSignals, supervise
from batchproc.lifeline import die_with_parent
from batchproc.control.torchrun_args import (DEFAULT_RDZV_PORT, MODULE, nproc_override, create_launch_cmd, local_addr_override,
                                             local_world_size, max_nodes, parse_args, rendezvous_endpoint,
                                             worker_command)
from batchproc.netaddr import interface_of, source_address
from batchproc.rundir.lifecycle import ExitCode
from batchproc.settings import ENV_AGENT, ENV_PROGRESS, RunSettings, cpu_count

if TYPE_CHECKING:
    from batchproc.rundir.storage import RunDir


#: The device nodes of the GPU drivers torch.cuda works with: NVIDIA's, ROCm's, WSL's.
GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def gpu_count() -> int:
    """The GPUs torch would use here: ``torch.cuda.device_count()``, but 0 without importing torch
    (2-3 s before the job can start, on a 2-core VM) on a host with none of the GPU drivers' device
    nodes, or with ``CUDA_VISIBLE_DEVICES`` empty or ``-1``, where torch sees none either."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if not any(glob.glob(pattern) for pattern in GPU_DEVICE_NODES):
        return 0
    import torch

    return torch.cuda.device_count()


def node_address(overrides: Sequence[str]) -> Optional[str]:
    """This node's own address on a multi-node job: ``--local-addr`` if given, else the address it
    reaches the rendezvous host from (the host itself on the node it names). None without a
    rendezvous endpoint; ValueError if its host does not resolve or cannot be reached."""
    given = local_addr_override(overrides)
    endpoint = rendezvous_endpoint(overrides)
    if given:
        return source_address(given, endpoint[1] if endpoint else DEFAULT_RDZV_PORT)  # a name: its address
    return source_address(*endpoint) if endpoint else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Launch, wait, and return 0 (completed), 75 (preempted) or the failure's exit code."""
    # Record preemption signals before anything slow (torch's import for the GPU count and the
    # overrides' check, the run lock): with Python's default actions a SIGTERM there would kill us
    # and the run would end as failed, although it only means "stop, run again to resume".
    with PreemptionSignals() as signals:
        die_with_parent()  # a SIGTERM, recorded as a preemption and passed on to torchrun
        return _launch(argv, signals)


def _launch(argv: Optional[Sequence[str]], signals: PreemptionSignals) -> int:
    overrides, script = parse_args(sys.argv[1:] if argv is None else argv)
    settings = RunSettings.from_env()
    try:
        nproc_value = nproc_override(overrides)
        counts_gpus = settings.slots_per_trial is None or (nproc_value and not nproc_value.isdigit())
        gpus = gpu_count() if counts_gpus else 0
        single_node = max_nodes(overrides) == 1
        node_addr = None if single_node else node_address(overrides)
        nproc = local_world_size(settings, overrides, gpus)
        if single_node and nproc == 1 and not overrides and os.environ.get(ENV_AGENT) != "torchrun":
            # Nothing to rendezvous: our own agent, which starts the worker without torchrun's torch import.
            cmd = solo_agent.command(worker_command(script), settings.max_restarts)
        else:
            cmd = create_launch_cmd(settings, overrides, script, gpus, node_addr)
    except ValueError as e:
        print(f"{MODULE}: error: {e}", file=sys.stderr)
        return ExitCode.USAGE

    from batchproc.rundir.storage import RunDir

    run_dir = RunDir(settings.run_dir, settings.storage_options) if settings.run_dir else None
    env_defaults = {"OMP_NUM_THREADS": str(max(1, cpu_count() // nproc))}
    if not single_node:
        # torch 2.14: with the rendezvous store shared with the workers (the default), a node
        # started again after a crash waits for a store address that the surviving node never
        # publishes (it keeps the first round's), and both fail. Unshared, every round
        # publishes a fresh one (see batchproc.distributed._worker_store).
        env_defaults["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        interface = interface_of(node_addr) if node_addr else None
        if interface is not None:
            # gloo listens on the address of the interface it is given; left to itself it takes
            # whatever the hostname resolves to (often 127.0.0.1, which peers cannot reach).
            env_defaults["GLOO_SOCKET_IFNAME"] = interface
    if sys.stderr.isatty():  # workers write to torchrun's pipes, but a person is watching
        env_defaults[ENV_PROGRESS] = "1"
    # On several nodes every launcher runs: none of them can hold the run's lock alone.
    rc = supervise(cmd, settings, run_dir, signals, holder=f"{MODULE} {shlex.join(script)}",
                   take_lock=not settings.lock_held and single_node, env_defaults=env_defaults, name=MODULE)
    if run_dir is not None and not settings.lock_held and rc not in (ExitCode.COMPLETED, ExitCode.PREEMPTED):
        _print_cause(run_dir)  # on its own (no `batchproc run` above us to say it)
    return rc


def _print_cause(run_dir: "RunDir") -> None:
    from batchproc.rundir import report

    try:
        print(f"{MODULE}: failed: {report.describe_cause(report.read_status(run_dir))}", file=sys.stderr)
    except Exception:  # the exit code says it failed already
        pass


if __name__ == "__main__":
    sys.exit(main())
