"""A test job over ImageFiles: one JSON row per image (index, path, a digest of its pixels).

Usage: images_job.py SOURCE STORAGE BATCH_SIZE INTERVAL [BAD_SAMPLES]

Rank 0 prints ``RESULT {json}``. ``BATCHPROC_FAULT=stop@step=S`` preempts it like any job.
"""

import json
import os
import sys

import torch

from batchproc import TorchBatchProcessor, torch_batch_process
from batchproc.images import ImageFiles
from batchproc.writers import RowWriter


def digest(image: torch.Tensor) -> int:
    """Position-weighted pixel sum: two different images of one size (almost) never agree."""
    flat = image.flatten().to(torch.int64)
    return int((flat * torch.arange(1, len(flat) + 1)).sum())


class Rows(TorchBatchProcessor):
    def __init__(self, context) -> None:
        super().__init__(context)
        self.writer = RowWriter(context, "rows", format="jsonl")

    def process_batch(self, batch, batch_idx) -> None:
        for index, path, image in zip(self.context.batch_indices, batch["path"], batch["image"]):
            self.writer.add_row({"index": index, "path": path, "digest": digest(image)})

    def on_checkpoint_start(self) -> None:
        self.writer.flush()


def main() -> None:
    source, storage, bs, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bad = sys.argv[5] if len(sys.argv) > 5 else "skip"
    result = torch_batch_process(Rows, ImageFiles(source), batch_size=bs, checkpoint_interval=interval,
                                 storage=storage, bad_samples=bad)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"completed": result.completed, "preempted": result.preempted,
                                      "steps_completed": result.steps_completed}), flush=True)


if __name__ == "__main__":
    main()
