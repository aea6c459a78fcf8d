"""Real uneven work: a small transformer over texts of seeded, very different lengths, dynamic vs static.

The texts' token counts are lognormal (sigma 1, median ``MEDIAN_TOKENS``, clipped to
``[4, MAX_TOKENS]``) in dataset order, so a batch (padded to its longest text) costs anything from
a few to a few hundred milliseconds. The model is a randomly initialised ``nn.TransformerEncoder``
(no download), run under ``torch.inference_mode`` on 2 ranks of 1 thread each.

Per run: the makespan (first batch started to last batch ended, as the sleep rows), texts/s over it,
and ``busy / (ranks x makespan)``, where busy is the summed time the ranks spent in
``process_batch`` and in loading (the dataset's ``__getitem__`` and the padding collate). That
fraction is the run against its own ideal (the work it measured, divided by the ranks): 1.0 means
no rank ever waited. ``python -m bench.schedule_text [RUNS]`` or row ``y``.

Worker: ``python -m bench.schedule_text worker SCHEDULE TEXTS OUT_DIR STORAGE``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
# 240 batches: with 120 (960 texts) the one 768-token batch near the end (0.6 s) left the other
# rank waiting 0.4-0.6 s, 3-4% of the row, a tail a job of this size has but a real one does not.
TEXTS, BATCH, MEDIAN_TOKENS, MAX_TOKENS, VOCAB = 1920, 8, 48, 768, 1000
#: Seconds this process spent loading (making the texts' tensors and padding them): work as much as the
#: model's, since with ``num_workers=0`` it is done by the rank between its batches.
LOADING = [0.0]


def lengths(n: int = TEXTS) -> List[int]:
    """Each text's token count (seeded): most are short, a few are long."""
    import numpy as np

    rng = np.random.default_rng(21)
    return [int(n) for n in np.clip(rng.lognormal(np.log(MEDIAN_TOKENS), 1.0, n), 4, MAX_TOKENS)]


class Texts:
    """Map-style dataset of token-id tensors of the seeded lengths."""

    def __init__(self, n: int = TEXTS) -> None:
        self.lengths = lengths(n)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Any:
        import torch

        t = time.perf_counter()
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, VOCAB, (self.lengths[i],), generator=g)
        LOADING[0] += time.perf_counter() - t
        return ids


def pad(samples: List[Any]) -> Tuple[Any, Any]:
    """Token ids padded to the batch's longest text, and the padding mask."""
    import torch

    t = time.perf_counter()
    ids = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True)
    mask = torch.arange(ids.shape[1])[None, :] >= torch.tensor([len(s) for s in samples])[:, None]
    LOADING[0] += time.perf_counter() - t
    return ids, mask


def model() -> Any:
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
    # enable_nested_tensor=False: the same dense kernels for every batch, on both schedules
    encoder = torch.nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    return torch.nn.ModuleDict({"embed": torch.nn.Embedding(VOCAB, 128), "encoder": encoder}).eval()


def worker(schedule: str, texts: int, out_dir: str, storage: str) -> None:
    import torch

    from batchproc import TorchBatchProcessor, torch_batch_process

    torch.set_num_threads(1)
    net = model()
    rank = int(os.environ.get("RANK", "0"))
    spans: List[Tuple[int, float, float]] = []

    class Encode(TorchBatchProcessor):
        def process_batch(self, batch: Any, batch_idx: int) -> None:
            t = time.time()
            ids, mask = batch
            with torch.inference_mode():
                net["encoder"](net["embed"](ids), src_key_padding_mask=mask).mean(dim=1)
            spans.append((self.context.global_batch_idx, t, time.time()))

    torch_batch_process(Encode, Texts(texts), batch_size=BATCH, checkpoint_interval=10,
                        dataloader_kwargs={"num_workers": 0, "collate_fn": pad}, storage=storage, schedule=schedule)
    with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
        json.dump({"spans": spans, "loading": LOADING[0]}, f)


