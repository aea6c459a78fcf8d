"""Batch image classification, checkpointed and resumable: the default experiment's script.

Every image gets a row (path, predicted class, probability, top-5, ground truth) in Parquet or
JSON Lines shards under ``<run_dir>/outputs/``; accuracy and top-5 accuracy are exact across ranks
and resumes. By default it classifies scikit-learn's handwritten digits (written as PNGs under
./data on first use) with the small CNN in ``examples/weights/digits_cnn.pt``.

Options come from the experiment's ``hyperparameters`` (``batchproc run``); the command-line flags
below are the fallback when a hyperparameter is absent.

    python examples/classify_images.py                                  # digits, one process
    torchrun --standalone --nproc-per-node=2 examples/classify_images.py --storage runs/digits
    python examples/classify_images.py --data 's3://bucket/dogs/Images/*/*.jpg' \\
        --labels parent --model resnet50

Row columns: ``index`` (dataset index), ``path`` (a byte of a file name that is not UTF-8 shows as
``\\xNN``; ``index`` names the file exactly), ``pred``/``pred_name``/``prob``, ``top5``/
``top5_names``/``top5_probs`` (fewer than 5 for smaller models), ``label`` (the ground truth as
the model's class index; -1 when unknown: unlabeled input, or a class folder the model does not
know) and ``label_name`` (the dataset's class folder, None without labels). Accuracy counts only
images with a known label (None when there are none).

``--model`` is ``digits_cnn`` or any torchvision classifier name. Torchvision models use their
default pretrained weights only when already in torch's cache (``torch.hub.get_dir()``); nothing
is ever downloaded: without them the model runs with random weights (and says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from batchproc import MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext, get_hparams, torch_batch_process
from batchproc.data.inputs import printable
from batchproc.images import DEFAULT_MAX_PIXELS, UNKNOWN_LABEL, ImageFiles, preprocess_from_weights
from batchproc.writers import RowWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling example modules
from digits_cnn import DIGIT_CLASSES, WEIGHTS_FILE, DigitsCNN, digits_preprocess, load_digits_cnn  # noqa: E402
from digits_data import ensure_digits_folder  # noqa: E402

TOP_K = 5


def _json(text: str) -> Dict[str, Any]:
    return json.loads(text) if isinstance(text, str) else dict(text)


def _opt_int(text: Any) -> Optional[int]:
    return None if text in (None, "", "none", "None") else int(text)


# name -> (type, default, help); a hyperparameter of the same name wins over the flag.
OPTIONS: Dict[str, tuple] = {
    "data": (str, None, "folder, glob or fsspec URL of the images (default: the digits under ./data)"),
    "data_storage_options": (_json, {}, "fsspec options for reading the data, as JSON"),
    "labels": (str, "auto", "ground truth: auto (class sub-folders of a folder), parent (parent folder name), none"),
    "model": (str, "digits_cnn", "digits_cnn, or a torchvision classifier name such as resnet50"),
    "weights": (str, None, "weights file (state_dict); 'random' for random weights"),
    "batch_size": (int, 64, "images per batch"),
    "checkpoint_interval": (int, 5, "batches per rank between checkpoints"),
    "max_batches": (_opt_int, None, "cap on the batches each rank processes"),
    "num_workers": (_opt_int, None, "DataLoader worker processes per rank (default: batchproc's, from the cores)"),
    "multiprocessing_context": (str, None, "how loader workers start: fork, spawn or forkserver (default: Python's)"),
    "format": (str, "parquet", "parquet or jsonl"),
    "max_pixels": (_opt_int, DEFAULT_MAX_PIXELS, "images whose header claims more pixels are bad samples, not "
                   "decoded; 'none' for no limit"),
    "bad_samples": (str, "raise", "raise, or skip (undecodable images are recorded in errors.jsonl)"),
    "max_bad_samples": (_opt_int, None, "with skip: fail once more images than this were skipped"),
    "bad_batches": (str, "raise", "raise, or skip (a batch the model fails on is recorded in errors.jsonl)"),
    "max_bad_batches": (_opt_int, None, "with skip: fail once more batches than this were skipped"),
    "schedule": (str, None, "static (lock-step round-robin, Determined's call counts) or dynamic (ranks pull "
                 "batches: no rank waits for a slower one); default: the experiment's schedule key, else static"),
    "storage": (str, None, "run directory (path or fsspec URL); default from batchproc run, else ./runs/classify_images"),
}


def parse_options(argv: Optional[List[str]] = None, hparams: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Hyperparameters, else command-line flags, else the defaults in :data:`OPTIONS`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (_, _, help_text) in OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text)
    args = vars(parser.parse_args(argv))
    hparams = get_hparams() if hparams is None else hparams
    unknown = sorted(set(hparams) - set(OPTIONS))
    if unknown and os.environ.get("RANK", "0") == "0":
        print(f"classify_images: ignoring unknown hyperparameters {unknown}", file=sys.stderr)
    opts = {}
    for name, (convert, default, _) in OPTIONS.items():
        value = hparams[name] if name in hparams else args[name]
        opts[name] = default if value is None else convert(value)
    return opts


# -- model ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    build: Callable[[], torch.nn.Module]  # called in each rank's processor
    preprocess: Callable[[torch.Tensor], Any]
    classes: List[str]  # output index -> name
    description: str
    channels_last: bool = False  # NHWC weights: faster convolutions on CPUs and GPUs alike


def make_model(name: str, weights: Optional[str], log: Callable[[str], None]) -> Model:
    if name == "digits_cnn":
        return _digits_model(weights)
    return _torchvision_model(name, weights, log)


def _digits_model(weights: Optional[str]) -> Model:
    if weights == "random":
        return Model(_seeded(DigitsCNN), digits_preprocess(), DIGIT_CLASSES, "digits_cnn with random weights")
    path = Path(weights) if weights else WEIGHTS_FILE
    load_digits_cnn(path)  # fail here, before the job starts, if the file is missing or wrong
    return Model(lambda: load_digits_cnn(path), digits_preprocess(), DIGIT_CLASSES, f"digits_cnn ({path})")


def _torchvision_model(name: str, weights: Optional[str], log: Callable[[str], None]) -> Model:
    import torchvision.models as tvm

    try:
        default = tvm.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as e:
        raise ValueError(f"unknown model {name!r}: use digits_cnn or one of "
                         f"torchvision.models.list_models() ({e})") from None
    categories = list(default.meta.get("categories") or [])
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(default.url)
    if weights and weights != "random":
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file not found: {weights}")

        def build() -> torch.nn.Module:
            model = tvm.get_model(name, weights=None)
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return model
        what = f"{name} ({weights})"
    elif weights != "random" and cached.is_file():
        # get_model with the weights enum loads the cached file (it exists, so nothing is fetched)
        # and applies the model settings those weights need (e.g. inception's transform_input).
        def build() -> torch.nn.Module:
            return tvm.get_model(name, weights=default)
        what = f"{name} ({default}, {cached})"
    else:
        if weights != "random":
            log(f"no pretrained weights found at {cached}; using random weights")
        build = _seeded(lambda: tvm.get_model(name, weights=None))
        what = f"{name} with random weights"
    return Model(build, preprocess_from_weights(default), categories, what, channels_last=True)


def _seeded(make: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """``make`` under a fixed seed: every rank must build the same random model."""
    def build() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):  # the CPU generator is what init uses
            torch.manual_seed(0)
            return make()
    return build


def label_map(dataset_classes: List[str], model_classes: List[str]) -> List[int]:
    """Dataset label -> model class index (-1 when the dataset's class is not one of the model's).

    Names match ignoring case, ``_`` vs space, and a WordNet id prefix, so ImageNet-style folders
    (``n02085620-Chihuahua``) map to torchvision's categories (``Chihuahua``).
    """
    def norm(s: str) -> str:
        return re.sub(r"^n\d{8}[-_]", "", s).replace("_", " ").strip().lower()

    index: Dict[str, int] = {}
    for i, c in enumerate(model_classes):
        index.setdefault(norm(c), i)
    return [index.get(norm(c), UNKNOWN_LABEL) for c in dataset_classes]


# -- processor -----------------------------------------------------------------------------


class TopKAccuracy(MetricReducer):
    """Share of labeled images whose label is among the top ``k`` predictions (unknown labels skipped)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.reset()

    def reset(self) -> None:
        self.correct, self.seen = 0, 0

    def update(self, top: torch.Tensor, labels: torch.Tensor) -> None:
        known = labels != UNKNOWN_LABEL
        hits = (top[:, :self.k] == labels[:, None]).any(dim=1) & known
        self.correct += int(hits.sum())
        self.seen += int(known.sum())

    def per_slot_reduce(self) -> Dict[str, int]:
        return {"correct": self.correct, "seen": self.seen}

    def cross_slot_reduce(self, per_slot_metrics: List[Dict[str, int]]) -> Optional[float]:
        seen = sum(s["seen"] for s in per_slot_metrics)
        # None, not 0: a dataset without labels has no accuracy.
        return sum(s["correct"] for s in per_slot_metrics) / seen if seen else None


