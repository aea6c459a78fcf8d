"""One measured run of a benchmark workload; prints ``BENCH {json}`` (one line per rank).

Run by ``python -m bench`` in a fresh process per measurement, so runs do not share caches,
threads or allocator state. Model construction happens before the clock starts in every mode.

    python -m bench.workload MODE --data DIR [--model resnet18|tiny] [--bs 32] [--nw 1] ...

MODE: ``plain`` (DataLoader + model loop over batchproc's ImageFiles), ``framework`` (the same
through torch_batch_process), ``pil`` (torchvision ImageFolder + PIL transforms, the usual plain
loop), ``example`` (the shipped path whole: ImageFiles with the model's own preprocessing,
batchproc's default loader, and examples/classify_images.py's processor with its Parquet rows and
metrics), ``synthetic`` (cheap model on in-memory tensors through the framework, for commit/resume
costs), ``gpu-model`` / ``gpu-framework`` (ResNet-50 in bf16 and channels_last on CUDA over uint8
images pre-staged in host memory: a model-only loop, and the same through torch_batch_process).
``--model none`` skips the model (the data path alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from typing import Optional

T_PROCESS = time.time()

import torch  # noqa: E402
import torchvision  # noqa: E402

from batchproc import MetricReducer, TorchBatchProcessor, torch_batch_process  # noqa: E402
from batchproc.images import ImageFiles, standard_preprocess  # noqa: E402

T_IMPORTED = time.time()
ARGS: argparse.Namespace
MODEL: torch.nn.Module
MARKS: dict = {}


class _NoModel(torch.nn.Module):
    def forward(self, x):
        return x.new_zeros((len(x), 1000), dtype=torch.float32)


def build_model(name: str) -> torch.nn.Module:
    if name == "tiny":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    if name == "none":
        return _NoModel()
    return torchvision.models.get_model(name, weights=None, num_classes=1000)


GPU_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
GPU_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def gpu_model(device: torch.device) -> torch.nn.Module:
    """ResNet-50, bf16 weights, channels_last: the usual fast GPU inference set-up."""
    model = torchvision.models.resnet50(weights=None).eval().requires_grad_(False)
    return model.to(device, dtype=torch.bfloat16, memory_format=torch.channels_last)


def gpu_forward(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW on the device -> predicted classes on the host (one sync per batch)."""
    x = images.to(torch.bfloat16).sub_(GPU_MEAN.to(images.device, torch.bfloat16))
    x = x.div_(GPU_STD.to(images.device, torch.bfloat16)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model(x).argmax(1).cpu()


class _HostImages(torch.utils.data.Dataset):
    """``n`` uint8 3x224x224 images already decoded in (shared) host memory."""

    def __init__(self, n: int) -> None:
        self.images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def gpu_model_loop(ds: _HostImages) -> int:
    """The model-only baseline: pinned host batches, non-blocking copies, nothing else."""
    device = torch.device("cuda")
    model = gpu_model(device)
    host = ds.images.pin_memory()
    with torch.inference_mode():
        gpu_forward(model, host[:ARGS.bs].to(device))  # cuDNN picks its kernels once, as below
        torch.cuda.synchronize()
        MARKS["warm"] = time.time()
        preds = [gpu_forward(model, host[i:i + ARGS.bs].to(device, non_blocking=True))
                 for i in range(0, len(host), ARGS.bs)]
    return sum(len(p) for p in preds)


class GpuPredict(TorchBatchProcessor):
    def __init__(self, context):
        self.context = context
        self.model = gpu_model(context.device)
        self.count = context.wrap_reducer(Count(), "samples")
        gpu_forward(self.model, torch.zeros(ARGS.bs, 3, 224, 224, dtype=torch.uint8, device=context.device))
        torch.cuda.synchronize()
        MARKS["warm"] = time.time()

    def process_batch(self, batch, batch_idx):
        self.count.update(len(gpu_forward(self.model, self.context.to_device(batch))))


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

    def process_batch(self, batch, batch_idx):
        x = batch["image"] if isinstance(batch, dict) else batch
        x = self.context.to_device(x)
        with torch.inference_mode():
            pred = self.model(x).argmax(1)
        MARKS.setdefault("first_batch", time.time())
        self.count.update(len(pred))
        self.preds.append(pred)

    def on_checkpoint_start(self):
        if self.preds:
            with self.context.upload_path() as path:
                torch.save(torch.cat(self.preds), path / "preds.pt")
            self.preds = []


class Rows(Predict):
    """The outside harness's framework side (issue 11): Predict's work, its outputs written as
    Parquet rows (dataset index, prediction) through RowWriter, committed every checkpoint."""

    def __init__(self, context):
        super().__init__(context)
        from batchproc.writers import RowWriter

        self.rows = RowWriter(context, "preds", format="parquet")

    def process_batch(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        with torch.inference_mode():
            pred = self.model(self.context.to_device(x)).argmax(1)
        MARKS.setdefault("first_batch", time.time())
        self.count.update(len(pred))
        self.rows.add({"index": i, "pred": p} for i, p in zip(self.context.batch_indices, pred.tolist()))

    def on_checkpoint_start(self):
        self.rows.flush()


def run_example(bs: int, nw: Optional[int]) -> int:
    """examples/classify_images.py's processor over ARGS.data, with the model built before the clock."""
    import dataclasses

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import classify_images as ci

    model = dataclasses.replace(ci.make_model(ARGS.model, "random", log=lambda msg: None), build=lambda: MODEL)
    if ARGS.contiguous:  # the example without channels_last, to show what that layout is worth
        model = dataclasses.replace(model, channels_last=False)
    ds = ImageFiles(ARGS.data, transform=model.preprocess)
    setup = ci.Setup(model, ds, "parquet")
    kwargs = {} if nw is None else {"num_workers": nw}
    result = torch_batch_process(ci.make_processor(setup), ds, batch_size=bs, checkpoint_interval=ARGS.interval,
                                 max_batches=ARGS.max_batches, dataloader_kwargs=kwargs, storage=ARGS.storage)
    return len(ds) if result.completed else 0


def dataset():
    if ARGS.mode == "synthetic":
        return _Synthetic(ARGS.n)
    if ARGS.mode.startswith("gpu-"):
        return _HostImages(ARGS.n)
    if ARGS.mode in ("pil", "pil-rows"):
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
    p.add_argument("mode", choices=["plain", "framework", "pil", "pil-rows", "example", "synthetic", "gpu-model",
                                    "gpu-framework"])
    p.add_argument("--data")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--nw", type=int, default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--interval", type=int, default=10**6)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--contiguous", action="store_true", help="example: keep the model's default memory format")
    p.add_argument("--schedule", default="static", choices=["static", "dynamic"])
    p.add_argument("--storage", default=None, help="run directory (default: from batchproc run)")
    ARGS = p.parse_args()
    MODEL = build_model(ARGS.model) if not ARGS.mode.startswith("gpu-") else None
    ds = dataset() if ARGS.mode != "example" else None
    rank = int(os.environ.get("RANK", "0"))
    start = time.time()
    if ARGS.mode in ("plain", "pil"):
        samples = plain_loop(ds)
    elif ARGS.mode == "example":
        samples = run_example(ARGS.bs, ARGS.nw)
    elif ARGS.mode == "gpu-model":
        samples = gpu_model_loop(ds)
    else:
        kwargs = {} if ARGS.nw is None else {"num_workers": ARGS.nw}
        cls = {"gpu-framework": GpuPredict, "pil-rows": Rows}.get(ARGS.mode, Predict)
        result = torch_batch_process(cls, ds, batch_size=ARGS.bs, checkpoint_interval=ARGS.interval,
                                     max_batches=ARGS.max_batches, dataloader_kwargs=kwargs, storage=ARGS.storage,
                                     schedule=ARGS.schedule)
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
