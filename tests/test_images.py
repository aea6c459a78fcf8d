"""ImageFiles (modes, layouts, globs, fsspec URLs) and RowWriter through real in-process runs."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Dict, List

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from batchproc import TorchBatchProcessor, torch_batch_process
from batchproc.errors import BadSampleError, TooManyBadSamplesError
from batchproc.data.images import ImageFiles, decode_image_bytes, preprocess_from_weights, standard_preprocess
from batchproc.data.writers import RowWriter, list_outputs, read_rows

# torchvision 0.29 deprecates its decoders (batchproc.data.images silences this; pytest re-enables it).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")

RNG = np.random.default_rng(0)


def rgb(h: int, w: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# name -> (encoded bytes, size (h, w)); every mode torchvision or the PIL fallback must turn into RGB
def sample_files() -> Dict[str, bytes]:
    sixteen = Image.fromarray(np.array([[0, 65535, 32896], [256, 512, 1000]], dtype=np.uint16))
    return {
        "rgb.png": encode(rgb(5, 7), "PNG"),
        "gray.png": encode(rgb(9, 4).convert("L"), "PNG"),
        "rgba.png": encode(rgb(6, 6).convert("RGBA"), "PNG"),
        "palette.png": encode(rgb(8, 3).convert("P"), "PNG"),
        "cmyk.jpg": encode(rgb(16, 16).convert("CMYK"), "JPEG"),
        "gray.jpg": encode(rgb(7, 5).convert("L"), "JPEG"),
        "bitmap.bmp": encode(rgb(4, 9), "BMP"),  # not a torchvision format: PIL fallback
        "deep.png": encode(sixteen, "PNG"),  # 16-bit grayscale
    }


@pytest.fixture
def clean_env(monkeypatch):
    """An in-process job is a world of one with no launcher settings."""
    import os

    for k in list(os.environ):
        if k.startswith("BATCHPROC_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                "TORCHELASTIC_RESTART_COUNT"):
            monkeypatch.delenv(k)


@pytest.mark.parametrize("name", sorted(sample_files()))
def test_every_mode_decodes_to_rgb_uint8(name):
    data = sample_files()[name]
    t = decode_image_bytes(data, name)
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert t.dtype == torch.uint8 and t.shape == (3, h, w)
    if name == "deep.png":  # 16 bits scaled to 8 (PIL clips instead)
        assert t[0].tolist() == [[0, 255, 128], [1, 2, 3]] and torch.equal(t[0], t[2])
    elif name == "cmyk.jpg":  # torchvision converts CMYK itself; it must agree with PIL
        assert (t.int() - expected.int()).abs().max() <= 2
    else:
        assert torch.equal(t, expected)


def test_undecodable_bytes_name_the_file():
    with pytest.raises(ValueError, match="x/broken.jpg"):
        decode_image_bytes(b"definitely not an image", "x/broken.jpg")
    with pytest.raises(ValueError, match="empty"):
        decode_image_bytes(b"", "x/empty.png")


def write_tree(root: Path, files: Dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def folder_files() -> Dict[str, bytes]:
    f = sample_files()
    return {"cat/rgb.png": f["rgb.png"], "cat/sub/gray.png": f["gray.png"], "cat/rgba.png": f["rgba.png"],
            "dog/palette.png": f["palette.png"], "dog/cmyk.jpg": f["cmyk.jpg"], "dog/bitmap.bmp": f["bitmap.bmp"],
            "dog/notes.txt": b"not an image", "dog/.hidden.png": f["rgb.png"], ".cache/x.png": f["rgb.png"],
            "README.txt": b"a top-level non-image does not hide the class layout"}


def test_image_folder_layout_gives_classes_and_labels(tmp_path):
    write_tree(tmp_path, folder_files())
    ds = ImageFiles(tmp_path)
    assert ds.classes == ["cat", "dog"]
    rel = [str(Path(p).relative_to(tmp_path)) for p in ds.paths]
    assert rel == ["cat/rgb.png", "cat/rgba.png", "cat/sub/gray.png",
                   "dog/bitmap.bmp", "dog/cmyk.jpg", "dog/palette.png"]  # sorted; txt and hidden skipped
    assert ds.labels == [0, 0, 0, 1, 1, 1]
    item = ds[4]
    assert item["label"] == 1 and item["path"] == str(tmp_path / "dog/cmyk.jpg")
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8
    assert ds.describe_sample(3) == str(tmp_path / "dog/bitmap.bmp")


def test_flat_folder_and_glob_are_unlabeled_unless_asked(tmp_path):
    write_tree(tmp_path, folder_files())
    flat = ImageFiles(tmp_path / "dog")
    assert flat.classes == [] and flat.labels == [-1, -1, -1]
    g = ImageFiles(str(tmp_path / "*" / "*.png"))
    assert [Path(p).name for p in g.paths] == ["rgb.png", "rgba.png", "palette.png"] and set(g.labels) == {-1}
    by_parent = ImageFiles(str(tmp_path / "*" / "*.png"), labels="parent")
    assert by_parent.classes == ["cat", "dog"] and by_parent.labels == [0, 0, 1]
    assert ImageFiles(tmp_path, labels="none").labels == [-1] * 6
    single = ImageFiles(tmp_path / "cat" / "rgb.png")
    assert len(single) == 1 and single[0]["image"].shape == (3, 5, 7)


def test_symlinked_folders_bracketed_names_and_unnormalized_paths(tmp_path):
    """As ImageFolder reads them: a class folder that is a symlink is a class (a link back up the
    tree is not followed twice), a dangling link is skipped, a folder named like a glob is that
    folder, and /a/./b, /a//b and /x/../a/b name one source."""
    f = sample_files()
    write_tree(tmp_path / "photos [2024]", {"cat/a.png": f["rgb.png"]})
    write_tree(tmp_path / "elsewhere", {"dog/b.png": f["gray.png"]})
    top = tmp_path / "photos [2024]"
    (top / "dog").symlink_to(tmp_path / "elsewhere" / "dog", target_is_directory=True)
    (top / "cat" / "loop").symlink_to(top, target_is_directory=True)
    (top / "cat" / "gone.png").symlink_to(tmp_path / "missing.png")
    ds = ImageFiles(top)
    assert ds.classes == ["cat", "dog"] and ds.labels == [0, 1]
    assert [str(Path(p).relative_to(top)) for p in ds.paths] == ["cat/a.png", "dog/b.png"]
    globbed = ImageFiles(str(tmp_path / "photos [[]2024]" / "*" / "*.png"), labels="parent")
    assert globbed.classes == ["cat", "dog"] and len(globbed) == 2  # the dangling link is skipped
    spellings = [str(top), f"{tmp_path}/./photos [2024]", f"{tmp_path}//photos [2024]/",
                 f"{tmp_path}/elsewhere/../photos [2024]", f"file://{top}"]
    assert len({ImageFiles(s).batchproc_source() for s in spellings}) == 1


