"""The text examples (``examples/embed_texts.py``, ``examples/generate_texts.py``) run as a user
runs them: ``batchproc run`` -> our launcher -> torchrun -> 2 ranks, offline (the standard
library's docstrings, tiny random models made by ``examples/text_data.py``).

For each: an uninterrupted run of its shipped experiment file, and a run preempted mid-way by a
SIGTERM to the job (exit 75), then resumed. The embedding job's resumed run is also SIGKILLed
between two Chroma upserts of ``on_finish`` and run once more. After each, every id is in the
outputs exactly once with what a plain in-process loop computes for it, the metrics are exact,
and the Chroma collection holds each id once with its embedding.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from batchproc.data.writers import read_rows
from tests.support import PY, ROOT, Procs, Tracked, shared_fs, write_config

sys.path.insert(0, str(ROOT / "examples"))
import text_data  # noqa: E402

COMPLETED, PREEMPTED = 0, 75
DOCS, DOC_BATCH = 200, 16  # 13 batches, the last one partial
PROMPTS, PROMPT_BATCH, NEW_TOKENS = 160, 16, 8  # 10 batches
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False",
           "TOKENIZERS_PARALLELISM": "false"}


def batches(n: int, size: int) -> int:
    return -(-n // size)


@pytest.fixture(scope="session")
def text_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus and tiny models, made before any job starts (the ranks only read them), once per
    test run: xdist's workers share the folder (text_data locks and marks it complete)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "text-examples"
    text_data.ensure_documents(root)
    text_data.ensure_prompts(root)
    text_data.ensure_tiny_encoder(root)
    text_data.ensure_tiny_causal_lm(root)
    return root


@functools.lru_cache(maxsize=None)
def table(root: Path, name: str, n: int) -> List[Dict[str, Any]]:
    import pyarrow.parquet as pq

    path = text_data.ensure_documents(root) if name == "documents" else text_data.ensure_prompts(root, "parquet")
    return pq.read_table(path).slice(0, n).to_pylist()


def write_table(rows: List[Dict[str, Any]], path: Path) -> str:
    """A test's input table: Parquet in row groups of 50, or JSON Lines (by the suffix)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=50)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Job:
    """One experiment's runs: ``batchproc run CONFIG [--set ...]`` in this test's folder."""

    def __init__(self, procs: Procs, tmp: Path, name: str, config: Path, sets: Dict[str, Any]) -> None:
        self.procs, self.tmp, self.config = procs, tmp, config
        self.sets = [f"--set={k}={json.dumps(v)}" for k, v in sets.items()]
        self.run_dir = tmp / "runs" / name
        self.mark = tmp / "mark"

    def start(self, **hooks: str) -> Tracked:
        env = dict(OFFLINE, TEXT_JOB_MARK=str(self.mark), **{f"TEXT_JOB_{k.upper()}": v for k, v in hooks.items()})
        return self.procs.start([PY, "-m", "batchproc", "run", self.config, *self.sets], env=env)

    def run(self) -> Any:
        return self.procs.finish(self.start(), timeout=300)

    def status(self) -> Dict[str, Any]:
        status: Dict[str, Any] = json.loads((self.run_dir / "status.json").read_text())
        return status

    def metrics(self) -> Dict[str, Any]:
        metrics: Dict[str, Any] = json.loads((self.run_dir / "metrics.json").read_text())
        return metrics

    def wait_for_marks(self, p: Tracked, *names: str, timeout: float = 240) -> None:
        paths = [Path(f"{self.mark}.{n}") for n in names]
        deadline = time.monotonic() + timeout
        while not all(path.exists() for path in paths):
            assert p.poll() is None, f"the job ended (rc={p.poll()}) before {names}:\n{p.output}"
            assert time.monotonic() < deadline, f"no {names} in {timeout:g}s:\n{p.output}"
            time.sleep(0.1)
        for path in paths:
            path.unlink()

    def preempt_midway(self, total: int) -> int:
        """SIGTERM to the job once each rank has done its first batch; returns the committed batches."""
        p = self.start(pause_after="1")
        self.wait_for_marks(p, "paused.r0", "paused.r1")
        os.killpg(p.pid, signal.SIGTERM)
        out = self.procs.finish(p, timeout=180)
        assert out.rc == PREEMPTED, out.out
        status = self.status()
        committed: int = status["committed_batches"]
        assert status["state"] == "preempted" and 0 < committed < total, status
        return committed

    def assert_completed(self, out: Any, total: int) -> None:
        assert out.rc == COMPLETED, out.out
        status = self.status()
        assert status["state"] == "completed", status
        assert status["committed_batches"] == status["total_batches"] == total, status


