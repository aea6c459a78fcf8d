"""The launcher's pure builders: argv split, torchrun command line, overrides checked by torchrun's parser."""

from __future__ import annotations

import sys
from typing import List, Optional

import pytest

from batchproc.settings import FORWARDED_SIGNALS, RunSettings
from batchproc.control.torchrun_args import (
    ENTRY,
    LOG_LINE_PREFIX,
    SIGNALS_TO_HANDLE,
    create_launch_cmd,
    launcher_overrides,
    local_world_size,
    max_nodes,
    parse_args,
    rendezvous_endpoint,
)
from batchproc.control.launcher import node_address
from batchproc.netaddr import source_address

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
LOOPBACK_TORCHRUN = [sys.executable, "-m", "batchproc.control.loopback"]  # one node: stores bind 127.0.0.1


def value(cmd: List[str], *flags: str) -> Optional[str]:
    """The value given to a flag (``--f v`` or ``--f=v``), asserting it is given at most once."""
    cmd = cmd[:cmd.index("--")] if "--" in cmd else cmd  # the script's own words are not torchrun's
    found = [cmd[i + 1] for i, w in enumerate(cmd) if w in flags]
    found += [w.split("=", 1)[1] for w in cmd if w.split("=", 1)[0] in flags and "=" in w]
    assert len(found) <= 1, f"{flags} given {len(found)} times in {cmd}"
    return found[0] if found else None


def cmd_for(overrides=(), script=("x.py",), gpus=0, **settings) -> List[str]:
    return create_launch_cmd(RunSettings(**settings), list(overrides), list(script), gpus)


# -- parse_args -------------------------------------------------------------------------------


def test_parse_args_splits_at_first_double_dash():
    assert parse_args(["--nnodes", "2", "--", "python3", "x.py", "--", "a"]) == (
        ["--nnodes", "2"], ["python3", "x.py", "--", "a"])


def test_parse_args_without_double_dash_is_all_script():
    assert parse_args(["python3", "x.py", "--lr", "1"]) == ([], ["python3", "x.py", "--lr", "1"])
    assert parse_args(["--", "x.py"]) == ([], ["x.py"])
    assert parse_args([]) == ([], [])


# -- defaults -------------------------------------------------------------------------------


def test_defaults():
    cmd = cmd_for(max_restarts=3)
    assert cmd[:3] == LOOPBACK_TORCHRUN
    assert value(cmd, "--nproc-per-node") == "1"
    assert value(cmd, "--max-restarts") == "3"
    assert value(cmd, "--signals-to-handle") == SIGNALS_TO_HANDLE
    assert {s.name for s in FORWARDED_SIGNALS} | {"SIGQUIT"} == set(SIGNALS_TO_HANDLE.split(","))
    assert value(cmd, "--tee") == "3"  # torchrun prefixes only tee'd lines
    assert value(cmd, "--log-line-prefix-template") == LOG_LINE_PREFIX == "[rank${rank}]: "
    assert cmd.count("--standalone") == 1
    assert cmd[-3:] == ["--", ENTRY, "x.py"]


@pytest.mark.parametrize("slots, gpus, expected", [(3, 8, "3"), (None, 4, "4"), (None, 0, "1"), (1, 0, "1")])
def test_nproc_from_slots_else_gpus_else_one(slots, gpus, expected):
    assert value(cmd_for(gpus=gpus, slots_per_trial=slots), "--nproc-per-node") == expected


# -- overrides ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, flags, expected", [
    (["--nproc-per-node", "5"], ("--nproc-per-node", "--nproc_per_node"), "5"),
    (["--nproc_per_node=5"], ("--nproc-per-node", "--nproc_per_node"), "5"),
    (["--max_restarts", "7"], ("--max-restarts", "--max_restarts"), "7"),
    (["--signals-to-handle=SIGTERM"], ("--signals-to-handle", "--signals_to_handle"), "SIGTERM"),
    (["-t", "1"], ("--tee", "-t"), "1"),
    (["-t1"], ("--tee", "-t"), None),  # attached short value: present once, as the user wrote it
    (["--log_line_prefix_template", "${rank}|"],
     ("--log-line-prefix-template", "--log_line_prefix_template"), "${rank}|"),
])
def test_override_replaces_default_in_either_spelling(overrides, flags, expected):
    cmd = cmd_for(overrides, slots_per_trial=2, max_restarts=1)
    assert value(cmd, *flags) == expected
    assert cmd[-len(overrides) - 4:-4] == overrides  # after ours, in the user's order, so they win


