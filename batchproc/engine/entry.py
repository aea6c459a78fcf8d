"""``python -m batchproc.engine.entry SCRIPT [ARGS...]`` or ``python -m batchproc.engine.entry -m MODULE [ARGS...]``.

The launcher runs every Python entrypoint through this module (torchrun's ``--module``), so that an
error raised by the job's script *outside* ``torch_batch_process`` is handled like one inside it:
building the dataset from a folder that does not exist, a typo in the script, a failure after the
run completed. Without it torchrun sees a worker exit non-zero and replays the same error on every
restart, on every rank, and nothing records the cause in the run directory.

Here such an error is reported as the rank's failure (:mod:`batchproc.rundir.lifecycle`), with the phase
"in the script, before torch_batch_process" (or "after it returned"). If a restart could not
help (anything but a connection, timeout or collective error), the rank leaves a verdict and
exits cleanly (:mod:`batchproc.engine.verdict`): one attempt, and the supervisor prints the cause.
Errors inside ``torch_batch_process`` were decided there already and pass through untouched.

The script runs as it would under ``python SCRIPT``: ``__name__ == "__main__"``, ``sys.argv``
and ``sys.path[0]`` as Python sets them.
"""

from __future__ import annotations

import os
import runpy
import sys
from types import TracebackType
from typing import List, Optional

from batchproc import lifeline, settings as _settings
from batchproc.rundir.lifecycle import Phase, Where

#: The attribute ``torch_batch_process`` sets on an exception it has reported and decided about.
REPORTED = "_batchproc_reported"
BEFORE = Where(Phase.SCRIPT_BEFORE, "in the script, before torch_batch_process")
AFTER = Where(Phase.SCRIPT_AFTER, "in the script, after torch_batch_process returned")
USAGE = "usage: python -m batchproc.engine.entry SCRIPT [ARGS...] | -m MODULE [ARGS...]"


class _Script:
    """What this process's script has done so far; torch_batch_process tells it (:func:`returned`)."""

    returned = False


def returned() -> None:
    """Called by ``torch_batch_process`` when it returns: errors from here on are the script's, after it."""
    _Script.returned = True


def script_phase() -> Where:
    """Where in the script an error outside ``torch_batch_process`` happened."""
    return AFTER if _Script.returned else BEFORE


def restart_could_help(error: BaseException) -> bool:
    """A storage, connection or timeout error (:func:`batchproc.rundir.storage.is_transient`) or a
    collective one (a peer or a store went away) may pass on a restart; anything else the script
    raised would be raised again by the same code and inputs."""
    from batchproc.rundir.lifecycle import describe_error, is_secondary
    from batchproc.rundir.storage import is_transient

    return is_transient(error) or is_secondary(describe_error(error))


def _report(error: BaseException) -> None:
    """Record the failure as torch_batch_process would, then leave cleanly if it is deterministic."""
    from batchproc.rundir import lifecycle
    from batchproc.engine import verdict
    from batchproc.rundir.storage import RunDir

    rank = int(os.environ.get("RANK") or 0)
    phase = script_phase()
    run_settings = _settings.RunSettings.from_env()
    if run_settings.run_dir:
        try:
            lifecycle.report_failure(RunDir(run_settings.run_dir, run_settings.storage_options), error, rank, phase)
        except Exception:  # the error itself matters more than its report
            pass
    if not restart_could_help(error) and verdict.write(lifecycle.describe_error(error), rank, phase):
        verdict.exit_cleanly(error, rank, phase)


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] == "-m" and len(args) < 2):
        raise SystemExit(USAGE)
    try:
        if args[0] == "-m":
            sys.argv = args[1:]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            script = args[0]
            sys.argv = args
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        if not getattr(e, REPORTED, False):
            _report(e.with_traceback(_from_the_script(e.__traceback__)))
        raise
    finally:
        # The script has ended: only the interpreter's exit is left, which the launcher waits for.
        lifeline.exit_without_collecting()


def _from_the_script(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """The traceback without this module's and runpy's frames: it starts in the user's script."""
    while tb is not None and tb.tb_next is not None and (
            tb.tb_frame.f_code.co_filename == __file__ or "runpy" in tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy's: torch_batch_process tells
    # batchproc.engine.entry that it returned, and script_phase must read that same module.
    from batchproc.engine.entry import main as _main

    _main()
