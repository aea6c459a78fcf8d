"""``python -m bench``: the framework's cost as ratios to a plain PyTorch loop, measured in one run.

Each row alternates the two sides (plain, ours, plain, ours, ...) in fresh processes and reports
medians; ratios > 1 mean ours is faster (throughput) or larger (memory, time). The table is printed
and written to docs/BENCHMARKS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from batchproc.rundir import layout

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / ".data"
PY = sys.executable


def make_jpegs(folder: Path, n: int, size=(500, 375)) -> Path:
    """``n`` JPEG photos-like files (smooth colour fields plus noise), ImageFolder layout."""
    marker = folder / f".done-{n}"
    if marker.exists():
        return folder
    import numpy as np
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        cls = folder / f"class{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(20, 80)) for _ in range(3)], -1)
        img = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype("uint8")
        Image.fromarray(img).save(cls / f"img{i:05d}.jpg", quality=90)
    marker.write_text("ok")
    return folder


def env_for(threads: int) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPROC_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = str(ROOT)
    return env


def run(args: List[str], nproc: int = 0, threads: int = 2, extra_env: Optional[Dict[str, str]] = None,
        storage: Optional[str] = None) -> List[dict]:
    """One measurement in fresh process(es); returns every rank's BENCH record."""
    store = storage or tempfile.mkdtemp(prefix="bench-run-")
    cmd = [PY, "-m", "bench.workload", *args, "--storage", store]
    if nproc:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "--no-python", *cmd]
    env = env_for(threads)
    env.update(extra_env or {})
    try:
        return measure(cmd, env)
    finally:
        if storage is None:
            shutil.rmtree(store, ignore_errors=True)


