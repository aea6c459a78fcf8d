"""Document embeddings, checkpointed and resumable, then loaded into a Chroma collection.

A table of documents (Parquet, JSON Lines or CSV; a file, folder, glob or fsspec URL) is read
with ``batchproc.tables.TableRows``; a ``transformers`` encoder embeds each row's text (mean of
the last hidden states over the real tokens, L2-normalised); every row gets an output row
(``id``, ``index``, ``embedding``, ``tokens``, and ``text`` unless ``documents: false``) in
Parquet shards under ``<run_dir>/outputs/``. When every batch is committed, rank 0's
``on_finish`` upserts every output row into a Chroma collection by id: a rerun of ``on_finish``
(after a kill during it, say) writes the same ids again, so the collection holds each id once.

By default it embeds the module docstrings of Python's standard library (written to
``./data/texts`` on first use) with a tiny BERT-shaped encoder with random weights, made offline
(``examples/text_data.py``); ``model`` takes a folder written by ``save_pretrained`` or a Hugging
Face name instead, e.g. ``sentence-transformers/all-MiniLM-L6-v2`` where you have it.

    batchproc run examples/embed_texts.yaml
    python examples/embed_texts.py --model /models/all-MiniLM-L6-v2 --chroma runs/chroma
    torchrun --standalone --nproc-per-node=2 examples/embed_texts.py --data 's3://bucket/docs/*.parquet'
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from batchproc import MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext
from batchproc.writers import RowWriter, list_outputs

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling example modules
import text_data  # noqa: E402
from text_jobs import (Options, as_bool, log, parse_options, resolve_model,  # noqa: E402
                       run_dir_storage_options, run_text_job, token_limit)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks after the tokenizer ran
ROWS = "embeddings"  # the RowWriter's name: outputs/embeddings.<tag>.parquet

OPTIONS: Options = {
    "data": (str, None, "table of documents: file, folder, glob or fsspec URL (default: the standard "
             "library's docstrings, made under <data_root>/texts)"),
    "id_column": (str, "id", "column holding each document's id (unique)"),
    "text_column": (str, "text", "column holding each document's text"),
    "model": (str, "tiny", "tiny (a random BERT-shaped encoder made offline), a save_pretrained folder, or a "
              "Hugging Face model name"),
    "max_length": (int, 256, "tokens per document at most (longer texts are truncated)"),
    "documents": (as_bool, True, "keep each text in the output rows and in Chroma"),
    "chroma": (str, "runs/chroma", "a folder for a persistent Chroma database, http://HOST:PORT of a Chroma "
               "server, or none (no upsert)"),
    "collection": (str, "stdlib-docs", "Chroma collection name"),
    "upsert_batch": (int, 1000, "rows per Chroma upsert call (at most the client's maximum)"),
}


class Count(MetricReducer):
    """Documents and tokens embedded, summed over every slot."""

    def reset(self) -> None:
        self.documents, self.tokens = 0, 0

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens

    def per_slot_reduce(self) -> Dict[str, int]:
        return {"documents": self.documents, "tokens": self.tokens}

    def cross_slot_reduce(self, per_slot_metrics: List[Dict[str, int]]) -> Dict[str, int]:
        return {k: sum(s[k] for s in per_slot_metrics) for k in ("documents", "tokens")}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row's hidden states over its real tokens (padding left out), L2-normalised."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(summed.float(), dim=1)


class EmbedProcessor(TorchBatchProcessor):
    """One embedding per document; rank 0 loads them all into Chroma in ``on_finish``."""

    opts: Dict[str, Any]  # set on a subclass by text_jobs.run_text_job (the engine constructs the processor)

    def __init__(self, context: TorchBatchProcessorContext) -> None:
        super().__init__(context)
        from transformers import AutoModel, AutoTokenizer

        o = self.opts
        self.tokenizer = AutoTokenizer.from_pretrained(o["model_path"])
        model = AutoModel.from_pretrained(o["model_path"], dtype=getattr(torch, o["dtype"]))
        self.model = context.prepare_model_for_inference(model)
        self.max_length = token_limit(o["max_length"], self.tokenizer)
        self.count = context.wrap_reducer(Count())
        self.writer = RowWriter(context, ROWS, "parquet")

    def process_batch(self, batch: Dict[str, Any], batch_idx: int) -> None:
        o = self.opts
        texts = [str(t) for t in batch[o["text_column"]]]
        ids = [str(i) for i in batch[o["id_column"]]]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = self.context.to_device(dict(enc))
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
            embeddings = mean_pool(hidden, enc["attention_mask"]).cpu()
        tokens = enc["attention_mask"].sum(dim=1).cpu().tolist()
        for j, index in enumerate(self.context.batch_indices):
            row = {"id": ids[j], "index": index, "embedding": embeddings[j].tolist(), "tokens": int(tokens[j])}
            if o["documents"]:
                row["text"] = texts[j]
            self.writer.add_row(row)
        self.count.update(len(ids), int(sum(tokens)))  # last: a batch that raised has counted nothing

    def on_checkpoint_start(self) -> None:
        self.writer.flush()

    def on_finish(self) -> None:
        o = self.opts
        if self.context.get_distributed_rank() != 0 or o["chroma"].lower() == "none":
            return
        n = upsert_outputs(self.context.run_dir, o["chroma"], o["collection"], o["upsert_batch"])
        log(f"embed_texts: upserted {n} embeddings into Chroma collection {o['collection']!r} at {o['chroma']}")


# -- Chroma ----------------------------------------------------------------------------------


def chroma_client(where: str) -> Any:
    """A persistent client on a local folder, or an HTTP client for ``http(s)://host:port``."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if where.startswith(("http://", "https://")):
        from urllib.parse import urlparse

        url = urlparse(where)
        return chromadb.HttpClient(host=url.hostname or "localhost", port=url.port or 8000,
                                   ssl=url.scheme == "https", settings=settings)
    return chromadb.PersistentClient(path=where, settings=settings)


