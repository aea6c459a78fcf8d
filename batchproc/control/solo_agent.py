"""``python -m batchproc.control.solo_agent [--max-restarts N] -- WORKER_CMD...``: one local worker,
started the way torchrun's agent starts it, without importing torch.

torchrun's agent imports all of torch (``torch.distributed.run``) before it starts any worker:
3-5 s on a loaded 2-core VM, in series with the worker's own import, and the reason a
one-slot ``batchproc run`` reached its first batch seconds after ``python script.py`` did
(docs/SCALING.md). A job of one node and one local slot needs none of the agent's rendezvous,
so the launcher (:mod:`batchproc.control.launcher`) runs this instead. It keeps what the rest of
batchproc relies on from torchrun:

* the worker's environment: ``RANK``/``LOCAL_RANK``/``GROUP_RANK``/``ROLE_RANK`` 0, the world
  sizes 1, ``MASTER_ADDR`` 127.0.0.1 and a free ``MASTER_PORT`` (only a script that creates its
  own process group listens there; batchproc creates none in a world of one),
  ``TORCHELASTIC_RUN_ID``, ``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_MAX_RESTARTS``;
* restarts: a worker that exits non-zero is started again, up to ``--max-restarts`` times, with
  the restart count incremented (ranks that failed for good exit 0 with a verdict, see
  :mod:`batchproc.engine.verdict`, and are not replayed);
* stops: the first SIGTERM/SIGINT/SIGUSR1/SIGHUP/SIGQUIT is passed on to the worker, which
  checkpoints; it gets :data:`GRACE_S` (torchrun's 30 s) before a SIGKILL. Later copies (a
  scheduler signalling every process of the job, then again) are noted and ignored, so that the
  worker keeps its grace. A stopped agent exits 1, as torchrun does;
* output: every line of the worker's stdout and stderr prefixed ``[rank0]: `` on ours;
* its place in the lifeline: it gets SIGTERM when the launcher dies, and the worker gets one
  when it dies (:mod:`batchproc.lifeline`).

``BATCHPROC_AGENT=torchrun`` makes the launcher use torchrun's agent for one slot too.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Dict, List, Optional, Sequence

from batchproc import lifeline
from batchproc.netaddr import free_port
from batchproc.settings import AGENT_SIGNALS, ENV_RESTART_COUNT

MODULE = "batchproc.control.solo_agent"
#: Seconds a stopped worker gets to checkpoint and exit before it is killed (torchrun's shutdown timeout).
GRACE_S = 30.0
#: torchrun_args.LOG_LINE_PREFIX for rank 0, spelled out: importing that module costs this agent 10 ms.
PREFIX = b"[rank0]: "
USAGE = f"usage: python -m {MODULE} [--max-restarts N] -- WORKER_CMD..."


def command(worker: Sequence[str], max_restarts: int) -> List[str]:
    """The agent's command line for ``worker`` (what the launcher runs in torchrun's place)."""
    return [sys.executable, "-m", MODULE, "--max-restarts", str(max_restarts), "--", *worker]


def worker_env(base: Dict[str, str], run_id: str, restart: int, max_restarts: int, port: int) -> Dict[str, str]:
    """torchrun's environment for the only worker of a one-node, one-slot job."""
    env = dict(base)
    env.update({
        "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "ROLE_RANK": "0",
        "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": "1",
        "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": run_id, ENV_RESTART_COUNT: str(restart),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts), "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": base.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "PYTHONUNBUFFERED": "1",  # torchrun runs `python -u`: lines reach the prefixer as they are written
    })
    return env


def _pump(source: IO[bytes], sink: IO[bytes]) -> None:
    """Copy ``source`` to ``sink`` line by line, each prefixed, until the worker closes it."""
    for line in iter(source.readline, b""):
        try:
            sink.write(PREFIX + line if line.endswith(b"\n") else PREFIX + line + b"\n")
            sink.flush()
        except (BrokenPipeError, ValueError):  # nobody reads us any more: keep draining the pipe
            pass
    source.close()


