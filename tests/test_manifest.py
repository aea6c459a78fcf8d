"""Inputs frozen at the first attempt (batchproc.data.inputs) through real runs, on local disk and on S3.

Between a preempted attempt and its resume, files are added, removed and replaced, keeping the
count or changing it: every file of the original listing is output exactly once, with its original
content, or named in errors.jsonl; files added later are never output. The listing happens once
per run, counted on a real S3 server (moto's) as the ListObjectsV2 requests it receives.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs

import numpy as np
import pytest
import torch
from PIL import Image

from batchproc import torch_batch_process
from batchproc.errors import BadSampleError, FingerprintMismatchError, InputSourceMismatchError
from batchproc.data.images import ImageFiles
from batchproc.data.inputs import MANIFEST_FILE, Manifest, StringColumn, freeze_inputs
from batchproc.rundir.storage import RunDir
from batchproc.data.writers import read_rows

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "scripts" / "images_job.py"
_spec = importlib.util.spec_from_file_location("images_job", JOB)
assert _spec and _spec.loader
images_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(images_job)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An in-process job is a world of one with no launcher settings."""
    for k in list(os.environ):
        if k.startswith("BATCHPROC_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                "TORCHELASTIC_RESTART_COUNT"):
            monkeypatch.delenv(k)
    return monkeypatch


def bmp(seed: int, side: int = 4) -> bytes:
    """A small BMP: its size depends on ``side`` only, so a replacement can keep the size."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "BMP")
    return buf.getvalue()


def pixel_digest(data: bytes) -> int:
    from batchproc.data.images import decode_image_bytes

    return images_job.digest(decode_image_bytes(data))


# -- the manifest itself -----------------------------------------------------------------------


def test_manifest_is_columnar_and_round_trips() -> None:
    n = 1000
    paths = [f"n{i % 7:08d}-class/img_{i:06d}.jpg" for i in range(n)]
    m = Manifest.build("s3://bucket/x", paths, sizes=range(n), versions=[i * 3 + 1 for i in range(n)],
                       labels=[i % 7 for i in range(n)], classes=[f"c{i}" for i in range(7)], root="bucket/x",
                       version_kind="etag")
    # Arrays only: a forked loader worker reading entries touches no per-entry Python object.
    assert isinstance(m.paths, StringColumn) and m.paths.data.dtype == np.uint8
    assert (m.paths.offsets.dtype, m.sizes.dtype, m.versions.dtype, m.labels.dtype) == (np.int64, np.int64, np.int64, np.int32)
    blob = m.to_bytes()
    back = Manifest.from_bytes(blob)
    assert back.paths == paths and back.paths == m.paths and back.source == "s3://bucket/x"
    assert back.path(5) == "bucket/x/" + paths[5] and back.classes == m.classes and back.version_kind == "etag"
    assert np.array_equal(back.sizes, m.sizes) and np.array_equal(back.versions, m.versions)
    assert np.array_equal(back.labels, m.labels)
    assert len(blob) < m.nbytes / 3  # stored compressed
    with pytest.raises(ValueError, match="run/x.npz is not a readable batchproc manifest"):
        Manifest.from_bytes(blob[: len(blob) // 2], "run/x.npz")


# -- local folders changed between attempts ------------------------------------------------------

ORIGINAL = [f"img{i:03d}.bmp" for i in range(0, 40, 2)]  # 20 files; odd numbers sort in between
# batch_size 2, preempted after step 3: batches 0-3 (img000..img014) are committed, the rest are not.
DONE, NOT_DONE = ORIGINAL[:8], ORIGINAL[8:]

# name -> (files written or replaced, files removed, whether the count stays, files that must be bad)
CHANGES: Dict[str, Tuple[Dict[str, bytes], List[str], bool, List[str]]] = {
    "add": ({"img001.bmp": bmp(101), "img003.bmp": bmp(103), "img099.bmp": bmp(199)}, [], False, []),
    "add-keeping-count": ({"img001.bmp": bmp(101), "img003.bmp": bmp(103)}, ["img030.bmp", "img032.bmp"], True,
                          ["img030.bmp", "img032.bmp"]),
    "remove": ({}, ["img000.bmp", "img020.bmp", "img022.bmp"], False, ["img020.bmp", "img022.bmp"]),
    "remove-keeping-count": ({"img021.bmp": bmp(121), "img023.bmp": bmp(123)}, ["img020.bmp", "img022.bmp"], True,
                             ["img020.bmp", "img022.bmp"]),
    "replace": ({"img002.bmp": bmp(202), "img024.bmp": bmp(224), "img026.bmp": bmp(226)}, [], True,
                ["img024.bmp", "img026.bmp"]),  # same sizes: caught by the version (mtime, ETag)
    "replace-changing-count": ({"img024.bmp": bmp(224, side=6), "img099.bmp": bmp(199)}, [], False, ["img024.bmp"]),
}


def write_files(root: Path, files: Dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)


def original_files() -> Dict[str, bytes]:
    return {name: bmp(i) for i, name in enumerate(ORIGINAL)}


def run_job(source: str, storage: str, *, stop_at: Optional[int] = None, bad_samples: str = "skip",
            num_workers: int = 0, env: Optional[pytest.MonkeyPatch] = None) -> Any:
    if env is not None:
        if stop_at is None:
            env.delenv("BATCHPROC_FAULT", raising=False)
        else:
            env.setenv("BATCHPROC_FAULT", f"stop@step={stop_at}")
    return torch_batch_process(images_job.Rows, ImageFiles(source), batch_size=2, checkpoint_interval=100,
                               storage=storage, bad_samples=bad_samples,
                               dataloader_kwargs={"num_workers": num_workers})


def check_exactly_once(run_url: str, url_of: Callable[[str], str], originals: Dict[str, bytes],
                       bad: List[str], errors: List[Dict[str, Any]]) -> None:
    """Every original file output once with its original pixels, or named in errors.jsonl."""
    rows = list(read_rows(run_url))
    by_path = collections.Counter(r["path"] for r in rows)
    assert all(c == 1 for c in by_path.values()), by_path
    assert [r["index"] for r in sorted(rows, key=lambda r: r["index"])] == \
        [i for i, name in enumerate(ORIGINAL) if name not in bad]
    for r in rows:
        name = ORIGINAL[r["index"]]
        assert r["path"] == url_of(name) and r["digest"] == pixel_digest(originals[name]), r
    named = sorted(e["index"] for e in errors)
    assert named == [ORIGINAL.index(b) for b in bad]
    for e in errors:
        assert url_of(ORIGINAL[e["index"]]) in e["sample"] and "InputChangedError" in e["error"], e


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_local_folder_changed_between_attempts(tmp_path: Path, clean_env: pytest.MonkeyPatch, change: str) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    originals = original_files()
    write_files(data, originals)
    first = run_job(str(data), str(run), stop_at=3, env=clean_env)
    assert first.preempted and first.steps_completed == 4
    added, removed, keeps_count, bad = CHANGES[change]
    write_files(data, added)
    for name in removed:
        (data / name).unlink()
    assert (len(list(data.iterdir())) == len(ORIGINAL)) == keeps_count
    second = run_job(str(data), str(run), env=clean_env)
    assert second.completed and second.total_batches == 10
    errors_file = run / "errors.jsonl"
    errors = [json.loads(l) for l in errors_file.read_text().splitlines()] if errors_file.exists() else []
    check_exactly_once(str(run), lambda name: str(data / name), originals, bad, errors)


def test_a_changed_file_under_raise_is_an_error_naming_it(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    write_files(data, original_files())
    assert run_job(str(data), str(run), stop_at=0, bad_samples="raise", env=clean_env).preempted
    (data / "img030.bmp").unlink()
    with pytest.raises(BadSampleError, match=r"img030\.bmp.*is gone.*frozen"):
        run_job(str(data), str(run), bad_samples="raise", env=clean_env)


def test_a_deleted_manifest_is_listed_again_only_if_nothing_changed(tmp_path: Path,
                                                                     clean_env: pytest.MonkeyPatch) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    write_files(data, original_files())
    assert run_job(str(data), str(run), stop_at=0, env=clean_env).preempted
    (run / "inputs" / "manifest.npz").unlink()
    (data / "img030.bmp").rename(tmp_path / "aside.bmp")
    with pytest.raises(FileNotFoundError, match=r"froze 20 inputs .* manifest inputs/manifest\.npz is gone"):
        run_job(str(data), str(run), env=clean_env)
    (tmp_path / "aside.bmp").rename(data / "img030.bmp")  # back, as it was (a rename keeps its mtime)
    assert run_job(str(data), str(run), env=clean_env).completed  # the same listing stands in for it
    assert sorted(r["path"] for r in read_rows(str(run))) == [str(data / n) for n in ORIGINAL]


def test_another_source_is_an_error_naming_both_until_fresh(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    a, b, run = tmp_path / "a", tmp_path / "b", tmp_path / "run"
    write_files(a, original_files())
    write_files(b, original_files())  # the same files elsewhere: still another source
    assert run_job(str(a), str(run), stop_at=0, env=clean_env).preempted
    with pytest.raises(InputSourceMismatchError) as info:
        run_job(str(b), str(run), env=clean_env)
    assert str(a) in str(info.value) and str(b) in str(info.value) and "--fresh" in str(info.value)
    assert isinstance(info.value, FingerprintMismatchError)
    RunDir(str(run)).remove_all()  # what `batchproc run --fresh` does
    assert run_job(str(b), str(run), env=clean_env).completed
    assert sorted(r["path"] for r in read_rows(str(run))) == [str(b / n) for n in ORIGINAL]


class Squares(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A dataset without the protocol, optionally with a content fingerprint."""

    def __init__(self, n: int, version: Optional[str]) -> None:
        self.n, self.version = n, version
        if version is not None:
            self.batchproc_fingerprint = lambda: version

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_datasets_without_the_protocol_keep_length_and_content_fingerprint(tmp_path: Path) -> None:
    from batchproc.engine.checkpoint import Fingerprint, check_fingerprint
    from batchproc.distributed import WorkerEnv

    env = WorkerEnv(0, 1, 0, 1, torch.device("cpu"), 0)
    run_dir = RunDir(str(tmp_path / "run"))

    def fingerprint(ds: Squares) -> Fingerprint:
        return Fingerprint(ds.n, 2, None, 5, inputs=freeze_inputs(ds, run_dir, env).get("inputs"))

    check_fingerprint(run_dir, fingerprint(Squares(10, "v1")))
    check_fingerprint(run_dir, fingerprint(Squares(10, "v1")))
    with pytest.raises(FingerprintMismatchError, match="batchproc_fingerprint.*'v1'.*'v2'"):
        check_fingerprint(run_dir, fingerprint(Squares(10, "v2")))
    other = RunDir(str(tmp_path / "plain"))
    check_fingerprint(other, Fingerprint(10, 2, None, 5))  # before inputs were recorded
    check_fingerprint(other, fingerprint(Squares(10, None)))
    check_fingerprint(other, fingerprint(Squares(10, "v1")))  # nothing recorded to compare: length only
    assert not run_dir.exists(MANIFEST_FILE)


# -- on S3 (moto's server), listings counted on the server ----------------------------------------


class CountingS3Server:
    """Another moto S3 server in this process (so it serves the buckets of the ``s3_server``
    fixture's), whose WSGI app records every request it answers: (method, path, prefix, status)."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.requests: List[Tuple[str, str, str, int]] = []
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ: Dict[str, Any], start_response: Any) -> Any:
            query = parse_qs(environ.get("QUERY_STRING", ""))
            method = environ["REQUEST_METHOD"] + (":list" if "list-type" in query else "")
            prefix = query.get("prefix", [""])[0]

            def record(status: str, headers: Any, *args: Any) -> Any:
                self.requests.append((method, environ.get("PATH_INFO", ""), prefix, int(status.split()[0])))
                return start_response(status, headers, *args)

            return app(environ, record)

        self.server = make_server("127.0.0.1", 0, counting, True, request_handler=MotoRequestHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def lists_of(self, bucket: str, prefix: str) -> int:
        """ListObjects(V2) pages served for keys under ``prefix``."""
        return sum(1 for m, path, p, _ in self.requests if m == "GET:list" and path.strip("/") == bucket and p.startswith(prefix))

    def reads_of(self, path_suffix: str) -> int:
        """Successful GETs of an object whose path ends with ``path_suffix``."""
        return sum(1 for m, path, _, status in self.requests if m == "GET" and path.endswith(path_suffix) and status == 200)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()


@pytest.fixture
def counting_s3(s3_server: Dict[str, Any]) -> Iterator[CountingS3Server]:
    server = CountingS3Server()
    yield server
    server.stop()


def s3fs_on(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})


def put_files(fs: Any, base: str, files: Dict[str, bytes]) -> None:
    fs.pipe({f"{base}/{name}": data for name, data in files.items()})


@pytest.mark.parametrize("change", ["add-keeping-count", "replace"])
def test_s3_prefix_changed_between_attempts(tmp_path: Path, clean_env: pytest.MonkeyPatch, s3_server: Dict[str, Any],
                                            s3_bucket: str, change: str) -> None:
    """The same as on local disk, with the images on S3 (replacements keep their size: the ETag
    tells them) and one loader worker (its own s3fs client, fetching ahead)."""
    fs = s3fs_on(s3_server["endpoint"])
    base = f"{s3_bucket}/data"
    originals = original_files()
    put_files(fs, base, originals)
    run = str(tmp_path / "run")
    assert run_job(base, run, stop_at=3, env=clean_env).preempted
    added, removed, _, bad = CHANGES[change]
    put_files(fs, base, added)
    if removed:
        fs.rm([f"{base}/{name}" for name in removed])
    assert run_job(base, run, num_workers=1, env=clean_env).completed
    errors_file = Path(run) / "errors.jsonl"
    errors = [json.loads(l) for l in errors_file.read_text().splitlines()] if errors_file.exists() else []
    check_exactly_once(run, lambda name: f"{base}/{name}", originals, bad, errors)


def test_s3_listing_happens_once_per_run_across_ranks_and_attempts(procs: Any, s3_server: Dict[str, Any], s3_bucket: str,
                                                                   counting_s3: CountingS3Server) -> None:
    """2 ranks through the real launcher, preempted, then resumed by one process; images and the
    run directory on S3. Only rank 0 of the first attempt lists; every other rank of every
    attempt reads the manifest (once)."""
    bucket = s3_bucket.split("://", 1)[1]
    fs = s3fs_on(s3_server["endpoint"])
    files = {f"c{i % 2}/{name}": data for i, (name, data) in enumerate(original_files().items())}
    put_files(fs, f"{s3_bucket}/imgs", files)
    run = f"{s3_bucket}/run"
    env = dict(s3_server["env"], AWS_ENDPOINT_URL=counting_s3.endpoint)
    args = [str(JOB), f"{s3_bucket}/imgs", run, "2", "100"]
    first = procs.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "--max-restarts=0", "--monitor-interval=0.2", *args],
                      env=dict(env, BATCHPROC_FAULT="stop@step=1"), timeout=120)
    assert first.rc == 0 and '"preempted": true' in first.out, first.out
    assert counting_s3.lists_of(bucket, "imgs") == 1
    assert counting_s3.reads_of(MANIFEST_FILE) == 1  # rank 1 read what rank 0 listed and wrote
    put_files(fs, f"{s3_bucket}/imgs", {"c0/img001.bmp": bmp(101), "c2/img100.bmp": bmp(300)})  # not part of the run
    second = procs.run([sys.executable, *args], env=env, timeout=120)  # an elastic resume: 1 process
    assert second.rc == 0 and '"completed": true' in second.out, second.out
    assert counting_s3.lists_of(bucket, "imgs") == 1  # still the first attempt's listing, and nothing since
    assert counting_s3.reads_of(MANIFEST_FILE) == 2
    rows = list(read_rows(run))
    assert sorted(r["path"] for r in rows) == sorted(f"{s3_bucket}/imgs/{name}" for name in files)
    assert sorted(r["index"] for r in rows) == list(range(len(files)))
    manifest = Manifest.from_bytes(fs.cat_file(f"{run}/{MANIFEST_FILE}"))
    assert manifest.classes == ("c0", "c1") and manifest.source == f"{s3_bucket}/imgs"


# -- the loader's batch path: per-sample failures, read-ahead hints ------------------------------


class Recording(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Items are their index; index 13 fails; records the read-ahead hints it gets."""

    def __init__(self) -> None:
        self.hints: List[List[int]] = []

    def __len__(self) -> int:
        return 100

    def __getitem__(self, i: int) -> int:
        if i == 13:
            raise ValueError("thirteen")
        return i

    def prefetch(self, indices: List[int]) -> None:
        self.hints.append(list(indices))

    def load_samples(self, indices: List[int]) -> List[Any]:
        return [ValueError("thirteen") if i == 13 else i for i in indices]


def test_a_batch_loads_at_once_with_per_sample_failures_and_hints_the_next_batches() -> None:
    from batchproc.engine.loader import _Bad, _IndexedDataset
    from batchproc.engine.policy import SkipPolicy
    from batchproc.engine.sharding import RankBatchSampler

    ds = Recording()
    sampler = RankBatchSampler(100, 10, 10, 0, 2, 1)  # rank 1 of 2: global batches 1, 3, 5, 7, 9
    wrapped = _IndexedDataset(ds, SkipPolicy("skip"), sampler)
    out = wrapped.__getitems__(list(range(10, 20)))  # batch 1, in the main process (no workers)
    assert [i for i, _ in out] == list(range(10, 20))
    assert isinstance(out[3][1], _Bad) and "thirteen" in out[3][1].error and not out[3][1].trace
    assert [s for _, s in out if not isinstance(s, _Bad)] == [10, 11, 12, 14, 15, 16, 17, 18, 19]
    # this batch, then the two this process loads next (global batches 3 and 5)
    assert ds.hints == [list(range(10, 20)) + list(range(30, 40)) + list(range(50, 60))]
    wrapped.__getitems__(list(range(90, 100)))  # the last batch: nothing after it
    assert ds.hints[-1] == list(range(90, 100))
    raising = _IndexedDataset(ds, SkipPolicy("raise"), sampler)
    assert raising.__getitems__([13])[0][1].trace.count("ValueError: thirteen") == 1  # kept for "raise"