def one_run(schedule: str, texts: int = TEXTS) -> Dict[str, float]:
    """One 2-rank job: makespan (s), texts/s over it, and busy / (ranks x makespan)."""
    out, store = tempfile.mkdtemp(prefix="bench-text-"), tempfile.mkdtemp(prefix="bench-text-run-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHPROC_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "bench.schedule_text", "worker", schedule, str(texts), out, store + "/run"]
    try:
        subprocess.run(cmd, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=900)
        recs = [json.loads((Path(out) / f"r{r}.json").read_text()) for r in range(2)]
        ranks = [r["spans"] for r in recs]
        spans = [s for r in ranks for s in r]
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    span = max(b for _, _, b in spans) - min(a for _, a, _ in spans)
    busy = sum(b - a for _, a, b in spans) + sum(r["loading"] for r in recs)
    # the tail: the rank that finished first waits for the other's last batch
    tail = max(b for _, _, b in spans) - min(max(b for _, _, b in ranks[r]) for r in range(2) if ranks[r])
    return {"makespan": span, "texts_per_s": texts / span, "of_ideal": busy / (2 * span), "tail": tail}


def text_rows(table: Any, runs: int, small: bool = False) -> str:
    """Row y: dynamic vs static texts/s, and each against its own ideal (``small``: 48 texts)."""
    n = 48 if small else TEXTS
    dyn: List[Dict[str, float]] = []
    sta: List[Dict[str, float]] = []
    for _ in range(runs):  # alternated
        sta.append(one_run("static", n))
        dyn.append(one_run("dynamic", n))
    ratio = statistics.median(d["texts_per_s"] / s["texts_per_s"] for d, s in zip(dyn, sta))
    what = (f"uneven real work: {n} texts of lognormal lengths (median {MEDIAN_TOKENS}, {min(lengths(n))}-"
            f"{max(lengths(n))} tokens), batch {BATCH}, 3-layer TransformerEncoder (random weights), 2 ranks: "
            "dynamic vs static (texts/s over the makespan)")
    table.add("y", what, f"{statistics.median(d['texts_per_s'] for d in dyn):.1f}",
              f"{statistics.median(s['texts_per_s'] for s in sta):.1f}", ratio, "(report)", None)
    d_ideal = statistics.median(d["of_ideal"] for d in dyn)
    s_ideal = statistics.median(s["of_ideal"] for s in sta)
    table.add("y", "the same, each against its own ideal: time in process_batch and loading / (2 ranks x makespan) "
              "(dynamic; baseline column: static)", f"{d_ideal:.3f}", f"{s_ideal:.3f}", d_ideal / s_ideal,
              ">= 0.95 of ideal (dynamic)", d_ideal >= 0.95)
    dyn_s = ", ".join(f"{d['makespan']:.2f} (tail {d['tail']:.2f})" for d in dyn)
    sta_s = ", ".join(f"{s['makespan']:.2f}" for s in sta)
    return (f"Text rows (y): `python -m bench.schedule_text {runs}` (`bench/schedule_text.py`), {runs} alternated "
            "pairs; makespan from the first batch started to the last batch ended on either rank. The ideal is each "
            "run's own measured work (the ranks' summed time in process_batch and in loading: making the texts' "
            "tensors and padding them) divided by the 2 ranks, so CPU contention between the ranks counts as work, "
            "not as waiting. Makespans (s): dynamic "
            f"{dyn_s}; static {sta_s}. The tail is the time one rank waited, after its last batch, for the other's.")


class _Print:
    def add(self, row: str, what: str, ours: str, base: str, ratio: float, target: str, ok: Any) -> None:
        print(f"{row} | {what} | {ours} | {base} | {ratio:.3f} | {target} | {ok}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        print(text_rows(_Print(), int(sys.argv[1]) if len(sys.argv) > 1 else 3))
