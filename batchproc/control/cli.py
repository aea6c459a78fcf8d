"""``batchproc run|status|stop``: run an experiment's entrypoint with its settings, show or stop a run.

No torch import here (``batchproc status`` must answer at once): the entrypoint's processes do
the work, and the run directory's state says how it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from typing import List, Optional, Sequence

from batchproc.rundir import lifecycle, report
from batchproc.control.config import load_config
from batchproc.errors import ConfigError
from batchproc.rundir.lifecycle import ExitCode, RunState, read_state
from batchproc.control.supervisor import PreemptionSignals
from batchproc.rundir.layout import METRICS_FILE
from batchproc.rundir.storage import RunDir

def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _url_join(url: str, rel: str) -> str:
    return url.rstrip("/") + "/" + rel


def _open_run(run: str, overrides: Sequence[str]) -> RunDir:
    """RUN is a config file (its run directory) or a run directory's path or URL."""
    if run.endswith((".yaml", ".yml")) and os.path.isfile(run):
        config = load_config(run, overrides)
        return RunDir(config.run_dir(), config.storage_root()[1])
    if overrides:
        raise ConfigError(f"--set applies to a config file, and {run!r} is a run directory")
    return RunDir(os.path.abspath(run) if "://" not in run else run)


def _resume_command(args: argparse.Namespace) -> str:
    # Without --fresh: that would throw away the progress the user is told is saved.
    words = ["batchproc", "run", args.config] + [w for s in args.set for w in ("--set", s)]
    return shlex.join(words)


def _attempt_cause(run_dir: RunDir, since: float) -> str:
    try:
        failure = lifecycle.root_cause(lifecycle.read_failures(run_dir, since))
    except Exception:
        failure = None
    if failure is None:
        return "no worker recorded a cause (see the output above)"
    return report.describe_cause({"error": failure.error, "failed_rank": failure.rank, "phase": failure.phase})


