"""Run one of ``examples/determined/`` as ``__main__``, its code unchanged, with test hooks around it.

Usage: determined_run.py EXAMPLE.py

Environment (each optional):

``DETERMINED_PORT_TMP``
    A folder that stands in for ``/tmp``: the example's ``"/tmp/..."`` string literals (and its
    ``constants`` module's) point there, as Determined's configs bind-mount the host's ``/tmp``
    into the container. Each test gets its own, so runs never share a Chroma folder or files.
``DETERMINED_PORT_TRACE``
    A file each rank appends its callbacks to, one line each, in the order they happen:
    ``<callback> <rank> <batch_idx or -> <time.time()>``, with ``on_finish`` as ``on_finish_start`` and
    ``on_finish_end``.
``DETERMINED_PORT_PAUSE_AFTER``
    ``N``: after its N-th ``process_batch`` of this attempt, each rank creates
    ``<trace>.paused.r<rank>`` and waits until it receives a preemption signal (SIGTERM, SIGINT
    or SIGUSR1), which batchproc's own handler records as usual; so the preemption the test
    sends lands mid-way whatever the machine's speed.
``DETERMINED_PORT_BLOCK``
    Where ``on_finish`` stops until it is killed, after creating ``<trace>.blocked.r<rank>``:
    ``start`` (before the example's ``on_finish`` runs, on every rank) or ``rmtree`` (rank 0's
    ``shutil.rmtree`` of a folder under ``DETERMINED_PORT_TMP``: after the Chroma upsert).
"""

import builtins
import os
import pathlib
import select
import shutil
import signal
import sys
import time
import types

EXAMPLE = pathlib.Path(sys.argv[1]).resolve()
TMP = os.environ.get("DETERMINED_PORT_TMP")
TRACE = os.environ.get("DETERMINED_PORT_TRACE")
PAUSE_AFTER = int(os.environ.get("DETERMINED_PORT_PAUSE_AFTER") or 0)
BLOCK = os.environ.get("DETERMINED_PORT_BLOCK")
RANK = os.environ.get("RANK", "0")


def trace(event, batch_idx="-"):
    if TRACE:
        fd = os.open(TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{event} {RANK} {batch_idx} {time.time():.3f}\n".encode())  # one write: lines never interleave
        finally:
            os.close(fd)


def touch_and_wait(marker):
    """Create ``marker``, then wait until killed."""
    pathlib.Path(marker).touch()
    while True:
        time.sleep(1)


def touch_and_wait_for_signal(marker, timeout=120):
    """Create ``marker``, then wait until this process receives a preemption signal.

    The signal's number reaches us through ``signal.set_wakeup_fd``, which leaves the handlers
    (batchproc's) in place; other signals (the loader's SIGCHLD) are ignored here."""
    wanted = {int(signal.SIGTERM), int(signal.SIGINT), int(signal.SIGUSR1)}
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        pathlib.Path(marker).touch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if ready and wanted & set(os.read(r, 64)):
                return
    finally:
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)


def blocking_rmtree(path, *args, **kwargs):
    if TMP and str(path).startswith(TMP):
        touch_and_wait(f"{TRACE}.blocked.r{RANK}")
    return real_rmtree(path, *args, **kwargs)


def hooked(cls):
    """``cls`` with every callback traced and the pause/block hooks in place."""

    class Hooked(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._port_batches = 0

        def process_batch(self, batch, batch_idx):
            super().process_batch(batch, batch_idx)
            trace("process_batch", batch_idx)
            self._port_batches += 1
            if self._port_batches == PAUSE_AFTER:
                touch_and_wait_for_signal(f"{TRACE}.paused.r{RANK}")

        def on_checkpoint_start(self):
            super().on_checkpoint_start()
            trace("on_checkpoint_start")

        def on_finish(self):
            trace("on_finish_start")
            if BLOCK == "start":
                touch_and_wait(f"{TRACE}.blocked.r{RANK}")
            if BLOCK == "rmtree":
                shutil.rmtree = blocking_rmtree
            try:
                super().on_finish()
            finally:
                shutil.rmtree = real_rmtree
            trace("on_finish_end")

    Hooked.__name__ = Hooked.__qualname__ = cls.__name__
    return Hooked


def main():
    sys.path.insert(0, str(EXAMPLE.parent))  # as `python EXAMPLE.py` has it: its siblings import
    source = EXAMPLE.read_text()
    if TMP:
        os.makedirs(TMP, exist_ok=True)
        source = source.replace('"/tmp/', f'"{TMP}/')
        try:
            import constants
        except ImportError:
            pass
        else:
            for name, value in vars(constants).items():
                if isinstance(value, str) and value.startswith("/tmp/"):
                    setattr(constants, name, TMP + value[len("/tmp"):])

    import batchproc

    real_tbp = batchproc.torch_batch_process

    def torch_batch_process(batch_processor_cls, *args, **kwargs):
        return real_tbp(hooked(batch_processor_cls), *args, **kwargs)

    batchproc.torch_batch_process = torch_batch_process  # found before batchproc's lazy __getattr__

    module = types.ModuleType("__main__")
    module.__file__ = str(EXAMPLE)
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [str(EXAMPLE)]
    exec(compile(source, str(EXAMPLE), "exec"), module.__dict__)


real_rmtree = shutil.rmtree
_runner = sys.modules["__main__"]  # keep this module alive once the example is __main__
main()
