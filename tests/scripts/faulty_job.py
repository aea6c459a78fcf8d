"""A job whose batches fail on purpose, for tests/test_batch_faults.py.

Sample ``i`` is ``x = i``; every processed sample's row ``{"index": i, "y": i*i}`` goes through a
RowWriter (JSON Lines); a reducer counts the samples processed. Knobs (environment):

* ``FAULTY_RAISE``: global batches whose process_batch raises ValueError after buffering its rows;
* ``FAULTY_OOM_ABOVE``: process_batch raises torch.OutOfMemoryError for batches of more samples;
* ``FAULTY_OOM_ALONE``: dataset indices that raise torch.OutOfMemoryError even alone;
* ``FAULTY_SLEEP_AT``: ``RANK:G:SECONDS``, that rank sleeps in global batch G;
* ``FAULTY_POLICY`` / ``FAULTY_MAX_BAD`` / ``FAULTY_TIMEOUT``: bad_batches, max_bad_batches,
  batch_timeout_s;
* ``FAULTY_CALLS``: a folder where each process appends the batches it was given (pieces too);
* ``FAULTY_SCRIPT``: ``RANKS:before`` or ``RANKS:after``, those ranks raise in the script itself,
  before ``torch_batch_process`` (opening a file that does not exist) or after it returned.

Usage: faulty_job.py N BATCH_SIZE INTERVAL [STORAGE|-]
"""

import json
import os
import sys
import time

import torch

from batchproc import MetricReducer, TorchBatchProcessor, torch_batch_process
from batchproc.writers import RowWriter


def _ints(name):
    return _ints_of(os.environ.get(name, ""))


class Samples(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": i, "x": torch.tensor(float(i))}


class Count(MetricReducer):
    def reset(self):
        self.n = 0

    def update(self, k):
        self.n += k

    def per_slot_reduce(self):
        return self.n

    def cross_slot_reduce(self, slots):
        return sum(slots)


class Faulty(TorchBatchProcessor):
    def __init__(self, context):
        super().__init__(context)
        self.rows = RowWriter(context, "rows", format="jsonl")
        self.count = context.wrap_reducer(Count(), "processed")
        self.raise_at, self.oom_alone = _ints("FAULTY_RAISE"), _ints("FAULTY_OOM_ALONE")
        self.oom_above = int(os.environ.get("FAULTY_OOM_ABOVE", "0"))
        sleep = os.environ.get("FAULTY_SLEEP_AT", "")
        self.sleep = tuple(map(float, sleep.split(":"))) if sleep else None
        print(f"WORKER rank={context.get_distributed_rank()} pid={os.getpid()}", flush=True)

    def process_batch(self, batch, batch_idx):
        g, indices = self.context.global_batch_idx, self.context.batch_indices
        assert batch["index"].tolist() == indices
        calls = os.environ.get("FAULTY_CALLS")
        if calls:
            os.makedirs(calls, exist_ok=True)
            with open(os.path.join(calls, f"p{os.getpid()}.log"), "a") as f:
                f.write(json.dumps({"g": g, "indices": indices}) + "\n")
        if self.sleep and self.context.get_distributed_rank() == int(self.sleep[0]) and g == int(self.sleep[1]):
            print(f"SLEEPING in batch {g}", flush=True)
            time.sleep(self.sleep[2])
        # Rows first, failure after: a failed batch must leave none of them behind.
        self.rows.add({"index": i, "y": float(x) ** 2} for i, x in zip(indices, batch["x"].tolist()))
        if g in self.raise_at:
            raise ValueError(f"cannot process batch {g}")
        if (self.oom_above and len(indices) > self.oom_above) or self.oom_alone & set(indices):
            raise torch.OutOfMemoryError(f"fake: {len(indices)} samples do not fit")
        self.count.update(len(indices))

    def on_checkpoint_start(self):
        self.rows.flush()


def _script_fault(when):
    ranks, _, at = os.environ.get("FAULTY_SCRIPT", "").partition(":")
    if at == when and int(os.environ.get("RANK", "0")) in _ints_of(ranks):
        if when == "before":
            open("/nonexistent/dir/labels.csv").close()
        raise RuntimeError("post-processing failed")


def _ints_of(text):
    return {int(v) for v in text.split(",") if v.strip()}


def main():
    _script_fault("before")
    n, bs, interval = (int(a) for a in sys.argv[1:4])
    storage = None if len(sys.argv) < 5 or sys.argv[4] == "-" else sys.argv[4]
    max_bad = os.environ.get("FAULTY_MAX_BAD")
    timeout = os.environ.get("FAULTY_TIMEOUT")
    result = torch_batch_process(Faulty, Samples(n), bs, None, interval, storage=storage,
                                 bad_batches=os.environ.get("FAULTY_POLICY", "raise"),
                                 max_bad_batches=int(max_bad) if max_bad else None,
                                 batch_timeout_s=float(timeout) if timeout else None)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"completed": result.completed, "preempted": result.preempted,
                                      "metrics": result.metrics}), flush=True)
    _script_fault("after")


if __name__ == "__main__":
    main()
