"""Dynamic vs static schedule on 2 ranks (1 thread each): uneven batches and a straggler.

Each batch sleeps a seeded cost (pure scheduling: no CPU contention between the ranks):

* ``uneven``: costs lognormal with sigma = 1, mean ``--mean-ms``;
* ``straggler``: every batch costs the same, and rank 1 takes twice as long on each.

The figure is the makespan (first batch started on any rank to the last batch's end on any rank:
the schedule's span, without the start-up and the end's meeting, which both schedules share), and the
ratio is ``ideal / makespan``: the ideal is the total work divided by the ranks' summed capacity
(uneven: ``sum(costs) / 2``; straggler: ``B * cost / 1.5``). Run ``python -m bench.schedule`` or
row ``y`` of ``python -m bench`` (:func:`all_rows`: these, uniform ResNet-18 work, the transformer over
texts in ``bench/schedule_text.py``, commit cost and resume cost). ``python -m bench.schedule
breakdown uneven dynamic [RUNS]`` says where the ranks' time inside the makespan went.

Worker: ``python -m bench.schedule worker KIND SCHEDULE BATCHES MEAN_MS OUT_DIR STORAGE``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
SIGMA = 1.0
INTERVAL = int(os.environ.get("BENCH_SCHEDULE_INTERVAL", "50"))  #: batches per rank between commits
#: Loader workers of the sleep rows (0: the rows' setting; more, to see claims made as the loader prefetches)
WORKERS = int(os.environ.get("BENCH_SCHEDULE_WORKERS", "0"))


def costs(kind: str, batches: int, mean_ms: float) -> List[float]:
    """Seconds of each global batch (before the straggler's factor)."""
    import numpy as np

    if kind == "straggler":
        return [mean_ms / 1000.0] * batches
    rng = np.random.default_rng(20)
    raw = rng.lognormal(0.0, SIGMA, batches)
    return [float(c) for c in raw / raw.mean() * mean_ms / 1000.0]


def ideal_s(kind: str, batches: int, mean_ms: float) -> float:
    total = sum(costs(kind, batches, mean_ms))
    return total / 1.5 if kind == "straggler" else total / 2


def worker(kind: str, schedule: str, batches: int, mean_ms: float, out_dir: str, storage: str) -> None:
    import torch

    from batchproc import TorchBatchProcessor, torch_batch_process

    cost = costs(kind, batches, mean_ms)
    rank = int(os.environ.get("RANK", "0"))
    factor = 2.0 if kind == "straggler" and rank == 1 else 1.0
    spans: List[Tuple[int, float, float]] = []  #: (global batch, its sleep's start, its end)

    class Sleeper(TorchBatchProcessor):
        def process_batch(self, batch: Any, batch_idx: int) -> None:
            g, t = self.context.global_batch_idx, time.time()
            time.sleep(cost[g] * factor)
            spans.append((g, t, time.time()))

    torch_batch_process(Sleeper, torch.arange(batches), batch_size=1, checkpoint_interval=INTERVAL,
                        dataloader_kwargs={"num_workers": WORKERS}, storage=storage, schedule=schedule)
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump({"first": spans[0][1] if spans else None, "last": spans[-1][2] if spans else None,
                   "end": time.time(), "spans": spans}, f)


def spans_of(kind: str, schedule: str, batches: int, mean_ms: float) -> List[Dict[str, Any]]:
    """One 2-rank job of ``kind``; each rank's record (its batches' spans among them)."""
    out, store = tempfile.mkdtemp(prefix="bench-sched-"), tempfile.mkdtemp(prefix="bench-sched-run-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPROC_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "bench.schedule", "worker", kind, schedule, str(batches), str(mean_ms), out, store + "/run"]
    try:
        subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return [json.loads((Path(out) / f"r{r}.json").read_text()) for r in range(2)]
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)


def makespan_of(recs: List[Dict[str, Any]]) -> float:
    ran = [r for r in recs if r["first"] is not None]
    return float(max(r["last"] for r in ran) - min(r["first"] for r in ran))


def makespan(kind: str, schedule: str, batches: int, mean_ms: float) -> float:
    return makespan_of(spans_of(kind, schedule, batches, mean_ms))


def breakdown(recs: List[Dict[str, Any]], kind: str, batches: int, mean_ms: float) -> Dict[str, float]:
    """Where the ranks' time inside the makespan went, in rank-seconds (they add up to 2 x makespan):
    the sleeps asked for, their overshoot (the OS waking the sleeper late), the gaps between a rank's
    batches (claim, load, collate; ``commit gaps`` those after each rank's ``INTERVAL``-th batch),
    and the idle time before a rank's first batch and after its last (the tail)."""
    cost = costs(kind, batches, mean_ms)
    ran = [r for r in recs if r["spans"]]
    t0, t1 = min(r["first"] for r in ran), max(r["last"] for r in ran)
    parts = dict.fromkeys(("work asked", "sleep overshoot", "loop gaps", "commit gaps", "start skew", "tail idle"), 0.0)
    for rank, r in enumerate(recs):
        factor = 2.0 if kind == "straggler" and rank == 1 else 1.0
        spans = r["spans"]
        if not spans:
            parts["tail idle"] += t1 - t0
            continue
        for i, (g, a, b) in enumerate(spans):
            parts["work asked"] += cost[g] * factor
            parts["sleep overshoot"] += (b - a) - cost[g] * factor
            if i + 1 < len(spans):
                parts["commit gaps" if (i + 1) % INTERVAL == 0 else "loop gaps"] += spans[i + 1][1] - b
        parts["start skew"] += spans[0][1] - t0
        parts["tail idle"] += t1 - spans[-1][2]
    return parts


def schedule_rows(table: Any, runs: int, batches: int = 240, mean_ms: float = 20.0,
                  kinds: Tuple[str, ...] = ("uneven", "straggler"), uneven_target: bool = True) -> str:
    """Rows of ``python -m bench``'s table: dynamic and static, each as a fraction of the ideal.
    ``uneven_target=False``: the uneven row is reported, not held to the 0.95 target."""
    targets = {"uneven": 0.95, "straggler": 0.9}
    found: Dict[str, Tuple[float, float]] = {}
    for kind in kinds:
        ideal = ideal_s(kind, batches, mean_ms)
        dyn: List[float] = []
        sta: List[float] = []
        for _ in range(runs):  # alternated, so that slow drifts of the machine hit both alike
            dyn.append(makespan(kind, "dynamic", batches, mean_ms))
            sta.append(makespan(kind, "static", batches, mean_ms))
        d, s = ideal / statistics.median(dyn), ideal / statistics.median(sta)
        found[kind] = (d, s)
        what = (f"{kind}: {batches} batches, " + ("lognormal sigma=1 sleeps" if kind == "uneven" else
                "rank 1 2x slower on every batch") + f", mean {mean_ms:g} ms, commit every {INTERVAL}, 2 ranks; ratio = ideal / makespan")
        held = kind != "uneven" or uneven_target
        table.add("y", what + " (dynamic; baseline column: static)", f"{statistics.median(dyn):.2f} s",
                  f"{statistics.median(sta):.2f} s", d,
                  f">= {targets[kind]} of ideal" if held else "(reported: the per-batch cost at 20 ms)",
                  d >= targets[kind] if held else None)
    return ("Schedule rows (y): makespan from the first batch started to the last batch ended, median of "
            f"{runs} alternated runs; ideal = total sleep / summed capacity. Static as a fraction of the "
            "ideal: " + ", ".join(f"{k} {v[1]:.3f}" for k, v in found.items()) + ".")


# -- uniform work: ResNet-18 over the bench images ------------------------------------------------


def uniform_rows(table: Any, runs: int, jpegs: str, run: Any, throughput: Any, compare: Any, alternate: Any,
                 bs: int = 8) -> str:
    """Row y: uniform work (ResNet-18 over the bench images, 2 ranks, 1 thread each), dynamic vs
    static. Batches of 8, so that the ranks have tens of batches each: at 10 batches of 32 (the first
    version of this row) one batch more on one rank was 10-20% of the run."""
    img = ["--data", jpegs, "--model", "resnet18", "--bs", str(bs), "--nw", "0", "--interval", "5"]
    static, dyn = alternate(lambda: run(["framework", *img], nproc=2, threads=1),
                            lambda: run(["framework", *img, "--schedule", "dynamic"], nproc=2, threads=1), runs)
    compare(table, "y", f"uniform work, 2 ranks: ResNet-18 over the bench images, batch {bs}, dynamic vs static "
            "schedule (img/s)", [throughput(r) for r in dyn], [throughput(r) for r in static], ">= 0.99",
            lambda x: x >= 0.99)
    return (f"Uniform row (y): `bench.workload framework` over the bench images in batches of {bs}, commit every 5 "
            f"batches, {runs} alternated pairs; img/s from the first rank's start to the last rank's end.")


# -- the commit's cost: dynamic vs static ------------------------------------------------------


def commit_worker(schedule: str, batches: int, out_dir: str, storage: str) -> None:
    """A commit after every batch (one small output file each), nothing else: the time between a
    rank's consecutive batches is its commit (and, under the static schedule, the step's agreement)."""
    import torch

    from batchproc import TorchBatchProcessor, torch_batch_process

    rank = int(os.environ.get("RANK", "0"))
    stamps: List[float] = []

    class Committer(TorchBatchProcessor):
        rows: List[int] = []

        def process_batch(self, batch: Any, batch_idx: int) -> None:
            stamps.append(time.perf_counter())
            self.rows.append(self.context.global_batch_idx)

        def on_checkpoint_start(self) -> None:
            if self.rows:
                with self.context.upload_path() as path:
                    (path / "rows.jsonl").write_text("".join(f'{{"g": {g}}}\n' for g in self.rows))
                self.rows = []

    torch_batch_process(Committer, torch.arange(batches), batch_size=1, checkpoint_interval=1,
                        dataloader_kwargs={"num_workers": 0}, storage=storage, schedule=schedule)
    gaps = [b - a for a, b in zip(stamps[3:], stamps[4:])]  # the first commits warm caches and folders
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump({"ms": statistics.median(gaps) * 1000 if gaps else None}, f)


def _torchrun(args: List[str], out: str, extra_env: Optional[Dict[str, str]] = None,
              check: bool = True) -> List[Dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPROC_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", **(extra_env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "bench.schedule", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 and check:
        raise RuntimeError(f"{cmd} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return [json.loads((Path(out) / f"r{r}.json").read_text()) for r in range(2) if (Path(out) / f"r{r}.json").exists()]


def commit_ms(schedule: str, batches: int, storage: str, env: Optional[Dict[str, str]] = None) -> float:
    """Median ms between a rank's consecutive batches (a commit after each), median over the ranks."""
    out = tempfile.mkdtemp(prefix="bench-commit-")
    try:
        recs = _torchrun(["commit", schedule, str(batches), out, storage], out, env)
        return statistics.median(r["ms"] for r in recs if r["ms"] is not None)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def commit_rows(table: Any, runs: int, batches: int = 200, wheres: Tuple[str, ...] = ("local disk", "S3 (moto)")) -> str:
    """Row y: a commit under the dynamic schedule costs what a static commit costs (2 ranks, local
    disk and S3 on moto's server on 127.0.0.1)."""
    from bench.manifest import Moto

    found: Dict[str, Tuple[float, float]] = {}
    moto = Moto(objects=["benchsched/none:0"])
    try:
        for where in wheres:
            dyn: List[float] = []
            sta: List[float] = []
            for i in range(runs):  # alternated
                for schedule, into in (("static", sta), ("dynamic", dyn)):
                    if where == "local disk":
                        root = tempfile.mkdtemp(prefix="bench-commit-run-")
                        try:
                            into.append(commit_ms(schedule, batches, root + "/run"))
                        finally:
                            shutil.rmtree(root, ignore_errors=True)
                    else:
                        into.append(commit_ms(schedule, batches, f"s3://benchsched/{schedule}-{i}-{time.time_ns()}",
                                              moto.env()))
            d, s = statistics.median(dyn), statistics.median(sta)
            found[where] = (d, s)
            table.add("y", f"commit after every batch, 2 ranks, {where}: ms between a rank's batches "
                      f"({batches} batches, one output file per commit; dynamic; baseline column: static)",
                      f"{d:.1f} ms", f"{s:.1f} ms", d / s, "<= 1.0 (no dearer than static)", d / s <= 1.0)
    finally:
        moto.stop()
    return (f"Commit rows (y): `bench/schedule.py` commit, median over {runs} alternated runs of each rank's median "
            "gap between consecutive batches with checkpoint_interval=1 (static: the step's all-reduce, the gather, "
            "rank 0's record and every rank's publication; dynamic: the claim, the lease check on S3, the rank's "
            "own record and publication, and rank 0's fold every 32 records).")


# -- resume cost: time to first batch after many per-rank records ----------------------------------


def ttfb_worker(batches: int, out_dir: str, storage: str) -> None:
    """A commit after every batch; writes when torch_batch_process was called and when its first batch
    ran (BATCHPROC_FAULT stops the job where the caller wants it)."""
    import torch

    from batchproc import TorchBatchProcessor, torch_batch_process

    rank = int(os.environ.get("RANK", "0"))
    seen: Dict[str, float] = {}

    kill_at = int(os.environ.get("BENCH_KILL_AT", "-1"))

    class First(TorchBatchProcessor):
        def process_batch(self, batch: Any, batch_idx: int) -> None:
            seen.setdefault("first", time.time())
            if 0 <= kill_at <= self.context.global_batch_idx:  # a crash: nothing after it is committed
                os.kill(os.getpid(), signal.SIGKILL)

    seen["call"] = time.time()
    result = torch_batch_process(First, torch.arange(batches), batch_size=1, checkpoint_interval=1,
                                 dataloader_kwargs={"num_workers": 0}, storage=storage, schedule="dynamic")
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump(dict(seen, committed=result.steps_completed), f)


def crashed_job(root: Path, records: int, batches: int) -> int:
    """A job in ``root/setup`` that committed about ``records`` per-rank records and then crashed
    (its ranks SIGKILLed, so no meeting folded its last records); how many rank records it left."""
    setup, out = root / "setup", root / "out"
    out.mkdir(parents=True)
    # a rank that claims global batch ``records`` dies there, and so does the other at its next
    # claim: together they commit the batches before it, a record each
    _torchrun(["ttfb", str(batches), str(out), str(setup)], str(out), {"BENCH_KILL_AT": str(records)}, check=False)
    return len(list((setup / "dynamic").glob("rank-*")))


def resume_once(root: Path, batches: int) -> Tuple[float, float, int]:
    """One resume of a copy of ``root/setup``: seconds from torch_batch_process's call to the first
    batch, the same from the launch, and the batches committed before it."""
    copy, out = root / "resume", root / "out"
    shutil.copytree(root / "setup", copy)
    for f in out.glob("*.json"):
        f.unlink()
    try:
        launched = time.time()
        recs = _torchrun(["ttfb", str(batches), str(out), str(copy)], str(out), {"BATCHPROC_FAULT": "stop@rank=0@step=0"})
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    first = min(r["first"] for r in recs if "first" in r)
    # committed less the resume's own (one batch per rank)
    return first - min(r["call"] for r in recs), first - launched, min(r["committed"] for r in recs) - 2


def resume_rows(table: Any, runs: int, many: int = 10_000, few: int = 10) -> str:
    """Row y: time to first batch of a resume after ``many`` per-rank records vs after ``few``; the
    two sides' resumes alternate, so that the machine's drifts hit both alike."""
    batches = many + 200
    root = Path(tempfile.mkdtemp(prefix="bench-ttfb-"))
    try:
        left = {n: crashed_job(root / str(n), n, batches) for n in (few, many)}
        got: Dict[int, List[Tuple[float, float, int]]] = {few: [], many: []}
        for _ in range(runs):
            for n in (few, many):
                got[n].append(resume_once(root / str(n), batches))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m_n, f_n = got[many][0][2], got[few][0][2]
    for i, what in ((0, "s from torch_batch_process's call"), (1, "s from the launch: torchrun, imports")):
        ratio = statistics.median(a[i] / b[i] for a, b in zip(got[many], got[few]))
        table.add("y", f"resume: time to first batch after {m_n:,} batches committed in per-rank records vs after "
                  f"{f_n} ({what}, 2 ranks, local disk)", f"{statistics.median(a[i] for a in got[many]):.2f} s",
                  f"{statistics.median(b[i] for b in got[few]):.2f} s", ratio, "<= 1.2", ratio <= 1.2)
    return (f"Resume rows (y): `bench/schedule.py` ttfb; each side one job committing a record per batch, its ranks "
            f"then SIGKILLed (no meeting folded the last records), and {runs} resumes of copies of its run directory, "
            f"the two sides alternated; the ratio is the median of the pairs' ratios. Rank records left for the resume "
            f"to read: {left[many]} after {m_n:,} commits (rank 0 folds every 32 during the attempt), {left[few]} after "
            f"{f_n}. From the call: {', '.join(f'{a[0]:.2f}' for a in got[many])} s vs "
            f"{', '.join(f'{b[0]:.2f}' for b in got[few])} s.")


PARTS = ("sleeps", "uniform", "text", "commit", "resume")


def all_rows(table: Any, runs: int, jpegs: str, run: Any, throughput: Any, compare: Any, alternate: Any) -> str:
    """Row y of ``python -m bench``; ``BENCH_SCHEDULE_PARTS`` (a comma list of :data:`PARTS`, all
    by default) picks the parts, and ``BENCH_SCHEDULE_SMALL=1`` runs each at a size that only
    checks it works (tests/test_bench.py)."""
    parts = os.environ.get("BENCH_SCHEDULE_PARTS", ",".join(PARTS)).split(",")
    small = os.environ.get("BENCH_SCHEDULE_SMALL") == "1"
    notes = []
    if "sleeps" in parts:
        if small:
            notes.append(schedule_rows(table, runs, batches=24, mean_ms=5.0, kinds=("uneven",)))
        else:
            # A rank spends ~0.5 ms between batches under either schedule (the claim's round trip to
            # the store, the loop): 2-3% of a 20 ms batch, 1% of a 50 ms one (inference batches here
            # cost 100 ms and more). The target is held at 50 ms; the 20 ms row keeps the fixed cost
            # in sight.
            notes.append(schedule_rows(table, runs, uneven_target=False))
            notes.append(schedule_rows(table, runs, mean_ms=50.0, kinds=("uneven",)))
    if "uniform" in parts:
        notes.append(uniform_rows(table, runs, jpegs, run, throughput, compare, alternate))
    if "text" in parts:
        from bench import schedule_text
        notes.append(schedule_text.text_rows(table, runs, small=small))
    if "commit" in parts:
        # small: S3 only, whose path (lease checks, object-store records) is the one local disk does not take
        notes.append(commit_rows(table, runs, batches=12, wheres=("S3 (moto)",)) if small else commit_rows(table, runs))
    if "resume" in parts:
        notes.append(resume_rows(table, runs, many=40 if small else 10_000, few=4 if small else 10))
    return "\n\n".join(notes)


class _Print:
    def add(self, row: str, what: str, ours: str, base: str, ratio: float, target: str, ok: bool) -> None:
        print(f"{row} | {what} | {ours} | {base} | {ratio:.3f} | {target} | {'yes' if ok else 'no'}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        k, sch, b, m, o, st = sys.argv[2:8]
        worker(k, sch, int(b), float(m), o, st)
    elif sys.argv[1:2] == ["commit"]:
        commit_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif sys.argv[1:2] == ["ttfb"]:
        ttfb_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif sys.argv[1:2] == ["breakdown"]:  # breakdown KIND SCHEDULE [RUNS [BATCHES [MEAN_MS]]]
        kind, sched = sys.argv[2], sys.argv[3]
        n_runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
        n_batches = int(sys.argv[5]) if len(sys.argv) > 5 else 240
        mean = float(sys.argv[6]) if len(sys.argv) > 6 else 20.0
        for _ in range(n_runs):
            recs = spans_of(kind, sched, n_batches, mean)
            span = makespan_of(recs)
            print(f"makespan {span:.3f} s, ideal/makespan {ideal_s(kind, n_batches, mean) / span:.3f}; rank-s: " +
                  ", ".join(f"{name} {v:.3f}" for name, v in breakdown(recs, kind, n_batches, mean).items()), flush=True)
    elif sys.argv[1:2] == ["commit-rows"]:
        print(commit_rows(_Print(), int(sys.argv[2]) if len(sys.argv) > 2 else 3))
    elif sys.argv[1:2] == ["resume-rows"]:
        print(resume_rows(_Print(), int(sys.argv[2]) if len(sys.argv) > 2 else 3))
    else:
        print(schedule_rows(_Print(), int(sys.argv[1]) if len(sys.argv) > 1 else 3))
