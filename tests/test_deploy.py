"""The deployment examples parse, the launcher accepts the torchrun flags they pass, and they follow
the launcher's signal and exit-code rules (known breaks are strict xfails naming the defect)."""

from __future__ import annotations

import re
import shlex
import signal as signal_module
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from batchproc.control.torchrun_args import _parse_overrides, parse_args

DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "deploy"


def _entrypoints(text: str):
    text = text.replace("\\\n", " ").replace("\n", " ")
    return [m.strip("'\" ") for m in re.findall(r"entrypoint=(.*?-- python3 [\w/]+\.py)", text)]


def _sbatch_launchers(text: str):
    """slurm.sbatch builds its entrypoint in ``launcher=``, around ``$JOB_SCRIPT`` (default given)."""
    script = re.search(r"^JOB_SCRIPT=\$\{JOB_SCRIPT:-(.*)\}$", text, re.M).group(1)
    return [m.replace("$JOB_SCRIPT", script) for m in re.findall(r'^\s*launcher="(.*? -- \$JOB_SCRIPT)"', text, re.M)]


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
        text = f.read_text()
        for entry in _entrypoints(text) + (_sbatch_launchers(text) if f.suffix == ".sbatch" else []):
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


def test_kubernetes_sigterm_reaches_batchproc_as_pid_1():
    """The kubelet signals the container's PID 1 only, and PID 1 ignores a signal it has no handler
    for: a shell left as PID 1 would never pass SIGTERM on, and the pod would be SIGKILLed at the
    end of the grace period without a checkpoint. batchproc must be PID 1 (exec'd by the shell)."""
    for c in _k8s_job()["spec"]["template"]["spec"]["containers"]:
        words = list(c.get("command", [])) + list(c.get("args", []))
        if words[0] != "batchproc":
            assert words[:2] in (["bash", "-c"], ["sh", "-c"]) and len(words) == 3, words
            assert words[2].lstrip().startswith("exec batchproc run "), words[2]


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
    # other failures are retried a bounded number of times (Ignore does not spend them)
    assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 1, spec.get("backoffLimit")


def _slurm_signal():
    text = (DEPLOY / "slurm.sbatch").read_text()
    m = re.search(r"^#SBATCH --signal=(B:)?(\w+)@\d+", text, re.M)
    assert m, "slurm.sbatch asks for no warning signal"
    return text, bool(m.group(1)), m.group(2)


def test_slurm_asks_for_a_signal_the_launcher_handles():
    _, _, name = _slurm_signal()
    assert getattr(signal_module, "SIG" + name.removeprefix("SIG")) in PREEMPTION_SIGNALS


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


def _run_sbatch(tmp_path: Path, srun_body: str, batchproc_body: str = "exit 0\n", signal_after_start=None):
    """Run slurm.sbatch itself with stubs for srun, scontrol and batchproc (the real thing runs in
    tests/test_slurm.py); optionally send the batch shell ``signal_after_start`` once srun runs.
    Returns (exit code, scontrol calls, batchproc calls, stderr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    logs = {name: tmp_path / f"{name}.log" for name in ("scontrol", "batchproc")}
    started = tmp_path / "srun.started"
    _stub(bin_dir, "srun", f'touch {shlex.quote(str(started))}\n' + srun_body)
    _stub(bin_dir, "scontrol", f'echo "$*" >> {shlex.quote(str(logs["scontrol"]))}\n'
                               '[ "$1 $2" = "show hostnames" ] && echo node1\nexit 0\n')
    _stub(bin_dir, "batchproc", f'echo "$*" >> {shlex.quote(str(logs["batchproc"]))}\n' + batchproc_body)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "STOPPED": str(tmp_path / "stopped")}
    shell = subprocess.Popen(["bash", str(DEPLOY / "slurm.sbatch")], env=env, stderr=subprocess.PIPE, text=True)
    if signal_after_start is not None:
        for _ in range(200):
            if started.exists():
                break
            time.sleep(0.05)
        time.sleep(0.2)  # the shell is in `wait` now
        shell.send_signal(signal_after_start)
    _, err = shell.communicate(timeout=30)
    calls = {name: log.read_text().splitlines() if log.exists() else [] for name, log in logs.items()}
    return shell.returncode, calls["scontrol"], calls["batchproc"], err


def test_slurm_requeues_when_the_job_exits_75(tmp_path: Path):
    """srun answers 75 (preempted): the script asks Slurm to requeue the job and exits 75."""
    rc, scontrol, _, err = _run_sbatch(tmp_path, f"exit {PREEMPTED}\n")
    assert "requeue 4242" in scontrol, (rc, scontrol, err)
    assert rc == PREEMPTED


def test_slurm_completion_exits_0_and_failures_propagate(tmp_path: Path):
    """0 ends the job as completed; any other code is the job's failure, not requeued."""
    for name, srun_rc in (("done", 0), ("failed", 3)):
        folder = tmp_path / name
        folder.mkdir()
        rc, scontrol, _, err = _run_sbatch(folder, f"exit {srun_rc}\n")
        assert rc == srun_rc and not any(c.startswith("requeue") for c in scontrol), (name, rc, scontrol, err)


def test_slurm_warning_signal_becomes_a_stop_request_and_the_shell_waits(tmp_path: Path):
    """SIGUSR1 to the batch shell (--signal=B:USR1, scancel --batch) asks the run to stop with the
    same experiment and storage as `batchproc run`; the shell is not killed and waits for srun's
    75, then requeues. srun here ends 75 once `batchproc stop` was called."""
    srun = ('for _ in $(seq 300); do [ -e "$STOPPED" ] && exit 75; sleep 0.1; done\nexit 9\n')
    rc, scontrol, batchproc, err = _run_sbatch(tmp_path, srun, 'touch "$STOPPED"\n',
                                               signal_after_start=signal_module.SIGUSR1)
    assert rc == PREEMPTED and "requeue 4242" in scontrol, (rc, scontrol, batchproc, err)
    assert batchproc and batchproc[0] == "stop experiment.yaml --set checkpoint_storage.host_path=/shared/runs", batchproc


def test_slurm_sigterm_does_not_kill_the_shell_before_the_verdict(tmp_path: Path):
    """SIGTERM (scancel, the time limit) reaches the tasks from Slurm itself: the shell survives it
    and reports srun's exit code instead of dying with 143."""
    rc, scontrol, batchproc, err = _run_sbatch(tmp_path, "sleep 1\nexit 75\n", signal_after_start=signal_module.SIGTERM)
    assert rc == PREEMPTED and "requeue 4242" in scontrol and not batchproc, (rc, scontrol, batchproc, err)
