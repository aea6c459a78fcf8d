"""What the tests (and ``bench.chaos``) share: processes, the test job, configs, and the S3 server.

Import it as ``from tests.support import ...`` (``tests`` is a package; pytest puts the repository
root on ``sys.path``, and ``python -m bench.chaos`` runs from there). It imports neither torch nor
batchproc, so a process that uses it stays light. The fixtures built on it (``procs``,
``s3_server``, ``s3_bucket``) are in ``tests/conftest.py``.

Processes
    ``Tracked(cmd, env, cwd=ROOT, log_path=None)``: a command in a session (process group) of its
    own. Its output is read on a thread (``lines``, ``output``; copied to ``log_path`` if given);
    every descendant is recorded while it runs (pid and start time), so that ``kill_all()`` kills
    each of them even after it left the group (torchrun starts its workers in groups of their own).
    ``wait_for(pattern, timeout)`` waits for a new output line matching a regex,
    ``wait(timeout)`` for the exit, ``worker_pid(rank)`` reads the test job's ``WORKER`` lines,
    ``leftovers()`` lists descendants still alive.
    ``Procs``: the processes one test started (the ``procs`` fixture): ``start(cmd, env)`` ->
    ``Tracked``, ``finish(t, timeout)`` -> ``Finished(rc, out)`` (a timeout kills everything and
    fails the test with the output), ``run(cmd, env, timeout)`` = start + finish,
    ``wait_for(t, pattern)``; ``cleanup()`` kills whatever is left, by pid and process group.
    ``Finished.result()``: the job's ``RESULT {json}`` line, parsed. ``base_env(extra)``: the
    environment of every process a test starts (no stray ``BATCHPROC_*``, 127.0.0.1, one thread
    per rank, the repository on ``PYTHONPATH``). ``descendants(pid)``: a /proc walk.

The test job (``tests/scripts/sum_job.py N BATCH_SIZE INTERVAL [MAX_BATCHES|-] [STORAGE|-]``)
    ``job_cmd(nproc, *args, max_restarts=0)``: one process without a launcher (``nproc=0``), else
    under torchrun; ``torchrun_cmd(nproc, script, *args)``. ``output_rows(run_dir)`` /
    ``output_indices(run_dir)``: its published rows / their sorted dataset indices.
    ``sum_job_metrics(n)`` / ``sum_job_rows(n)``: what an uninterrupted run over samples
    ``0..n-1`` reports and writes, in closed form (``tests/test_engine.py`` checks the closed form
    against a real single-process run); ``index_and_y(rows)`` makes rows comparable with it.
    ``assert_exactly_once(run_dir, n)``: a completed local run holds exactly that.

Experiment configs
    ``config_text(...)`` / ``write_config(path, ...)``: a ``batchproc run`` config for the test job
    (or another script); ``checkpoint_storage`` from ``shared_fs(path)``, ``s3_storage(...)`` or
    ``fsspec_storage(url, options)``.

S3
    ``S3Server(port=0)``: moto's S3 server on 127.0.0.1 in this process; ``start()``/``stop()``
    (restartable on the same port, its data kept), ``endpoint``, ``env`` (credentials and endpoint
    for child processes), ``fs()`` (an s3fs filesystem on it).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
SUM_JOB = SCRIPTS / "sum_job.py"
PY = sys.executable
WORKER = re.compile(r"WORKER rank=(\d+) pid=(\d+)")

PathLike = Union[str, "os.PathLike[str]"]


def base_env(extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a process a test starts: ours less ``BATCHPROC_*``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHPROC_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


# -- processes -------------------------------------------------------------------------------


def start_time(pid: int) -> Optional[int]:
    """The start time of ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def children_map() -> Dict[int, List[int]]:
    """Parent pid -> child pids, from one walk of /proc."""
    children: Dict[int, List[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry))
    return children


def signal_twice(pids: Sequence[int], sig: int = signal.SIGTERM, pause_s: float = 1.5) -> None:
    """``sig`` to each of ``pids``, then the same again ``pause_s`` later, as Slurm signals a job
    step: every process of it at once (those already gone are skipped)."""
    for _ in range(2):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(pause_s)