def test_missing_or_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFiles(tmp_path / "nope")  # a local path is checked at once (a stat, not a listing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        len(ImageFiles(tmp_path / "empty"))  # listing is lazy: the first len() or item lists
    with pytest.raises(ValueError, match="labels"):
        ImageFiles(tmp_path, labels="bogus")


def test_fsspec_memory_url_dir_and_glob():
    fs = fsspec.filesystem("memory")
    base = f"/imgs-{uuid.uuid4().hex[:8]}"
    f = sample_files()
    for rel, data in {"a/1.png": f["rgb.png"], "a/2.jpg": f["cmyk.jpg"], "b/3.png": f["gray.png"]}.items():
        fs.pipe_file(f"{base}/{rel}", data)
    try:
        ds = ImageFiles(f"memory://{base}", transform=v2.Resize((4, 4), antialias=True))
        assert ds.classes == ["a", "b"] and ds.labels == [0, 0, 1]
        assert ds.paths == [f"memory://{base}/a/1.png", f"memory://{base}/a/2.jpg", f"memory://{base}/b/3.png"]
        assert ds.describe_sample(2) == f"memory://{base}/b/3.png"
        assert all(ds[i]["image"].shape == (3, 4, 4) for i in range(3))
        g = ImageFiles(f"memory://{base}/*/*.png")
        assert g.paths == [f"memory://{base}/a/1.png", f"memory://{base}/b/3.png"]
    finally:
        fs.rm(base, recursive=True)


