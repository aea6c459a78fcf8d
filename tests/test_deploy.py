"""The deployment examples parse, the launcher accepts the torchrun flags they pass, and they follow
the launcher's signal and exit-code rules (known breaks are strict xfails naming the defect)."""

from __future__ import annotations

import re
import shlex
import signal as signal_module
import subprocess
from pathlib import Path

import pytest
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


# -- the launcher's signal and exit-code rules, as the deploy files must follow them ---------------
# `batchproc run` stops on SIGTERM (Kubernetes' stop signal), SIGINT or SIGUSR1 (Slurm's --signal)
# with progress saved, and exits 75 (EX_TEMPFAIL): "run the same command again to resume". After the
# signal the workers get torchrun's 30 s grace to finish the checkpoint before it SIGKILLs them,
# and the launcher waits VERDICT_GRACE_S for the ranks' verdicts.

from batchproc.control.supervisor import VERDICT_GRACE_S  # noqa: E402
from batchproc.rundir.lifecycle import ExitCode  # noqa: E402
from batchproc.settings import PREEMPTION_SIGNALS  # noqa: E402

PREEMPTED = int(ExitCode.PREEMPTED)
TORCHRUN_WORKER_GRACE_S = 30


def _k8s_job():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes-job.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "Job")


def test_exit_code_75_means_preempted():
    assert PREEMPTED == 75


def test_kubernetes_preemption_sends_sigterm_which_the_launcher_handles():
    pod = _k8s_job()["spec"]["template"]["spec"]
    assert signal_module.SIGTERM in PREEMPTION_SIGNALS
    for c in pod["containers"]:
        lifecycle = c.get("lifecycle") or {}
        assert "stopSignal" not in lifecycle, "a custom stop signal replaces SIGTERM"
        assert "preStop" not in lifecycle, "a preStop hook delays or replaces the SIGTERM"


def test_kubernetes_grace_period_outlasts_the_checkpoint():
    """The kubelet SIGKILLs after terminationGracePeriodSeconds (default 30 s): it must be longer
    than torchrun's grace for the checkpoint plus the launcher's wait for the verdicts."""
    grace = _k8s_job()["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    assert grace > TORCHRUN_WORKER_GRACE_S + VERDICT_GRACE_S


def test_kubernetes_exit_75_is_retried_not_a_failure():
    spec = _k8s_job()["spec"]
    container = spec["template"]["spec"]["containers"][0]["name"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    # the first rule that matches exit 75 decides; Ignore: the pod is replaced (the job resumes)
    # without counting against backoffLimit (Count would spend the retries on preemptions,
    # FailJob would end the job)
    matching = [r for r in spec["podFailurePolicy"]["rules"]
                if "onExitCodes" in r and r["onExitCodes"].get("operator") == "In"
                and PREEMPTED in r["onExitCodes"]["values"]
                and r["onExitCodes"].get("containerName", container) == container]
    assert matching and matching[0]["action"] == "Ignore", spec["podFailurePolicy"]


def _slurm_signal():
    text = (DEPLOY / "slurm.sbatch").read_text()
    m = re.search(r"^#SBATCH --signal=(B:)?(\w+)@\d+", text, re.M)
    assert m, "slurm.sbatch asks for no warning signal"
    return text, bool(m.group(1)), m.group(2)


def test_slurm_asks_for_a_signal_the_launcher_handles():
    _, _, name = _slurm_signal()
    assert getattr(signal_module, "SIG" + name.removeprefix("SIG")) in PREEMPTION_SIGNALS


@pytest.mark.xfail(strict=True, reason="slurm.sbatch: --signal=B:USR1 goes to the batch shell only, "
                                       "which has no trap for it: USR1's default action kills the shell "
                                       "and batchproc never sees the signal")
def test_slurm_batch_shell_traps_the_signal_it_asks_for():
    """With ``B:`` Slurm signals only the batch shell: it must trap the signal and pass it on."""
    text, batch_only, name = _slurm_signal()
    traps = re.findall(r"^\s*trap\s+.*?\s((?:SIG)?\w+(?:\s+(?:SIG)?\w+)*)\s*$", text, re.M)
    trapped = {w.removeprefix("SIG") for t in traps for w in t.split()}
    assert not batch_only or name.removeprefix("SIG") in trapped


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.xfail(strict=True, reason="slurm.sbatch: `set -e` exits the script on `wait $!`'s status 75 "
                                       "before `scontrol requeue` runs, so a preempted job is never requeued")
def test_slurm_requeues_when_the_job_exits_75(tmp_path: Path):
    """Run slurm.sbatch itself with srun answering 75 (preempted): it asks Slurm to requeue the job
    and exits 75."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    _stub(bin_dir, "srun", f"exit {PREEMPTED}\n")
    _stub(bin_dir, "scontrol", f'echo "$*" >> {shlex.quote(str(log))}\n'
                               '[ "$1 $2" = "show hostnames" ] && echo node1\nexit 0\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242"}
    done = subprocess.run(["bash", str(DEPLOY / "slurm.sbatch")], env=env, capture_output=True, text=True,
                          timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    assert "requeue 4242" in calls, (done.returncode, calls, done.stderr)
    assert done.returncode == PREEMPTED
