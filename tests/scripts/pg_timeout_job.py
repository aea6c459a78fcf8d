"""The sum job, whose every rank reports the timeout of the process group it actually joined.

Prints ``PG_TIMEOUT rank=R seconds=S`` once per rank, read from torch.distributed's default
group (the gloo backend's options), not from batchproc's settings: what the workers really got.

Usage: pg_timeout_job.py N BATCH_SIZE INTERVAL [MAX_BATCHES|-] [STORAGE|-]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sum_job  # noqa: E402


class Reporting(sum_job.Processor):
    def __init__(self, context):
        super().__init__(context)
        dist = torch.distributed
        if dist.is_initialized():
            backend = dist.group.WORLD._get_backend(torch.device("cpu"))
            seconds = backend.options._timeout.total_seconds()
        else:
            seconds = None  # one process: no group
        print(f"PG_TIMEOUT rank={context.get_distributed_rank()} seconds={seconds}", flush=True)


sum_job.Processor = Reporting

if __name__ == "__main__":
    sum_job.main()
