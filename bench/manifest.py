"""Rows m and s of ``python -m bench``: frozen inputs at scale, and reading images from S3.

Row m (the manifest, ``batchproc.inputs``):
  * listing 100k objects on moto's S3 server, against ``s3fs.find`` (what ``ImageFiles`` called
    before), and writing / reading their manifest in a run directory on the same server;
  * time to the first batch of a resume at 90% against one at 10%, with that 100k manifest;
  * peak RSS of a rank and of its loader workers with a 1M-entry manifest against a 1k one
    (the workers read every entry, as a worker holding Python lists would copy them).
Row s (the data path, ``ImageFiles`` on S3): the data path alone (decode + standard transform,
no model, default settings) from S3 at 0 ms and at +20 ms per request
(``../shared/bench/latency_proxy.py``) against local disk, with moto's own CPU time; and the
shipped example with ResNet-18 at +20 ms against local disk.

moto runs in a child process (so its CPU time is its own), filled in-process (100k PUTs over
HTTP would take minutes). Sub-commands of ``python -m bench.manifest`` are the measured
processes: ``serve``, ``listing``, ``resume``, ``rss``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from batchproc.settings import cpu_count

T_PROCESS = time.time()
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
LATENCY_PROXY = Path(os.environ.get("BENCH_LATENCY_PROXY", ROOT.parent / "shared" / "bench" / "latency_proxy.py"))
CLASSES = 120  # Stanford Dogs' class count, for realistic keys: n02085620-breed017/n02085620_0012345.jpg


def synthetic_key(i: int) -> str:
    c = i % CLASSES
    return f"n{2085620 + c:08d}-breed{c:03d}/n{2085620 + c:08d}_{i:07d}.jpg"


def tiny_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children: none here)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- servers ----------------------------------------------------------------------------------


class Moto:
    """moto's S3 server in a child process: ``objects`` are ``bucket/prefix:N`` (N tiny JPEGs under
    synthetic keys), ``folders`` are ``bucket/prefix=DIR`` (DIR's files, as they are)."""

    def __init__(self, objects: List[str] = (), folders: List[str] = ()) -> None:  # type: ignore[assignment]
        self.port = free_port()
        args = [a for o in objects for a in ("--objects", o)] + [a for f in folders for a in ("--folder", f)]
        self.proc = subprocess.Popen([PY, "-m", "bench.manifest", "serve", "--port", str(self.port), *args],
                                     cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"moto server did not start: {line!r}")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: Optional[str] = None) -> Dict[str, str]:
        return dict(CREDENTIALS, AWS_ENDPOINT_URL=endpoint or self.endpoint)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


