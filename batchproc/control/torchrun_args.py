"""torchrun's command line for a job: our defaults, the user's overrides checked against torchrun's
own parser, and the script run under :mod:`batchproc.engine.entry`. Pure functions, no torch
import at module level (the CLI uses them to read an entrypoint's ``--nnodes``)."""


from __future__ import annotations

import difflib
import os
import re
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import argparse

from batchproc.control.loopback import BIND_FLAG
from batchproc.settings import TORCHRUN_SIGNALS_TO_HANDLE as SIGNALS_TO_HANDLE, RunSettings, cpu_count

MODULE = "launch.torch_distributed"
#: The same launcher by its package path, for sites where another package is called ``launch``.
MODULES = (MODULE, "batchproc.control.launcher")
#: Every Python entrypoint runs through it (torchrun's --module): see batchproc.engine.entry.
ENTRY = "batchproc.engine.entry"
#: torchrun with its stores bound to one address (see batchproc.control.loopback).
LOOPBACK_MODULE = "batchproc.control.loopback"
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


def _under_entry(given: Dict[str, Optional[str]], script: Sequence[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
    """:func:`_script_args`, with a Python script or module run under batchproc.engine.entry, which
    reports an error raised outside torch_batch_process and keeps the agent from replaying a
    deterministic one."""
    flags, argv = _script_args(script)
    if "no_python" not in given and "no_python" not in dict(flags):
        module = "module" in given or "module" in dict(flags)
        flags, argv = [("module", "--module")], [ENTRY, *(["-m"] if module else []), *argv]
    return flags, argv


def worker_command(script: Sequence[str]) -> List[str]:
    """The command torchrun would start as a worker for ``script`` (no overrides): ``python -u -m
    batchproc.engine.entry ...`` for a Python script or module, else the executable itself."""
    flags, argv = _under_entry({}, script)
    return [sys.executable, "-u", "-m", *argv] if ("module", "--module") in flags else argv


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
    """The torchrun overrides of an entrypoint ``... -m launch.torch_distributed OVERRIDES -- ...``
    (or ``-m batchproc.control.launcher``)."""
    words = list(entrypoint)
    for i in range(len(words) - 1):
        if words[i] == "-m" and words[i + 1] in MODULES:
            return parse_args(words[i + 2:])[0]
    return []


def local_world_size(settings: RunSettings, overrides: Sequence[str], gpu_count: int) -> int:
    """Processes this node starts: ``--nproc-per-node`` if overridden, else slots, GPUs, or 1."""
    value = nproc_override(overrides)
    if value is None:
        return settings.slots_per_trial or gpu_count or 1
    if value.isdigit():
        return max(1, int(value))
    if value in ("gpu", "auto") and gpu_count:
        return gpu_count
    return cpu_count() if value in ("cpu", "auto") else 1


def nproc_override(overrides: Sequence[str]) -> Optional[str]:
    return _flag_value(overrides, "--nproc-per-node", "--nproc_per_node")


#: torchrun's default port of a c10d rendezvous endpoint given without one.
DEFAULT_RDZV_PORT = 29400


def rendezvous_endpoint(overrides: Sequence[str]) -> Optional[Tuple[str, int]]:
    """(host, port) the nodes meet at: ``--rdzv-endpoint``, else ``--master-addr``/``--master-port``
    (a static rendezvous); None without either."""
    endpoint = _flag_value(overrides, "--rdzv-endpoint", "--rdzv_endpoint")
    if endpoint:
        host, sep, port = endpoint.rpartition(":")
        if not sep or "]" in port or (":" in host and not host.startswith("[")):  # no port: "h", "[v6]", "v6"
            host, port = endpoint, ""
        host = host.strip("[]")
        try:
            return host, int(port) if port else DEFAULT_RDZV_PORT
        except ValueError:
            raise ValueError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT") from None
    master = _flag_value(overrides, "--master-addr", "--master_addr")
    if master:
        port = _flag_value(overrides, "--master-port", "--master_port") or "29500"
        return master, int(port)
    return None


def local_addr_override(overrides: Sequence[str]) -> Optional[str]:
    return _flag_value(overrides, "--local-addr", "--local_addr")


def create_launch_cmd(settings: RunSettings, overrides: Sequence[str], script: Sequence[str],
                      gpu_count: int, node_addr: Optional[str] = None) -> List[str]:
    """The torchrun command line: our defaults, then ``overrides`` (which replace them), then the script.

    ``node_addr``, on several nodes: this node's own address (see
    :func:`batchproc.control.launcher.node_address`). torchrun's stores listen on it only, and it
    is published as the node's address (``--local-addr``), so that peers reach the workers' store
    and the rendezvous names this node by it. Without it, torchrun binds as it does by itself.
    """
    given = _parse_overrides(overrides)
    flags, argv = _under_entry(given, script)
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
        # One node needs no listener others can reach: torchrun's stores bind 127.0.0.1.
        cmd = [sys.executable, "-m", LOOPBACK_MODULE]
    elif node_addr is not None:
        # Several nodes: each listens on its own address only, never on every interface.
        defaults.append(("local_addr", ["--local-addr", node_addr]))
        cmd = [sys.executable, "-m", LOOPBACK_MODULE, f"{BIND_FLAG}={node_addr}"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run"]
    for dest, tokens in defaults:
        if dest not in given:
            cmd += tokens
    cmd += overrides
    cmd += [flag for dest, flag in flags if dest not in given]
    # "--" ends torchrun's options: argparse would otherwise take the script's own flags as
    # abbreviations of torchrun's (`--n` is "ambiguous") and refuse to start.
    return cmd + ["--"] + argv