def descendants(pid: int) -> List[int]:
    """Every live descendant of ``pid`` (children first)."""
    children, out, todo = children_map(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int, started: Optional[int]) -> bool:
    """Whether ``pid`` is still the process that had start time ``started`` (not a reused pid)."""
    st = start_time(pid)
    if st is None or st != started:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Tracked:
    """A command in a session of its own: output read on a thread, descendants recorded."""

    def __init__(self, cmd: Sequence[PathLike], env: Mapping[str, str], cwd: PathLike = ROOT,
                 log_path: Optional[PathLike] = None) -> None:
        self.cmd = [str(c) for c in cmd]
        self.lines: List[str] = []
        self.log: Optional[IO[str]] = open(log_path, "w") if log_path is not None else None
        if self.log is not None:
            self.log.write("$ " + shlex.join(self.cmd) + "\n")
            self.log.flush()
        self.started = time.monotonic()
        self.p = subprocess.Popen(self.cmd, env=dict(env), cwd=str(cwd), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self.pid = self.p.pid
        self.seen: Dict[int, Optional[int]] = {}  # every descendant seen: pid -> start time
        self.workers: Dict[int, int] = {}  # the test job's rank -> pid, the latest seen
        self.worker_seen = threading.Event()
        self._cond = threading.Condition()
        self._cursor = 0  # lines before this one were looked at by wait_for
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    # -- threads

    def _read(self) -> None:
        assert self.p.stdout is not None
        try:
            for line in self.p.stdout:
                if self.log is not None:
                    self.log.write(line)
                m = WORKER.search(line)
                with self._cond:
                    if m:
                        self.workers[int(m.group(1))] = int(m.group(2))
                    self.lines.append(line)
                    self._cond.notify_all()
                if m:
                    self.worker_seen.set()
        finally:
            if self.log is not None:
                self.log.flush()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _snapshot(self) -> None:
        for pid in descendants(self.pid):
            if pid not in self.seen:
                self.seen[pid] = start_time(pid)

    def _watch(self) -> None:
        while self.p.poll() is None:  # a /proc walk costs a few ms: often enough for long-lived ranks
            self._snapshot()
            time.sleep(0.5)

    # -- reading

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> List[str]:
        """Wait for an output line after those already waited for that matches ``pattern``.

        Returns every line so far; raises AssertionError (with the output) on a timeout, or
        when the output ends without such a line."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with self._cond:
            while True:
                while self._cursor < len(self.lines):
                    self._cursor += 1
                    if regex.search(self.lines[self._cursor - 1]):
                        return list(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "the output ended" if self._eof else f"none in {timeout:g}s"
                    raise AssertionError(f"no line matching {pattern!r} ({why}); output so far:\n{''.join(self.lines)}")
                self._cond.wait(min(left, 1.0))

    def worker_pid(self, rank: int) -> Optional[int]:
        with self._cond:
            return self.workers.get(rank)

    # -- processes

    def poll(self) -> Optional[int]:
        return self.p.poll()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """The exit code, or None if it is still running after ``timeout`` seconds."""
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=10)  # an orphan holding the pipe must not block us
        return rc

    def launcher_pid(self) -> Optional[int]:
        """The direct child of the command (under ``batchproc run``: the entrypoint, our launcher)."""
        kids = children_map().get(self.pid, [])
        return kids[0] if kids else None

    def signal_descendant(self, pid: Optional[int], sig: int) -> bool:
        """Signal ``pid`` only if it is still one of this command's own live processes."""
        if pid is None or self.p.poll() is not None or pid not in descendants(self.pid):
            return False
        try:
            os.kill(pid, sig)
            return True
        except ProcessLookupError:
            return False

    def leftovers(self) -> List[int]:
        """Processes it started that are still alive."""
        self._snapshot()
        return [pid for pid, st in self.seen.items() if alive(pid, st)]

    def kill_all(self) -> None:
        """SIGKILL its process group and every descendant it ever had that is still alive."""
        if self.p.poll() is None:
            self._snapshot()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid, st in list(self.seen.items()):
            if alive(pid, st):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        self._reader.join(timeout=10)
        if self.log is not None:
            self.log.close()
            self.log = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Finished:
    """How a command ended: its exit code and its whole output."""

    def __init__(self, rc: int, out: str) -> None:
        self.rc, self.out = rc, out

    def result(self) -> Dict[str, Any]:
        """The test job's ``RESULT {json}`` line (the last one), parsed."""
        lines = [line for line in self.out.splitlines() if "RESULT " in line]
        assert lines, f"no RESULT line (rc={self.rc}); output:\n{self.out}"
        result: Dict[str, Any] = json.loads(lines[-1].split("RESULT ", 1)[1])
        return result


class Procs:
    """The processes a test started; ``cleanup()`` kills all of them and their descendants."""

    def __init__(self) -> None:
        self.tracked: List[Tracked] = []

    def start(self, cmd: Sequence[PathLike], env: Optional[Mapping[str, str]] = None, cwd: PathLike = ROOT,
              log_path: Optional[PathLike] = None) -> Tracked:
        t = Tracked(cmd, base_env(env), cwd=cwd, log_path=log_path)
        self.tracked.append(t)
        return t

    def run(self, cmd: Sequence[PathLike], env: Optional[Mapping[str, str]] = None, timeout: float = 180,
            cwd: PathLike = ROOT) -> Finished:
        return self.finish(self.start(cmd, env, cwd=cwd), timeout)

    @staticmethod
    def wait_for(t: Tracked, pattern: str, timeout: float = 120) -> List[str]:
        return t.wait_for(pattern, timeout)

    @staticmethod
    def finish(t: Tracked, timeout: float = 180) -> Finished:
        rc = t.wait(timeout)
        if rc is None:
            t.kill_all()
            t.close()
            raise AssertionError(f"timed out after {timeout:g}s: {shlex.join(t.cmd)}; output:\n{t.output}")
        t.close()
        return Finished(rc, t.output)

    def cleanup(self) -> None:
        for t in self.tracked:
            t.kill_all()
            t.close()
        self.tracked.clear()


# -- the test job ----------------------------------------------------------------------------


def torchrun_cmd(nproc: int, script: PathLike, *args: object, max_restarts: int = 0) -> List[str]:
    """torchrun itself (not our launcher) running ``script`` from tests/scripts on ``nproc`` processes."""
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--monitor-interval=0.2", str(SCRIPTS / script), *map(str, args)]


def job_cmd(nproc: int, *args: object, max_restarts: int = 0) -> List[str]:
    """The sum job, single process without a launcher when ``nproc == 0``, else under torchrun."""
    if nproc == 0:
        return [PY, str(SUM_JOB), *map(str, args)]
    return torchrun_cmd(nproc, "sum_job.py", *args, max_restarts=max_restarts)


def output_rows(run_dir: Path) -> List[Dict[str, Any]]:
    """The sum job's published rows (``outputs/**/*.jsonl``) of a local run directory."""
    rows = []
    for f in sorted((run_dir / "outputs").rglob("*.jsonl")):
        rows.extend(json.loads(line) for line in f.read_text().splitlines())
    return rows


def output_indices(run_dir: Path) -> List[int]:
    return sorted(r["index"] for r in output_rows(run_dir))


def sum_job_metrics(n: int) -> Dict[str, Any]:
    """The sum job's metrics over samples ``0..n-1``, as an uninterrupted run reports them.

    Sample ``i`` is ``x = i`` with label ``i % 3``, predicted ``i*i % 3``: the sum reducer gives
    ``sum``/``count``/``mean`` of ``x``, the accuracy counts ``i % 3 != 2``. Every partial sum is
    an integer far below 2**24, so float32 and float64 arithmetic are exact and the values equal.
    """
    total = float(n * (n - 1) // 2)
    correct = sum(1 for i in range(n) if (i * i) % 3 == i % 3)
    return {"sum": total, "count": n, "mean": total / n if n else 0.0, "accuracy": correct / n if n else 0.0}


def sum_job_rows(n: int) -> List[Tuple[int, float]]:
    """The sum job's ``(index, y)`` output rows over samples ``0..n-1``."""
    return [(i, float(i * i)) for i in range(n)]


def assert_exactly_once(run_dir: Path, n: int) -> None:
    """A completed local run of the sum job over samples ``0..n-1``: every row once with its value,
    only tagged shard files in ``outputs/`` (and what on_finish published, under the tag of its
    fixed names), nothing left staged, ``metrics.json`` exact."""
    assert index_and_y(output_rows(run_dir)) == sum_job_rows(n)
    names = [p.name for p in (run_dir / "outputs").rglob("*") if p.is_file()]
    assert all(re.fullmatch(r"rows\.[0-9a-f]{8}-r\d+-u\d+\.jsonl|[a-z]+\.ffffffff-r\d+-u\d+\.json", name)
               for name in names), names
    staging = run_dir / "staging"
    assert not (staging.exists() and [p for p in staging.rglob("*") if p.is_file()])
    assert json.loads((run_dir / "metrics.json").read_text()) == sum_job_metrics(n)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["committed_batches"] == status["total_batches"], status


def index_and_y(rows: Sequence[Mapping[str, Any]]) -> List[Tuple[int, float]]:
    """Rows without their batch position, sorted: comparable with :func:`sum_job_rows`."""
    return sorted((r["index"], r["y"]) for r in rows)


# -- experiment configs ----------------------------------------------------------------------


def shared_fs(host_path: PathLike) -> str:
    """A ``checkpoint_storage`` block: a local (shared) directory."""
    return f"  type: shared_fs\n  host_path: {host_path}\n"


def s3_storage(bucket: str, prefix: str, endpoint: str) -> str:
    """A ``checkpoint_storage`` block: ``s3://bucket/prefix`` on ``endpoint``."""
    return f"  type: s3\n  bucket: {bucket}\n  prefix: {prefix}\n  endpoint_url: {endpoint}\n"


def fsspec_storage(url: str, options: Optional[Mapping[str, Any]] = None) -> str:
    """A ``checkpoint_storage`` block: any fsspec URL with its storage options."""
    text = f"  type: fsspec\n  url: {url}\n"
    return text + (f"  storage_options: {json.dumps(dict(options))}\n" if options else "")


def config_text(args: Sequence[object], storage: str, *, name: str = "sums", script: PathLike = "tests/scripts/sum_job.py",
                slots: Optional[int] = 2, max_restarts: Optional[int] = 0, pg_timeout_s: Optional[float] = None,
                hparams: Optional[Mapping[str, Any]] = None) -> str:
    """A ``batchproc run`` config that runs ``script args...`` through our launcher.

    ``storage`` is the ``checkpoint_storage`` block (:func:`shared_fs`, :func:`s3_storage`,
    :func:`fsspec_storage`); ``None`` for ``slots``/``max_restarts`` leaves the key out (its default).
    """
    text = f"name: {name}\nentrypoint: python3 -m launch.torch_distributed python3 {script} {' '.join(map(str, args))}\n"
    if slots is not None:
        text += f"resources:\n  slots_per_trial: {slots}\n"
    if max_restarts is not None:
        text += f"max_restarts: {max_restarts}\n"
    if pg_timeout_s is not None:
        text += f"process_group_timeout_s: {pg_timeout_s:g}\n"
    text += "checkpoint_storage:\n" + storage
    if hparams:
        text += "hyperparameters:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in hparams.items())
    return text


def write_config(path: Path, args: Sequence[object], storage: str, **kw: Any) -> Path:
    """Write :func:`config_text` to ``path`` (the config file's name); returns ``path``."""
    path.write_text(config_text(args, storage, **kw))
    return path


# -- S3 --------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class S3Server:
    """moto's S3 server in this process, on 127.0.0.1 only; its data outlives a stop (kept in-process).

    Each process (each xdist worker) has its own: buckets are per process, not per server.
    """

    CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, port: int = 0) -> None:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = port  # 0: any free port, chosen by the first start and kept by restarts
        self.server: Any = None

    @property
    def endpoint(self) -> str:
        assert self.port, "start() the server first"
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> Dict[str, str]:
        """Credentials and endpoint, for child processes (and s3fs, once in ``os.environ``)."""
        return dict(self.CREDENTIALS, AWS_ENDPOINT_URL=self.endpoint)

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def fs(self, **kw: Any) -> Any:
        """A fresh s3fs filesystem on this server (``kw`` goes to ``S3FileSystem``)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, key="testing", secret="testing",
                                 client_kwargs={"endpoint_url": self.endpoint}, **kw)
