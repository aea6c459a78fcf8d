"""Hostile files among the inputs (issue 19): a JPEG bomb, file names that are not UTF-8, a symlink
loop under a ``**`` glob. Each is listed once and, where it cannot be read, is a bad sample: named
in errors.jsonl under ``bad_samples="skip"``, an error naming it under ``"raise"``, at the first
attempt without a torchrun restart. The jobs run the image example through ``batchproc run`` (our
launcher, torchrun, 2 ranks, gloo on 127.0.0.1), with loader workers started by ``forkserver`` and
``spawn``, whose parent is not always the rank."""

from __future__ import annotations

import glob
import io
import json
import os
import resource
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from batchproc.data.images import ImageFiles, claimed_size, decode_image_bytes
from batchproc.data.inputs import Manifest, printable
from batchproc.data.writers import RowWriter
from batchproc.errors import ImageTooLargeError
from batchproc.rundir.lifecycle import ExitCode
from tests.support import PY, Procs, shared_fs, write_config

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")

BOMB_SIDE = 30000  # 900 M pixels claimed: 2.7 GB as RGB if it were decoded


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (4 + seed % 3, 5, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bomb(side: int = BOMB_SIDE) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is patched to claim ``side`` x ``side``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") * 2  # height, width
    return bytes(data)


def write_bytes_name(folder: bytes, name: bytes, data: bytes) -> str:
    """A file whose name is raw bytes (not necessarily UTF-8); its path as Python lists it."""
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return os.fsdecode(path)


def hostile_folder(root: Path) -> Dict[str, List[str]]:
    """Good PNGs (one of them named in Latin-1), a JPEG bomb, an undecodable file whose name is not
    UTF-8, and a symlink back up the tree. Returns the good and the hostile paths."""
    (root / "sub").mkdir(parents=True)
    good = []
    for i in range(7):
        p = root / ("sub" if i % 2 else "") / f"img{i}.png"
        p.write_bytes(png(i))
        good.append(str(p))
    raw = os.fsencode(root)
    good.append(write_bytes_name(raw, b"caf\xe9.png", png(7)))
    (root / "bomb.jpg").write_bytes(jpeg_bomb())
    hostile = [str(root / "bomb.jpg"), write_bytes_name(raw, b"broken\xff\xfe.jpg", b"\xff\xd8 not a jpeg")]
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    return {"good": sorted(good), "hostile": sorted(hostile)}


# -- the parts, in process -----------------------------------------------------------------------


def test_non_utf8_names_are_listed_stored_exactly_and_named_printably(tmp_path):
    files = hostile_folder(tmp_path / "imgs")
    ds = ImageFiles(tmp_path / "imgs")  # the folder walk (it enters sub/loop's target once)
    assert list(ds.paths) == sorted(files["good"] + files["hostile"])
    again = Manifest.from_bytes(ds.manifest.to_bytes())
    assert list(again.paths) == list(ds.manifest.paths)  # the stored bytes read back as the same names
    latin = ds.paths.index(str(tmp_path / "imgs" / "caf\udce9.png"))
    assert os.fsencode(ds[latin]["path"]).endswith(b"/caf\xe9.png") and ds[latin]["image"].shape[0] == 3
    broken = ds.paths.index(str(tmp_path / "imgs" / "broken\udcff\udcfe.jpg"))
    assert ds.describe_sample(broken) == printable(ds.paths[broken]) == str(tmp_path / "imgs" / "broken\\xff\\xfe.jpg")
    with pytest.raises(ValueError, match=r"broken\\xff\\xfe\.jpg"):
        ds[broken]


def test_a_glob_through_symlink_loops_lists_each_file_once(tmp_path):
    files = hostile_folder(tmp_path / "imgs")
    ds = ImageFiles(f"{tmp_path}/imgs/**/*.*")
    assert list(ds.paths) == sorted(files["good"] + files["hostile"])  # was 41 times each under sub/loop
    # A second loop: Python's ** would follow the two in every order, 2**40 paths (it never ended).
    (tmp_path / "imgs" / "again").symlink_to(".", target_is_directory=True)
    assert list(ImageFiles(f"{tmp_path}/imgs/**/sub/*.png").paths) == [p for p in files["good"] if "/sub/" in p]
    # A folder reached by a link from elsewhere, as the folder walk reads it: once, by its shortest path.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "link").symlink_to(tmp_path / "imgs" / "sub", target_is_directory=True)
    assert list(ImageFiles(f"{tmp_path}/**/img1.png").paths) == [str(tmp_path / "imgs" / "sub" / "img1.png")]


@pytest.mark.parametrize("pattern", ["**/*.png", "*/**/*.png", "**/b/*.png", "**/**/*.png", "**/.*.png",
                                     "**/y.png", "**/[xy].png", "**/*", "a*/**/*"])
def test_the_glob_expansion_matches_pythons_where_there_is_no_loop(tmp_path, pattern):
    from batchproc.data.images import _glob_once

    for rel in ("x.png", "a/y.png", "a/b/z.png", "a/.w.png", ".h/q.png", "ab/b/v.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    full = f"{tmp_path}/{pattern}"
    assert sorted(set(_glob_once(full))) == sorted(set(glob.glob(full, recursive=True)) - {f"{tmp_path}/"})


def test_a_jpeg_bomb_is_refused_from_its_header(tmp_path):
    bomb = jpeg_bomb()
    assert len(bomb) < 1000 and claimed_size(bomb) == (BOMB_SIDE, BOMB_SIDE, 1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageTooLargeError, match=r"x/bomb\.jpg claims 30000x30000 pixels"):
        decode_image_bytes(bomb, "x/bomb.jpg")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing was decoded


def test_row_writer_keeps_non_utf8_strings_in_jsonl_and_names_them_for_parquet(tmp_path):
    import contextlib

    class Context:
        @contextlib.contextmanager
        def upload_path(self):
            yield tmp_path

    name = os.fsdecode(b"/data/caf\xe9.png")
    jsonl = RowWriter(Context(), "rows", format="jsonl")
    jsonl.add([{"path": name, "n": 1}, {"path": "plain é", "n": 2}])
    jsonl.flush()
    text = (tmp_path / "rows.jsonl").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    rows = [json.loads(line) for line in text.splitlines()]
    assert rows == [{"path": name, "n": 1}, {"path": "plain é", "n": 2}] and os.fsencode(rows[0]["path"]) == b"/data/caf\xe9.png"
    parquet = RowWriter(Context(), "rows", format="parquet")
    parquet.add_row({"path": "fine", "extra": ["x", name]})
    with pytest.raises(ValueError, match=r"column 'extra' of row 0 .*'/data/caf\\xe9\.png'.*format='jsonl'"):
        parquet.flush()


# -- through the launcher ------------------------------------------------------------------------


def run_example(procs: Procs, tmp_path: Path, data: str, **hparams) -> tuple:
    """The image example on 2 slots with ``max_restarts: 2`` (a replay would show); (rc, out, run dir)."""
    hp = {"data": data, "batch_size": 2, "checkpoint_interval": 2, "format": "jsonl", "num_workers": 2, **hparams}
    config = write_config(tmp_path / "exp.yaml", [], shared_fs(tmp_path / "runs"), name="hostile",
                          script="examples/classify_images.py", max_restarts=2, hparams=hp)
    done = procs.run([PY, "-m", "batchproc", "run", str(config)], timeout=300)
    return done.rc, done.out, tmp_path / "runs" / "hostile"


def first_attempt_only(out: str, run_dir: Path) -> dict:
    status = json.loads((run_dir / "status.json").read_text())
    assert out.count("classifying the images of") == 1, out  # rank 0 says it once per attempt
    assert status["restarts"] == 0, status
    return status


def test_hostile_files_are_skipped_and_named_once_each(procs, tmp_path):
    """skip: every good image output exactly once, each hostile file named once in errors.jsonl,
    exit 0 at the first attempt; loader workers started by a fork server (their parent is not the rank)."""
    files = hostile_folder(tmp_path / "imgs")
    peak_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, over every child so far
    rc, out, run_dir = run_example(procs, tmp_path, f"{tmp_path}/imgs/**/*.*", bad_samples="skip",
                                   multiprocessing_context="forkserver")
    assert rc == 0, out
    status = first_attempt_only(out, run_dir)
    assert status["state"] == "completed" and status["skipped_samples"] == 2, status
    rows = [json.loads(line) for f in sorted((run_dir / "outputs").rglob("*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(printable(p) for p in files["good"])  # each once
    assert sorted(r["index"] for r in rows) == sorted(set(r["index"] for r in rows))
    errors = [json.loads(line) for line in (run_dir / "errors.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(errors) == 2, errors
    for path in files["hostile"]:
        assert sum(printable(path) in e["sample"] for e in errors) == 1, (path, errors)
    bomb = next(e for e in errors if "bomb.jpg" in e["sample"])
    assert "ImageTooLargeError" in bomb["error"] and "claims 30000x30000" in bomb["error"], bomb
    # Every process of the job has been waited for: had a loader worker decoded the bomb, the
    # largest of them would have held 2.7 GB (telling only if no earlier child of this pytest
    # process came near that).
    if peak_before < 1_500_000:
        assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2_000_000, "a process of the job peaked over 2 GB"


@pytest.mark.parametrize("hostile", ["bomb", "name"])
def test_a_hostile_file_fails_raise_at_the_first_attempt_naming_it(procs, tmp_path, hostile):
    """raise: the job fails at once naming the file, and torchrun does not replay it (max_restarts: 2);
    loader workers started by spawn."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(6):
        (root / f"img{i}.png").write_bytes(png(i))
    if hostile == "bomb":
        (root / "bomb.jpg").write_bytes(jpeg_bomb())
        named = str(root / "bomb.jpg")
    else:
        named = printable(write_bytes_name(os.fsencode(root), b"broken\xff.png", b"\x89PNG\r\n\x1a\n cut short"))
    (root / "loop").symlink_to(root, target_is_directory=True)
    rc, out, run_dir = run_example(procs, tmp_path, str(root), bad_samples="raise", multiprocessing_context="spawn")
    assert rc == ExitCode.FAILED, out
    status = first_attempt_only(out, run_dir)
    assert status["state"] == "failed", status
    assert "BadSampleError: loading sample" in out and named in out, out
