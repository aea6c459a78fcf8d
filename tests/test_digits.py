"""The default experiment's data, model and script: digits PNGs, the trained CNN, classify_images.py
end to end through torchrun with 1 and 2 processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest
import torch

from batchproc.data.images import ImageFiles
from batchproc.data.writers import read_rows
from tests.support import PY, ROOT, Procs

sys.path.insert(0, str(ROOT / "examples"))
import classify_images  # noqa: E402
from digits_cnn import WEIGHTS_FILE, DigitsCNN, digits_preprocess, load_digits_cnn  # noqa: E402
from digits_data import MARKER, N_DIGITS, digits_index, ensure_digits_folder  # noqa: E402


# torchvision 0.29 deprecates its decoders (batchproc.data.images silences this; pytest re-enables it).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    return ensure_digits_folder(tmp_path_factory.mktemp("data"))


def test_digits_folder_holds_sklearn_digits_once(digits):
    from sklearn.datasets import load_digits

    folder = Path(digits)
    files = sorted(folder.rglob("*.png"))
    assert len(files) == N_DIGITS and (folder / MARKER).exists()
    stamp = (folder / MARKER).stat().st_mtime_ns
    assert ensure_digits_folder(folder.parent) == digits and (folder / MARKER).stat().st_mtime_ns == stamp
    ref = load_digits()
    ds = ImageFiles(digits)
    assert ds.classes == [str(i) for i in range(10)]
    for i in (0, 500, N_DIGITS - 1):
        row = digits_index(ds.files[i])
        assert int(ds.classes[ds.labels[i]]) == ref.target[row]
        image = ds[i]["image"]
        assert image.shape == (3, 8, 8)
        assert np.array_equal(image[0].numpy(), np.rint(ref.images[row] * 255 / 16).astype(np.uint8))


def test_trained_weights_load_weights_only_and_classify(digits):
    state = torch.load(WEIGHTS_FILE, weights_only=True)
    DigitsCNN().load_state_dict(state)
    model = load_digits_cnn().eval()
    ds = ImageFiles(digits, transform=digits_preprocess())
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.inference_mode():
        pred = model(x).argmax(1)
    acc = float((pred == torch.tensor(ds.labels)).float().mean())
    assert acc > 0.98, acc


def test_options_hparams_win_over_flags_over_defaults():
    opts = classify_images.parse_options(["--batch-size", "8", "--format", "jsonl"], {"batch_size": "16"})
    assert opts["batch_size"] == 16 and opts["format"] == "jsonl" and opts["model"] == "digits_cnn"
    assert opts["max_bad_samples"] is None and opts["data_storage_options"] == {}


def test_label_map_matches_imagenet_style_folder_names():
    model = ["tench", "Chihuahua", "Japanese spaniel"]
    assert classify_images.label_map(["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "cat"], model) == [1, 2, -1]


def test_torchvision_model_without_cached_weights_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    said = []
    model = classify_images.make_model("resnet18", None, said.append)
    assert said == [f"no pretrained weights found at {tmp_path}/hub/checkpoints/resnet18-f37072fd.pth; "
                    "using random weights"]
    assert len(model.classes) == 1000 and "random" in model.description


def test_torchvision_model_through_the_example_predicts_like_a_plain_loop(digits, tmp_path, monkeypatch):
    """The shipped path (ImageFiles, the weights' preprocessing, channels_last, row writer) gives a
    plain contiguous-model loop's probabilities for the same images."""
    for name in ("BATCHPROC_RUN_DIR", "BATCHPROC_HPARAMS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    rc = classify_images.main(["--data", digits, "--model", "resnet18", "--weights", "random", "--storage", str(run),
                               "--batch-size", "8", "--max-batches", "2", "--num-workers", "0", "--format", "jsonl"])
    assert rc == 0
    rows = sorted(read_rows(str(run)), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(16))
    model = classify_images.make_model("resnet18", "random", lambda msg: None)
    plain = model.build().eval()
    ds = ImageFiles(digits, transform=model.preprocess)
    with torch.inference_mode():
        probs = plain(torch.stack([ds[i]["image"] for i in range(16)])).softmax(1)
    top_p, top_i = probs.topk(5, dim=1)
    assert np.allclose([r["top5_probs"] for r in rows], top_p.numpy(), atol=1e-4)
    clear = (top_p[:, 0] - top_p[:, 1]) > 1e-3  # a near tie may flip with the memory format
    assert [r["pred"] for r, c in zip(rows, clear) if c] == top_i[clear, 0].tolist()


