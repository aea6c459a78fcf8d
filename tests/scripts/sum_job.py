"""A test job: every sample's output written through upload_path(), plus exact metrics.

Writes one JSON-lines file per checkpoint per rank (buffered rows flushed in on_checkpoint_start),
records call counts per rank in <run_dir>/calls/, and prints the result as JSON on rank 0.

Usage: sum_job.py [--schedule static|dynamic] [--slow-rank R] [--images GLOB] N BATCH_SIZE INTERVAL [MAX_BATCHES|-] [STORAGE|-]

``--slow-rank R``: rank R sleeps three times as long per batch as the others (SUM_JOB_SLEEP, or
0.02 s when it is not set). SUM_JOB_BAD_SAMPLES=i,j,...: those samples fail to load (run with
bad_samples=skip and SUM_JOB_MAX_BAD_SAMPLES to bound them). ``--images GLOB``: the samples are
real image files (``ImageFiles(GLOB)``), sample value ``v`` being the first pixel of its image
(``bench.chaos`` writes one per value, hostile files among them); files that cannot be read are bad
samples (``bad_samples="skip"``).
"""

import json
import os
import sys
import time

import torch

from batchproc import MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext, torch_batch_process


SLEEP = float(os.environ.get("SUM_JOB_SLEEP", "0"))
# Batch faults for the chaos campaign: these global batches raise, and batches of more samples than
# OOM_ABOVE raise torch.OutOfMemoryError (split by batchproc), both before anything is counted.
RAISE = {int(g) for g in os.environ.get("SUM_JOB_RAISE", "").split(",") if g.strip()}
OOM_ABOVE = int(os.environ.get("SUM_JOB_OOM_ABOVE", "0"))
BAD_BATCHES = os.environ.get("SUM_JOB_BAD_BATCHES", "raise")
# A slow flush (a large upload) from a worker's second checkpoint on: a job stopped after its first
# is still committing for this long.
FLUSH_SLEEP = float(os.environ.get("SUM_JOB_FLUSH_SLEEP", "0"))
BAD_SAMPLES = {int(i) for i in os.environ.get("SUM_JOB_BAD_SAMPLES", "").split(",") if i.strip()}
MAX_BAD_SAMPLES = int(os.environ["SUM_JOB_MAX_BAD_SAMPLES"]) if os.environ.get("SUM_JOB_MAX_BAD_SAMPLES") else None


def _flag(name, default=None):
    """Take ``--name VALUE`` out of sys.argv (the positional arguments stay as they were)."""
    if name in sys.argv:
        i = sys.argv.index(name)
        value = sys.argv[i + 1]
        del sys.argv[i:i + 2]
        return value
    return default


SCHEDULE = _flag("--schedule")
IMAGES = _flag("--images")
SLOW_RANK = _flag("--slow-rank")
if SLOW_RANK is not None and not SLEEP:
    SLEEP = 0.02


