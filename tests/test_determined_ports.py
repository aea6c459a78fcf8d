"""Determined's two examples (``examples/determined/``), run as a user runs them, on 2 ranks.

``batchproc run CONFIG`` -> our launcher -> torchrun -> 2 ranks, each running the example through
``tests/scripts/determined_run.py``, which runs the example's code unchanged and only adds hooks:
the example's ``/tmp`` becomes the test's own folder (as Determined's configs bind-mount ``/tmp``),
callbacks are traced, and a rank can pause (so a signal lands mid-way) or block in ``on_finish``
(so a SIGKILL lands there). For each example, two tests:

* an uninterrupted run (and Determined's callback order in it);
* a run preempted mid-way (SIGTERM to the job's process group: exit 75), resumed, SIGKILLed in
  ``on_finish`` of the resumed run, and run again (which runs only ``on_finish``). One scenario
  rather than two, to spend one run less: the resumed run is the one killed in ``on_finish``.

After every run that got that far, every document is in the Chroma collection exactly once with
its own embedding, and every CIFAR-10 stand-in image is predicted exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "determined"
RUNNER = "tests/scripts/determined_run.py"
EMBED = "examples/determined/bert_embedding_generation.py"
CIFAR = "examples/determined/torch_batch_process_inference.py"
PY = sys.executable
DOCS = 500  # the example embeds the first 500 documents of the corpus
EMBED_BATCHES = -(-DOCS // 64)
IMAGES = 1200  # the CIFAR-10 stand-in's length for these tests (6 batches of 200)
CIFAR_BATCHES = IMAGES // 200
COMPLETED, PREEMPTED = 0, 75


@functools.lru_cache(maxsize=None)
def examples_module(name: str) -> Any:
    """A sibling module of the examples (``offline``, ``model``), under a name of its own here."""
    spec = importlib.util.spec_from_file_location(f"determined_examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def example_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The offline stand-ins, generated here before any job starts (the ranks then only read
    them), once per test run: xdist's workers share the folder (generation is atomic)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "determined-examples-cache"
    os.environ["BATCHPROC_EXAMPLE_CACHE"] = str(cache)  # for offline's functions in this process
    offline = examples_module("offline")
    offline.tiny_bert()
    offline.scidocs_corpus()
    return str(cache)


class Job:
    """One example's experiment: its config, its run directory, its ``/tmp``, one trace per run."""

    def __init__(self, procs: Any, tmp: Path, example: str, cache: str) -> None:
        self.procs, self.tmp, self.cache = procs, tmp, cache
        self.name = Path(example).stem.replace("_", "-")
        self.run_dir = tmp / "runs" / self.name
        self.fake_tmp = tmp / "tmp"
        self.config = tmp / "experiment.yaml"
        self.config.write_text(
            f"name: {self.name}\n"
            f"entrypoint: python3 -m launch.torch_distributed python3 {RUNNER} {example}\n"
            "resources:\n  slots_per_trial: 2\n"
            "max_restarts: 0\n"
            f"checkpoint_storage:\n  type: shared_fs\n  host_path: {tmp / 'runs'}\n")
        self.runs = 0

    def start(self, **hooks: str) -> Tuple[Any, Path]:
        """``batchproc run`` started, with the runner's hooks; returns (process, its trace file)."""
        self.runs += 1
        trace = self.tmp / f"trace{self.runs}"
        env = {
            "DETERMINED_PORT_TMP": str(self.fake_tmp),
            "DETERMINED_PORT_TRACE": str(trace),
            "BATCHPROC_EXAMPLE_CACHE": self.cache,
            "BATCHPROC_EXAMPLE_CIFAR10_SIZE": str(IMAGES),
            # Nothing may come from the network: the Hugging Face libraries are told so.
            "HF_HOME": str(self.tmp / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        }
        env.update({f"DETERMINED_PORT_{k.upper()}": v for k, v in hooks.items()})
        return self.procs.start([PY, "-m", "batchproc", "run", self.config], env=env), trace

    def run(self) -> Tuple[Any, List[Tuple[str, int, str]]]:
        p, trace = self.start()
        return self.procs.finish(p, timeout=240), read_trace(trace)

    def status(self) -> Dict[str, Any]:
        return json.loads((self.run_dir / "status.json").read_text())


def read_trace(trace: Path) -> List[Tuple[str, int, str]]:
    if not trace.exists():
        return []
    return [(e, int(r), b) for e, r, b, _ in (line.split() for line in trace.read_text().splitlines())]


def wait_for_files(p: Any, *paths: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        assert p.poll() is None, f"the job ended (rc={p.poll()}) before {[str(x) for x in paths]}:\n{p.output}"
        assert time.monotonic() < deadline, f"none of {[str(x) for x in paths]} in {timeout:g}s:\n{p.output}"
        time.sleep(0.1)


def assert_completed(job: Job, out: Any, batches: int) -> None:
    assert out.rc == COMPLETED, out.out
    status = job.status()
    assert status["state"] == "completed", status
    assert status["committed_batches"] == status["total_batches"] == batches, status


def assert_determined_order(trace: List[Tuple[str, int, str]], batches: int) -> None:
    """Determined's callback order: every batch, then the final ``on_checkpoint_start`` of every
    rank, then ``on_finish`` on every rank (and no callback after it)."""
    events = [e for e, _, _ in trace]
    assert sorted((r, int(b)) for e, r, b in trace if e == "process_batch") == \
        sorted((g % 2, g // 2) for g in range(batches)), trace  # rank r: global batches r, r+2, ...
    first_finish = events.index("on_finish_start")
    assert {r for e, r, _ in trace[:first_finish] if e == "on_checkpoint_start"} == {0, 1}, trace
    assert all(e in ("on_finish_start", "on_finish_end") for e in events[first_finish:]), trace
    assert sorted(r for e, r, _ in trace if e == "on_finish_end") == [0, 1], trace
    last_ckpt = {r: max(i for i, (e, rr, _) in enumerate(trace) if e == "on_checkpoint_start" and rr == r)
                 for r in (0, 1)}
    last_batch = {r: max(i for i, (e, rr, _) in enumerate(trace) if e == "process_batch" and rr == r)
                  for r in (0, 1)}
    assert all(last_batch[r] < last_ckpt[r] for r in (0, 1)), trace  # the last batches were flushed


def assert_resumed_where_committed(trace: List[Tuple[str, int, str]], committed: int, batches: int) -> None:
    """The resumed attempt processed exactly the uncommitted batches, and ``batch_idx`` kept
    Determined's meaning (the rank's own batch count, continued from the committed steps)."""
    assert committed % 2 == 0  # 2 ranks stop at the same step
    resumed = sorted((r, int(b)) for e, r, b in trace if e == "process_batch")
    assert resumed == sorted((g % 2, g // 2) for g in range(committed, batches)), trace


def assert_only_on_finish(trace: List[Tuple[str, int, str]]) -> None:
    """A rerun of a run that stopped in ``on_finish``: no batch, ``on_finish`` again on every rank."""
    assert "process_batch" not in [e for e, _, _ in trace], trace
    assert sorted(r for e, r, _ in trace if e == "on_finish_end") == [0, 1], trace


# -- the embedding example -------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def corpus() -> List[Dict[str, str]]:
    offline = examples_module("offline")
    with open(offline.scidocs_corpus()) as f:
        return [json.loads(line) for line in f][:DOCS]


@functools.lru_cache(maxsize=None)
def reference_embeddings(ids: Tuple[str, ...]) -> Dict[str, List[float]]:
    """What the example computes for these documents, in this process (one batch)."""
    import torch
    from transformers import BertModel, BertTokenizer

    offline = examples_module("offline")
    tokenizer = BertTokenizer.from_pretrained(offline.tiny_bert())
    model = BertModel.from_pretrained(offline.tiny_bert(), output_hidden_states=True).eval()
    texts = {d["_id"]: d["text"] for d in corpus()}
    enc = tokenizer([texts[i] for i in ids], truncation=True, padding="max_length", max_length=512,
                    return_tensors="pt")
    with torch.no_grad():
        out = model(enc["input_ids"], enc["attention_mask"])
    return dict(zip(ids, torch.mean(out["hidden_states"][-1], dim=1).tolist()))


def assert_collection_exactly_once(job: Job, cleaned_up: bool = True) -> None:
    """Every document in the Chroma collection once, with its text and its own embedding (and,
    once ``on_finish`` returned, the embedding files removed)."""
    import chromadb

    client = chromadb.PersistentClient(str(job.fake_tmp / "chroma"))
    try:
        collection = client.get_collection("scidocs_embedding")
        got = collection.get(include=["documents", "embeddings"])
        count = collection.count()
    finally:
        client.clear_system_cache()  # read afresh next time: another process writes in between
    docs = corpus()
    assert count == len(got["ids"]) == DOCS
    assert sorted(got["ids"]) == sorted(d["_id"] for d in docs)
    texts = {d["_id"]: d["text"] for d in docs}
    assert all(text == texts[i] for i, text in zip(got["ids"], got["documents"]))
    embeddings = dict(zip(got["ids"], got["embeddings"]))
    assert {len(e) for e in embeddings.values()} == {32}
    sample = tuple(d["_id"] for d in docs[::23])  # spread over every batch and both ranks
    for i, expected in reference_embeddings(sample).items():
        assert max(abs(a - b) for a, b in zip(embeddings[i], expected)) < 1e-4, i
    assert (job.fake_tmp / "data" / "bert_scidocs_embeddings").exists() != cleaned_up


def preempt_midway(job: "Job", total: int) -> Tuple[int, Path]:
    """SIGTERM once each rank has processed its first batch: exit 75, some but not all committed.
    Returns the committed batches and the attempt's trace."""
    p, trace = job.start(pause_after="1")
    wait_for_files(p, Path(f"{trace}.paused.r0"), Path(f"{trace}.paused.r1"))
    os.killpg(p.pid, signal.SIGTERM)
    first = job.procs.finish(p, timeout=120)
    assert first.rc == PREEMPTED, first.out
    status = job.status()
    committed: int = status["committed_batches"]
    assert status["state"] == "preempted" and 0 < committed < total, status
    return committed, trace


@pytest.mark.xdist_group(name="determined-embeddings")
def test_embeddings_uninterrupted(procs: Any, tmp_path: Path, example_cache: str) -> None:
    job = Job(procs, tmp_path, EMBED, example_cache)
    out, trace = job.run()
    assert_completed(job, out, EMBED_BATCHES)
    assert_determined_order(trace, EMBED_BATCHES)
    assert_collection_exactly_once(job)


@pytest.mark.xdist_group(name="determined-embeddings")
def test_embeddings_preempted_resumed_killed_in_on_finish_rerun(procs: Any, tmp_path: Path,
                                                                 example_cache: str) -> None:
    job = Job(procs, tmp_path, EMBED, example_cache)
    committed, trace = preempt_midway(job, EMBED_BATCHES)
    assert "on_finish_start" not in [e for e, _, _ in read_trace(trace)]  # only once all work is done
    assert not (job.fake_tmp / "chroma").exists()

    # 2. Resumed, and SIGKILLed in on_finish: rank 0 stops after its Chroma upsert, before it
    #    removes the embedding files.
    p, trace = job.start(block="rmtree")
    wait_for_files(p, Path(f"{trace}.blocked.r0"))
    p.kill_all()
    assert job.status()["state"] == "finishing", job.status()
    assert_resumed_where_committed(read_trace(trace), committed, EMBED_BATCHES)
    assert_collection_exactly_once(job, cleaned_up=False)

    # 3. Run again: no batch, on_finish again (it upserts the same ids again), then completed.
    again, trace = job.run()
    assert_completed(job, again, EMBED_BATCHES)
    assert_only_on_finish(trace)
    assert_collection_exactly_once(job)


# -- the CIFAR-10 example --------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def cifar_inputs() -> Tuple[Any, Any]:
    """The stand-in dataset as the example builds it: (images N x 3 x 32 x 32, labels)."""
    import torch
    import torchvision as tv
    import torchvision.transforms as transforms

    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    data = tv.datasets.FakeData(size=IMAGES, image_size=(3, 32, 32), num_classes=10, transform=transform)
    images, labels = zip(*(data[i] for i in range(IMAGES)))
    return torch.stack(images), torch.tensor(labels)


def image_key(image: Any) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def assert_predicted_exactly_once(job: Job) -> None:
    """Every image of the stand-in dataset in one published output, with its label, predicted
    as the model predicts it; nothing else published."""
    import torch

    images, labels = cifar_inputs()
    index = {image_key(img): i for i, img in enumerate(images)}
    assert len(index) == IMAGES  # the images tell their samples apart
    seen: List[int] = []
    predictions = {}
    files = sorted(p for p in (job.run_dir / "outputs").rglob("*") if p.is_file())
    assert len(files) == CIFAR_BATCHES, files  # one file per batch
    for f in files:
        assert f.name.startswith("prediction_output_"), f
        (output,) = torch.load(f, weights_only=True)
        batch_images, batch_labels = output["input"]
        for img, label, pred in zip(batch_images, batch_labels, output["predictions"]):
            i = index[image_key(img)]
            assert int(label) == int(labels[i])
            seen.append(i)
            predictions[i] = pred
    assert sorted(seen) == list(range(IMAGES))
    model = examples_module("model").build_model().eval()
    sample = list(range(0, IMAGES, 97))
    with torch.no_grad():
        expected = model(images[sample])
    assert torch.allclose(torch.stack([predictions[i] for i in sample]), expected, atol=1e-4)


@pytest.mark.xdist_group(name="determined-cifar")
def test_cifar_uninterrupted(procs: Any, tmp_path: Path, example_cache: str) -> None:
    job = Job(procs, tmp_path, CIFAR, example_cache)
    out, trace = job.run()
    assert_completed(job, out, CIFAR_BATCHES)
    assert_determined_order(trace, CIFAR_BATCHES)
    assert_predicted_exactly_once(job)


@pytest.mark.xdist_group(name="determined-cifar")
def test_cifar_preempted_resumed_killed_in_on_finish_rerun(procs: Any, tmp_path: Path, example_cache: str) -> None:
    job = Job(procs, tmp_path, CIFAR, example_cache)
    committed, trace = preempt_midway(job, CIFAR_BATCHES)
    published = [f for f in (job.run_dir / "outputs").rglob("*") if f.is_file()]
    assert len(published) == committed  # committed work is published, and nothing else

    # 2. Resumed, and SIGKILLed in on_finish (every rank stops as its on_finish begins).
    p, trace = job.start(block="start")
    wait_for_files(p, Path(f"{trace}.blocked.r0"), Path(f"{trace}.blocked.r1"))
    p.kill_all()
    assert job.status()["state"] == "finishing", job.status()
    assert_resumed_where_committed(read_trace(trace), committed, CIFAR_BATCHES)
    assert_predicted_exactly_once(job)  # every output was published before on_finish

    # 3. Run again: no batch, on_finish again, then completed.
    again, trace = job.run()
    assert_completed(job, again, CIFAR_BATCHES)
    assert_only_on_finish(trace)
    assert_predicted_exactly_once(job)