def by_id(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The rows keyed by id, after checking that no id is there twice."""
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), sorted(i for i in set(ids) if ids.count(i) > 1)
    return {r["id"]: r for r in rows}


def close(a: List[float], b: List[float], tol: float = 1e-4) -> bool:
    return max(abs(x - y) for x, y in zip(a, b)) < tol and len(a) == len(b)


# -- embeddings ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents(text_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[str, List[Dict[str, Any]]]:
    rows = table(text_root, "documents", DOCS)
    return write_table(rows, tmp_path_factory.mktemp("docs") / "documents.parquet"), rows


@pytest.fixture(scope="module")
def reference_embeddings(text_root: Path, documents: Tuple[str, List[Dict[str, Any]]]) -> Dict[str, List[float]]:
    """Each document's embedding from a plain loop over the job's batches (mean of the last hidden
    states over the real tokens, L2-normalised)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = text_data.ensure_tiny_encoder(text_root)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    rows = documents[1]
    out: Dict[str, List[float]] = {}
    for start in range(0, len(rows), DOC_BATCH):
        part = rows[start:start + DOC_BATCH]
        enc = tokenizer([r["text"] for r in part], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
        out.update(zip((r["id"] for r in part), pooled.tolist()))
    return out


def embed_job(procs: Procs, tmp: Path, text_root: Path, data: str, *, wrapped: bool = False) -> Job:
    """The shipped examples/embed_texts.yaml (or a copy whose entrypoint adds the test hooks)."""
    sets = {"checkpoint_storage.host_path": str(tmp / "runs"), "hyperparameters.data": data,
            "hyperparameters.data_root": str(text_root), "hyperparameters.chroma": str(tmp / "chroma"),
            "hyperparameters.batch_size": DOC_BATCH, "hyperparameters.checkpoint_interval": 2,
            "hyperparameters.upsert_batch": 50}
    config = ROOT / "examples" / "embed_texts.yaml"
    if wrapped:
        config = write_config(tmp / "embed.yaml", ["examples/embed_texts.py"], shared_fs(tmp / "runs"),
                              name="embed-texts", script="tests/scripts/text_job.py")
    return Job(procs, tmp, "embed-texts", config, sets)


def assert_embeddings_once(job: Job, documents: List[Dict[str, Any]], reference: Dict[str, List[float]]) -> None:
    rows = by_id(read_rows(str(job.run_dir), name="embeddings"))
    assert sorted(rows) == sorted(d["id"] for d in documents)
    texts = {d["id"]: d["text"] for d in documents}
    for i, row in rows.items():
        assert row["text"] == texts[i] and documents[row["index"]]["id"] == i
        assert close(row["embedding"], reference[i]), i
    assert job.metrics() == {"documents": len(documents), "tokens": sum(r["tokens"] for r in rows.values())}


def collection(job: Job) -> Dict[str, Any]:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(str(job.tmp / "chroma"), settings=Settings(anonymized_telemetry=False))
    try:
        col = client.get_collection("stdlib-docs")
        got: Dict[str, Any] = col.get(include=["documents", "embeddings", "metadatas"])
        got["count"] = col.count()
        return got
    finally:
        client.clear_system_cache()  # read afresh next time: a job writes it in between


def assert_collection_once(job: Job, documents: List[Dict[str, Any]], reference: Dict[str, List[float]],
                           complete: bool = True) -> int:
    """Each id in the collection once, with its text and embedding; every id when ``complete``."""
    got = collection(job)
    ids = got["ids"]
    assert got["count"] == len(ids) == len(set(ids)), ids
    texts = {d["id"]: d["text"] for d in documents}
    assert set(ids) <= set(texts)
    if complete:
        assert len(ids) == len(documents)
    for i, text, embedding, meta in zip(ids, got["documents"], got["embeddings"], got["metadatas"]):
        assert text == texts[i] and documents[meta["index"]]["id"] == i
        assert close(list(embedding), reference[i]), i
    return len(ids)


@pytest.mark.xdist_group(name="text-embed")
def test_embed_texts_uninterrupted(procs: Procs, tmp_path: Path, text_root: Path, documents: Any,
                                   reference_embeddings: Dict[str, List[float]]) -> None:
    job = embed_job(procs, tmp_path, text_root, documents[0])
    out = job.run()
    job.assert_completed(out, batches(DOCS, DOC_BATCH))
    assert f"upserted {DOCS} embeddings" in out.out, out.out
    assert_embeddings_once(job, documents[1], reference_embeddings)
    assert_collection_once(job, documents[1], reference_embeddings)


@pytest.mark.xdist_group(name="text-embed")
def test_embed_texts_preempted_resumed_killed_in_on_finish_then_rerun(
        procs: Procs, tmp_path: Path, text_root: Path, documents: Any,
        reference_embeddings: Dict[str, List[float]]) -> None:
    total = batches(DOCS, DOC_BATCH)
    job = embed_job(procs, tmp_path, text_root, documents[0], wrapped=True)
    committed = job.preempt_midway(total)
    partial = by_id(read_rows(str(job.run_dir), name="embeddings"))
    assert 0 < len(partial) < DOCS and not (tmp_path / "chroma").exists()

    # Resumed; SIGKILLed in on_finish between two upserts (of 50 rows): some ids are in Chroma.
    p = job.start(block_upsert="1")
    job.wait_for_marks(p, "blocked")
    p.kill_all()
    assert job.status()["state"] == "finishing", job.status()
    assert_embeddings_once(job, documents[1], reference_embeddings)
    assert 0 < assert_collection_once(job, documents[1], reference_embeddings, complete=False) < DOCS

    # Run again: no batch is left, on_finish upserts every id again; each is there once.
    again = job.run()
    job.assert_completed(again, total)
    assert committed < total
    assert_embeddings_once(job, documents[1], reference_embeddings)
    assert_collection_once(job, documents[1], reference_embeddings)


# -- generation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(text_root: Path) -> List[Dict[str, Any]]:
    return table(text_root, "prompts", PROMPTS)


@pytest.fixture(scope="module")
def reference_completions(text_root: Path, prompts: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Each prompt's greedy completion from a plain loop over the job's batches (left padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = text_data.ensure_tiny_causal_lm(text_root)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left", truncation_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    eos = tokenizer.eos_token_id
    out: Dict[str, Dict[str, Any]] = {}
    for start in range(0, len(prompts), PROMPT_BATCH):
        part = prompts[start:start + PROMPT_BATCH]
        enc = tokenizer([r["prompt"] for r in part], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        for r, new, mask in zip(part, generated[:, enc["input_ids"].shape[1]:].tolist(), enc["attention_mask"]):
            n = new.index(eos) + 1 if eos in new else len(new)
            out[r["id"]] = {"completion": tokenizer.decode(new[:n], skip_special_tokens=True), "completion_tokens": n,
                            "prompt_tokens": int(mask.sum()), "finish_reason": "stop" if eos in new else "length"}
    return out


def generate_job(procs: Procs, tmp: Path, text_root: Path, data: str, *, wrapped: bool = False,
                 output_format: str = "parquet") -> Job:
    sets = {"checkpoint_storage.host_path": str(tmp / "runs"), "hyperparameters.data": data,
            "hyperparameters.data_root": str(text_root), "hyperparameters.batch_size": PROMPT_BATCH,
            "hyperparameters.checkpoint_interval": 2, "hyperparameters.max_new_tokens": NEW_TOKENS,
            "hyperparameters.format": output_format}
    config = ROOT / "examples" / "generate_texts.yaml"
    if wrapped:
        config = write_config(tmp / "generate.yaml", ["examples/generate_texts.py"], shared_fs(tmp / "runs"),
                              name="generate-texts", script="tests/scripts/text_job.py")
    return Job(procs, tmp, "generate-texts", config, sets)


def assert_completions_once(job: Job, prompts: List[Dict[str, Any]], reference: Dict[str, Dict[str, Any]]) -> None:
    rows = by_id(read_rows(str(job.run_dir), name="completions"))
    assert sorted(rows) == sorted(p["id"] for p in prompts)
    texts = {p["id"]: p["prompt"] for p in prompts}
    for i, row in rows.items():
        assert row["prompt"] == texts[i] and prompts[row["index"]]["id"] == i
        assert {k: row[k] for k in reference[i]} == reference[i], (i, row)
    metrics = job.metrics()
    assert metrics.pop("tokens_per_s") > 0 and metrics.pop("generate_s") > 0
    assert metrics == {"prompts": len(prompts),
                       "prompt_tokens": sum(r["prompt_tokens"] for r in reference.values()),
                       "completion_tokens": sum(r["completion_tokens"] for r in reference.values())}


@pytest.mark.xdist_group(name="text-generate")
def test_generate_texts_uninterrupted_from_json_lines(procs: Procs, tmp_path: Path, text_root: Path,
                                                       prompts: List[Dict[str, Any]],
                                                       reference_completions: Dict[str, Dict[str, Any]]) -> None:
    data = write_table(prompts, tmp_path / "prompts.jsonl")
    job = generate_job(procs, tmp_path, text_root, data)
    job.assert_completed(job.run(), batches(PROMPTS, PROMPT_BATCH))
    assert_completions_once(job, prompts, reference_completions)


@pytest.mark.xdist_group(name="text-generate")
def test_generate_texts_preempted_then_resumed_from_parquet(procs: Procs, tmp_path: Path, text_root: Path,
                                                             prompts: List[Dict[str, Any]],
                                                             reference_completions: Dict[str, Dict[str, Any]]) -> None:
    total = batches(PROMPTS, PROMPT_BATCH)
    data = write_table(prompts, tmp_path / "prompts.parquet")
    job = generate_job(procs, tmp_path, text_root, data, wrapped=True, output_format="jsonl")
    job.preempt_midway(total)
    partial = by_id(read_rows(str(job.run_dir), name="completions"))
    assert 0 < len(partial) < PROMPTS
    job.assert_completed(job.run(), total)
    assert_completions_once(job, prompts, reference_completions)


def test_text_data_is_the_standard_library_docstrings(text_root: Path) -> None:
    import ast
    import sysconfig

    rows = table(text_root, "documents", 10_000)
    assert len(rows) > 300 and len({r["id"] for r in rows}) == len(rows)
    json_doc = next(r for r in rows if r["id"] == "json")
    source = Path(sysconfig.get_paths()["stdlib"], "json", "__init__.py").read_text()
    assert json_doc["text"] == ast.get_docstring(ast.parse(source))
    assert json_doc["title"] == json_doc["text"].splitlines()[0]


def test_completion_lengths_stop_at_a_stop_token_or_padding() -> None:
    import torch

    import generate_texts

    new = torch.tensor([[5, 6, 0, 9], [5, 6, 7, 8], [5, 1, 1, 1], [2, 1, 1, 1]])
    assert generate_texts.completion_lengths(new, {0, 2}, pad_id=1) == [3, 4, 1, 1]


def test_bad_options_name_the_option_and_a_missing_model_folder_says_what_to_use(tmp_path: Path) -> None:
    import text_jobs

    with pytest.raises(ValueError, match="option 'dtype': expected float32, bfloat16 or float16, got 'int8'"):
        text_jobs.parse_options("embed_texts", "", {}, [], {"dtype": "int8"})
    with pytest.raises(FileNotFoundError, match=f"model folder not found: {tmp_path}/nope .*'tiny'"):
        text_jobs.resolve_model(str(tmp_path / "nope"), text_data.ensure_tiny_encoder, str(tmp_path))
    assert text_jobs.resolve_model("org/some-model", text_data.ensure_tiny_encoder, str(tmp_path)) == "org/some-model"