@dataclasses.dataclass
class Setup:
    model: Model
    dataset: Any  # read only once torch_batch_process has frozen its inputs (its classes, in the processor)
    format: str

    @property
    def dataset_classes(self) -> List[str]:
        return list(getattr(self.dataset, "classes", []))


class ClassifyProcessor(TorchBatchProcessor):
    """Softmax predictions of one model; a row per image, accuracy and top-5 accuracy."""

    setup: Setup  # set on a subclass by make_processor (the engine constructs the processor)

    def __init__(self, context: TorchBatchProcessorContext) -> None:
        super().__init__(context)
        s = self.setup
        self.model = context.prepare_model_for_inference(s.model.build(), channels_last=s.model.channels_last)
        self.classes = s.model.classes
        self.dataset_classes = s.dataset_classes
        to_model_label = label_map(s.dataset_classes, s.model.classes)
        self.to_model_label = torch.tensor(to_model_label + [UNKNOWN_LABEL], dtype=torch.long)
        self.accuracy, self.top5_accuracy = TopKAccuracy(1), TopKAccuracy(TOP_K)
        context.wrap_reducer(self.accuracy, "accuracy")
        context.wrap_reducer(self.top5_accuracy, "top5_accuracy")
        self.writer = RowWriter(context, "predictions", s.format)

    def process_batch(self, batch: Dict[str, Any], batch_idx: int) -> None:
        images = self.context.to_device(batch["image"])
        with torch.inference_mode():
            probs = self.model(images).float().softmax(dim=1)
            top_p, top_i = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        top_p, top_i = top_p.cpu(), top_i.cpu()  # one device sync per batch
        ds_labels = batch["label"]
        labels = self.to_model_label[ds_labels]  # index -1 picks the trailing UNKNOWN_LABEL
        self.accuracy.update(top_i, labels)
        self.top5_accuracy.update(top_i, labels)
        names = self._name
        for j, (path, index) in enumerate(zip(batch["path"], self.context.batch_indices)):
            ids, ps = top_i[j].tolist(), top_p[j].tolist()
            ds_label = int(ds_labels[j])
            self.writer.add_row({
                "index": index, "path": printable(path),
                "pred": ids[0], "pred_name": names(ids[0]), "prob": ps[0],
                "top5": ids, "top5_names": [names(i) for i in ids], "top5_probs": ps,
                "label": int(labels[j]),
                "label_name": printable(self.dataset_classes[ds_label]) if ds_label >= 0 else None,
            })

    def _name(self, i: int) -> str:
        return self.classes[i] if i < len(self.classes) else str(i)

    def on_checkpoint_start(self) -> None:
        self.writer.flush()


