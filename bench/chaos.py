"""Exactly-once under randomized failures: a campaign of real multi-process jobs.

    python -m bench.chaos --scenarios 50 --seed 1 [--s3]

CI runs a small slice of it (``.ci/run``: seed 1298's first four scenarios).

Each scenario runs the test job (``tests/scripts/sum_job.py``: N samples, every output row written
through ``upload_path()``, exact metrics) with ``batchproc run`` on a generated experiment yaml, on
1-3 CPU processes (gloo, torchrun through ``launch.torch_distributed``), and breaks it a few times
at random, mixing in each attempt:

* SIGTERM to ``batchproc run`` or to the launcher under it, at a random time (mostly counted
  from the first worker's start, so that it often lands while batches are processed, sometimes
  from the command's start, so that it also lands in start-up and shutdown);
* SIGKILL of a random worker (pid from its ``WORKER rank=R pid=P`` line) at a random time, with
  ``max_restarts`` >= 1 so torchrun restarts the workers;
* SIGKILL of ``batchproc run``, of the launcher or of torchrun (the OOM killer, ``kill -9``):
  no process of the job may outlive it by more than a checkpoint, and when ``batchproc run``
  itself was killed the next attempt starts at once, beside the dying job, which it must wait
  for rather than commit beside it;
* on S3, a holder frozen past its lease (SIGSTOP of every process of the job, as a VM pause
  would, with ``BATCHPROC_LEASE_TTL_S`` short), a rival job started meanwhile, then SIGCONT:
  the rival takes the lease over, and the frozen job must stop without committing again;
* a kill in the middle of a commit (``BATCHPROC_FAULT=kill-after-stage|kill-after-record@rank=R``);
* a truncated latest checkpoint record (``checkpoints/ckpt-*.json``) between attempts;
* batch faults, in every attempt of a scenario: global batches whose ``process_batch`` raises
  (``bad_batches="skip"``: their samples must be in ``errors.jsonl`` once, not in ``outputs/``),
  and batches of more than one sample that run out of memory (split down to one sample);
* a world-size change between attempts (``--set resources.slots_per_trial=K``, K in 1..3);
* hostile files among the inputs: the samples are real image files (``sum_job.py --images``,
  ``ImageFiles`` over a ``**`` glob), with a JPEG whose header claims 30000x30000 pixels, an
  undecodable file whose name is not UTF-8, and a symlink loop back up the tree. Each unreadable
  file must be named in ``errors.jsonl`` exactly once (``bad_samples="skip"``), the loop must not
  list any file twice, and no attempt may be replayed for them;
* the schedule: static (lock-step) or dynamic (claimed batches, per-rank records), drawn per
  scenario; a dynamic scenario keeps its schedule in every attempt;
* the run directory on the local disk, or (``--s3``: half of the scenarios) on S3, served by
  moto's server on 127.0.0.1 that this command starts.

Then it runs the job again without faults until it exits 0 (a bounded number of times) and
checks the run against what a clean run of the same job gives (``tests.support.sum_job_metrics``,
its closed form): every sample's row exactly
once in ``outputs/``, only tagged shard files there, nothing left in ``staging/``, ``metrics.json``
equal. The closing line counts samples lost and duplicated (rows in stray files count as
duplicated), scenarios whose metrics differ, and attempts that did not end within
``--step-timeout`` (hung: killed, with every process they started). A scenario that never
completes counts its missing samples as lost. The exit code is 0 only when all four are 0.

Every process is started in a session of its own, its descendants are recorded (pid and start
time) while it runs, and all are killed by pid or process group when it ends or times out; a
process that outlives its ``batchproc run`` is reported as an orphan and killed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Union

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.support, when run as a script rather than with -m from ROOT
    sys.path.insert(0, str(ROOT))

from batchproc.data.inputs import printable as printable_name  # noqa: E402
from batchproc.rundir import layout  # noqa: E402
from batchproc.settings import ENV_FAULT, ENV_LEASE_TTL  # noqa: E402
from tests.support import (PY, S3Server, Tracked, base_env, children_map, config_text, descendants,  # noqa: E402
                           s3_storage, shared_fs, sum_job_metrics)

NAME = "chaos"
SLOW_ATTEMPT_S = 60.0  # reported (not counted as hung): an attempt this long deserves a look
LEASE_TTL_S = 2.0  # in scenarios with a frozen holder
FREEZE_SLEEP_S = 0.4  # seconds per batch in the attempt that is frozen
ORPHAN_GRACE_S = 15.0  # a process still alive this long after its batchproc run ended is an orphan


# -- storage ---------------------------------------------------------------------------------


class LocalStore:
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run = root / NAME

    def config(self) -> str:
        return shared_fs(self.root)

    def files(self, rel: str) -> List[str]:
        base = self.run / rel
        return sorted(str(p.relative_to(self.run)) for p in base.rglob("*") if p.is_file()) if base.exists() else []

    def read(self, rel: str) -> bytes:
        return (self.run / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        (self.run / rel).write_bytes(data)

    def exists(self, rel: str) -> bool:
        return (self.run / rel).exists()


class S3Store:
    kind = "s3"

    def __init__(self, fs: Any, endpoint: str, bucket: str, prefix: str) -> None:
        self.fs, self.endpoint, self.bucket, self.prefix = fs, endpoint, bucket, prefix
        self.run = f"{bucket}/{prefix}/{NAME}"

    def config(self) -> str:
        return s3_storage(self.bucket, self.prefix, self.endpoint)

    def files(self, rel: str) -> List[str]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(f"{self.run}/{rel}")
        except FileNotFoundError:
            return []
        return sorted(p[len(self.run) + 1:] for p in found)

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(f"{self.run}/{rel}")

    def write(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.run}/{rel}", data)

    def exists(self, rel: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(f"{self.run}/{rel}")


Store = Union[LocalStore, S3Store]


# -- scenarios -------------------------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    slots: int
    max_restarts: int = 0
    sigterm_at: Optional[float] = None      # seconds after the anchor
    sigterm_anchor: str = "worker"          # "worker" (first WORKER line) or "start"
    sigterm_target: str = "run"             # "run" (batchproc run) or "launcher"
    kill_rank: Optional[int] = None         # SIGKILL this worker ...
    kill_delay: float = 0.0                 # ... this long after the first WORKER line
    commit_fault: Optional[str] = None      # BATCHPROC_FAULT
    truncate_after: bool = False            # truncate the latest record once the attempt ended
    kill9_target: Optional[str] = None      # SIGKILL "run", "launcher" or "torchrun" ...
    kill9_at: float = 0.0                   # ... this long after the first WORKER line
    freeze_at: Optional[float] = None       # S3: SIGSTOP the whole job this long after the first WORKER line

    def describe(self) -> str:
        parts = [f"K{self.slots}", f"mr{self.max_restarts}"]
        if self.sigterm_at is not None:
            anchor = "w+" if self.sigterm_anchor == "worker" else ""
            parts.append(f"term({self.sigterm_target})@{anchor}{self.sigterm_at:.1f}s")
        if self.kill_rank is not None:
            parts.append(f"kill(r{self.kill_rank})+{self.kill_delay:.1f}s")
        if self.kill9_target is not None:
            parts.append(f"kill9({self.kill9_target})+{self.kill9_at:.1f}s")
        if self.freeze_at is not None:
            parts.append(f"freeze(lease)+{self.freeze_at:.1f}s")
        if self.commit_fault:
            parts.append(self.commit_fault)
        if self.truncate_after:
            parts.append("truncate")
        return " ".join(parts)


@dataclasses.dataclass
class Scenario:
    index: int
    n: int
    batch_size: int
    interval: int
    storage: str
    attempts: List[Attempt]
    final_slots: List[int]
    raise_batches: List[int] = dataclasses.field(default_factory=list)  # skipped (bad_batches="skip")
    oom_above: int = 0  # batches of more samples run out of memory (0: none do)
    hostile: bool = False  # samples are image files, hostile ones among them (write_inputs)
    schedule: str = "static"

    def describe(self) -> str:
        faults = (f" raise={self.raise_batches}" if self.raise_batches else "") + (
            f" oom>{self.oom_above}" if self.oom_above else "") + (" hostile" if self.hostile else "")
        return (f"n={self.n} bs={self.batch_size} interval={self.interval} storage={self.storage} "
                f"schedule={self.schedule}{faults} "
                f"attempts=[{'; '.join(a.describe() for a in self.attempts)}]")

    def env(self) -> Dict[str, str]:
        """The batch faults, the same in every run of the scenario (they are properties of the data)."""
        env: Dict[str, str] = {}
        if any(a.freeze_at is not None for a in self.attempts):
            env[ENV_LEASE_TTL] = str(LEASE_TTL_S)  # a freeze of a few seconds outlives it
        if self.raise_batches:
            env.update(SUM_JOB_RAISE=",".join(map(str, self.raise_batches)), SUM_JOB_BAD_BATCHES="skip")
        if self.oom_above:
            env["SUM_JOB_OOM_ABOVE"] = str(self.oom_above)
        return env

    def skipped(self) -> Set[int]:
        """Samples of the batches that raise: in errors.jsonl, never in outputs/."""
        bs = self.batch_size
        return {i for g in self.raise_batches for i in range(g * bs, min(self.n, (g + 1) * bs))}


def make_scenario(rng: random.Random, index: int, s3: bool, max_faulty: int) -> Scenario:
    attempts = []
    for _ in range(rng.randint(1, max_faulty)):
        slots = rng.randint(1, 3)
        a = Attempt(slots=slots)
        r = rng.random()  # each fault alone (a clean preemption must end in exit 75), or mixed
        faults = (["sigterm"] if r < 0.25 else ["kill"] if r < 0.35 else ["commit"] if r < 0.45
                  else ["kill9"] if r < 0.6 else rng.sample(["sigterm", "kill", "commit"], rng.choice([2, 2, 3])))
        if "kill9" in faults:  # an operator's fault: alone, so that what it leaves is its own
            a.kill9_target = rng.choice(["run", "launcher", "torchrun"])
            a.kill9_at = round(rng.uniform(0.0, 3.0), 2)
        if "sigterm" in faults:
            a.sigterm_anchor = "worker" if rng.random() < 0.7 else "start"
            a.sigterm_at = round(rng.uniform(0.0, 3.0) if a.sigterm_anchor == "worker" else rng.uniform(0.3, 10.0), 2)
            a.sigterm_target = rng.choice(["run", "launcher"])
        if "kill" in faults:
            a.kill_rank = rng.randrange(slots)
            a.kill_delay = round(rng.uniform(0.0, 3.0), 2)
        if "commit" in faults:
            a.commit_fault = f"{rng.choice(['kill-after-stage', 'kill-after-record'])}@rank={rng.randrange(slots)}"
        a.max_restarts = 1 if a.kill_rank is not None else rng.choice([0, 1])
        a.truncate_after = rng.random() < 0.35 and a.kill9_target != "run"  # never under a live writer
        attempts.append(a)
    sc = Scenario(index=index, n=rng.randint(12, 40), batch_size=rng.choice([1, 2, 3]),
                  interval=rng.randint(1, 4), storage="s3" if s3 and rng.random() < 0.5 else "local",
                  attempts=attempts, final_slots=[rng.randint(1, 3) for _ in range(4)])
    if rng.random() < 0.3:  # out-of-memory batches: every batch of two or three samples is split
        sc.batch_size, sc.oom_above = max(sc.batch_size, 2), 1
    if rng.random() < 0.3:  # batches that raise, skipped and recorded
        sc.raise_batches = sorted(rng.sample(range(-(-sc.n // sc.batch_size)), rng.choice([1, 2])))
    if sc.storage == "s3" and rng.random() < 0.4:  # drawn last: the draws above stay what they were
        # First, and on slower batches, so that the freeze finds the job mid-run.
        sc.attempts.insert(0, Attempt(slots=rng.randint(1, 3), freeze_at=round(rng.uniform(0.3, 1.5), 2)))
    # Drawn after everything above, so that a seed's earlier draws (and CI's slice) stay the same.
    if rng.random() < 0.3:  # image files with hostile ones among them; batch faults would name
        sc.hostile, sc.raise_batches = True, []  # other samples (indices shift), so none here
    if rng.random() < 0.7:
        sc.schedule = "dynamic"
    return sc


HOSTILE = ("bomb.jpg", "broken\udcff\udcfe.jpg")  # the unreadable files (os.fsdecode'd names)


def write_inputs(folder: Path, n: int) -> str:
    """Sample value ``v`` as a real 2x2 PNG of gray level ``v`` (one named in Latin-1), beside the
    hostile files of :data:`HOSTILE` and a symlink loop; returns the ``**`` glob that lists them."""
    import io
    from PIL import Image
    sub = folder / "sub"
    sub.mkdir(parents=True, exist_ok=True)
    for v in range(n):
        buf = io.BytesIO()
        Image.new("L", (2, 2), v).save(buf, "PNG")
        name = f"caf\udce9-{v:03d}.png" if v == n // 2 else f"v{v:03d}.png"  # b"caf\xe9..." on disk
        (sub if v % 2 else folder).joinpath(name).write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    bomb = bytearray(buf.getvalue())
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5:sof + 9] = (30000).to_bytes(2, "big") * 2  # the frame header claims 30000 x 30000
    (folder / HOSTILE[0]).write_bytes(bytes(bomb))
    (sub / HOSTILE[1]).write_bytes(b"\xff\xd8 not a jpeg")
    loop = sub / "loop"
    if not loop.is_symlink():
        loop.symlink_to(folder, target_is_directory=True)
    return f"{folder}/**/*.*"


@dataclasses.dataclass
class Outcome:
    lost: int = 0
    duplicated: int = 0
    metric_mismatch: int = 0
    hung: int = 0
    orphans: int = 0
    stray: List[str] = dataclasses.field(default_factory=list)
    completed: bool = False
    rcs: List[Any] = dataclasses.field(default_factory=list)
    slow: int = 0
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.metric_mismatch or self.hung or self.orphans
                    or self.stray or not self.completed)


def _signal_all(pids: List[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _metrics_over(indices: List[int]) -> Dict[str, Any]:
    """The sum job's metrics over some samples (``tests.support.sum_job_metrics`` covers 0..n-1)."""
    total, count = float(sum(indices)), len(indices)
    correct = sum(1 for i in indices if (i * i) % 3 == i % 3)
    return {"sum": total, "count": count, "mean": total / count if count else 0.0,
            "accuracy": correct / count if count else 0.0}


