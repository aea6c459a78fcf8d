"""``python -m launch.torch_distributed [TORCHRUN_OVERRIDES... --] SCRIPT...``

Starts ``SCRIPT`` on every slot through torchrun (``python -m torch.distributed.run``) with the
run's settings: ``--nproc-per-node`` (slots_per_trial, else the GPU count, else 1),
``--max-restarts``, SIGUSR1 among the forwarded signals (Slurm), rank-prefixed output lines,
``--standalone`` on one node. Overrides before ``--`` are torchrun flags checked against
torchrun's own parser; each replaces our default for the same flag. The exit code is 0 completed,
75 preempted (run again to resume), anything else failed (see :mod:`batchproc.control.supervisor`).

torch is imported only inside functions: ``batchproc`` imports this module and must stay fast.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import argparse

    from batchproc.rundir.storage import RunDir

from batchproc.rundir.lifecycle import ExitCode
from batchproc.control.supervisor import PreemptionSignals, supervise
from batchproc.settings import ENV_PROGRESS, TORCHRUN_SIGNALS_TO_HANDLE as SIGNALS_TO_HANDLE, RunSettings, cpu_count

MODULE = "launch.torch_distributed"
#: Every Python entrypoint runs through it (torchrun's --module): see batchproc.engine.entry.
ENTRY = "batchproc.engine.entry"
USAGE = f"usage: python -m {MODULE} [TORCHRUN_OVERRIDES... --] SCRIPT [ARGS...]"
LOG_LINE_PREFIX = "[rank${rank}]: "
# Any of these in the overrides means a rendezvous the user set up, which --standalone would replace.
_RENDEZVOUS = ("rdzv_endpoint", "rdzv_backend", "master_addr", "master_port")
_PYTHON = re.compile(r"python(\d+(\.\d+)*)?")


def parse_args(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Split at the first ``--`` into (torchrun overrides, script); without one it is all script."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return [], argv


def _torchrun_options() -> Dict[str, "argparse.Action"]:
    from torch.distributed.run import get_args_parser

    return {s: a for a in get_args_parser()._actions for s in a.option_strings}


def _parse_overrides(overrides: Sequence[str]) -> Dict[str, Optional[str]]:
    """torchrun's dest -> value (None for flags without one) of each override; unknown flags raise."""
    if not overrides:
        return {}  # nothing to check: spare the launch the ~2 s import of torch's parser
    options = _torchrun_options()
    given: Dict[str, Optional[str]] = {}
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("-") or token == "-":
            raise ValueError(f"unexpected {token!r} among the torchrun overrides: put the script after '--'")
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
        else:  # `-t3` as argparse allows
            flag, eq, value = token[:2], ("=" if len(token) > 2 else ""), token[2:]
        action = options.get(flag)
        if action is None:
            long_flags = [o for o in options if o.startswith("--")]
            close = [o for o in long_flags if o.startswith(flag)] or difflib.get_close_matches(flag, long_flags)
            hint = f" (did you mean {' or '.join(sorted(close)[:3])}?)" if close else ""
            raise ValueError(f"unknown torchrun flag {flag!r} in the launcher overrides{hint}; "
                             "see `python -m torch.distributed.run --help`")
        if action.nargs == 0:
            if eq:
                raise ValueError(f"torchrun flag {flag} takes no value, got {token!r}")
            given[action.dest] = None
        elif eq:
            given[action.dest] = value
        elif i + 1 < len(overrides):
            i += 1
            given[action.dest] = overrides[i]
        else:
            raise ValueError(f"torchrun flag {flag} needs a value")
        i += 1
    return given


def _is_python(word: str) -> bool:
    return word == sys.executable or _PYTHON.fullmatch(os.path.basename(word)) is not None