class LatencyProxy:
    """The shared latency proxy between a client and ``upstream_port``: +``delay_ms`` per request."""

    def __init__(self, upstream_port: int, delay_ms: float) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([PY, str(LATENCY_PROXY), str(self.port), str(upstream_port), str(delay_ms)],
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "proxy 127.0.0.1:... -> ..." once it listens
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def serve(port: int, objects: List[str], folders: List[str]) -> None:
    import logging

    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]

    def bucket(name: str) -> None:
        if name not in backend.buckets:
            backend.create_bucket(name, "us-east-1")

    data = tiny_jpeg()
    for spec in objects:
        where, n = spec.rsplit(":", 1)
        name, _, prefix = where.partition("/")
        bucket(name)
        for i in range(int(n)):
            backend.put_object(name, f"{prefix}/{synthetic_key(i)}", data)
    for spec in folders:
        where, folder = spec.split("=", 1)
        name, _, prefix = where.partition("/")
        bucket(name)
        for dirpath, _, files in os.walk(folder):
            for f in files:
                if not f.startswith("."):
                    rel = os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/")
                    backend.put_object(name, f"{prefix}/{rel}", Path(dirpath, f).read_bytes())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    print("READY", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


# -- measured processes -----------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cmd_listing(source: str, storage: str, baseline: bool) -> Dict[str, Any]:
    """List ``source`` once: ours (and write/read its manifest), or s3fs's ``find`` (the old way)."""
    import fsspec

    from batchproc.images import ImageFiles
    from batchproc.inputs import MANIFEST_FILE, read_manifest
    from batchproc.rundir.storage import RunDir

    before = peak_rss_mb()
    t0 = time.time()
    if baseline:
        fs, root = fsspec.core.url_to_fs(source)
        n = len(fs.find(root))  # what ImageFiles did; s3fs keeps every info dict in its listings cache
        return {"list_s": time.time() - t0, "entries": n, "rss_mb": peak_rss_mb() - before}
    manifest = ImageFiles(source).batchproc_list_inputs()
    t1 = time.time()
    blob = manifest.to_bytes()
    run_dir = RunDir(storage)
    run_dir.write_atomic(MANIFEST_FILE, blob)
    t2 = time.time()
    back = read_manifest(run_dir)
    t3 = time.time()
    assert len(back) == len(manifest)
    return {"list_s": t1 - t0, "write_s": t2 - t1, "read_s": t3 - t2, "entries": len(manifest),
            "bytes": len(blob), "nbytes": manifest.nbytes, "rss_mb": peak_rss_mb() - before}


def cmd_resume(source: str, storage: str, cheap: bool) -> Dict[str, Any]:
    """One attempt over ``source`` (stop it with ``BATCHPROC_FAULT``). ``cheap``: samples are not
    fetched (to reach 90% of 100k images quickly); the manifest path is the real one."""
    import torch
    from torchvision.transforms import v2

    from batchproc import TorchBatchProcessor, torch_batch_process
    from batchproc.images import ImageFiles

    marks: Dict[str, float] = {}

    class Cheap(ImageFiles):
        def prefetch(self, indices: Any) -> None:
            pass

        def load_samples(self, indices: Any) -> List[Any]:
            return [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "label": int(self.manifest.labels[i]),
                     "path": ""} for i in indices]

    class FirstBatch(TorchBatchProcessor):
        def process_batch(self, batch: Any, batch_idx: int) -> None:
            marks.setdefault("first_batch", time.time())

    ds = (Cheap if cheap else ImageFiles)(source, transform=v2.Resize((8, 8), antialias=True))
    start = time.time()
    result = torch_batch_process(FirstBatch, ds, batch_size=32, checkpoint_interval=10**6, storage=storage,
                                 dataloader_kwargs={"num_workers": 0} if cheap else None)
    return {"process_start": T_PROCESS, "start": start, "first_batch": marks.get("first_batch"),
            "watermark": result.steps_completed, "total": result.total_batches}


