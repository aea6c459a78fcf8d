"""Row t of ``python -m bench``: TableRows (batchproc.tables) over Parquet files.

  * the data path (TableRows, batchproc's default loader, a processor that does nothing) from
    moto's S3 server at +20 ms per request (``../shared/bench/latency_proxy.py``) against 0 ms;
  * rows/s of the data path against pyarrow reading the same files straight through
    (``iter_batches`` + ``to_pylist`` + the default collate: the same batches), local disk, one process;
  * the manifest of 10,000 files of 10,000 rows (100M rows, one int64 column, 10 row groups each):
    listing time, and peak RSS of a rank and of a loader worker against a 10-file manifest;
  * time to the first batch of a resume at 90% against one at 10%.

Sub-commands of ``python -m bench.tables`` are the measured processes: ``read``, ``pyarrow``,
``list``, ``rss``, ``resume``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

T_PROCESS = time.time()
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / ".data"
PY = sys.executable


def make_docs(folder: Path, files: int = 20, rows: int = 5000, row_group: int = 1000) -> Path:
    """Parquet files of (id, text ~200 bytes, score): a table of documents."""
    marker = folder / f".done-{files}-{rows}"
    if marker.exists():
        return folder
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = np.asarray([f"w{i}" for i in range(5000)])
    texts = np.asarray([" ".join(rng.choice(words, 40)) for _ in range(20_000)], dtype=object)  # ~200 bytes each
    for k in range(files):
        ids = np.arange(k * rows, (k + 1) * rows)
        text = texts[rng.integers(0, len(texts), rows)].tolist()
        pq.write_table(pa.table({"id": ids, "text": text, "score": rng.random(rows)}), folder / f"part{k:05d}.parquet",
                       row_group_size=row_group)
    marker.write_text("ok")
    return folder


def make_ints(folder: Path, files: int, rows: int = 10_000, row_group: int = 1000) -> Path:
    """``files`` Parquet files of ``rows`` int64 ids each, in row groups of ``row_group``."""
    marker = folder / f".done-{files}-{rows}"
    if marker.exists():
        return folder
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for k in range(files):
        sub = folder / f"d{k // 1000:02d}"
        sub.mkdir(exist_ok=True)
        pq.write_table(pa.table({"id": np.arange(k * rows, (k + 1) * rows, dtype=np.int64)}),
                       sub / f"part{k:05d}.parquet", row_group_size=row_group)
    marker.write_text("ok")
    return folder


# -- measured processes -----------------------------------------------------------------------


def cmd_read(source: str, storage: str, bs: int, workers: Optional[int], columns: Optional[List[str]]) -> Dict[str, Any]:
    """The data path: every batch of ``source`` through torch_batch_process, a processor doing nothing."""
    from batchproc import TorchBatchProcessor, torch_batch_process
    from batchproc.tables import TableRows

    marks: Dict[str, float] = {}

    class Nothing(TorchBatchProcessor):
        def process_batch(self, batch: Any, batch_idx: int) -> None:
            marks.setdefault("first_batch", time.time())

    ds = TableRows(source, columns=columns)
    start = time.time()
    result = torch_batch_process(Nothing, ds, batch_size=bs, checkpoint_interval=10**6, storage=storage,
                                 dataloader_kwargs=None if workers is None else {"num_workers": workers})
    end = time.time()
    return {"rows": len(ds), "start": start, "end": end, "process_start": T_PROCESS,
            "first_batch": marks.get("first_batch"), "watermark": result.steps_completed}


def cmd_pyarrow(source: str, bs: int, columns: Optional[List[str]]) -> Dict[str, Any]:
    """The same batches, read straight through with pyarrow (files in sorted order)."""
    import pyarrow.parquet as pq
    from torch.utils.data._utils.collate import default_collate

    start = time.time()
    n = 0
    for path in sorted(Path(source).rglob("*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=bs, columns=columns):
            default_collate(batch.to_pylist())  # type: ignore[no-untyped-call]
            n += batch.num_rows
    return {"rows": n, "start": start, "end": time.time()}


def cmd_list(source: str) -> Dict[str, Any]:
    from bench.manifest import peak_rss_mb
    from batchproc.tables import TableRows

    before = peak_rss_mb()
    t0 = time.time()
    m = TableRows(source).batchproc_list_inputs()
    t1 = time.time()
    blob = m.to_bytes()
    return {"list_s": t1 - t0, "files": len(m), "rows": int(m.extra["rows"].sum()),
            "chunks": len(m.extra["chunk_file"]), "bytes": len(blob), "nbytes": m.nbytes,
            "rss_mb": peak_rss_mb() - before}


def _touch_manifest(worker_id: int) -> None:
    """A loader worker locates rows all over the manifest (every chunk's arrays are read)."""
    from torch.utils.data import get_worker_info

    from bench.manifest import _memory

    info = get_worker_info()
    assert info is not None
    ds = info.dataset.dataset  # type: ignore[attr-defined]
    n = len(ds)
    total = sum(ds.plan.locate(i)[1] for i in range(0, n, max(1, n // 10_000)))
    assert total >= 0
    with open(os.path.join(os.environ["BENCH_RSS_DIR"], f"worker{worker_id}.json"), "w") as f:
        json.dump(_memory(os.getpid()), f)


def cmd_rss(source: str, storage: str) -> Dict[str, Any]:
    """2 batches over a run whose manifest was listed before; peak memory of this rank and its 2 workers."""
    from bench.manifest import watched_run
    from batchproc.tables import TableRows

    result = watched_run(TableRows(source), storage, 1000, _touch_manifest)
    result["rows"] = result.pop("entries")
    return result


# -- the driver ---------------------------------------------------------------------------------


def _measure(sub: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 1800) -> Dict[str, Any]:
    from bench.manifest import measure

    return measure("bench.tables", sub, env, timeout)


def _rate(r: Dict[str, Any]) -> float:
    return float(r["rows"]) / (float(r["end"]) - float(r["start"]))


def _store() -> str:
    return tempfile.mkdtemp(prefix="bench-tables-")


def table_rows(table: Any, runs: int, compare: Callable[..., float],
               alternate: Callable[..., Tuple[List[Any], List[Any]]], med: Callable[[List[float]], float]) -> str:
    """Row t; returns its notes. ``BENCH_TABLES_PARTS`` (``s3,local,manifest,resume``) picks parts,
    ``BENCH_TABLES_FILES`` the big manifest's file count (10,000)."""
    from bench.manifest import LatencyProxy, Moto, memory_rows

    parts = os.environ.get("BENCH_TABLES_PARTS", "s3,local,manifest,resume").split(",")
    docs = make_docs(DATA / "docs-20x5000")
    notes: List[str] = []
    bs = ["--bs", "256"]
    if "s3" in parts:
        moto = Moto(folders=[f"bench/docs={docs}"])
        proxy = LatencyProxy(moto.port, 20)
        try:
            s0, s20 = alternate(
                lambda: _rate(_measure(["read", "--source", "s3://bench/docs", "--storage", _store(), *bs], moto.env())),
                lambda: _rate(_measure(["read", "--source", "s3://bench/docs", "--storage", _store(), *bs],
                                       moto.env(proxy.endpoint))), runs)
        finally:
            proxy.stop()
            moto.stop()
        compare(table, "t", "TableRows data path, Parquet on S3 at +20 ms vs 0 ms (rows/s)", s20, s0, ">= 0.9",
                lambda x: x >= 0.9, "{:.0f}")
    if "local" in parts:
        docs = make_docs(DATA / "docs-20x25000", files=20, rows=25_000)  # 500k rows: start-up is not the measure
        base, ours = alternate(lambda: _rate(_measure(["pyarrow", "--source", str(docs), *bs])),
                               lambda: _rate(_measure(["read", "--source", str(docs), "--storage", _store(),
                                                       "--workers", "0", *bs])), runs)
        compare(table, "t", "TableRows data path (from torch_batch_process(), listing included) vs pyarrow "
                "iter_batches straight through, 500k rows local, 1 process (rows/s)", ours, base, ">= 0.8 (report)", lambda x: x >= 0.8, "{:.0f}")
    if "manifest" in parts:
        n_files = int(os.environ.get("BENCH_TABLES_FILES", "10000"))
        t0 = time.time()
        big = make_ints(DATA / f"ints-{n_files}", n_files)
        made_s = time.time() - t0
        small = make_ints(DATA / "ints-10", 10)
        lists = [_measure(["list", "--source", str(big)]) for _ in range(max(1, runs // 2 + 1))]
        m = lists[0]
        notes.append(f"Row t, the manifest of {m['files']:,} files, {m['rows']:,} rows, {m['chunks']:,} row groups: "
                     f"listed (footers read, {32} at once, local disk) in {med([l['list_s'] for l in lists]):.2f} s, "
                     f"{m['bytes'] / 2**20:.2f} MiB stored, {m['nbytes'] / 2**20:.2f} MiB in memory, the listing "
                     f"process grew {med([l['rss_mb'] for l in lists]):.0f} MiB. (Writing the files took {made_s:.0f} s.)")

        def rss(folder: Path) -> Dict[str, Any]:
            store = _store()
            try:
                return _measure(["rss", "--source", str(folder), "--storage", store])
            finally:
                shutil.rmtree(store, ignore_errors=True)

        few, many = alternate(lambda: rss(small), lambda: rss(big), max(1, runs // 2 + 1))
        memory_rows(table, "t", f"{n_files:,} vs 10 files", many, few, "reading the manifest", compare, med)
    if "resume" in parts:
        mid = make_ints(DATA / "ints-100", 100)  # 1M rows: 977 batches of 1,024
        total = -(-1_000_000 // 1024)
        dirs = {}
        for pct in (10, 90):
            dirs[pct] = _store()
            _measure(["read", "--source", str(mid), "--storage", dirs[pct], "--bs", "1024", "--workers", "1"],
                     {"BATCHPROC_FAULT": f"stop@step={total * pct // 100 - 1}"})

        def first(pct: int) -> Tuple[float, float]:
            r = _measure(["read", "--source", str(mid), "--storage", dirs[pct], "--bs", "1024", "--workers", "1"],
                         {"BATCHPROC_FAULT": "stop@step=0"})
            return r["first_batch"] - r["process_start"], r["first_batch"] - r["start"]

        r10, r90 = alternate(lambda: first(10), lambda: first(90), runs)
        for i, what in ((0, "process start"), (1, "torch_batch_process()")):
            compare(table, "t", f"{what} to first batch, TableRows 1M rows, resume at 90% vs 10% (s)",
                    [r[i] for r in r90], [r[i] for r in r10], "<= 1.1", lambda x: x <= 1.1, "{:.3f}")
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    return "\n\n".join(notes)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tables")
    p.add_argument("cmd", choices=["read", "pyarrow", "list", "rss"])
    p.add_argument("--source", required=True)
    p.add_argument("--storage", default="-")
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--columns", default=None)
    args = p.parse_args(argv)
    columns = args.columns.split(",") if args.columns else None
    if args.cmd == "read":
        result = cmd_read(args.source, args.storage, args.bs, args.workers, columns)
    elif args.cmd == "pyarrow":
        result = cmd_pyarrow(args.source, args.bs, columns)
    elif args.cmd == "list":
        result = cmd_list(args.source)
    else:
        result = cmd_rss(args.source, args.storage)
    print("RESULT " + json.dumps(result), flush=True)
    if args.storage not in ("-", "") and args.cmd == "read" and "bench-tables-" in args.storage \
            and not os.environ.get("BATCHPROC_FAULT"):
        shutil.rmtree(args.storage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
