"""A test job over TableRows: one JSON row per table row, holding the row's ``id``.

Usage: table_job.py SOURCE STORAGE BATCH_SIZE INTERVAL [BAD_SAMPLES] [NUM_WORKERS]

Rank 0 prints ``RESULT {json}``. ``BATCHPROC_FAULT=stop@step=S`` preempts it like any job.
"""

import json
import os
import sys

from batchproc import TorchBatchProcessor, torch_batch_process
from batchproc.tables import TableRows
from batchproc.writers import RowWriter


class Ids(TorchBatchProcessor):
    def __init__(self, context) -> None:
        super().__init__(context)
        self.writer = RowWriter(context, "ids", format="jsonl")

    def process_batch(self, batch, batch_idx) -> None:
        for index, id_ in zip(self.context.batch_indices, batch["id"].tolist()):
            self.writer.add_row({"index": index, "id": id_})

    def on_checkpoint_start(self) -> None:
        self.writer.flush()


def main() -> None:
    source, storage, bs, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bad = sys.argv[5] if len(sys.argv) > 5 else "skip"
    workers = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    result = torch_batch_process(Ids, TableRows(source, columns=["id"]), batch_size=bs,
                                 checkpoint_interval=interval, storage=storage, bad_samples=bad,
                                 dataloader_kwargs={"num_workers": workers})
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"completed": result.completed, "preempted": result.preempted,
                                      "steps_completed": result.steps_completed}), flush=True)


if __name__ == "__main__":
    main()