def make_processor(setup: Setup) -> type:
    return type("ClassifyProcessor", (ClassifyProcessor,), {"setup": setup})


# -- main ----------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_options(argv)
    chief = int(os.environ.get("RANK", "0")) == 0

    def log(msg: str) -> None:
        if chief:
            print(msg, flush=True)

    model = make_model(opts["model"], opts["weights"], log)
    data = opts["data"] or ensure_digits_folder("data")  # every rank may call it: it locks
    dataset = ImageFiles(data, transform=model.preprocess, storage_options=opts["data_storage_options"],
                          labels=opts["labels"], max_pixels=opts["max_pixels"])
    setup = Setup(model, dataset, opts["format"])
    # No len(dataset) here: the files are listed once per run, inside torch_batch_process (batchproc.inputs).
    log(f"classifying the images of {data} with {model.description}")
    loader_kwargs: Dict[str, Any] = {}
    if opts["num_workers"] is not None:
        loader_kwargs["num_workers"] = opts["num_workers"]
    if opts["multiprocessing_context"] is not None:
        loader_kwargs["multiprocessing_context"] = opts["multiprocessing_context"]
    result = torch_batch_process(
        make_processor(setup), dataset, batch_size=opts["batch_size"],
        checkpoint_interval=opts["checkpoint_interval"], max_batches=opts["max_batches"],
        dataloader_kwargs=loader_kwargs, storage=opts["storage"], bad_samples=opts["bad_samples"],
        max_bad_samples=opts["max_bad_samples"], bad_batches=opts["bad_batches"],
        max_bad_batches=opts["max_bad_batches"], schedule=opts["schedule"])
    if result.preempted:
        log(f"preempted after {result.steps_completed}/{result.total_batches} batches; progress is saved "
            f"in {result.run_dir}: run the same command again to resume")
        return 0  # the launcher reports "preempted" from the run state; a non-zero code would make torchrun restart
    run_dir = result.run_dir.rstrip("/")
    log(f"done: {result.total_batches} batches; outputs in {run_dir}/outputs/ "
        f"(batchproc.writers.read_rows({run_dir!r})), metrics in {run_dir}/metrics.json, "
        f"skipped images (if any) in {run_dir}/errors.jsonl")
    log("metrics: " + json.dumps(result.metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
