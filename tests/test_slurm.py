"""``examples/deploy/slurm.sbatch`` on a real one-machine Slurm cluster (Debian's slurm-wlm + munge).

The module starts munged with a key of its own, slurmctld and slurmd with a slurm.conf of their
own in a temporary folder (127.0.0.1, free ports, state and logs in the folder, proctrack/linuxproc:
a signal to a job step reaches every process of it, as proctrack/cgroup does on real clusters),
submits the shipped sbatch file running the sum job, and checks what a user relies on: the
time-limit signal (``--signal=B:USR1``) or ``scancel --batch --signal=USR1`` makes the job
checkpoint, exit 75 and requeue itself; the requeued job resumes and completes; every sample is
output exactly once. Every daemon and job process it started is killed by pid at the end.

Runs as root with the packages installed and ``BATCHPROC_TEST_SLURM=1``: ``make test-slurm``
installs the packages (as root) and sets it. Otherwise the module is skipped, saying why.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from tests.support import ROOT, Procs, assert_exactly_once, base_env, free_port, shared_fs, write_config

SBATCH = ROOT / "examples" / "deploy" / "slurm.sbatch"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
MARK = "BATCHPROC_SLURM_TEST_CLUSTER"  # every process of our cluster carries it: teardown finds them

_missing = [b for b in BINARIES if shutil.which(b) is None]
pytestmark = [
    pytest.mark.skipif(os.environ.get("BATCHPROC_TEST_SLURM") != "1",
                       reason="the Slurm cluster test runs with `make test-slurm` (root, slurm-wlm and munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a Slurm cluster needs root (slurmd runs jobs as their user): "
                                                 "run `make test-slurm` as root"),
    pytest.mark.skipif(bool(_missing), reason=f"{', '.join(_missing)} not installed: "
                                              "`apt-get install -y slurm-wlm munge` (or `make test-slurm` as root)"),
    pytest.mark.xdist_group("slurm-cluster"),
]


def _node_line() -> str:
    """This machine's real CPUs, sockets and memory, as slurmd itself reports them (``slurmd -C``)."""
    first = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = dict(w.split("=", 1) for w in first.split())
    fields.pop("NodeName")
    fields["RealMemory"] = str(int(fields["RealMemory"]) * 9 // 10)  # what a job may use, less some slack
    return "NodeName=localhost NodeAddr=127.0.0.1 " + " ".join(f"{k}={v}" for k, v in fields.items())


def _slurm_conf(d: Path, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=batchproc-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
# Bind to 127.0.0.1, not every address.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthType=auth/munge
AuthInfo=socket={d}/munge/socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
# The main scheduling loop every 5 s (default 60): a requeued job starts once it is eligible again.
SchedulerParameters=sched_interval=5
KillWait=30
{_node_line()}
PartitionName=batchproc Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _listening_addresses(pid: int) -> List[str]:
    """The local addresses (``ip:port``) of the TCP sockets ``pid`` listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addr, port = cols[1].split(":")
                if len(addr) == 8:
                    ip = ".".join(str(b) for b in reversed(bytes.fromhex(addr)))
                else:
                    ip = "ipv6:" + addr
                found.append(f"{ip}:{int(port, 16)}")
    return found


def _marked_pids(token: str) -> List[int]:
    """Processes whose environment carries our cluster's mark (daemons, slurmstepd, job processes)."""
    needle = f"{MARK}={token}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0"):
                pids.append(int(entry))
    return pids


class Cluster:
    """A running one-node cluster: its folder, the client environment, and job helpers."""

    def __init__(self, folder: Path, env: Dict[str, str]) -> None:
        self.folder, self.env = folder, env

    def cmd(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        return done.stdout

    def job(self, job_id: str) -> Dict[str, str]:
        text = self.cmd("scontrol", "show", "job", "-o", job_id)
        return dict(w.split("=", 1) for w in text.split() if "=" in w)

    def wait_job(self, job_id: str, until, what: str, timeout: float) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: not {what} after {timeout:g} s: {info}\n{self.log(job_id)}")
            time.sleep(1)

    def log(self, job_id: str) -> str:
        path = self.folder / f"job-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else "(no job output yet)"

    def submit(self, job_env: Dict[str, str], *sbatch_args: str) -> str:
        env = dict(self.env, **job_env)
        out = subprocess.run(["sbatch", "--parsable", f"--output={self.folder}/job-%j.out", "--nodes=1",
                              f"--cpus-per-task={os.cpu_count()}", "--gpus-per-node=0", *sbatch_args, str(SBATCH)],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # Not pytest's tmp_path: munged wants every folder above its socket open to all (pytest's are 0700).
    d = Path(tempfile.mkdtemp(prefix="batchproc-slurm-"))
    d.chmod(0o755)
    for sub in ("key", "munge", "state", "spool", "log"):
        (d / sub).mkdir()
    # munged checks its folders: the key's private, the socket's reachable by every user.
    (d / "key").chmod(0o700)
    (d / "munge").chmod(0o755)
    key = d / "key" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (d / "plugstack.conf").write_text("")
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, free_port(), free_port()))
    token = uuid.uuid4().hex
    env = base_env({"SLURM_CONF": str(conf), MARK: token,
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    procs = Procs()
    try:
        munged = procs.start(["munged", "--foreground", "--num-threads=10", f"--socket={d}/munge/socket",
                              f"--key-file={key}", f"--seed-file={d}/key/seed", f"--pid-file={d}/munge/munged.pid",
                              f"--log-file={d}/log/munged.log"], env, log_path=d / "log" / "munged.out")
        munged.wait_for("Created .* work threads", timeout=30)
        ctld = procs.start(["slurmctld", "-D", "-i", "-f", str(conf)], env, log_path=d / "log" / "slurmctld.out")
        slurmd = procs.start(["slurmd", "-D", "-N", "localhost", "-f", str(conf)], env,
                             log_path=d / "log" / "slurmd.out")
        c = Cluster(d, env)
        deadline = time.monotonic() + 60
        while c.cmd("sinfo", "-h", "-n", "localhost", "-o", "%T", check=False).strip() != "idle":
            assert time.monotonic() < deadline, f"the node never came up:\n{ctld.output}\n{slurmd.output}"
            time.sleep(0.5)
        for daemon in (ctld, slurmd):
            addresses = _listening_addresses(daemon.pid)
            assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), (daemon.cmd[0], addresses)
        yield c
        c.cmd("scancel", "--full", "--partition=batchproc", check=False)
    finally:
        procs.cleanup()  # the daemons, by pid and process group
        # slurmstepd and the jobs' processes left slurmd's tree: they carry our mark
        deadline = time.monotonic() + 10
        while _marked_pids(token):
            assert time.monotonic() < deadline, f"still running: {_marked_pids(token)}"
            for pid in _marked_pids(token):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        shutil.rmtree(d, ignore_errors=True)


def _sum_job(cluster: Cluster, name: str, n: int, sleep_s: float) -> Dict[str, str]:
    """An experiment running the sum job over ``n`` samples (batches of 4, a checkpoint every 2),
    ``sleep_s`` per batch, on 2 processes; returns the job's environment for the sbatch file."""
    runs = cluster.folder / "runs"
    config = write_config(cluster.folder / f"{name}.yaml", [n, 4, 2], shared_fs(runs), name=name)
    return {"EXPERIMENT": str(config), "JOB_SCRIPT": f"python3 tests/scripts/sum_job.py {n} 4 2",
            "RUNS": str(runs), "SUM_JOB_SLEEP": str(sleep_s)}


def _finished(info: Dict[str, str]) -> bool:
    return info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")


def _assert_completed_after_requeue(cluster: Cluster, job_id: str, info: Dict[str, str], n: int, name: str) -> None:
    log = cluster.log(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    assert int(info["Restarts"]) >= 1, (info, log)
    assert f"requeueing job {job_id}" in log and "batchproc: preempted; progress saved" in log, log
    assert re.search(r"batchproc: completed \(\d+/\d+ batches\)", log), log
    assert_exactly_once(cluster.folder / "runs" / name, n)


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster: Cluster) -> None:
    """--time=2 --signal=B:USR1@60: slurmctld checks time limits every 30 s and sends the warning
    when fewer than warn + 30 s are left, so the signal comes 30-60 s into the job, and the kill at
    the limit 60-90 s after it. Each rank has 60 batches of 1 s: the signal finds it mid-run."""
    n = 480
    job_id = cluster.submit(_sum_job(cluster, "timelimit", n, 1.0), "--time=2", "--signal=B:USR1@60")
    cluster.wait_job(job_id, lambda i: int(i["Restarts"]) >= 1 or _finished(i), "requeued", timeout=240)
    # The second attempt gets the same 2 minutes and its own warning: lift the limit so that it
    # runs to the end (if it starts before this, it is preempted and requeued again: still correct).
    cluster.cmd("scontrol", "update", f"JobId={job_id}", "TimeLimit=10", check=False)
    info = cluster.wait_job(job_id, _finished, "finished", timeout=300)
    _assert_completed_after_requeue(cluster, job_id, info, n, "timelimit")


def test_scancel_batch_signal_preempts_and_the_requeued_job_resumes(cluster: Cluster) -> None:
    """``scancel --batch --signal=USR1`` signals the batch shell only, as ``B:`` does: it reaches
    the shell's trap. (Without --batch Slurm signals the job steps and not the shell; --full
    signals the shell and every process of its steps, so each would get it twice.)"""
    n = 160
    job_id = cluster.submit(_sum_job(cluster, "scancel", n, 1.0), "--time=10")
    deadline = time.monotonic() + 120
    while not re.search(r"PROGRESS (?:[3-9]|\d\d)\b", cluster.log(job_id)):  # mid-run: a few batches done
        assert time.monotonic() < deadline, cluster.log(job_id)
        time.sleep(0.5)
    cluster.cmd("scancel", "--batch", "--signal=USR1", job_id)
    info = cluster.wait_job(job_id, _finished, "finished", timeout=300)
    _assert_completed_after_requeue(cluster, job_id, info, n, "scancel")