def test_overrides_come_after_defaults_and_before_script():
    cmd = cmd_for(["--monitor-interval", "1"], script=["x.py", "--arg"])
    assert cmd[-7:] == ["--monitor-interval", "1", "--module", "--", ENTRY, "x.py", "--arg"]


@pytest.mark.parametrize("flag", ["--nproc", "--foo", "--max-restart", "-z"])
def test_unknown_flag_is_an_error_naming_it(flag):
    with pytest.raises(ValueError, match=f"unknown torchrun flag '{flag}'"):
        cmd_for([flag, "1"])


def test_unknown_flag_suggests_the_real_one():
    with pytest.raises(ValueError, match="did you mean --nproc-per-node"):
        cmd_for(["--nproc", "2"])


@pytest.mark.parametrize("overrides, message", [
    (["x.py"], "put the script after '--'"),
    (["--tee"], "needs a value"),
    (["--standalone=1"], "takes no value"),
])
def test_malformed_overrides(overrides, message):
    with pytest.raises(ValueError, match=message):
        cmd_for(overrides)


# -- standalone vs. multi-node ---------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    ["--nnodes", "2"], ["--nnodes=1:4"],
    ["--rdzv-endpoint", "host:29400"], ["--rdzv_endpoint=host:29400"],
    ["--master-addr", "10.0.0.1"], ["--master_port", "29500"], ["--rdzv-backend", "c10d"],
])
def test_no_standalone_with_a_rendezvous(overrides):
    cmd = cmd_for(overrides)
    assert "--standalone" not in cmd and cmd[:3] == TORCHRUN  # the user's endpoint, as torchrun binds it


def test_several_nodes_listen_on_the_node_address():
    cmd = create_launch_cmd(RunSettings(), ["--nnodes=2", "--rdzv-endpoint=10.9.8.1:29400"], ["x.py"], 0,
                            node_addr="10.9.8.2")
    assert cmd[:4] == LOOPBACK_TORCHRUN + ["--bind=10.9.8.2"]  # stores bind it, not every interface
    assert value(cmd, "--local-addr", "--local_addr") == "10.9.8.2"  # what peers and MASTER_ADDR use
    assert "--standalone" not in cmd


def test_a_local_addr_given_by_the_user_is_kept():
    cmd = create_launch_cmd(RunSettings(), ["--nnodes=2", "--local_addr=node-b"], ["x.py"], 0, node_addr="10.9.8.2")
    assert value(cmd, "--local-addr", "--local_addr") == "node-b"


@pytest.mark.parametrize("overrides, expected", [
    (["--rdzv-endpoint", "head:1234"], ("head", 1234)),
    (["--rdzv_endpoint=head"], ("head", 29400)),
    (["--rdzv-endpoint=[fd00::1]:5"], ("fd00::1", 5)),
    (["--rdzv-endpoint=[fd00::1]"], ("fd00::1", 29400)),
    (["--rdzv-endpoint=fd00::1"], ("fd00::1", 29400)),
    (["--master-addr=10.0.0.1", "--master-port=7"], ("10.0.0.1", 7)),
    (["--nnodes=2"], None),
])
def test_rendezvous_endpoint(overrides, expected):
    assert rendezvous_endpoint(overrides) == expected


def test_node_address_is_the_source_towards_the_rendezvous_host():
    assert node_address(["--nnodes=2", "--rdzv-endpoint=127.0.0.1:29400"]) == "127.0.0.1"
    assert node_address(["--nnodes=2", "--local-addr=localhost"]) in ("127.0.0.1", "::1")
    assert node_address(["--nnodes=2"]) is None  # no endpoint: torchrun's own defaults


def test_an_unknown_rendezvous_host_is_an_error_naming_it():
    with pytest.raises(ValueError, match="no-such-host.invalid"):
        source_address("no-such-host.invalid", 29400, wait_s=0)


@pytest.mark.parametrize("overrides", [[], ["--nnodes", "1"], ["--nnodes=1:1"]])
def test_standalone_on_one_node(overrides):
    assert cmd_for(overrides).count("--standalone") == 1


def test_standalone_given_by_user_is_not_doubled():
    assert cmd_for(["--standalone"]).count("--standalone") == 1


@pytest.mark.parametrize("overrides, expected", [
    ([], 1), (["--nnodes", "3"], 3), (["--nnodes=2:4"], 4), (["--nnodes", "1"], 1),
])
def test_max_nodes(overrides, expected):
    assert max_nodes(overrides) == expected