def run_classify(procs, nproc: int, digits: str, storage: Path, env=None, preempted: bool = False) -> dict:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=0.2", "examples/classify_images.py", "--data", digits, "--storage", str(storage),
           "--batch-size", "100", "--checkpoint-interval", "3", "--num-workers", "0", "--format", "jsonl"]
    done = procs.run(cmd, env=env, timeout=240)
    assert done.rc == 0, done.out
    if preempted:
        assert "preempted after" in done.out, done.out
        return {}
    lines = [l for l in done.out.splitlines() if "metrics: " in l]
    assert lines, done.out
    return json.loads(lines[-1].split("metrics: ", 1)[1])


# One worker runs the tests that compare with the reference run, so that it is made once (pytest-xdist).
SHARES_REFERENCE = pytest.mark.xdist_group("digits-reference")


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """One uninterrupted single-process run: (metrics, run dir)."""
    procs = Procs()
    try:
        run = tmp_path_factory.mktemp("ref") / "run"
        return run_classify(procs, 1, digits, run), run
    finally:
        procs.cleanup()


@SHARES_REFERENCE
def test_digits_end_to_end_one_and_two_processes_agree(procs, digits, reference, tmp_path):
    metrics, ref_run = reference
    assert metrics["accuracy"] > 0.98 and metrics["top5_accuracy"] > 0.999
    assert run_classify(procs, 2, digits, tmp_path / "run2") == metrics
    preds = {}
    for run in (ref_run, tmp_path / "run2"):
        rows = read_rows(str(run))
        assert sorted(r["index"] for r in rows) == list(range(N_DIGITS))  # every image exactly once
        preds[run] = {r["path"]: r["pred"] for r in rows}
        assert json.loads((run / "metrics.json").read_text()) == metrics
    assert preds[ref_run] == preds[tmp_path / "run2"]
    row = min(read_rows(str(ref_run)), key=lambda r: r["index"])
    assert row["path"].endswith("/0/0000.png") and row["label"] == 0 and row["label_name"] == "0"
    assert len(row["top5"]) == 5 and row["top5"][0] == row["pred"] and row["pred_name"] == str(row["pred"])


@SHARES_REFERENCE
def test_digits_preempted_then_resumed_with_another_world_size(procs, digits, reference, tmp_path):
    """The default experiment's promise: stop mid-way (2 processes), resume (1): every image once,
    the same accuracy as an uninterrupted run."""
    run = tmp_path / "run"
    run_classify(procs, 2, digits, run, env={"BATCHPROC_FAULT": "stop@step=2"}, preempted=True)
    partial = read_rows(str(run))
    assert 0 < len(partial) < N_DIGITS
    resumed = run_classify(procs, 1, digits, run)
    assert sorted(r["index"] for r in read_rows(str(run))) == list(range(N_DIGITS))
    assert resumed == reference[0]


@SHARES_REFERENCE
def test_digits_job_with_images_and_run_dir_on_s3(procs: Procs, digits: str, reference: Tuple[Dict[str, Any], Path],
                                                  s3_server: Dict[str, Any], s3_bucket: str) -> None:
    """The same job reading its images from S3 and committing to S3 (moto server on 127.0.0.1).

    Two of the ten class folders (a fifth of the images: moto serves each file in turn): every
    image's prediction equals the local reference run's, and so do the metrics over them."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for cls in S3_CLASSES:
        fs.put(f"{digits.rstrip('/')}/{cls}/", f"{s3_bucket}/digits/{cls}/", recursive=True)
    run = f"{s3_bucket}/runs/digits"
    metrics = run_classify(procs, 2, f"{s3_bucket}/digits", run, env=s3_server["env"])
    rows = read_rows(run)
    assert all(r["path"].startswith(f"{s3_bucket}/digits/") for r in rows)
    expected = {_rel(r["path"]): r for r in read_rows(str(reference[1])) if _rel(r["path"]).split("/")[0] in S3_CLASSES}
    assert len(expected) > 300 and sorted(r["index"] for r in rows) == list(range(len(expected)))
    for r in rows:
        ref = expected[_rel(r["path"])]
        assert (r["label"], r["pred"], r["top5"]) == (ref["label"], ref["pred"], ref["top5"]), (r, ref)
    assert metrics == {"accuracy": sum(r["pred"] == r["label"] for r in expected.values()) / len(expected),
                       "top5_accuracy": sum(r["label"] in r["top5"] for r in expected.values()) / len(expected)}


S3_CLASSES = ("3", "8")


def _rel(path: str) -> str:
    """``<class>/<file>.png``: the same image's name locally and on S3."""
    return "/".join(path.rsplit("/", 2)[-2:])