class Squares(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in BAD_SAMPLES:
            raise OSError(f"chaos: sample {i} is unreadable")
        return {"index": i, "x": torch.tensor(float(i)), "label": i % 3}


def _square(v: int):
    return {"index": v, "x": torch.tensor(float(v)), "label": v % 3}


if IMAGES is not None:  # only then: torchvision's import costs seconds
    from batchproc.images import ImageFiles

    class ImageSquares(ImageFiles):
        """The sum job's samples read from image files: the listing, the pixel limit and the decode
        path are the real ones, so a hostile file is a bad sample as in any image job."""

        def load_samples(self, indices):
            return [item if isinstance(item, BaseException) else _square(int(item["image"].flatten()[0]))
                    for item in super().load_samples(indices)]


class SumReducer(MetricReducer):
    def reset(self):
        self.total, self.count = 0.0, 0

    def update(self, x):
        self.total += float(x.sum())
        self.count += int(x.numel())

    def per_slot_reduce(self):
        return (self.total, self.count)

    def cross_slot_reduce(self, slots):
        total = sum(s[0] for s in slots)
        count = sum(s[1] for s in slots)
        return {"sum": total, "count": count, "mean": total / count if count else 0.0}


class Accuracy(MetricReducer):
    def reset(self):
        self.correct = torch.zeros((), dtype=torch.long)
        self.seen = torch.zeros((), dtype=torch.long)

    def update(self, pred, label):
        self.correct += (pred == label).sum()
        self.seen += label.numel()

    def per_slot_reduce(self):
        return {"correct": self.correct, "seen": self.seen}

    def cross_slot_reduce(self, slots):
        c = sum(int(s["correct"]) for s in slots)
        n = sum(int(s["seen"]) for s in slots)
        return c / n if n else 0.0


class Processor(TorchBatchProcessor):
    def __init__(self, context: TorchBatchProcessorContext) -> None:
        self.context = context
        self.sums = context.wrap_reducer(SumReducer(), name=None)
        self.acc = context.wrap_reducer(Accuracy(), name="accuracy")
        self.rows = []
        self.calls = {"process_batch": 0, "on_checkpoint_start": 0, "on_finish": 0}
        print(f"WORKER rank={context.get_distributed_rank()} pid={os.getpid()}", flush=True)
        if context.get_distributed_rank() == 0 and context.get_hparams():
            print("HPARAMS " + json.dumps(context.get_hparams(), sort_keys=True), flush=True)

    def process_batch(self, batch, batch_idx):
        batch = self.context.to_device(batch)
        if IMAGES is None:  # with --images, a sample's value is its image's, not its index
            assert batch["index"].tolist() == self.context.batch_indices, (batch["index"], self.context.batch_indices)
        self.calls["process_batch"] += 1
        if self.context.global_batch_idx in RAISE:
            raise ValueError(f"chaos: batch {self.context.global_batch_idx} cannot be processed")
        if OOM_ABOVE and len(self.context.batch_indices) > OOM_ABOVE:
            raise torch.OutOfMemoryError(f"chaos: {len(self.context.batch_indices)} samples do not fit")
        if SLEEP:
            slow = SLOW_RANK is not None and int(SLOW_RANK) == self.context.get_distributed_rank()
            time.sleep(SLEEP * (3 if slow else 1))
            if self.context.get_distributed_rank() == 0:
                print(f"PROGRESS {self.context.global_batch_idx}", flush=True)
        self.sums.update(batch["x"])
        pred = (batch["index"] * batch["index"]) % 3
        self.acc.update(pred, batch["label"])
        for i, x in zip(batch["index"].tolist(), batch["x"].tolist()):
            self.rows.append({"index": i, "y": x * x, "g": self.context.global_batch_idx})

    def on_checkpoint_start(self):
        self.calls["on_checkpoint_start"] += 1
        if os.environ.get("SUM_JOB_REPORT"):
            self.context.report_metrics("checkpoint", self.context.global_batch_idx, {"rows": len(self.rows)})
        if self.rows:
            if self.calls["on_checkpoint_start"] >= 2:
                time.sleep(FLUSH_SLEEP)
            with self.context.upload_path() as path:
                with open(path / "rows.jsonl", "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in self.rows)
            self.rows = []

    def on_finish(self):
        self.calls["on_finish"] += 1


def main() -> None:
    n, bs, interval = (int(a) for a in sys.argv[1:4])
    max_batches = None if len(sys.argv) < 5 or sys.argv[4] == "-" else int(sys.argv[4])
    storage = None if len(sys.argv) < 6 or sys.argv[5] == "-" else sys.argv[5]
    dataset = Squares(n) if IMAGES is None else ImageSquares(IMAGES)
    result = torch_batch_process(Processor, dataset, batch_size=bs, checkpoint_interval=interval,
                                 max_batches=max_batches, storage=storage, bad_batches=BAD_BATCHES,
                                 bad_samples="skip" if BAD_SAMPLES or IMAGES else "raise",
                                 max_bad_samples=MAX_BAD_SAMPLES,
                                 **({"schedule": SCHEDULE} if SCHEDULE else {}))
    calls_dir = os.environ.get("SUM_JOB_CALLS_DIR")
    if calls_dir:
        rank = int(os.environ.get("RANK", "0"))
        attempt = len([f for f in os.listdir(calls_dir) if f.startswith(f"r{rank}-")]) if os.path.isdir(calls_dir) else 0
        os.makedirs(calls_dir, exist_ok=True)
        with open(os.path.join(calls_dir, f"r{rank}-{attempt}.json"), "w") as f:
            json.dump({"calls": _CALLS.get("calls"), "preempted": result.preempted}, f)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"completed": result.completed, "preempted": result.preempted,
                                      "steps_completed": result.steps_completed, "metrics": result.metrics,
                                      "run_dir": result.run_dir}), flush=True)


_CALLS = {}
_orig_init = Processor.__init__


def _tracking_init(self, context):
    _orig_init(self, context)
    _CALLS["calls"] = self.calls


Processor.__init__ = _tracking_init

if __name__ == "__main__":
    main()