def test_max_nodes_rejects_garbage():
    with pytest.raises(ValueError, match="--nnodes"):
        max_nodes(["--nnodes", "many"])


def test_launcher_overrides_of_an_entrypoint():
    entry = "python3 -m launch.torch_distributed --nnodes 2 --rdzv-endpoint h:1 -- python3 x.py".split()
    assert launcher_overrides(entry) == ["--nnodes", "2", "--rdzv-endpoint", "h:1"]
    assert launcher_overrides("python3 -m launch.torch_distributed python3 x.py".split()) == []
    assert launcher_overrides(["python3", "x.py"]) == []


# -- the script -------------------------------------------------------------------------------


@pytest.mark.parametrize("python", ["python", "python3", "python3.11", "/usr/bin/python3", sys.executable])
def test_python_is_dropped_and_the_script_runs_under_batchproc_entry(python):
    cmd = cmd_for(script=[python, "-u", "examples/x.py", "--lr", "1"])
    assert cmd[-6:] == ["--module", "--", "batchproc.engine.entry", "examples/x.py", "--lr", "1"]
    assert python not in cmd[3:] and "--no-python" not in cmd and "-u" not in cmd


def test_python_module_runs_under_batchproc_entry():
    cmd = cmd_for(script=["python3", "-m", "pkg.mod", "--a"])
    assert cmd[-6:] == ["--module", "--", "batchproc.engine.entry", "-m", "pkg.mod", "--a"]
    given = cmd_for(["-m"], script=["python3", "-m", "pkg.mod"])  # the user's -m stands; no second one
    assert "--module" not in given and given[-4:] == ["--", "batchproc.engine.entry", "-m", "pkg.mod"]


def test_py_file_runs_under_batchproc_entry_and_executables_without_python():
    cmd = cmd_for(script=["x.py"])
    assert cmd[-4:] == ["--module", "--", "batchproc.engine.entry", "x.py"] and "--no-python" not in cmd
    cmd = cmd_for(script=["./job.sh", "a"])
    assert cmd[-4:] == ["--no-python", "--", "./job.sh", "a"]
    cmd = cmd_for(["--no-python"], script=["./job", "a"])  # the user's own executable, as given
    assert cmd[-3:] == ["--", "./job", "a"] and ENTRY not in cmd


@pytest.mark.parametrize("script, message", [
    ([], "no script"), (["python3"], "no script"), (["python3", "-c", "print()"], "option -c"),
    (["python3", "-m"], "module name"),
])
def test_bad_scripts(script, message):
    with pytest.raises(ValueError, match=message):
        cmd_for(script=script)


# -- processes per node (OMP threads) -------------------------------------------------------------


def test_local_world_size():
    assert local_world_size(RunSettings(slots_per_trial=3), [], 8) == 3
    assert local_world_size(RunSettings(), [], 2) == 2
    assert local_world_size(RunSettings(), [], 0) == 1
    assert local_world_size(RunSettings(slots_per_trial=3), ["--nproc_per_node=5"], 0) == 5
    assert local_world_size(RunSettings(), ["--nproc-per-node", "gpu"], 4) == 4


def test_the_cli_and_the_launcher_start_without_importing_torch():
    """Their start-up is on every run's critical path (row f of the bench): torch's import, 1.4 s
    of CPU here, belongs in the workers only."""
    import subprocess

    code = ("import sys, batchproc.control.cli, batchproc.control.supervisor, launch.torch_distributed; "
            "print(sorted(m for m in ('torch', 's3fs', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_launcher_by_its_package_path_is_the_same_launcher() -> None:
    """Where another installed package is called ``launch``, ``-m batchproc.control.launcher`` is
    the same command, and its overrides are read the same way."""
    for module in ("launch.torch_distributed", "batchproc.control.launcher"):
        entrypoint = ["python3", "-m", module, "--nnodes", "2", "--", "python3", "job.py"]
        assert launcher_overrides(entrypoint) == ["--nnodes", "2"]
        assert max_nodes(launcher_overrides(entrypoint)) == 2


def test_the_interface_of_an_address_and_a_listener_bound_to_it_only():
    from batchproc.netaddr import interface_of, listening_socket

    assert interface_of("127.0.0.1") == "lo"  # what GLOO_SOCKET_IFNAME gets on that node
    sock = listening_socket("127.0.0.1", 0)
    assert sock is not None and sock.getsockname()[0] == "127.0.0.1"
    sock.close()
    assert listening_socket("203.0.113.9", 0) is None  # not an address of this machine
