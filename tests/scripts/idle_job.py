"""Joins the process group like a job, says READY, and waits: for tests that inspect a running job."""

import os
import time

from batchproc.distributed import init_worker

env = init_worker(60)
env.barrier()
print(f"READY rank={env.rank} pid={os.getpid()}", flush=True)
time.sleep(float(os.environ.get("IDLE_JOB_S", "30")))
env.shutdown()
