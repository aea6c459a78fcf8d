"""Row k: the cost of a commit once the job has recorded many skips, against a job that has none.

The real commit path (``Checkpointer.commit``: the gather of a world of one, the errors part, the
reducer states, the record, ``errors.jsonl``, ``status.json``, publication of one small output) on
a local run directory, in a fresh process per measurement. Both sides make the same number of
commits first (so folders exist and caches are as warm) and then time the same commits (one new
skipped sample and one output each); only the skips committed before them differ.

``python -m bench.commit_cost --errors N --commits M`` prints one side's median ms per commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, List, Optional

FILL_COMMITS = 50  #: commits that make the history (50k skips: 1000 each; none on the other side)


class _Processor:
    def on_checkpoint_start(self) -> None:
        pass



def measure(errors: int, commits: int) -> float:
    """Median ms of ``commits`` commits after ``errors`` skips were committed, on a fresh run dir."""
    import torch

    from batchproc.distributed import WorkerEnv
    from batchproc.engine import checkpoint
    from batchproc.engine.policy import ErrorRecord
    from batchproc.reducer import MetricReducer, ReducerRegistry
    from batchproc.rundir import lifecycle
    from batchproc.rundir.lifecycle import RunState
    from batchproc.rundir.storage import RunDir, Stager

    class Count(MetricReducer):
        def reset(self) -> None:
            self.n = 0

        def per_slot_reduce(self) -> Any:
            return self.n

        def cross_slot_reduce(self, slots: List[Any]) -> Any:
            return sum(slots)

    root = tempfile.mkdtemp(prefix="bench-commit-cost-")
    try:
        run_dir = RunDir(root)
        env = WorkerEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                        restart_count=0)
        total = 10 ** 9
        fp = checkpoint.Fingerprint(dataset_len=total * 64, batch_size=64, max_batches=None, total_batches=total)
        resumed = checkpoint.open_run(run_dir, fp, 0)
        lifecycle.transition(run_dir, RunState.RUNNING, attempts=1, restarts=0, world_size=1,
                             committed_batches=0, total_batches=total)
        attempt = "0123abcd"
        stager = Stager(run_dir, attempt, 0)
        reducers = ReducerRegistry()
        count = reducers.wrap(Count(), "n")
        ckpt = checkpoint.Checkpointer(run_dir, env, stager, reducers, resumed, fp, attempt)
        index = 0
        watermark = 0

        def commit(new: int) -> None:
            nonlocal index, watermark
            folder, seq = stager.open_upload()
            with open(os.path.join(folder, "rows.jsonl"), "w") as f:
                f.write('{"index": 0, "y": 0.0}\n')
            stager.close_upload(folder, seq)
            batch = [ErrorRecord.for_sample(index + i, f"sample {index + i} (/data/images/img{index + i:08d}.jpg)",
                                            "UnidentifiedImageError: cannot identify image file")
                     for i in range(new)]
            index += new
            watermark += 5
            count.n += 320
            ckpt.commit(_Processor(), watermark, batch, RunState.RUNNING)

        for i in range(FILL_COMMITS):
            commit(errors * (i + 1) // FILL_COMMITS - index)
        times = []
        for _ in range(commits):
            t = time.perf_counter()
            commit(1)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000
    finally:
        shutil.rmtree(root, ignore_errors=True)


def one_side(errors: int, commits: int, python_path: Optional[str] = None) -> float:
    """:func:`measure` in a fresh process (``python_path``: another checkout's batchproc)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (python_path, root) if p), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "bench.commit_cost", "--errors", str(errors), "--commits",
                          str(commits)], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"bench.commit_cost failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["ms"])


def commit_cost_rows(table: Any, runs: int, compare: Callable[..., float], alternate: Callable[..., Any],
                     errors: int = 50_000, commits: int = 30) -> str:
    """Row k of ``python -m bench``."""
    none, many = alternate(lambda: one_side(0, commits), lambda: one_side(errors, commits), runs)
    compare(table, "k", f"commit cost after {errors // 1000}k recorded skips vs after 0 (ms/commit)", many, none,
            "<= 1.2", lambda x: x <= 1.2)
    return (f"Row k: `bench/commit_cost.py`, the real `Checkpointer.commit` on a local run directory in one "
            f"process, median of {commits} commits (one new skip and one output each) per run; the history "
            f"of {errors} skips is committed in {FILL_COMMITS} commits before the timed ones ({FILL_COMMITS} commits "
            "without skips on the other side).")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.commit_cost")
    p.add_argument("--errors", type=int, default=50_000)
    p.add_argument("--commits", type=int, default=30)
    args = p.parse_args(argv)
    print(json.dumps({"errors": args.errors, "ms": measure(args.errors, args.commits)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
