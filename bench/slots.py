"""Row n: the shipped job under ``batchproc run`` at the default experiment's resources vs the same
script as one plain process, whole process; and the start-up profile behind docs/SCALING.md.

Both sides run ``examples/classify_images.py`` with the default experiment's hyperparameters
(``experiment.yaml``), each in fresh processes at its own defaults (threads, loader workers), timed
from the command's start to its exit; the images are what the run directory says it committed.

* ``one``: ``python examples/classify_images.py`` (one process, no launcher);
* ``default``: ``batchproc run experiment.yaml`` (its ``resources`` as shipped);
* ``slots2``: the same with ``--set resources.slots_per_trial=2`` (the 2-process demonstration).

Jobs: ``digits`` is the default experiment itself (1,797 PNG digits, the small CNN, batch 64);
``resnet`` is the same script on JPEG photos with ResNet-18 and batch 32 (issue 22's harness).

    python -m bench.slots --runs 5                      # the paired rounds, medians (img/s)
    python -m bench.slots --runs 5 --profile            # and the start-up, stage by stage
    python -m bench --rows n                            # the rows in docs/BENCHMARKS.md

``--profile`` puts :mod:`bench.profile_hook` first on every process's path as ``sitecustomize``
(each process of the job records its start, its imports, the worker's stages and its exit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SIDES = ("one", "default", "slots2")
#: The default experiment's hyperparameters as the script's flags (the one-process side).
_HPARAM_FLAGS = ("batch_size", "checkpoint_interval", "format", "max_pixels", "bad_samples", "max_bad_samples",
                 "bad_batches", "max_bad_batches", "model", "data")


def _experiment_hparams(extra: Dict[str, object]) -> Dict[str, object]:
    import yaml

    with open(ROOT / "experiment.yaml", encoding="utf-8") as f:
        hparams = dict(yaml.safe_load(f).get("hyperparameters") or {})
    hparams.update(extra)
    return hparams


def job_hparams(job: str, jpegs: Optional[str] = None) -> Dict[str, object]:
    """The hyperparameters a job changes from the default experiment's."""
    if job == "digits":
        return {}
    if job == "resnet":
        if not jpegs:
            raise ValueError("the resnet job needs JPEGs (bench.__main__.make_jpegs)")
        return {"data": jpegs, "model": "resnet18", "batch_size": 32}
    raise ValueError(f"unknown job {job!r}")