def measure(cmd: List[str], env: Dict[str, str]) -> List[dict]:
    """Run ``cmd`` (bench.workload somewhere below it) and return its ranks' BENCH records, each
    with ``t0``, the time the command started."""
    env = dict(env, BENCH_OUT=tempfile.mkdtemp(prefix="bench-out-"))
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    recs = read_records(env["BENCH_OUT"])
    if out.returncode != 0 or not recs:
        raise RuntimeError(f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    for r in recs:
        r["t0"] = t0
    return recs


def read_records(out_dir: str) -> List[dict]:
    recs = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    shutil.rmtree(out_dir, ignore_errors=True)
    return recs


def commit_ms(n: int) -> float:
    """Median time between consecutive checkpoint records of a cheap job committing every batch.

    The records' own timestamps are used, not two runs' totals, so the machine's noise in a
    single slow step does not count: with a tiny model that interval is the commit's cost."""
    store = tempfile.mkdtemp(prefix="bench-commit-")
    run(["synthetic", "--model", "tiny", "--bs", "4", "--n", str(n), "--max-batches", "200", "--interval", "1"],
        threads=1, storage=store)
    times = sorted(json.loads(p.read_text())["time"] for p in Path(store, layout.RECORDS).glob("ckpt-*.json"))
    shutil.rmtree(store, ignore_errors=True)
    return med([b - a for a, b in zip(times, times[1:])]) * 1000


def throughput(recs: List[dict], since: str = "start") -> float:
    """Samples per second, from ``since`` (a record field or mark) to the last rank's end."""
    start = min(r[since] if since in r else r["marks"][since] for r in recs)
    end = max(r["end"] for r in recs)
    return sum(r["samples"] for r in recs if r["rank"] == 0 or r["mode"] in ("plain", "pil")) / (end - start)


def run_batchproc(args: List[str], slots: int) -> List[dict]:
    """``batchproc run`` of an experiment whose entrypoint is ``bench.workload ARGS`` on ``slots``
    ranks, everything else at batchproc's defaults (threads, loader workers); records carry t0."""
    store = tempfile.mkdtemp(prefix="bench-slots-")
    cfg = Path(store, "experiment.yaml")
    cfg.write_text(f"name: bench\nentrypoint: python3 -m launch.torch_distributed python3 -m bench.workload "
                   f"{' '.join(args)}\nresources:\n  slots_per_trial: {slots}\nmax_restarts: 0\n"
                   f"checkpoint_storage:\n  type: shared_fs\n  host_path: {store}/runs\n")
    env = env_for(1)
    del env["OMP_NUM_THREADS"]  # batchproc's own choice per rank
    try:
        return measure([PY, "-m", "batchproc", "run", str(cfg)], env)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def outside_rows(table: "Table", runs: int, jpegs: str) -> str:
    """Row o, issue 11's outside harness: PIL ImageFolder, ResNet-18, batch 32; the plain side a
    DataLoader loop with 2 threads and 1 worker keeping its predictions in memory."""
    pil = ["--data", jpegs, "--model", "resnet18", "--bs", "32"]
    plain = lambda: run(["pil", *pil, "--nw", "1"], threads=2)  # noqa: E731
    same = lambda: run(["pil-rows", *pil, "--nw", "1", "--interval", "5"], threads=2)  # noqa: E731
    base, ours = alternate(plain, same, runs)
    compare(table, "o", "same work, 1 process: TorchBatchProcessor, checkpoint_interval=5, Parquet rows through "
            "RowWriter vs the plain loop (img/s)", [throughput(r) for r in ours], [throughput(r) for r in base],
            ">= 0.97", lambda x: x >= 0.97)
    slots = lambda: run_batchproc(["pil-rows", *pil, "--interval", "5"], 2)  # noqa: E731
    base, ours = alternate(plain, slots, runs)
    compare(table, "o", "batchproc run, 2 slots at its defaults vs the plain loop in one process, whole "
            "process (img/s)", [throughput(r, "t0") for r in ours], [throughput(r, "t0") for r in base],
            ">= 1.0", lambda x: x >= 1.0)
    return ("Row o: the plain side is `bench.workload pil --nw 1` with 2 threads; the 2-slot side is a "
            "`batchproc run` experiment at batchproc's defaults, timed from its command's start to the last "
            "rank's end, the plain side from its process's start.")


def alternate(a, b, runs: int):
    """Run ``a()`` and ``b()`` alternately ``runs`` times each; lists of their results."""
    ra, rb = [], []
    for _ in range(runs):
        ra.append(a())
        rb.append(b())
    return ra, rb


def compare(table: "Table", row: str, what: str, ours: List[float], base: List[float], target: str,
            ok, fmt: str = "{:.2f}") -> float:
    """One table row: each side's median, and the median of the per-pair ratios. Each pair ran
    back to back, so a pair's ratio cancels the machine's slow drifts, which ratios of two
    medians taken over the whole row do not."""
    ratio = med([o / b for o, b in zip(ours, base)])
    table.add(row, what, fmt.format(med(ours)), fmt.format(med(base)), ratio, target, ok(ratio) if ok else None)
    return ratio


def med(xs):
    return statistics.median(xs)


class Table:
    def __init__(self) -> None:
        self.rows: List[List[str]] = []

    def add(self, row: str, what: str, ours: str, base: str, ratio: float, target: str, ok: Optional[bool]) -> None:
        self.rows.append([row, what, ours, base, f"{ratio:.3f}", target, "yes" if ok else ("no" if ok is not None else "-")])
        print(" | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        head = ["row", "measure", "batchproc", "baseline", "ratio", "target", "met"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--runs", type=int, default=5, help="alternating runs per side (medians)")
    p.add_argument("--images", type=int, default=320, help="JPEG files (batches of 32)")
    p.add_argument("--rows", default="abcdefghkmnosy")
    p.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    jpegs = str(make_jpegs(DATA / f"jpeg500-{args.images}", args.images))
    img = ["--data", jpegs, "--model", "resnet18", "--bs", "32"]
    table, notes = Table(), []
    R = args.runs
    started = time.time()

    if "a" in args.rows or "e" in args.rows:
        plain, ours = alternate(lambda: run(["plain", *img, "--nw", "0"]),
                                lambda: run(["framework", *img, "--nw", "0"]), R)
        compare(table, "a", "throughput, 1 process (img/s)", [throughput(r) for r in ours],
                [throughput(r) for r in plain], ">= 0.97", lambda x: x >= 0.97)
        compare(table, "e", "peak RSS per rank (MiB)", [r[0]["maxrss_mb"] for r in ours],
                [r[0]["maxrss_mb"] for r in plain], "<= 1.1", lambda x: x <= 1.1, "{:.0f}")
    if "b" in args.rows:
        plain, ours = alternate(lambda: run(["plain", *img, "--nw", "0"], threads=2),
                                lambda: run(["framework", *img, "--nw", "0"], nproc=2, threads=1), R)
        compare(table, "b", "throughput, 2 ranks vs plain on 2 cores (img/s)", [throughput(r) for r in ours],
                [throughput(r) for r in plain], ">= 0.95", lambda x: x >= 0.95)
    if "c" in args.rows:
        every, rare = alternate(lambda: run(["framework", *img, "--nw", "0", "--interval", "1"]),
                                lambda: run(["framework", *img, "--nw", "0"]), R)
        compare(table, "c", "checkpoint_interval=1 vs never (img/s)", [throughput(r) for r in every],
                [throughput(r) for r in rare], ">= 0.97", lambda x: x >= 0.97)
        small, large = alternate(lambda: commit_ms(1000), lambda: commit_ms(100_000), R)
        compare(table, "c", "commit cost, 100k vs 1k samples (ms/commit)", large, small, "~1.0 (independent)", None)
    if "d" in args.rows:
        syn = ["synthetic", "--model", "tiny", "--bs", "32", "--n", "100000"]
        dirs = {}
        for pct, step in ((10, 312), (90, 2812)):
            dirs[pct] = tempfile.mkdtemp(prefix=f"bench-resume{pct}-")
            run(syn, threads=1, storage=dirs[pct], extra_env={"BATCHPROC_FAULT": f"stop@step={step}"})

        def to_first(pct):
            r = run(syn, threads=1, storage=dirs[pct], extra_env={"BATCHPROC_FAULT": "stop@step=0"})[0]
            return r["marks"]["first_batch"] - r["t0"], r["marks"]["first_batch"] - r["start"]
        r10, r90 = alternate(lambda: to_first(10), lambda: to_first(90), R)
        for i, what in ((0, "launch to first batch"), (1, "torch_batch_process() to first batch")):
            compare(table, "d", f"{what}, resume at 90% vs 10% (s)", [r[i] for r in r90], [r[i] for r in r10],
                    "<= 1.1", lambda x: x <= 1.1, "{:.3f}")
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
    if "f" in args.rows:
        notes.append(startup_breakdown(R))
    if "g" in args.rows:
        pil, ours = alternate(lambda: run(["pil", *img, "--nw", "0"]), lambda: run(["example", *img]), R)
        compare(table, "g", "shipped image path vs PIL ImageFolder loop (img/s)", [throughput(r) for r in ours],
                [throughput(r) for r in pil], ">= 1.2", lambda x: x >= 1.2)
        # The data path's own ceiling: the same two loaders with no model behind them.
        bare = ["--data", jpegs, "--model", "none", "--bs", "32"]
        pil, ours = alternate(lambda: run(["pil", *bare, "--nw", "0"]), lambda: run(["framework", *bare]), R)
        compare(table, "g", "data path alone, no model: ImageFiles + default loader vs PIL (img/s)",
                [throughput(r) for r in ours], [throughput(r) for r in pil], "(bound)", None)
    if "o" in args.rows:
        notes.append(outside_rows(table, R, jpegs))
    if "h" in args.rows:
        notes.append(gpu_rows(table, R))
    if "n" in args.rows:  # the shipped job: default resources and 2 slots vs one process (bench/slots.py)
        from bench import slots
        notes.append(slots.slots_rows(table, R, jpegs, compare))
    if "k" in args.rows:  # a commit after 50k recorded skips vs after none (bench/commit_cost.py)
        from bench import commit_cost
        notes.append(commit_cost.commit_cost_rows(table, R, compare, alternate))
    if "m" in args.rows:  # frozen inputs: the manifest at 100k and 1M entries (bench/manifest.py)
        from bench import manifest
        notes.append(manifest.manifest_rows(table, R, jpegs, compare, alternate, med))
    if "s" in args.rows:  # ImageFiles from S3 (moto), at 0 and +20 ms per request, vs local disk
        from bench import manifest
        notes.append(manifest.s3_rows(table, R, jpegs, run, throughput, compare, med))
    if "t" in args.rows:  # TableRows: Parquet on S3 and local disk, a 10,000-file manifest (bench/tables.py)
        from bench import tables
        notes.append(tables.table_rows(table, R, compare, alternate, med))
    if "y" in args.rows:  # schedules, dynamic vs static (bench/schedule.py, bench/schedule_text.py)
        from bench import schedule
        notes.append(schedule.all_rows(table, R, jpegs, run, throughput, compare, alternate))
    report = render(table, notes, args, time.time() - started)
    write_report(Path(args.out), report)
    print(report)
    return 0


BEGIN, END = "<!-- bench: generated, from here -->", "<!-- bench: to here -->"


def write_report(path: Path, report: str) -> None:
    """Replace the generated block of ``path``; what is written around it (history, notes) stays."""
    block = f"{BEGIN}\n{report.strip()}\n{END}"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        text = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        text = "# Benchmarks\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def gpu_rows(table: Table, runs: int) -> str:
    """Row h: ResNet-50 bf16 channels_last on the GPU over pre-staged host images, framework vs a
    model-only loop, with and without the side-stream device prefetch (BATCHPROC_DEVICE_PREFETCH)."""
    import torch

    if not torch.cuda.is_available():
        return "Row h (GPU): not measured, this machine has no CUDA device."
    gpu = ["--model", "resnet50", "--bs", "256", "--n", str(256 * 40)]
    cores = os.cpu_count() or 1
    base, ours = alternate(lambda: run(["gpu-model", *gpu], threads=cores),
                           lambda: run(["gpu-framework", *gpu], threads=cores), runs)
    compare(table, "h", "GPU ResNet-50 bf16: framework vs model-only loop (img/s)",
            [throughput(r, "warm") for r in ours], [throughput(r, "warm") for r in base], ">= 0.95", lambda x: x >= 0.95)
    base, ours = alternate(lambda: run(["gpu-model", *gpu], threads=cores),
                           lambda: run(["gpu-framework", *gpu], threads=cores,
                                       extra_env={"BATCHPROC_DEVICE_PREFETCH": "1"}), runs)
    compare(table, "h", "the same, side-stream device prefetch on (img/s)",
            [throughput(r, "warm") for r in ours], [throughput(r, "warm") for r in base], ">= 0.95", lambda x: x >= 0.95)
    return f"Row h ran on {torch.cuda.get_device_name(0)}."


def startup_breakdown(runs: int) -> str:
    """Row f: ``batchproc run`` of a 2-slot experiment to its first processed batch, by stage."""
    stages = []
    for _ in range(runs):
        tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
        cfg = tmp / "exp.yaml"
        cfg.write_text(f"""name: startup
entrypoint: python3 -m launch.torch_distributed python3 -m bench.workload synthetic --model tiny --bs 4 --n 64
resources: {{slots_per_trial: 2}}
checkpoint_storage: {tmp}/runs
""")
        env = dict(env_for(1), BENCH_OUT=tempfile.mkdtemp(prefix="bench-out-"))
        t0 = time.time()
        subprocess.run([PY, "-m", "batchproc", "run", str(cfg)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
        recs = read_records(env["BENCH_OUT"])
        r0 = [r for r in recs if r["rank"] == 0][0]
        stages.append({"to worker start": r0["process_start"] - t0, "imports (torch, batchproc)": r0["imported"] - r0["process_start"],
                       "process group + open run": r0["marks"]["init"] - r0["start"],
                       "first batch": r0["marks"]["first_batch"] - r0["marks"]["init"],
                       "total": r0["marks"]["first_batch"] - t0})
        shutil.rmtree(tmp, ignore_errors=True)
    lines = ["Row f, `batchproc run` (2 slots, tiny model) to the first processed batch, medians of "
             f"{runs} runs (s):", ""]
    for k in stages[0]:
        lines.append(f"- {k}: {med([s[k] for s in stages]):.2f}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def render(table: Table, notes: List[str], args, elapsed: float) -> str:
    import torch

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"""Command: `python -m bench --runs {args.runs} --images {args.images} --rows {args.rows}` ({elapsed / 60:.1f} min)
Date: {datetime.date.today().isoformat()}. Machine: {cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}.
Each side runs {args.runs} times, alternating, each in a fresh process. The two value columns are each
side's median; the ratio is the median of the ratios of back-to-back pairs. Workload: {args.images} JPEG
files 500x375 px (generated), decode + Resize 256 + CenterCrop 224, ResNet-18 (random weights), batch 32.

{table.markdown()}

{chr(10).join(notes)}"""

if __name__ == "__main__":
    sys.exit(main())
