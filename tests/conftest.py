"""Shared fixtures: run jobs through the real launcher (torchrun, gloo, 127.0.0.1) and clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is not an installed package

from bench.chaos import descendants  # noqa: E402  (one /proc walk for the tests and the campaign)
SCRIPTS = ROOT / "tests" / "scripts"
PY = sys.executable


def base_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHPROC_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


class Procs:
    """Processes a test started, each in its own process group, killed by group at teardown."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen] = []

    def start(self, cmd: List[str], env: Optional[Dict[str, str]] = None, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=base_env(env), cwd=kw.pop("cwd", ROOT), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def run(self, cmd: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 180, **kw) -> "Finished":
        return self.finish(self.start(cmd, env, **kw), timeout)

    def wait_for(self, p: subprocess.Popen, pattern: str, timeout: float = 120) -> List[str]:
        """Read ``p``'s output until a line matches ``pattern`` (a regex); returns the lines read."""
        import re
        import time

        lines: List[str] = getattr(p, "_lines", [])
        p._lines = lines  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if re.search(pattern, line):
                return lines
        raise AssertionError(f"no line matching {pattern!r}; output so far:\n{''.join(lines)}")

    def finish(self, p: subprocess.Popen, timeout: float = 180) -> "Finished":
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            out, _ = p.communicate()
            raise AssertionError(f"timed out after {timeout}s; output:\n{''.join(getattr(p, '_lines', []))}{out}")
        return Finished(p.returncode, "".join(getattr(p, "_lines", [])) + out)

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        # Our launchers start torchrun in a process group of its own: collect every descendant
        # by PID before killing, so nothing outlives the test.
        pids = [d for p in self.procs for d in descendants(p.pid)]
        for p in self.procs:
            self.kill(p)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait(timeout=30)


class Finished:
    def __init__(self, rc: int, out: str) -> None:
        self.rc, self.out = rc, out

    def result(self) -> dict:
        lines = [l for l in self.out.splitlines() if "RESULT " in l]
        assert lines, f"no RESULT line (rc={self.rc}); output:\n{self.out}"
        return json.loads(lines[-1].split("RESULT ", 1)[1])


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.cleanup()


def torchrun_cmd(nproc: int, script: str, *args: str, max_restarts: int = 0) -> List[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.2", str(SCRIPTS / script), *map(str, args)]


def job_cmd(nproc: int, *args: str, max_restarts: int = 0) -> List[str]:
    """The sum job, single process without a launcher when nproc == 0, else under torchrun."""
    if nproc == 0:
        return [PY, str(SCRIPTS / "sum_job.py"), *map(str, args)]
    return torchrun_cmd(nproc, "sum_job.py", *args, max_restarts=max_restarts)


def output_rows(run_dir: Path) -> List[dict]:
    rows = []
    for f in sorted((run_dir / "outputs").rglob("*.jsonl")):
        rows.extend(json.loads(l) for l in f.read_text().splitlines())
    return rows


def output_indices(run_dir: Path) -> List[int]:
    return sorted(r["index"] for r in output_rows(run_dir))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol HTTP server (moto's server mode) on 127.0.0.1, stopped after the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)  # for s3fs in this process; children get them through base_env
    yield {"endpoint": endpoint, "env": creds}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test: returns its s3:// URL."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]}, skip_instance_cache=True)
    fs.mkdir(name)
    yield f"s3://{name}"