def upsert_outputs(run_dir: str, where: str, name: str, batch: int) -> int:
    """Upsert every committed output row of ``run_dir`` into collection ``name``; the rows upserted.

    One shard at a time, so memory holds one shard, not the whole run. Upserting by id makes a
    second call leave the collection as the first did."""
    import fsspec
    import pyarrow.parquet as pq

    client = chroma_client(where)
    collection = client.get_or_create_collection(name, metadata={"hnsw:space": "cosine"})
    batch = max(1, min(batch, client.get_max_batch_size()))
    options = run_dir_storage_options()
    done = 0
    for url in list_outputs(run_dir, options, name=ROWS):
        with fsspec.open(url, "rb", **options) as f:
            table = pq.read_table(f)
        for start in range(0, table.num_rows, batch):
            upsert_rows(collection, table.slice(start, batch).to_pylist())
            done += min(batch, table.num_rows - start)
    return done


def upsert_rows(collection: Any, rows: List[Dict[str, Any]]) -> None:
    documents = [r["text"] for r in rows] if rows and "text" in rows[0] else None
    collection.upsert(ids=[r["id"] for r in rows], embeddings=[r["embedding"] for r in rows],
                      metadatas=[{"index": r["index"], "tokens": r["tokens"]} for r in rows], documents=documents)


# -- main ------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_options("embed_texts", __doc__ or "", OPTIONS, argv)
    opts["model_path"] = resolve_model(opts["model"], text_data.ensure_tiny_encoder, opts["data_root"])
    data = opts["data"] or text_data.ensure_documents(opts["data_root"])  # every rank may call it: it locks
    log(f"embed_texts: embedding the rows of {data} with {opts['model_path']}")
    return run_text_job("embed_texts", EmbedProcessor, opts, data,
                        [opts["id_column"], opts["text_column"]], "embeddings (Parquet)")


if __name__ == "__main__":
    sys.exit(main())