class _Stop:
    """The first stop signal, passed on to the worker once; later ones noted and ignored."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.deadline = float("inf")
        self._worker: Optional["subprocess.Popen[bytes]"] = None
        self._sent = False

    def attach(self, worker: Optional["subprocess.Popen[bytes]"]) -> None:
        """Pass stops on to ``worker`` from now on (None: there is none), the one before it included."""
        # Handlers run in the main thread between two bytecodes: each of the two sends below is
        # guarded by _sent, so the worker gets the signal exactly once, whenever it came.
        self._worker, self._sent = worker, False
        if worker is not None and self.signum is not None:
            self._send()

    def _send(self) -> None:
        worker = self._worker
        if worker is None or self._sent or self.signum is None:
            return
        self._sent = True
        if worker.poll() is None:
            try:
                worker.send_signal(self.signum)
            except ProcessLookupError:
                pass

    def on_signal(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            print(f"batchproc: agent (pid {os.getpid()}): {signal.Signals(signum).name} again while stopping on "
                  f"{signal.Signals(self.signum).name}; the worker keeps its grace", file=sys.stderr, flush=True)
            return
        self.signum = signum
        self.deadline = time.monotonic() + GRACE_S
        self._send()


def _wait(worker: "subprocess.Popen[bytes]", stop: _Stop) -> int:
    killed = False
    while True:
        try:
            return worker.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if not killed and time.monotonic() > stop.deadline:
            killed = True
            print(f"batchproc: agent: the worker (pid {worker.pid}) did not stop within {GRACE_S:.0f} s of "
                  "the signal: killing it", file=sys.stderr, flush=True)
            worker.kill()


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def run(worker_cmd: Sequence[str], max_restarts: int) -> int:
    """Run the worker, restarting it on failure; 0 if it succeeded, 1 if it failed or was stopped."""
    stop = _Stop()
    for sig in AGENT_SIGNALS:
        signal.signal(sig, stop.on_signal)
    lifeline.die_with_parent()  # the launcher died: stop the worker as on any preemption
    run_id = secrets.token_hex(8)
    base = dict(os.environ)
    for restart in range(max_restarts + 1):
        if stop.signum is not None:
            break  # asked to stop before this worker started: start nothing
        env = lifeline.child_env(worker_env(base, run_id, restart, max_restarts, free_port()))
        # A session of its own, as torchrun's workers have: a terminal's Ctrl-C reaches it once, through us.
        worker = subprocess.Popen(list(worker_cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        pumps = [threading.Thread(target=_pump, args=(pipe, sink), daemon=True)
                 for pipe, sink in ((worker.stdout, sys.stdout.buffer), (worker.stderr, sys.stderr.buffer))]
        for pump in pumps:
            pump.start()
        stop.attach(worker)
        rc = _wait(worker, stop)
        stop.attach(None)
        for pump in pumps:  # a grandchild that kept the pipes open must not hold us
            pump.join(timeout=5.0)
        if rc == 0 and stop.signum is None:
            return 0
        if stop.signum is not None:
            break
        left = max_restarts - restart
        what = f"batchproc: agent: worker rank 0 (pid {worker.pid}) {_describe(rc)}"
        if left:
            print(f"{what}; starting it again ({left} of --max-restarts {max_restarts} left)", file=sys.stderr,
                  flush=True)
        else:
            print(f"{what}; no restarts left (--max-restarts {max_restarts})", file=sys.stderr, flush=True)
    if stop.signum is not None:
        print(f"batchproc: agent: stopped on {signal.Signals(stop.signum).name}", file=sys.stderr, flush=True)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    max_restarts = 0
    if args[:1] == ["--max-restarts"] and len(args) > 1 and args[1].isdigit():
        max_restarts, args = int(args[1]), args[2:]
    if args[:1] != ["--"] or len(args) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return run(args[1:], max_restarts)
    except OSError as e:
        print(f"batchproc: agent: cannot start {args[1]!r}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