class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="batchproc-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s3: Optional[S3Server] = None
        self.fs: Any = None  # s3fs on self.s3
        self.bucket = f"chaos-{args.seed}-{os.getpid()}"
        self.live: List[Tracked] = []
        self.dying: List[Any] = []  # (Tracked, what) of SIGKILLed batchproc runs, see check_dying

    # -- environment

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = {"SUM_JOB_SLEEP": str(self.args.sleep)}
        if self.s3 is not None:
            env.update(self.s3.env)
        env.update(extra or {})
        return base_env(env)

    def start(self, cmd: List[str], log: Path, extra: Optional[Dict[str, str]] = None) -> Tracked:
        t = Tracked(cmd, self.env(extra), log_path=log)
        self.live.append(t)
        return t

    def finish(self, t: Tracked, out: Outcome, what: str, dying_ok: bool = False) -> Optional[int]:
        """Wait for ``t`` (bounded); a timeout is a hang: kill everything it started.

        ``dying_ok``: ``batchproc run`` was SIGKILLed; if it is gone, its processes are left to
        die while the next attempt starts (:meth:`check_dying`)."""
        rc = t.wait(self.args.step_timeout)
        if dying_ok and rc == -signal.SIGKILL:
            self.dying.append((t, what))
            return rc
        if rc is None:
            out.hung += 1
            out.notes.append(f"{what}: hung (no exit in {self.args.step_timeout:g}s), killed")
            t.kill_all()
        else:
            if t.elapsed > SLOW_ATTEMPT_S:
                out.slow += 1
                out.notes.append(f"{what}: slow ({t.elapsed:.0f}s)")
            # A SIGKILLed worker's DataLoader processes notice their parent is gone within ~5 s
            # (torch's watchdog); only what is still there after that grace is an orphan.
            self.count_orphans(t, out, f"{what}: {{}} process(es) outlived it: {{}}")
        t.close()
        self.live.remove(t)
        return rc

    @staticmethod
    def count_orphans(t: Tracked, out: Outcome, note: str) -> None:
        """Processes of ``t`` still alive after the orphan grace count as orphans, and are killed."""
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while (left := t.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            out.orphans += len(left)
            out.notes.append(note.format(len(left), left))
            t.kill_all()

    def check_dying(self, out: Outcome) -> None:
        """The job of a SIGKILLed ``batchproc run`` must be gone within a checkpoint's time,
        while the attempt just started waits for it (batchproc.rundir.job_lock)."""
        while self.dying:
            t, what = self.dying.pop()
            self.count_orphans(t, out, f"{what}: {{}} process(es) outlived its SIGKILLed batchproc run: {{}}")
            t.close()
            self.live.remove(t)

    # -- pieces

    def store(self, sc: Scenario, sdir: Path) -> Store:
        if sc.storage == "s3":
            assert self.s3 is not None and self.fs is not None
            return S3Store(self.fs, self.s3.endpoint, self.bucket, f"s{sc.index}")
        return LocalStore(sdir / "runs")

    def write_config(self, sc: Scenario, sdir: Path, store: Store) -> Path:
        cfg = sdir / "experiment.yaml"
        args: List[Any] = [sc.n, sc.batch_size, sc.interval]
        if sc.hostile:
            args = ["--images", shlex.quote(write_inputs(sdir / "inputs", sc.n)), *args]
        if sc.schedule != "static":
            args = ["--schedule", sc.schedule, *args]
        cfg.write_text(config_text(args, store.config(), name=NAME, slots=1, max_restarts=0))
        return cfg

    def run_attempt(self, cfg: Path, a: Attempt, log: Path, out: Outcome, what: str,
                    env: Optional[Dict[str, str]] = None) -> Optional[int]:
        cmd = [PY, "-m", "batchproc", "run", str(cfg), "--set", f"resources.slots_per_trial={a.slots}",
               "--set", f"max_restarts={a.max_restarts}"]
        extra = dict(env or {})
        if a.freeze_at is not None:
            extra["SUM_JOB_SLEEP"] = str(FREEZE_SLEEP_S)
        if a.commit_fault:
            extra[ENV_FAULT] = a.commit_fault
        t = self.start(cmd, log, extra)
        self.check_dying(out)
        timers: List[threading.Thread] = []
        if a.sigterm_at is not None:
            def term() -> None:
                if a.sigterm_anchor == "worker":
                    while not t.worker_seen.wait(0.2):
                        if t.p.poll() is not None:
                            return
                time.sleep(a.sigterm_at)
                pid = t.p.pid if a.sigterm_target == "run" else t.launcher_pid()
                if pid is not None and t.p.poll() is None:
                    if pid == t.p.pid:
                        try:
                            os.kill(pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                    else:
                        t.signal_descendant(pid, signal.SIGTERM)
            timers.append(threading.Thread(target=term, daemon=True))
        if a.kill_rank is not None:
            def kill() -> None:
                while not t.worker_seen.wait(0.2):
                    if t.p.poll() is not None:
                        return
                time.sleep(a.kill_delay)
                t.signal_descendant(t.worker_pid(a.kill_rank), signal.SIGKILL)
            timers.append(threading.Thread(target=kill, daemon=True))
        if a.kill9_target is not None:
            def kill9() -> None:
                while not t.worker_seen.wait(0.2):
                    if t.p.poll() is not None:
                        return
                time.sleep(a.kill9_at)
                if a.kill9_target == "run":
                    if t.p.poll() is None:
                        os.kill(t.p.pid, signal.SIGKILL)
                    return
                pid = t.launcher_pid()
                if a.kill9_target == "torchrun" and pid is not None:
                    kids = children_map().get(pid, [])
                    pid = kids[0] if kids else None
                t.signal_descendant(pid, signal.SIGKILL)
            timers.append(threading.Thread(target=kill9, daemon=True))
        rival: List[Tracked] = []
        if a.freeze_at is not None:
            def freeze() -> None:
                while not t.worker_seen.wait(0.2):
                    if t.p.poll() is not None:
                        return
                time.sleep(a.freeze_at)
                if t.p.poll() is not None:
                    return
                frozen = [t.p.pid, *descendants(t.p.pid)]
                _signal_all(frozen, signal.SIGSTOP)
                try:
                    time.sleep(LEASE_TTL_S * 2)  # past the lease
                    rival.append(self.start(cmd[:-4], log.with_name(log.stem + "-rival.log"), env))
                    time.sleep(4)  # the rival takes the lease over and commits
                finally:
                    _signal_all(frozen, signal.SIGCONT)
            timers.append(threading.Thread(target=freeze, daemon=True))
        for th in timers:
            th.start()
        rc = self.finish(t, out, what, dying_ok=a.kill9_target == "run")
        for th in timers:
            th.join(timeout=60)
        for r in rival:  # the frozen job stopped (lease lost) or ended; the rival goes on alone
            rival_rc = self.finish(r, out, what + " (rival)")
            out.rcs.append(f"rival:{rival_rc}")
        for th in timers:
            th.join(timeout=1)
        return rc

    def truncate_latest(self, store, rng: random.Random, out: Outcome) -> None:
        records = [f for f in store.files(layout.RECORDS) if layout.record_seq(f.rsplit("/", 1)[-1]) is not None]
        if len(records) < 2:  # with no valid record left, the run is refused by design (--fresh)
            out.notes.append("truncate: skipped (fewer than 2 records)")
            return
        latest = records[-1]
        data = store.read(latest)
        store.write(latest, data[: rng.randrange(len(data))])
        out.notes.append(f"truncated {latest}")

    def check(self, sc: Scenario, store, out: Outcome) -> None:
        counts: collections.Counter = collections.Counter()
        for rel in store.files(layout.OUTPUTS):
            name = rel.rsplit("/", 1)[-1]
            rows = [json.loads(l) for l in store.read(rel).decode().splitlines() if l.strip()]
            tagged = layout.parse_tag(name) is not None and name.startswith("rows.") and name.endswith(".jsonl")
            if not tagged or rel.count("/") != 1:
                out.stray.append(rel)
                out.duplicated += len(rows)
                continue
            for r in rows:
                if r.get("y") != float(r["index"]) ** 2:
                    out.notes.append(f"wrong row {r} in {rel}")
                    out.duplicated += 1
                counts[r["index"]] += 1
        skipped = sc.skipped()
        out.lost += sum(1 for i in range(sc.n) if counts[i] == 0 and i not in skipped)
        out.duplicated += sum(c - 1 for c in counts.values() if c > 1)
        out.duplicated += sum(c for i, c in counts.items() if not 0 <= i < sc.n or i in skipped)
        out.stray.extend(store.files(layout.STAGING))
        # Every skipped batch is recorded exactly once (its records follow the commit rules of outputs).
        records: collections.Counter = collections.Counter()
        if store.exists(layout.ERRORS_FILE):
            for line in store.read(layout.ERRORS_FILE).decode().splitlines():
                e = json.loads(line)
                if e.get("kind") == "batch":
                    records[e["global_batch"]] += 1
        out.lost += sum(1 for g in sc.raise_batches if records[g] == 0)
        out.duplicated += sum(c - 1 for c in records.values() if c > 1)
        out.duplicated += sum(c for g, c in records.items() if g not in sc.raise_batches)
        if sc.hostile:  # each unreadable file named once, and nothing else
            named: collections.Counter = collections.Counter()
            if store.exists(layout.ERRORS_FILE):
                for line in store.read(layout.ERRORS_FILE).decode().splitlines():
                    e = json.loads(line)
                    if e.get("kind") is None:
                        hit = [h for h in HOSTILE if printable_name(h) in e.get("sample", "")]
                        named[hit[0] if hit else e.get("sample")] += 1
            for h in HOSTILE:
                if named[h] != 1:
                    out.notes.append(f"{h!r} named {named[h]} times in errors.jsonl")
                    out.lost += named[h] == 0
                    out.duplicated += max(0, named[h] - 1)
            for other in set(named) - set(HOSTILE):
                out.notes.append(f"unexpected bad sample {other!r}")
                out.duplicated += named[other]
        ref = sum_job_metrics(sc.n) if not skipped else _metrics_over([i for i in range(sc.n) if i not in skipped])  # what a clean run reports (tests/test_engine.py checks the closed form)
        metrics = json.loads(store.read(layout.METRICS_FILE)) if store.exists(layout.METRICS_FILE) else None
        if metrics != ref:
            out.metric_mismatch += 1
            out.notes.append(f"metrics {metrics} != reference {ref}")

    def scenario(self, sc: Scenario, rng: random.Random) -> Outcome:
        sdir = self.workdir / f"s{sc.index:03d}"
        sdir.mkdir(parents=True, exist_ok=True)
        store = self.store(sc, sdir)
        cfg = self.write_config(sc, sdir, store)
        out = Outcome()
        for i, a in enumerate(sc.attempts):
            rc = self.run_attempt(cfg, a, sdir / f"attempt{i}.log", out, f"attempt {i}", sc.env())
            out.rcs.append(rc)
            if a.truncate_after:
                self.truncate_latest(store, rng, out)
        for j in range(self.args.completion_runs):
            k = sc.final_slots[j % len(sc.final_slots)]
            rc = self.run_attempt(cfg, Attempt(slots=k), sdir / f"complete{j}.log", out, f"completion {j}",
                                  sc.env())
            out.rcs.append(f"K{k}:{rc}")
            if rc == 0:
                out.completed = True
                break
            if rc == 3:  # the run directory is still locked (a lease of a killed job): wait it out
                time.sleep(5)
        self.check_dying(out)
        if not out.completed:
            out.notes.append(f"did not complete in {self.args.completion_runs} runs")
        self.check(sc, store, out)
        return out

    def close(self) -> None:
        for t in list(self.live):
            t.kill_all()
            t.close()
        self.live.clear()
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--s3", action="store_true", help="put half of the run directories on S3 (moto on 127.0.0.1)")
    parser.add_argument("--max-faulty-attempts", type=int, default=3, help="broken attempts per scenario (1..this)")
    parser.add_argument("--completion-runs", type=int, default=4, help="clean runs allowed to complete the job")
    parser.add_argument("--step-timeout", type=float, default=240.0, help="seconds before an attempt counts as hung")
    parser.add_argument("--sleep", type=float, default=0.1, help="SUM_JOB_SLEEP: seconds per batch")
    parser.add_argument("--workdir", help="where scenarios run (default: a temp dir, removed if all is well)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir even if all is well")
    parser.add_argument("--require", default="",
                        help="comma-separated words (e.g. 'kill-after-stage,storage=s3,K3') that the scenarios' "
                             "descriptions must contain between them; checked before anything runs (exit 2)")
    args = parser.parse_args(argv)
    scenarios = [make_scenario(random.Random(f"{args.seed}/{i}"), i, args.s3, args.max_faulty_attempts)
                 for i in range(args.scenarios)]
    described = "\n".join(sc.describe() for sc in scenarios)
    missing = [w for w in filter(None, args.require.split(",")) if w not in described]
    if missing:
        print(f"chaos: the scenarios of seed {args.seed} do not cover {missing}:\n{described}", file=sys.stderr)
        return 2

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # run the cleanup below

    for sig in (signal.SIGINT, signal.SIGTERM):  # nohup'd with `&`, SIGINT would be ignored
        signal.signal(sig, interrupted)
    campaign = Campaign(args)
    endings: collections.Counter = collections.Counter()
    totals = Outcome(completed=True)
    incomplete = orphans = stray = slow = 0
    t_start = time.monotonic()
    print(f"chaos: seed={args.seed} scenarios={args.scenarios} s3={args.s3} workdir={campaign.workdir}", flush=True)
    try:
        if args.s3:
            campaign.s3 = S3Server().start()
            campaign.fs = campaign.s3.fs()
            campaign.fs.mkdir(campaign.bucket)
        for i in range(args.scenarios):
            rng = random.Random(f"{args.seed}/{i}")
            sc = make_scenario(rng, i, args.s3, args.max_faulty_attempts)  # the same as above: rng goes on
            t0 = time.monotonic()
            out = campaign.scenario(sc, rng)
            for field in ("lost", "duplicated", "metric_mismatch", "hung"):
                setattr(totals, field, getattr(totals, field) + getattr(out, field))
            incomplete += not out.completed
            for rc in out.rcs[:len(sc.attempts)]:
                endings[{0: "completed", 75: "preempted", None: "hung", -signal.SIGKILL: "killed"}.get(rc, "failed")] += 1
            orphans += out.orphans
            stray += len(out.stray)
            slow += out.slow
            verdict = "ok" if out.clean else "FAIL"
            print(f"scenario {i}: {verdict} {time.monotonic() - t0:.0f}s {sc.describe()} exits={out.rcs} "
                  f"lost={out.lost} duplicated={out.duplicated} metric_mismatch={out.metric_mismatch} "
                  f"hung={out.hung}" + (f" stray={out.stray}" if out.stray else "")
                  + (f" notes={out.notes}" if out.notes else ""), flush=True)
    finally:
        campaign.close()
    wall = time.monotonic() - t_start
    bad = totals.lost or totals.duplicated or totals.metric_mismatch or totals.hung or incomplete or orphans or stray
    print("chaos: broken attempts ended " + ", ".join(f"{k}={v}" for k, v in sorted(endings.items())), flush=True)
    print(f"chaos: wall={wall:.0f}s incomplete={incomplete} orphans={orphans} stray_files={stray} slow_attempts={slow}"
          + (f" (logs kept in {campaign.workdir})" if bad or args.keep else ""), flush=True)
    if not bad and not args.keep and not args.workdir:
        shutil.rmtree(campaign.workdir, ignore_errors=True)
    print(f"scenarios={args.scenarios} lost={totals.lost} duplicated={totals.duplicated} "
          f"metric_mismatch={totals.metric_mismatch} hung={totals.hung} orphans={orphans}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
