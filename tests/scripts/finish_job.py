"""The sum job, instrumented for the lifecycle tests (tests/test_lifecycle.py).

Each rank appends its callbacks to ``$FINISH_JOB_LOG/r<rank>.log`` ("batch G", "checkpoint",
"finish ..."). In ``on_finish`` it records what Determined's users rely on: how many rows every
rank has published under ``outputs/`` and whether the metrics are final. Knobs (environment):
``FINISH_JOB_SLEEP_IN_FINISH`` (seconds ``on_finish`` waits, printing ``IN_FINISH`` first) and
``FINISH_JOB_RAISE_AT`` (``RANK:G``: that rank raises in global batch G).

Usage: finish_job.py [--schedule S] N BATCH_SIZE INTERVAL [STORAGE|-]
"""

import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sum_job import SCHEDULE, Processor, Squares  # noqa: E402

from batchproc import torch_batch_process  # noqa: E402


def _log(context, line):
    folder = os.environ.get("FINISH_JOB_LOG")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"r{context.get_distributed_rank()}.log"), "a") as f:
            f.write(line + "\n")


class Instrumented(Processor):
    def process_batch(self, batch, batch_idx):
        g = self.context.global_batch_idx
        raise_at = os.environ.get("FINISH_JOB_RAISE_AT", "")
        if raise_at and raise_at == f"{self.context.get_distributed_rank()}:{g}":
            raise ValueError(f"bad record in batch {g}")
        _log(self.context, f"batch {g}")
        super().process_batch(batch, batch_idx)

    def on_checkpoint_start(self):
        _log(self.context, "checkpoint")
        super().on_checkpoint_start()

    def on_finish(self):
        outputs = os.path.join(self.context.run_dir, "outputs")
        rows = sum(len(open(p).read().splitlines()) for p in glob.glob(f"{outputs}/**/*.jsonl", recursive=True))
        dist = self.context.distributed  # Determined's DistributedContext
        ranks = dist.allgather(dist.get_rank())
        gathered = dist.gather(dist.get_rank() * 10)
        _log(self.context, "finish " + json.dumps({"rows_published": rows, "metrics": self.context.metrics,
                                                   "allgather": ranks, "gather": gathered,
                                                   "broadcast": dist.broadcast(f"from {dist.get_rank()}")}))
        # Every rank stages a file from on_finish too, as soon as it starts it (rank 0 may still be
        # tidying up after the final commit then); it is published when this rank's on_finish
        # returns: one per rank, however often on_finish runs.
        with self.context.upload_path() as path:
            with open(os.path.join(path, "summary.json"), "w") as f:
                json.dump({"rank": dist.get_rank(), "rows": rows}, f)
        wait = float(os.environ.get("FINISH_JOB_SLEEP_IN_FINISH", "0"))
        if wait:
            print(f"IN_FINISH rank={self.context.get_distributed_rank()}", flush=True)
            time.sleep(wait)
        super().on_finish()


def main() -> None:
    n, bs, interval = (int(a) for a in sys.argv[1:4])
    storage = None if len(sys.argv) < 5 or sys.argv[4] == "-" else sys.argv[4]
    result = torch_batch_process(Instrumented, Squares(n), bs, None, interval, storage=storage,
                                 **({"schedule": SCHEDULE} if SCHEDULE else {}))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"completed": result.completed, "preempted": result.preempted,
                                      "steps_completed": result.steps_completed, "metrics": result.metrics,
                                      "run_dir": result.run_dir}), flush=True)


if __name__ == "__main__":
    main()