def _env(profile_dir: Optional[str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPROC_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "OMP_NUM_THREADS"):
        env.pop(k, None)  # each side at its own defaults
    env["PYTHONPATH"] = str(ROOT)
    if profile_dir:
        env["PYTHONPATH"] = hook_dir() + os.pathsep + str(ROOT)
        env["BATCHPROC_PROFILE_DIR"] = profile_dir
    return env


_HOOK: List[str] = []


def hook_dir() -> str:
    """A folder holding bench/profile_hook.py as ``sitecustomize.py`` (made once per process)."""
    if not _HOOK:
        folder = tempfile.mkdtemp(prefix="bench-hook-")
        shutil.copy(ROOT / "bench" / "profile_hook.py", Path(folder, "sitecustomize.py"))
        _HOOK.append(folder)
    return _HOOK[0]


def command(side: str, hparams: Dict[str, object], storage: str) -> List[str]:
    """``side``'s command line; ``hparams``: what the job changes from the default experiment's."""
    if side == "one":
        cmd = [PY, "examples/classify_images.py", "--storage", os.path.join(storage, "one")]
        full = _experiment_hparams(hparams)
        for name in _HPARAM_FLAGS:
            if full.get(name) is not None:
                cmd += ["--" + name.replace("_", "-"), str(full[name])]
        return cmd
    cmd = [PY, "-m", "batchproc", "run", "experiment.yaml", "--fresh",
           "--set", f"checkpoint_storage.host_path={storage}"]
    for name, value in hparams.items():
        cmd += ["--set", f"hyperparameters.{name}={value}"]
    if side == "slots2":
        cmd += ["--set", "resources.slots_per_trial=2"]
    return cmd


def run_side(side: str, hparams: Dict[str, object], profile: bool = False) -> Dict[str, object]:
    """One fresh run of ``side``: {"img_s", "wall", "images"} and, profiled, "procs" and "t0"."""
    storage = tempfile.mkdtemp(prefix="bench-slots-")
    profile_dir = tempfile.mkdtemp(prefix="bench-profile-") if profile else None
    cmd = command(side, hparams, storage)
    try:
        t0 = time.time()
        done = subprocess.run(cmd, cwd=ROOT, env=_env(profile_dir), capture_output=True, text=True, timeout=1200)
        wall = time.time() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        run_dir = next(p for p in Path(storage).iterdir() if (p / "status.json").is_file())
        images = json.loads((run_dir / "status.json").read_text())["committed_samples"]
        result: Dict[str, object] = {"img_s": images / wall, "wall": wall, "images": images, "t0": t0,
                                     "end": t0 + wall}
        if profile_dir:
            result["procs"] = [json.loads(p.read_text()) for p in Path(profile_dir).glob("*.json")]
        return result
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        if profile_dir:
            shutil.rmtree(profile_dir, ignore_errors=True)


def rounds(hparams: Dict[str, object], runs: int, sides: Sequence[str] = SIDES,
           profile: bool = False) -> Dict[str, List[Dict[str, object]]]:
    """``runs`` rounds; each runs every side once, in an order rotated from round to round."""
    out: Dict[str, List[Dict[str, object]]] = {s: [] for s in sides}
    for i in range(runs):
        order = list(sides[i % len(sides):]) + list(sides[:i % len(sides)])
        for side in order:
            out[side].append(run_side(side, hparams, profile))
            print(f"round {i + 1} {side}: {out[side][-1]['img_s']:.1f} img/s ({out[side][-1]['wall']:.1f} s)",
                  file=sys.stderr, flush=True)
    return out


# -- the profile -----------------------------------------------------------------------------


def _kind(proc: Dict[str, object]) -> str:
    words = " ".join(proc.get("cmdline") or proc.get("argv") or [])  # type: ignore[arg-type]
    if "control.loopback" in words or "torch.distributed.run" in words or "control.solo_agent" in words:
        return "agent"
    if "launch.torch_distributed" in words or "control.launcher" in words:
        return "launcher"
    if "batchproc.engine.entry" in words or "classify_images.py" in words:
        return "worker"
    if "batchproc" in words:
        return "cli"
    return "other"


def stages(result: Dict[str, object]) -> Dict[str, float]:
    """One profiled run -> seconds per stage (see docs/SCALING.md), rank 0's worker for the worker's."""
    t0 = float(result["t0"])  # type: ignore[arg-type]
    procs = result["procs"]
    by: Dict[str, List[Dict]] = {}
    for p in procs:  # type: ignore[union-attr]
        by.setdefault(_kind(p), []).append(p)
    workers = sorted(by.get("worker", []), key=lambda p: p["start"])
    w = min(workers, key=lambda p: p["marks"].get("first_batch_end", float("inf")))
    imp = lambda p, m: (p["imports"][m][1] - p["imports"][m][0]) if p["imports"].get(m) else 0.0  # noqa: E731
    s: Dict[str, float] = {}
    if "launcher" in by:
        s["batchproc run: start -> launcher process starts"] = by["launcher"][0]["start"] - t0
    if "agent" in by:
        a = by["agent"][0]
        s["launcher -> agent process starts (torchrun's, or ours for one slot)"] = a["start"] - by["launcher"][0]["start"]
        s["agent: import torch"] = imp(a, "torch")
        s["agent: start -> first worker process starts"] = workers[0]["start"] - a["start"]
    else:
        s["(no launcher: the script's process starts)"] = w["start"] - t0
    m = w["marks"]
    s["worker: import torch"] = imp(w, "torch")
    s["worker: import torchvision"] = imp(w, "torchvision")
    s["worker: start -> torch_batch_process() called"] = m["tbp_start"] - w["start"]
    s["torch_batch_process() -> processor built (process group, inputs, loader)"] = \
        m["processor_init_start"] - m["tbp_start"]
    s["model load (processor __init__)"] = m["processor_init_end"] - m["processor_init_start"]
    s["processor built -> first batch done"] = m["first_batch_end"] - m["processor_init_end"]
    s["command start -> first batch done"] = m["first_batch_end"] - t0
    b = w["batches"]
    s["rank 0: batches"] = b["n"]
    s["rank 0: in process_batch (model, rows)"] = b["in"]
    s["rank 0: waiting between batches (loader, commits)"] = b["gap"]
    s["last batch -> torch_batch_process() returned"] = m["tbp_end"] - b["last_end"]
    s["torch_batch_process() returned -> worker's exit begins"] = w["end"] - m["tbp_end"]
    s["worker's exit begins -> command exits"] = float(result["end"]) - max(p["end"] for p in workers)  # type: ignore
    s["total (command wall)"] = float(result["wall"])  # type: ignore[arg-type]
    s["ranks"] = len(workers)
    s["torch threads per rank"] = w.get("torch_threads", 0)
    s["loader workers per rank"] = w.get("loader_workers", 0)
    s["img/s, whole process"] = float(result["img_s"])  # type: ignore[arg-type]
    return s


def profile_table(results: Dict[str, List[Dict[str, object]]]) -> str:
    per_side = {side: [stages(r) for r in rs] for side, rs in results.items()}
    keys: List[str] = []
    for side in per_side.values():
        for s in side:
            keys += [k for k in s if k not in keys]
    heads = {"one": "one process", "default": "batchproc run (default)", "slots2": "batchproc run, 2 slots"}
    lines = ["| stage (s; medians) | " + " | ".join(heads[s] for s in per_side) + " |",
             "|---|" + "---|" * len(per_side)]
    for k in keys:
        cells = []
        for side in per_side.values():
            values = [s[k] for s in side if k in s]
            cells.append(_fmt(k, statistics.median(values)) if values else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(key: str, value: float) -> str:
    if key.startswith(("ranks", "torch threads", "loader workers", "rank 0: batches")):
        return f"{value:g}"
    return f"{value:.1f}" if key.startswith("img/s") else f"{value:.2f}"


# -- decode vs model -------------------------------------------------------------------------


_DECODE_VS_MODEL = r"""
import json, sys, time
sys.path.insert(0, "examples")
import torch
from classify_images import make_model
from digits_data import ensure_digits_folder
from batchproc.images import ImageFiles
h = json.loads(sys.argv[1])
model = make_model(h.get("model", "digits_cnn"), None, lambda m: None)
ds = ImageFiles(h.get("data") or ensure_digits_folder("data"), transform=model.preprocess)
n = min(len(ds), 256)
t = time.perf_counter(); items = [ds[i] for i in range(n)]; decode = (time.perf_counter() - t) / n
bs = int(h.get("batch_size", 64))
x = torch.stack([it["image"] for it in items[:bs]])
m = model.build().eval()
if model.channels_last:
    m = m.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
out = {"decode_ms_per_image": decode * 1000}
for threads in (1, 2):
    torch.set_num_threads(threads)
    with torch.inference_mode():
        m(x)
        t = time.perf_counter(); reps = 3
        for _ in range(reps): m(x)
    out[f"model_ms_per_image_{threads}t"] = (time.perf_counter() - t) / reps / len(x) * 1000
print(json.dumps(out))
"""


def decode_vs_model(hparams: Dict[str, object]) -> Dict[str, float]:
    """Per image: decode + preprocess in one process (1 thread), and the model at 1 and 2 threads."""
    env = _env(None)
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([PY, "-c", _DECODE_VS_MODEL, json.dumps(hparams)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# -- the bench rows --------------------------------------------------------------------------


def slots_rows(table: object, runs: int, jpegs: str, compare: Callable[..., float]) -> str:
    """Row n, for both jobs: the default experiment's resources vs one process (>= 1.0), and 2 slots
    forced vs one process (reported)."""
    for job in ("digits", "resnet"):
        results = rounds(job_hparams(job, jpegs), runs)
        one = [float(r["img_s"]) for r in results["one"]]  # type: ignore[arg-type]
        what = ("the default experiment (digits CNN, 1,797 PNGs)" if job == "digits"
                else "the same script, ResNet-18 on the JPEGs, batch 32")
        compare(table, "n", f"{what}: `batchproc run` at the default resources vs one process, whole process "
                "(img/s)", [float(r["img_s"]) for r in results["default"]], one,  # type: ignore[arg-type]
                ">= 1.0", lambda x: x >= 1.0)
        compare(table, "n", f"{what}: `batchproc run`, slots_per_trial=2 forced vs one process, whole process "
                "(img/s)", [float(r["img_s"]) for r in results["slots2"]], one,  # type: ignore[arg-type]
                "(reported)", None)
    return ("Row n: `python examples/classify_images.py` (one process) vs `batchproc run experiment.yaml` "
            "(default resources) vs the same with `--set resources.slots_per_trial=2`, rounds in rotated "
            "order, each fresh, timed from the command's start to its exit (bench/slots.py; "
            "docs/SCALING.md has the stage-by-stage profile).")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slots", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--job", choices=("digits", "resnet"), default="digits")
    p.add_argument("--images", type=int, default=512, help="JPEG files for --job resnet")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--profile", action="store_true", help="also print the start-up profile table")
    p.add_argument("--decode", action="store_true", help="also measure decode vs model time per image")
    args = p.parse_args(argv)
    jpegs = None
    if args.job == "resnet":
        from bench.__main__ import DATA, make_jpegs

        jpegs = str(make_jpegs(DATA / f"jpeg500-{args.images}", args.images))
    hparams = job_hparams(args.job, jpegs)
    sides = tuple(args.sides.split(","))
    results = rounds(hparams, args.runs, sides, args.profile)
    print(f"job {args.job}, {args.runs} rounds (medians, img/s, whole process):")
    for side in sides:
        xs = [float(r["img_s"]) for r in results[side]]  # type: ignore[arg-type]
        line = f"  {side}: {statistics.median(xs):.1f}  ({', '.join(f'{x:.1f}' for x in xs)})"
        if side != "one" and "one" in results:
            ratios = [float(r["img_s"]) / float(o["img_s"]) for r, o in zip(results[side], results["one"])]  # type: ignore
            line += f"  ratio to one process (median of pairs): {statistics.median(ratios):.3f}"
        print(line)
    if args.profile:
        print(profile_table(results))
    if args.decode:
        print(json.dumps(decode_vs_model(_experiment_hparams(hparams))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
