"""Dynamic vs static schedule on 2 ranks (1 thread each): uneven batches and a straggler.

Each batch sleeps a seeded cost (pure scheduling: no CPU contention between the ranks):

* ``uneven``: costs lognormal with sigma = 1, mean ``--mean-ms``;
* ``straggler``: every batch costs the same, and rank 1 takes twice as long on each.

The figure is the makespan (first batch started on any rank to the last batch's end on any rank:
the schedule's span, without the start-up and the end's meeting, which both schedules share), and the
ratio is ``ideal / makespan``: the ideal is the total work divided by the ranks' summed capacity
(uneven: ``sum(costs) / 2``; straggler: ``B * cost / 1.5``). Run ``python -m bench.schedule`` or
row ``y`` of ``python -m bench``.

Worker: ``python -m bench.schedule worker KIND SCHEDULE BATCHES MEAN_MS OUT_DIR STORAGE``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
SIGMA = 1.0
INTERVAL = int(os.environ.get("BENCH_SCHEDULE_INTERVAL", "50"))  #: batches per rank between commits


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
    first: Dict[str, float] = {}

    class Sleeper(TorchBatchProcessor):
        def process_batch(self, batch: Any, batch_idx: int) -> None:
            first.setdefault("t", time.time())
            time.sleep(cost[self.context.global_batch_idx] * factor)
            first["last"] = time.time()

    torch_batch_process(Sleeper, torch.arange(batches), batch_size=1, checkpoint_interval=INTERVAL,
                        dataloader_kwargs={"num_workers": 0}, storage=storage, schedule=schedule)
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump({"first": first.get("t"), "last": first.get("last"), "end": time.time()}, f)


def makespan(kind: str, schedule: str, batches: int, mean_ms: float) -> float:
    out, store = tempfile.mkdtemp(prefix="bench-sched-"), tempfile.mkdtemp(prefix="bench-sched-run-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPROC_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "bench.schedule", "worker", kind, schedule, str(batches), str(mean_ms), out, store + "/run"]
    try:
        subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        recs = [json.loads((Path(out) / f"r{r}.json").read_text()) for r in range(2)]
        ran = [r for r in recs if r["first"] is not None]
        return max(r["last"] for r in ran) - min(r["first"] for r in ran)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)


def schedule_rows(table: Any, runs: int, batches: int = 240, mean_ms: float = 20.0) -> str:
    """Rows of ``python -m bench``'s table: dynamic and static, each as a fraction of the ideal."""
    targets = {"uneven": 0.95, "straggler": 0.9}
    found: Dict[str, Tuple[float, float]] = {}
    for kind in ("uneven", "straggler"):
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
        table.add("y", what + " (dynamic; baseline column: static)", f"{statistics.median(dyn):.2f} s",
                  f"{statistics.median(sta):.2f} s", d, f">= {targets[kind]} of ideal", d >= targets[kind])
    return ("Schedule rows (y): makespan from the first batch started to the last batch ended, median of "
            f"{runs} alternated runs; ideal = total sleep / summed capacity. Static as a fraction of the "
            f"ideal: uneven {found['uneven'][1]:.3f}, straggler {found['straggler'][1]:.3f}.")


class _Print:
    def add(self, row: str, what: str, ours: str, base: str, ratio: float, target: str, ok: bool) -> None:
        print(f"{row} | {what} | {ours} | {base} | {ratio:.3f} | {target} | {'yes' if ok else 'no'}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        k, sch, b, m, o, st = sys.argv[2:8]
        worker(k, sch, int(b), float(m), o, st)
    else:
        print(schedule_rows(_Print(), int(sys.argv[1]) if len(sys.argv) > 1 else 3))