def _script_args(script: Sequence[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(torchrun flags as (dest, flag), argv) running ``script`` the way torchrun wants it."""
    words = list(script)
    if not words:
        raise ValueError(f"no script to launch; {USAGE}")
    if not _is_python(words[0]):
        # torchrun prepends `python -u` itself; anything not a .py file is an executable.
        return ([] if words[0].endswith(".py") else [("no_python", "--no-python")]), words
    words = words[1:]
    if words[:1] == ["-u"]:
        words = words[1:]  # torchrun always passes -u
    if words[:1] == ["-m"]:
        if len(words) < 2:
            raise ValueError("`python -m` needs a module name")
        return [("module", "--module")], words[1:]
    if not words or words[0].startswith("-"):
        got = f"option {words[0]}" if words else "no script"
        raise ValueError(f"python with {got}: torchrun runs `python -u SCRIPT.py ...` or `python -u -m MODULE ...`")
    return [], words


def _flag_value(overrides: Sequence[str], *flags: str) -> Optional[str]:
    """The last value given to any spelling of a flag, without torch's parser (``batchproc`` uses it)."""
    value = None
    for i, token in enumerate(overrides):
        name, eq, rest = token.partition("=")
        if name in flags:
            value = rest if eq else (overrides[i + 1] if i + 1 < len(overrides) else None)
    return value


def max_nodes(overrides: Sequence[str]) -> int:
    """The most nodes the overrides' ``--nnodes N`` or ``--nnodes MIN:MAX`` allows (1 if absent)."""
    value = _flag_value(overrides, "--nnodes")
    if value is None:
        return 1
    try:
        return int(value.rsplit(":", 1)[-1])
    except ValueError:
        raise ValueError(f"--nnodes {value!r}: expected N or MIN:MAX") from None


def launcher_overrides(entrypoint: Sequence[str]) -> List[str]:
    """The torchrun overrides of an entrypoint ``... -m launch.torch_distributed OVERRIDES -- ...``."""
    words = list(entrypoint)
    for i in range(len(words) - 1):
        if words[i:i + 2] == ["-m", MODULE]:
            return parse_args(words[i + 2:])[0]
    return []


def local_world_size(settings: RunSettings, overrides: Sequence[str], gpu_count: int) -> int:
    """Processes this node starts: ``--nproc-per-node`` if overridden, else slots, GPUs, or 1."""
    value = _nproc_override(overrides)
    if value is None:
        return settings.slots_per_trial or gpu_count or 1
    if value.isdigit():
        return max(1, int(value))
    if value in ("gpu", "auto") and gpu_count:
        return gpu_count
    return cpu_count() if value in ("cpu", "auto") else 1


def _nproc_override(overrides: Sequence[str]) -> Optional[str]:
    return _flag_value(overrides, "--nproc-per-node", "--nproc_per_node")


def create_launch_cmd(settings: RunSettings, overrides: Sequence[str], script: Sequence[str],
                      gpu_count: int) -> List[str]:
    """The torchrun command line: our defaults, then ``overrides`` (which replace them), then the script."""
    given = _parse_overrides(overrides)
    flags, argv = _script_args(script)
    if "no_python" not in given and "no_python" not in dict(flags):
        # A Python script or module runs under batchproc.engine.entry, which reports an error raised
        # outside torch_batch_process and keeps torchrun from replaying a deterministic one.
        module = "module" in given or "module" in dict(flags)
        flags, argv = [("module", "--module")], [ENTRY, *(["-m"] if module else []), *argv]
    defaults = [
        ("nproc_per_node", ["--nproc-per-node", str(settings.slots_per_trial or gpu_count or 1)]),
        ("max_restarts", ["--max-restarts", str(settings.max_restarts)]),
        ("signals_to_handle", ["--signals-to-handle", SIGNALS_TO_HANDLE]),
        # torchrun prefixes only tee'd streams: tee both, or lines of different ranks mix unlabeled.
        ("tee", ["--tee", "3"]),
        ("log_line_prefix_template", ["--log-line-prefix-template", LOG_LINE_PREFIX]),
    ]
    single_node = max_nodes(overrides) == 1 and not any(d in given for d in _RENDEZVOUS)
    if single_node:
        defaults.append(("standalone", ["--standalone"]))  # c10d on a free port: no collisions
    # One node needs no listener others can reach: torchrun's stores bind 127.0.0.1 (launch.loopback).
    cmd = [sys.executable, "-m", "batchproc.control.loopback" if single_node else "torch.distributed.run"]
    for dest, tokens in defaults:
        if dest not in given:
            cmd += tokens
    cmd += overrides
    cmd += [flag for dest, flag in flags if dest not in given]
    # "--" ends torchrun's options: argparse would otherwise take the script's own flags as
    # abbreviations of torchrun's (`--n` is "ambiguous") and refuse to start.
    return cmd + ["--"] + argv


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Launch, wait, and return 0 (completed), 75 (preempted) or the failure's exit code."""
    # Record preemption signals before anything slow (torch's import for the GPU count and the
    # overrides' check, the run lock): with Python's default actions a SIGTERM there would kill us
    # and the run would end as failed, although it only means "stop, run again to resume".
    with PreemptionSignals() as signals:
        return _launch(argv, signals)


def _launch(argv: Optional[Sequence[str]], signals: PreemptionSignals) -> int:
    overrides, script = parse_args(sys.argv[1:] if argv is None else argv)
    settings = RunSettings.from_env()
    try:
        nproc_value = _nproc_override(overrides)
        counts_gpus = settings.slots_per_trial is None or (nproc_value and not nproc_value.isdigit())
        gpus = _gpu_count() if counts_gpus else 0
        cmd = create_launch_cmd(settings, overrides, script, gpus)
        nproc = local_world_size(settings, overrides, gpus)
        single_node = max_nodes(overrides) == 1
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