def _print_summary(rc: int, run_dir: RunDir, args: argparse.Namespace, since: float) -> None:
    """The last lines a user reads: how it ended, why, and what the run directory holds now."""
    try:
        status = report.read_status(run_dir)
    except Exception as e:  # the exit code is known already; a summary is a courtesy
        print(f"batchproc: cannot read the run's status: {e}", file=sys.stderr)
        return
    total = status.get("total_batches")
    done = f"{status.get('committed_batches', 0)}/{total if total is not None else '?'} batches"
    if rc == ExitCode.COMPLETED:
        print(f"batchproc: completed ({done}). Outputs: {_url_join(run_dir.url, 'outputs/')}  "
              f"metrics: {_url_join(run_dir.url, METRICS_FILE)}")
        print("metrics: " + json.dumps(status.get("metrics", {}), sort_keys=True))
        skipped = {what: status.get(f"skipped_{what}") or 0 for what in ("batches", "samples")}
        if any(skipped.values()):  # the job went on past them (bad_batches/bad_samples="skip")
            print(f"batchproc: skipped {skipped['batches']} batch(es) and {skipped['samples']} sample(s), "
                  f"each named in {_url_join(run_dir.url, 'errors.jsonl')}; their samples have no output.")
    elif rc == ExitCode.PREEMPTED:
        print(f"batchproc: preempted; progress saved ({done}). "
              f"Run the same command again to resume: {_resume_command(args)}")
    elif status["state"] == RunState.COMPLETED.value:
        # The run had completed (before, or in this attempt), and the script failed outside
        # torch_batch_process: before it could find that out, or after it returned.
        cause = _attempt_cause(run_dir, since)
        print(f"batchproc: failed with exit code {rc}: {cause}", file=sys.stderr)
        print(f"batchproc: the run directory {run_dir.url} holds a completed run ({done}); every output "
              f"is there, and a rerun has nothing left to process.", file=sys.stderr)
    else:
        print(f"batchproc: failed with exit code {rc}: {report.describe_cause(status)}", file=sys.stderr)
        print(f"batchproc: the run directory {run_dir.url} has {done} committed; nothing committed was lost. "
              f"Fix the cause, then resume with: {_resume_command(args)}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    # Record preemption signals before anything slow (imports, config, the run lock): with Python's
    # default actions a SIGTERM there would kill us and the run would end as failed, although
    # "stop, run again to resume" is all the signal means (see batchproc.control.supervisor).
    with PreemptionSignals() as signals:
        return _run(args, signals)


def _run(args: argparse.Namespace, signals: PreemptionSignals) -> int:
    from batchproc.control.supervisor import supervise
    from batchproc.control.torchrun_args import launcher_overrides, max_nodes

    try:
        config = load_config(args.config, args.set)
        entrypoint = config.entrypoint_argv()
        if entrypoint[0] in ("python", "python3"):
            # The interpreter running batchproc has batchproc (and torch); the first one on PATH may not.
            entrypoint[0] = sys.executable
        nodes = max_nodes(launcher_overrides(entrypoint))
    except (ConfigError, ValueError) as e:
        _err(str(e))
        return ExitCode.USAGE
    if args.fresh and nodes > 1:
        _err("--fresh on several nodes would let each node wipe the others' work; "
             f"clear {config.run_dir()} once with a single-node `batchproc run --fresh` or by hand")
        return ExitCode.USAGE
    run_dir = RunDir(config.run_dir(), config.storage_root()[1])
    print(f"batchproc: run directory {run_dir.url}", flush=True)
    # On several nodes each node runs this command: no single one can hold the run directory.
    since = time.time()
    rc = supervise(entrypoint, config.run_settings(lock_held=False), run_dir, signals,
                   holder=f"batchproc run {args.config}", take_lock=nodes == 1,
                   prepare=run_dir.remove_all if args.fresh else None)
    if rc not in (ExitCode.USAGE, ExitCode.LOCKED, ExitCode.NOT_FOUND, ExitCode.UNWRITABLE):
        _print_summary(rc, run_dir, args, since)
    return rc


def _existing_run(args: argparse.Namespace) -> "RunDir | int":
    """The run directory RUN names, or the exit code of why there is none."""
    try:
        run_dir = _open_run(args.run, args.set)
    except ConfigError as e:
        _err(str(e))
        return ExitCode.USAGE
    if not run_dir.exists(""):
        _err(f"no run directory at {run_dir.url}")
        return 1
    return run_dir


def _cmd_status(args: argparse.Namespace) -> int:
    run_dir = _existing_run(args)
    if isinstance(run_dir, int):
        return run_dir
    status = report.read_status(run_dir)
    print(json.dumps(status, indent=1, sort_keys=True) if args.json else report.format_status(status))
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    run_dir = _existing_run(args)
    if isinstance(run_dir, int):
        return run_dir
    state = read_state(run_dir)
    report.request_stop(run_dir)
    if state in (RunState.RUNNING, RunState.FINISHING):
        print(f"stop requested: the job on {run_dir.url} checkpoints at its next check and exits "
              f"(exit code {ExitCode.PREEMPTED.value}); `batchproc run` with the same config resumes it.")
    else:
        state_name = state.value if state else "not started"
        print(f"stop requested for {run_dir.url}, but its state is {state_name}: no job seems to be running.")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchproc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    set_help = "override a config key, e.g. --set resources.slots_per_trial=2 (repeatable)"

    run = sub.add_parser("run", help="run an experiment (resumes where it stopped)")
    run.add_argument("config", help="experiment.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help=set_help)
    run.add_argument("--fresh", action="store_true", help="delete the run's progress and outputs first")
    run.set_defaults(func=_cmd_run)

    for name, func, text in (("status", _cmd_status, "show a run's progress"),
                             ("stop", _cmd_stop, "ask a running job to checkpoint and stop")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("run", help="a run directory (path or URL) or an experiment.yaml")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help=set_help)
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="print the status as JSON")
        cmd.set_defaults(func=func)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``batchproc`` command; returns its exit code."""
    args = _parser().parse_args(argv)
    try:
        rc: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`batchproc status RUN | head`): as CLI tools do, stop quietly.
        # Python would print a traceback when it flushes stdout at exit; point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    return rc