def test_preprocessing_helpers_work_on_uint8_tensors():
    from torchvision.models import ResNet18_Weights

    img = decode_image_bytes(sample_files()["rgb.png"])
    out = standard_preprocess(32, resize=40)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    for w in (ResNet18_Weights.DEFAULT, "ResNet18_Weights.IMAGENET1K_V1"):  # transforms only: no download
        assert preprocess_from_weights(w)(img).shape == (3, 224, 224)


# -- RowWriter and bad samples through real runs -----------------------------------------------


class RowsProcessor(TorchBatchProcessor):
    fmt = "parquet"

    def __init__(self, context) -> None:
        super().__init__(context)
        self.writer = RowWriter(context, "rows", format=self.fmt)

    def process_batch(self, batch, batch_idx) -> None:
        for index, path, image, label in zip(self.context.batch_indices, batch["path"], batch["image"], batch["label"]):
            self.writer.add_row({"index": index, "path": path, "mean": image.float().mean(), "label": label,
                                 "shape": list(image.shape)})

    def on_checkpoint_start(self) -> None:
        self.writer.flush()


def make_flat(root: Path, n: int, bad: bool = False) -> List[str]:
    """``n`` good PNGs (and a corrupt and a truncated JPEG); returns the good paths."""
    root.mkdir(parents=True, exist_ok=True)
    good = []
    for i in range(n):
        p = root / f"img{i:02d}.png"
        p.write_bytes(encode(rgb(3 + i % 4, 5), "PNG"))
        good.append(str(p))
    if bad:
        (root / "img03b-corrupt.jpg").write_bytes(b"\xff\xd8 this is no jpeg")
        jpeg = encode(rgb(32, 32), "JPEG")
        (root / "img07b-truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return good


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_row_writer_round_trip_through_a_run(tmp_path, clean_env, fmt):
    good = make_flat(tmp_path / "imgs", 11)
    ds = ImageFiles(tmp_path / "imgs", transform=v2.Resize((2, 2), antialias=True))
    cls = type("P", (RowsProcessor,), {"fmt": fmt})
    result = torch_batch_process(cls, ds, batch_size=2, checkpoint_interval=2, storage=str(tmp_path / "run"),
                                 dataloader_kwargs={"num_workers": 2})  # workers get a pickled ImageFiles
    assert result.completed
    outputs = list_outputs(result.run_dir)
    assert len(outputs) == 3 and all(o.endswith("." + fmt) for o in outputs)  # 6 batches: commits after 2, 4, 6
    assert list_outputs(result.run_dir, name="rows") == outputs and list_outputs(result.run_dir, name="x") == []
    rows = sorted(read_rows(result.run_dir), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(11)) and [r["path"] for r in rows] == good
    assert all(r["label"] == -1 and r["shape"] == [3, 2, 2] and isinstance(r["mean"], float) for r in rows)


def test_row_writer_buffers_and_skips_empty_flushes(tmp_path):
    opened = []

    class Ctx:
        def upload_path(self):
            import contextlib

            @contextlib.contextmanager
            def cm():
                opened.append(tmp_path)
                yield tmp_path
            return cm()

    w = RowWriter(Ctx(), "preds", format="jsonl")
    assert w.flush() == 0 and opened == []  # nothing buffered: no file, no upload
    w.add([{"a": torch.tensor(1)}, {"a": np.int64(2)}])
    w.add_row({"a": 3, "t": torch.tensor([0.5, 1.5])})
    assert len(w) == 3 and w.flush() == 3 and len(w) == 0
    lines = [json.loads(l) for l in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert lines == [{"a": 1}, {"a": 2}, {"a": 3, "t": [0.5, 1.5]}]
    with pytest.raises(ValueError, match="format"):
        RowWriter(Ctx(), format="csv")


def test_bad_samples_skipped_and_recorded(tmp_path, clean_env):
    good = make_flat(tmp_path / "imgs", 10, bad=True)
    ds = ImageFiles(tmp_path / "imgs", transform=v2.Resize((2, 2), antialias=True))
    run = tmp_path / "run"
    result = torch_batch_process(RowsProcessor, ds, batch_size=3, checkpoint_interval=1, storage=str(run),
                                 bad_samples="skip")
    assert result.completed
    errors = [json.loads(l) for l in (run / "errors.jsonl").read_text().splitlines()]
    bad = {str(tmp_path / "imgs" / "img03b-corrupt.jpg"), str(tmp_path / "imgs" / "img07b-truncated.jpg")}
    assert len(errors) == 2 and {p for p in bad if any(p in json.dumps(e) for e in errors)} == bad
    assert json.loads((run / "status.json").read_text())["skipped_samples"] == 2
    paths = [r["path"] for r in read_rows(str(run))]
    assert sorted(paths) == sorted(good) and len(paths) == len(set(paths))


def test_bad_sample_raise_names_the_file(tmp_path, clean_env):
    make_flat(tmp_path / "imgs", 10, bad=True)
    ds = ImageFiles(tmp_path / "imgs", transform=v2.Resize((2, 2), antialias=True))
    with pytest.raises(BadSampleError) as info:
        # No loader workers: a worker's error reaches us wrapped in its traceback, and its loader
        # then takes 5 s to shut down (torch's join timeout) when the test frees it.
        torch_batch_process(RowsProcessor, ds, batch_size=3, storage=str(tmp_path / "run"),
                            dataloader_kwargs={"num_workers": 0})
    assert str(tmp_path / "imgs" / "img03b-corrupt.jpg") in str(info.value)


def test_too_many_bad_samples_fail_the_job(tmp_path, clean_env):
    make_flat(tmp_path / "imgs", 10, bad=True)
    ds = ImageFiles(tmp_path / "imgs", transform=v2.Resize((2, 2), antialias=True))
    with pytest.raises(TooManyBadSamplesError, match="max_bad_samples=1"):
        torch_batch_process(RowsProcessor, ds, batch_size=3, storage=str(tmp_path / "run"),
                            bad_samples="skip", max_bad_samples=1, dataloader_kwargs={"num_workers": 0})
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_s3_glob_with_parent_labels_and_outputs_on_s3(s3_server, s3_bucket, clean_env):
    """``s3://bucket/dogs/Images/*/*.jpg``, read by a forked loader worker (its own s3fs client), with
    the run directory (and so the shards RowWriter publishes) on S3 too."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    base = f"{s3_bucket}/dogs/Images"
    names = {"n02085620-Chihuahua/a.jpg", "n02085620-Chihuahua/b.jpg", "n02085782-Japanese_spaniel/c.jpg"}
    for rel in names:
        fs.pipe_file(f"{base}/{rel}", encode(rgb(6, 5), "JPEG"))
    fs.pipe_file(f"{base}/README.txt", b"not matched by the glob")
    ds = ImageFiles(f"{base}/*/*.jpg", transform=v2.Resize((2, 2), antialias=True), labels="parent")
    assert ds.classes == ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"] and ds.labels == [0, 0, 1]
    assert ds.paths == sorted(f"{base}/{rel}" for rel in names) and ds.describe_sample(2) == f"{base}/n02085782-Japanese_spaniel/c.jpg"
    result = torch_batch_process(RowsProcessor, ds, batch_size=1, checkpoint_interval=2,
                                 storage=f"{s3_bucket}/run", dataloader_kwargs={"num_workers": 1})
    assert result.completed
    assert all(u.startswith(f"{s3_bucket}/run/outputs/rows.") for u in list_outputs(result.run_dir))
    rows = sorted(read_rows(result.run_dir), key=lambda r: r["index"])
    assert [(r["path"], r["label"]) for r in rows] == list(zip(ds.paths, ds.labels))
