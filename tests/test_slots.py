"""``slots_per_trial: auto`` (and the key left out): one process per GPU, one on a CPU-only host.

The default experiment ships with ``auto``: on a host without GPUs a second process on the same
cores measured slower than one (docs/SCALING.md). The GPU count must not cost the launcher a torch
import where there is no GPU driver at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from batchproc.control import launcher
from batchproc.control.config import AUTO_SLOTS, Resources, load_config
from batchproc.control.torchrun_args import create_launch_cmd, local_world_size
from batchproc.errors import ConfigError
from batchproc.settings import ENV_SLOTS, RunSettings
from tests.support import PY, ROOT, Procs, assert_exactly_once, shared_fs, write_config

BASE = "name: n\nentrypoint: python3 -m launch.torch_distributed python3 x.py\n"


def _load(tmp_path: Path, text: str, overrides=()):
    path = tmp_path / "experiment.yaml"
    path.write_text(textwrap.dedent(text))
    return load_config(str(path), overrides)


@pytest.mark.parametrize("resources", ["resources:\n  slots_per_trial: auto\n", "resources:\n", ""])
def test_auto_and_absent_leave_the_count_to_the_launcher(tmp_path, resources):
    config = _load(tmp_path, BASE + resources)
    assert config.resources.slots() is None
    settings = config.run_settings(lock_held=False)
    assert settings.slots_per_trial is None and ENV_SLOTS not in settings.to_env()
    assert RunSettings.from_env(settings.to_env()).slots_per_trial is None


def test_auto_is_kept_as_written(tmp_path):
    assert _load(tmp_path, BASE + "resources: {slots_per_trial: auto}\n").resources.slots_per_trial == AUTO_SLOTS


@pytest.mark.parametrize("override, expected", [("resources.slots_per_trial=2", 2),
                                                ("resources.slots_per_trial=auto", None)])
def test_set_overrides_auto_either_way(tmp_path, override, expected):
    config = _load(tmp_path, BASE + "resources:\n  slots_per_trial: 3\n", [override])
    assert config.resources.slots() == expected
    assert config.run_settings(lock_held=False).slots_per_trial == expected


@pytest.mark.parametrize("value", ["two", "Auto", 0, -1, True, 1.5, [2]])
def test_bad_slots_name_the_key_and_both_choices(tmp_path, value):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, BASE + f"resources:\n  slots_per_trial: {json.dumps(value)}\n")
    message = str(e.value)
    assert "resources.slots_per_trial" in message and "int >= 1 or 'auto'" in message, message


def test_bad_slots_from_set_names_the_override(tmp_path):
    with pytest.raises(ConfigError, match=r"--set resources.slots_per_trial=many"):
        _load(tmp_path, BASE, ["resources.slots_per_trial=many"])


def test_resources_validate_themselves():
    assert Resources(4).slots() == 4 and Resources("auto").slots() is None and Resources().slots() is None
    with pytest.raises(ConfigError):
        Resources("four")


def test_the_default_experiment_is_auto():
    with open(ROOT / "experiment.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["resources"]["slots_per_trial"] == AUTO_SLOTS


# -- what auto resolves to -----------------------------------------------------------------


@pytest.mark.parametrize("gpus, expected", [(0, 1), (1, 1), (4, 4)])
def test_auto_is_one_per_gpu_else_one(gpus, expected):
    settings = RunSettings(slots_per_trial=None)
    assert local_world_size(settings, [], gpus) == expected
    cmd = create_launch_cmd(settings, [], ["x.py"], gpus)
    assert cmd[cmd.index("--nproc-per-node") + 1] == str(expected)


def test_no_gpu_device_node_means_no_gpu_and_no_torch_import(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(launcher.glob, "glob", lambda pattern: [])
    monkeypatch.setitem(sys.modules, "torch", None)  # an import of torch would raise
    assert launcher.gpu_count() == 0


@pytest.mark.parametrize("visible", ["", "-1", " "])
def test_no_visible_device_means_no_gpu(monkeypatch, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(launcher.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    monkeypatch.setitem(sys.modules, "torch", None)
    assert launcher.gpu_count() == 0


def test_a_gpu_driver_asks_torch(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = []
    monkeypatch.setattr(launcher.glob, "glob", lambda pattern: seen.append(pattern) or ["/dev/nvidia0"])
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(device_count=lambda: 3))
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert launcher.gpu_count() == 3
    assert seen[0] == "/dev/nvidia[0-9]*"


def test_the_launcher_counts_gpus_without_torch_here():
    """On this host, in a fresh interpreter: the count the launcher uses, and whether torch came in."""
    code = ("import sys; from batchproc.control.launcher import gpu_count, GPU_DEVICE_NODES; import glob; "
            "print(gpu_count(), 'torch' in sys.modules, any(glob.glob(p) for p in GPU_DEVICE_NODES))")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    count, imported, has_driver = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True,
                                                 text=True, check=True).stdout.split()
    if has_driver == "True":
        pytest.skip("this host has a GPU driver: torch counts the GPUs")
    assert (count, imported) == ("0", "False")


def test_auto_runs_one_process_on_a_cpu_only_host(procs: Procs, tmp_path: Path):
    """``batchproc run`` with the key left out: one worker, and the job completes exactly once."""
    if launcher.gpu_count():
        pytest.skip("this host has GPUs: auto starts one process per GPU")
    n = 12
    cfg = write_config(tmp_path / "exp.yaml", (n, 2, 2), shared_fs(tmp_path / "runs"), slots=None)
    done = procs.run([PY, "-m", "batchproc", "run", str(cfg)])
    assert done.rc == 0, done.out
    run_dir = tmp_path / "runs" / "sums"
    assert json.loads((run_dir / "status.json").read_text())["world_size"] == 1
    assert "[rank0]" in done.out and "[rank1]" not in done.out, done.out
    assert_exactly_once(run_dir, n)
