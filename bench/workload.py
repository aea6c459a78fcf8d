"""One measured run of a benchmark workload; prints ``BENCH {json}`` (one line per rank).

Run by ``python -m bench`` in a fresh process per measurement, so runs do not share caches,
threads or allocator state. Model construction happens before the clock starts in every mode.

    python -m bench.workload MODE --data DIR [--model resnet18|tiny] [--bs 32] [--nw 1] ...

MODE: ``plain`` (DataLoader + model loop over batchproc's ImageFiles), ``framework`` (the same
through torch_batch_process), ``pil`` (torchvision ImageFolder + PIL transforms, the usual plain
loop), ``shipped`` (ImageFiles with batchproc's defaults and RowWriter, through the framework),
``synthetic`` (cheap model on in-memory tensors through the framework, for commit/resume costs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

T_PROCESS = time.time()

import torch  # noqa: E402
import torchvision  # noqa: E402

from batchproc import MetricReducer, TorchBatchProcessor, torch_batch_process  # noqa: E402
from batchproc.images import ImageFiles, standard_preprocess  # noqa: E402

T_IMPORTED = time.time()
ARGS: argparse.Namespace
MODEL: torch.nn.Module
MARKS: dict = {}


def build_model(name: str) -> torch.nn.Module:
    if name == "tiny":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    return torchvision.models.get_model(name, weights=None, num_classes=1000)


class Count(MetricReducer):
    def reset(self):
        self.n = 0

    def update(self, n):
        self.n += n

    def per_slot_reduce(self):
        return self.n

    def cross_slot_reduce(self, slots):
        return sum(slots)


class Predict(TorchBatchProcessor):
    def __init__(self, context):
        self.context = context
        MARKS.setdefault("init", time.time())
        self.model = context.prepare_model_for_inference(MODEL)
        self.count = context.wrap_reducer(Count(), "samples")
        self.preds = []
        self.writer = None
        if ARGS.mode == "shipped":
            from batchproc.writers import RowWriter

            self.writer = RowWriter(context, format="parquet")

    def process_batch(self, batch, batch_idx):
        x = batch["image"] if isinstance(batch, dict) else batch
        x = self.context.to_device(x)
        with torch.inference_mode():
            pred = self.model(x).argmax(1)
        MARKS.setdefault("first_batch", time.time())
        self.count.update(len(pred))
        if self.writer is not None:
            self.writer.add([{"path": p, "pred": int(c)} for p, c in zip(batch["path"], pred.tolist())])
        else:
            self.preds.append(pred)

    def on_checkpoint_start(self):
        if self.writer is not None:
            self.writer.flush()
        elif self.preds:
            with self.context.upload_path() as path:
                torch.save(torch.cat(self.preds), path / "preds.pt")
            self.preds = []


def dataset():
    if ARGS.mode == "synthetic":
        return _Synthetic(ARGS.n)
    if ARGS.mode == "pil":
        from torchvision import transforms as T

        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        return torchvision.datasets.ImageFolder(ARGS.data, transform=tf)
    return ImageFiles(ARGS.data, transform=standard_preprocess())


class _Synthetic(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((16,), float(i % 7))


def plain_loop(ds) -> int:
    loader = torch.utils.data.DataLoader(ds, batch_size=ARGS.bs, num_workers=ARGS.nw)
    model, preds = MODEL.eval(), []
    with torch.inference_mode():
        for batch in loader:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch["image"]
            preds.append(model(x).argmax(1))
            MARKS.setdefault("first_batch", time.time())
    folder = ARGS.storage or tempfile.mkdtemp(prefix="bench-plain-")
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, "preds.pt")
    torch.save(torch.cat(preds), out)
    return sum(len(p) for p in preds)


def main() -> None:
    global ARGS, MODEL
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["plain", "framework", "pil", "shipped", "synthetic"])
    p.add_argument("--data")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--nw", type=int, default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--interval", type=int, default=10**6)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--storage", default=None, help="run directory (default: from batchproc run)")
    ARGS = p.parse_args()
    MODEL = build_model(ARGS.model)
    ds = dataset()
    rank = int(os.environ.get("RANK", "0"))
    start = time.time()
    if ARGS.mode in ("plain", "pil"):
        samples = plain_loop(ds)
    else:
        kwargs = {} if ARGS.nw is None else {"num_workers": ARGS.nw}
        result = torch_batch_process(Predict, ds, batch_size=ARGS.bs, checkpoint_interval=ARGS.interval,
                                     max_batches=ARGS.max_batches, dataloader_kwargs=kwargs, storage=ARGS.storage)
        samples = result.metrics.get("samples", 0)
    end = time.time()
    record = json.dumps({
        "rank": rank, "mode": ARGS.mode, "start": start, "end": end, "samples": samples,
        "process_start": T_PROCESS, "imported": T_IMPORTED, "marks": MARKS,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads()})
    out_dir = os.environ.get("BENCH_OUT")
    if out_dir:  # ranks' stdout interleave without torchrun's --tee; a file each does not
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            f.write(record)
    else:
        print("BENCH " + record, flush=True)


if __name__ == "__main__":
    main()