def _children(pid: int) -> List[int]:
    out: List[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _memory(pid: int) -> Dict[str, float]:
    """Peak RSS (VmHWM), and now: private (USS) and proportional (PSS) memory, in MiB."""
    out = {"hwm_mb": 0.0, "private_mb": 0.0, "pss_mb": 0.0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["hwm_mb"] = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Private_Clean", "Private_Dirty"):
                out["private_mb"] += int(rest.split()[0]) / 1024
            elif key == "Pss":
                out["pss_mb"] = int(rest.split()[0]) / 1024
    return out


def _touch_every_entry(worker_id: int) -> None:
    """A loader worker reads every entry of the manifest (paths, labels, sizes)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    assert info is not None
    ds = info.dataset.dataset  # type: ignore[attr-defined]  # batchproc's wrapper, then ImageFiles
    total = sum(len(p) for p in ds.paths) + sum(ds.labels) + int(ds.manifest.sizes.sum())
    assert total > 0
    # Measured here, before any batch: what the manifest costs a worker, without images in flight.
    with open(os.path.join(os.environ["BENCH_RSS_DIR"], f"worker{worker_id}.json"), "w") as f:
        json.dump(_memory(os.getpid()), f)


def watched_run(ds: Any, storage: str, batch_size: int, touch: Callable[[int], None]) -> Dict[str, Any]:
    """2 batches of ``ds`` (run directory ``storage``) through torch_batch_process with 2 loader workers (``touch`` their
    ``worker_init_fn``, writing its own measure to ``$BENCH_RSS_DIR/worker<id>.json``): peak
    memory of this rank and of its workers, and the workers' own measures."""
    from batchproc import TorchBatchProcessor, torch_batch_process

    workers: Dict[int, Dict[str, float]] = {}

    class Watch(TorchBatchProcessor):
        def process_batch(self, batch: Any, batch_idx: int) -> None:
            for pid in _children(os.getpid()):
                try:
                    m = _memory(pid)
                except OSError:
                    continue
                seen = workers.setdefault(pid, m)
                for k, v in m.items():
                    seen[k] = max(seen[k], v)

    os.environ["BENCH_RSS_DIR"] = tempfile.mkdtemp(prefix="bench-rss-workers-")
    result = torch_batch_process(Watch, ds, batch_size=batch_size, max_batches=2, storage=storage,
                                 dataloader_kwargs={"num_workers": 2, "worker_init_fn": touch, "prefetch_factor": 1})
    after_touch = [json.loads(p.read_text()) for p in sorted(Path(os.environ["BENCH_RSS_DIR"]).glob("worker*.json"))]
    shutil.rmtree(os.environ["BENCH_RSS_DIR"], ignore_errors=True)
    return {"entries": len(ds), "rank": _memory(os.getpid()), "workers": list(workers.values()),
            "workers_after_touch": after_touch, "completed": result.completed}


def cmd_rss(source: str, storage: str) -> Dict[str, Any]:
    """2 batches of the data path over a run whose manifest the driver wrote; peak memory of this
    rank and of its 2 loader workers (each reads every manifest entry first)."""
    from batchproc.images import ImageFiles, standard_preprocess

    return watched_run(ImageFiles(source, transform=standard_preprocess()), storage, 32, _touch_every_entry)


def memory_rows(table: Any, row: str, label: str, many: List[Dict[str, Any]], few: List[Dict[str, Any]],
                touched: str, compare: Callable[..., float], med: Callable[[List[float]], float]) -> None:
    """The rows of :func:`watched_run`'s measures, ``many`` against ``few`` (the target is on the
    difference, not the ratio: at most 100 MiB more)."""
    picks: List[Tuple[str, Callable[[Dict[str, Any]], float]]] = [
        ("rank peak RSS", lambda r: float(r["rank"]["hwm_mb"])),
        ("loader worker peak RSS", lambda r: max(float(w["hwm_mb"]) for w in r["workers"])),
        (f"loader worker private memory (USS) after {touched}",
         lambda r: max(float(w["private_mb"]) for w in r["workers_after_touch"]))]
    for what, pick in picks:
        ours, base = [pick(r) for r in many], [pick(r) for r in few]
        diff = med(ours) - med(base)

        def within(_ratio: float, d: float = diff) -> bool:
            return d <= 100

        compare(table, row, f"{what}, {label} (MiB; {diff:+.0f} MiB)", ours, base, "<= +100 MiB", within, "{:.0f}")


# -- the driver (called by python -m bench) ---------------------------------------------------


def measure(module: str, sub: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 900) -> Dict[str, Any]:
    """Run ``python -m MODULE SUB...`` in a fresh process (2 threads, no batchproc or torchrun
    variables of ours); its JSON result, from its last ``RESULT`` line."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPROC_", "TORCHELASTIC_"))}
    full.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    full.update(env or {})
    out = subprocess.run([PY, "-m", module, *sub], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=timeout)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{module} {sub} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])  # type: ignore[no-any-return]


def _measure(sub: List[str], env: Dict[str, str], timeout: float = 900) -> Dict[str, Any]:
    return measure("bench.manifest", sub, env, timeout)


def _synthetic_manifest(data: str, entries: int) -> Any:
    """The real files of ``data`` first (the only ones read), then synthetic keys up to ``entries``."""
    import numpy as np

    from batchproc.images import ImageFiles
    from batchproc.inputs import Manifest

    real = ImageFiles(data).batchproc_list_inputs()
    k = len(real)
    paths = list(real.paths) + [synthetic_key(i) for i in range(k, entries)]
    classes = sorted(set(real.classes) | {synthetic_key(i).split("/")[0] for i in range(min(entries, k + CLASSES))})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.concatenate([np.asarray([index[real.classes[l]] for l in real.labels], dtype=np.int32),
                             np.asarray([index[synthetic_key(i).split("/")[0]] for i in range(k, entries)], dtype=np.int32)])
    sizes = np.concatenate([real.sizes, np.full(entries - k, 60_000, dtype=np.int64)])
    versions = np.concatenate([real.versions, np.arange(k, entries, dtype=np.int64) + 1])
    return Manifest.build(real.source, paths, sizes=sizes, versions=versions, labels=labels, classes=classes,
                          root=real.root, version_kind=real.version_kind)


def manifest_rows(table: Any, runs: int, jpegs: str, compare: Callable[..., float],
                  alternate: Callable[..., Tuple[List[Any], List[Any]]], med: Callable[[List[float]], float]) -> str:
    """Row m; returns its notes. ``BENCH_MANIFEST_PARTS`` (``list,resume,rss``) picks its parts."""
    n = int(os.environ.get("BENCH_MANIFEST_OBJECTS", "100000"))
    parts = os.environ.get("BENCH_MANIFEST_PARTS", "list,resume,rss").split(",")
    notes: List[str] = []
    if "list" in parts or "resume" in parts:
        t0 = time.time()
        moto = Moto(objects=[f"bench/objs:{n}"])
        fill_s = time.time() - t0
        try:
            if "list" in parts:
                _listing_rows(table, n, runs, moto, fill_s, compare, med, notes)
            if "resume" in parts:
                _resume_rows(table, n, runs, moto, compare, alternate, notes)
        finally:
            moto.stop()
    if "rss" in parts:
        _rss_rows(table, runs, jpegs, compare, alternate, med, notes)
    return "\n\n".join(notes)


def _listing_rows(table: Any, n: int, runs: int, moto: Moto, fill_s: float, compare: Callable[..., float],
                  med: Callable[[List[float]], float], notes: List[str]) -> None:
    """Listing, writing and reading the manifest of ``n`` objects; s3fs's ``find`` as the baseline."""
    env = moto.env()
    lists: List[Dict[str, Any]] = []
    finds: List[Dict[str, Any]] = []
    cpu: List[float] = []
    for r in range(max(1, runs // 2 + 1)):
        c0 = moto.cpu_s()
        lists.append(_measure(["listing", "--source", "s3://bench/objs", "--storage", f"s3://bench/runs/list{r}"], env))
        cpu.append(moto.cpu_s() - c0)
        finds.append(_measure(["listing", "--source", "s3://bench/objs", "--storage", "-", "--baseline"], env))
    compare(table, "m", f"list {n // 1000}k S3 objects: ImageFiles vs s3fs.find (s)", [l["list_s"] for l in lists],
            [f["list_s"] for f in finds], "(info)", None, "{:.2f}")
    compare(table, "m", f"peak RSS growth of the listing process, {n // 1000}k objects (MiB)",
            [l["rss_mb"] for l in lists], [f["rss_mb"] for f in finds], "(info)", None, "{:.0f}")
    compare(table, "m", f"read the run's manifest vs list again, {n // 1000}k objects (s)",
            [l["read_s"] for l in lists], [l["list_s"] for l in lists], "(info)", None, "{:.3f}")
    m = lists[0]
    notes.append(f"Row m, the manifest of {m['entries']:,} objects: {m['bytes'] / 2**20:.2f} MiB stored "
                 f"(compressed .npz), {m['nbytes'] / 2**20:.1f} MiB in memory (columns). Listing: "
                 f"{med([l['list_s'] for l in lists]):.2f} s ({-(-m['entries'] // 1000)} LIST pages), of which "
                 f"moto's own CPU {med(cpu):.2f} s; writing it to the run directory on S3 "
                 f"{med([l['write_s'] for l in lists]):.3f} s, reading it back {med([l['read_s'] for l in lists]):.3f} s. "
                 f"moto sorts the whole bucket for every LIST page, so its listing cost grows with the square of "
                 f"the count; S3 pages in 50-100 ms each. Filling moto with {n:,} objects took {fill_s:.0f} s.")


def _resume_rows(table: Any, n: int, runs: int, moto: Moto, compare: Callable[..., float],
                 alternate: Callable[..., Tuple[List[Any], List[Any]]], notes: List[str]) -> None:
    """Time to the first batch of a resume at 10% and at 90% of ``n`` objects."""
    from batchproc.inputs import MANIFEST_FILE
    from batchproc.rundir.storage import RunDir

    env = moto.env()
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto.endpoint}}
    listed = RunDir("s3://bench/runs/list0", opts)
    if not listed.exists(MANIFEST_FILE):  # the listing part did not run: one listing, unmeasured
        _measure(["listing", "--source", "s3://bench/objs", "--storage", "s3://bench/runs/list0"], env)
    total = -(-n // 32)
    runs_at = {}
    for pct in (10, 90):
        url = f"s3://bench/runs/resume{pct}"
        # This source's manifest, as listed above: the first attempts start from a copy instead of
        # listing again (a listing on moto takes minutes; its cost is the listing row's).
        RunDir(url, opts).write_atomic(MANIFEST_FILE, listed.read_bytes(MANIFEST_FILE))
        first = _measure(["resume", "--source", "s3://bench/objs", "--storage", url, "--cheap"],
                         dict(env, BATCHPROC_FAULT=f"stop@step={total * pct // 100 - 1}"))
        assert first["watermark"] == total * pct // 100, first
        runs_at[pct] = url

    def resume(pct: int) -> Tuple[float, float]:
        r = _measure(["resume", "--source", "s3://bench/objs", "--storage", runs_at[pct]],
                     dict(env, BATCHPROC_FAULT="stop@step=0"))
        return r["first_batch"] - r["process_start"], r["first_batch"] - r["start"]

    r10, r90 = alternate(lambda: resume(10), lambda: resume(90), runs)
    for i, what in ((0, "process start"), (1, "torch_batch_process()")):
        compare(table, "m", f"{what} to first batch, {n // 1000}k-object manifest on S3, resume at 90% vs 10% (s)",
                [r[i] for r in r90], [r[i] for r in r10], "<= 1.1", lambda x: x <= 1.1, "{:.3f}")
    notes.append("Row m, resumes (torch_batch_process() to first batch, s), pairs 10% / 90%: " +
                 ", ".join(f"{a[1]:.2f} / {b[1]:.2f}" for a, b in zip(r10, r90)))


def _rss_rows(table: Any, runs: int, jpegs: str, compare: Callable[..., float],
              alternate: Callable[..., Tuple[List[Any], List[Any]]], med: Callable[[List[float]], float],
              notes: List[str]) -> None:
    """Peak memory of a rank and its loader workers: a 1M-entry manifest against a 1k one."""
    from batchproc.inputs import MANIFEST_FILE
    from batchproc.rundir.storage import RunDir

    def rss(entries: int) -> Dict[str, Any]:
        store = tempfile.mkdtemp(prefix="bench-rss-")
        RunDir(store).write_atomic(MANIFEST_FILE, _synthetic_manifest(jpegs, entries).to_bytes())
        try:
            return _measure(["rss", "--source", jpegs, "--storage", store], {})
        finally:
            shutil.rmtree(store, ignore_errors=True)

    big_n = int(os.environ.get("BENCH_MANIFEST_BIG", "1000000"))
    small, big = alternate(lambda: rss(1000), lambda: rss(big_n), max(1, runs // 2 + 1))
    memory_rows(table, "m", f"{big_n // 1000}k vs 1k entries", big, small, "reading every entry", compare, med)
    notes.append(f"Row m, memory: 2 loader workers per rank, each read all {big_n:,} entries (paths, labels, "
                 f"sizes) before loading its first batch; their USS (memory not shared with the rank) is taken "
                 f"then, before any image is in flight. Peak RSS counts the pages a worker shares with its "
                 f"rank, the manifest's among them.")


def s3_rows(table: Any, runs: int, jpegs: str, run: Callable[..., List[Dict[str, Any]]],
            throughput: Callable[[List[Dict[str, Any]]], float], compare: Callable[..., float],
            med: Callable[[List[float]], float], example: bool = True) -> str:
    """Row s; returns its notes. ``run``/``throughput`` are bench's: one bench.workload process."""
    moto = Moto(folders=[f"bench/jpegs={jpegs}"])
    proxy = LatencyProxy(moto.port, 20)
    url = "s3://bench/jpegs"
    bare = ["--model", "none", "--bs", "32"]
    cpu: List[float] = []
    local, s0, s20 = [], [], []
    try:
        for _ in range(runs):
            local.append(throughput(run(["framework", "--data", jpegs, *bare])))
            c0 = moto.cpu_s()
            s0.append(throughput(run(["framework", "--data", url, *bare], extra_env=moto.env())))
            cpu.append(moto.cpu_s() - c0)
            s20.append(throughput(run(["framework", "--data", url, *bare], extra_env=moto.env(proxy.endpoint))))
        compare(table, "s", "data path alone, S3 at 0 ms vs local disk (img/s)", s0, local, "(report)", None)
        compare(table, "s", "data path alone, S3 at +20 ms vs S3 at 0 ms (img/s)", s20, s0, ">= 0.9",
                lambda x: x >= 0.9)
        compare(table, "s", "data path alone, S3 at +20 ms vs local disk (img/s)", s20, local, "(report)", None)
        n = len([p for p in Path(jpegs).rglob("*.jpg")])
        per_image_ms = med(cpu) / n * 1000
        note = (f"Row s: moto's server process used {med(cpu):.2f} s of CPU per {n}-image run at 0 ms "
                f"({per_image_ms:.1f} ms per image), on the same 2 cores as the job; at {med(s0):.0f} img/s that "
                f"is {med(cpu) * med(s0) / n:.0%} of one core taken from decoding. Real S3 costs the job's "
                f"machine nothing per request.")
        if example:
            img = ["--model", "resnet18", "--bs", "32"]
            ex_local, ex_20, ex_net, servers = [], [], [], []
            cores = cpu_count()
            for _ in range(runs):
                ex_local.append(throughput(run(["example", "--data", jpegs, *img])))
                c0 = moto.cpu_s() + proxy.cpu_s()
                ex_20.append(throughput(run(["example", "--data", url, *img], extra_env=moto.env(proxy.endpoint))))
                servers.append(moto.cpu_s() + proxy.cpu_s() - c0)
                # The same run had the test server's CPU been elsewhere, as real S3's is: its
                # CPU seconds, spread over the job's cores, taken off the wall time.
                ex_net.append(n / max(1e-9, n / ex_20[-1] - servers[-1] / cores))
            compare(table, "s", "shipped example, ResNet-18, S3 at +20 ms vs local disk (img/s)", ex_20, ex_local,
                    ">= 0.9", lambda x: x >= 0.9)
            compare(table, "s", "the same, net of the test server's CPU (moto + proxy) vs local disk (img/s)", ex_net,
                    ex_local, "(info)", None)
            note += (f" In the example rows moto and the proxy used {med(servers):.2f} s of CPU per run on the "
                     f"job's {cores} cores; the 'net' row takes that off each run's wall time.")
        return note
    finally:
        proxy.stop()
        moto.stop()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.manifest")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--objects", action="append", default=[])
    s.add_argument("--folder", action="append", default=[])
    for name in ("listing", "resume", "rss"):
        c = sub.add_parser(name)
        c.add_argument("--source", required=True)
        c.add_argument("--storage", required=True)
        c.add_argument("--baseline", action="store_true")
        c.add_argument("--cheap", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port, args.objects, args.folder)
        return 0
    if args.cmd == "listing":
        result = cmd_listing(args.source, args.storage, args.baseline)
    elif args.cmd == "resume":
        result = cmd_resume(args.source, args.storage, args.cheap)
    else:
        result = cmd_rss(args.source, args.storage)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
