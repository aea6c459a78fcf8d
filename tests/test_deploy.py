"""The deployment examples parse, and the launcher accepts the torchrun flags they pass."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from batchproc.control.torchrun_args import _parse_overrides, parse_args

DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "deploy"


def _entrypoints(text: str):
    text = text.replace("\\\n", " ").replace("\n", " ")
    return [m.strip("'\" ") for m in re.findall(r"entrypoint=(.*?-- python3 [\w/]+\.py)", text)]


def test_shell_scripts_parse():
    for script in ("slurm.sbatch", "multinode-torchrun.sh"):
        subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True)


def test_kubernetes_manifest_parses():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes-job.yaml").read_text()))
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Service", "Job"]
    job = docs[1]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"]
    assert 75 in job["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"]


def test_launcher_accepts_the_deploy_overrides():
    found = 0
    for f in DEPLOY.iterdir():
        for entry in _entrypoints(f.read_text()):
            words = shlex.split(re.sub(r"\$\(?\{?(\w+)\}?\)?", "1", entry))
            overrides, script = parse_args(words[3:])  # drop "python3 -m launch.torch_distributed"
            given = _parse_overrides(overrides)
            assert given["nnodes"] and given["rdzv_endpoint"] and script[-1].endswith(".py")
            found += 1
    assert found == 3
