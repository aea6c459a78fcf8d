"""Offline stand-ins for what Determined's two examples download, the same shape, real components.

Determined's examples fetch ``bert-base-uncased`` and ``BeIR/scidocs`` from the Hugging Face hub
and CIFAR-10 from its website. Here nothing is downloaded:

* :func:`tiny_bert` is a folder that ``BertTokenizer.from_pretrained`` and
  ``BertModel.from_pretrained`` load like the hub's ``bert-base-uncased``: a real WordPiece
  tokenizer on the small vocabulary shipped in ``tiny_bert/vocab.txt`` (lower-cased, with BERT's
  special tokens), and a real ``BertModel`` built from a tiny ``BertConfig`` (2 layers, hidden size
  32, 512 positions as BERT's) whose weights are randomly initialised with a fixed seed, so every
  rank and every attempt has the same model.
* :func:`scidocs_corpus` is a JSON Lines file with BeIR corpus columns (``_id``, ``title``,
  ``text``): 600 short pseudo-abstracts generated from the vocabulary with a fixed seed; load it
  with the real ``datasets.load_dataset("json", ...)``.
* :data:`CIFAR10_TEST_SIZE` is the length of the stand-in for CIFAR-10's test split, which the
  example builds with ``torchvision.datasets.FakeData`` (3x32x32 images, 10 classes, each sample
  generated from its index): 10,000 as CIFAR-10's, or ``BATCHPROC_EXAMPLE_CIFAR10_SIZE``.

Files are generated once into ``$BATCHPROC_EXAMPLE_CACHE`` (default ``~/.cache/batchproc/examples``)
under a name that hashes what they are made of, written to a temporary folder and renamed into
place, so ranks that start together never see a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
import tempfile
from typing import Callable

HERE = pathlib.Path(__file__).resolve().parent
VOCAB = HERE / "tiny_bert" / "vocab.txt"
#: The tiny BERT's shape; BERT-base is hidden 768, 12 layers, 12 heads, intermediate 3072.
TINY_BERT_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "max_position_embeddings": 512, "type_vocab_size": 2}
SEED = 0
CORPUS_DOCS = 600
CIFAR10_TEST_SIZE = int(os.environ.get("BATCHPROC_EXAMPLE_CIFAR10_SIZE") or 10_000)
_VERSION = "1"  # bump when the generators below change what they write


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("BATCHPROC_EXAMPLE_CACHE")
                        or pathlib.Path.home() / ".cache" / "batchproc" / "examples")


def tiny_bert() -> str:
    """The folder of the tiny BERT (tokenizer files, ``config.json``, ``model.safetensors``)."""
    key = _key(VOCAB.read_bytes(), json.dumps(TINY_BERT_CONFIG, sort_keys=True), SEED)
    return str(_once(cache_root() / f"tiny-bert-{key}", _write_tiny_bert))


def scidocs_corpus() -> str:
    """The path of the stand-in corpus: JSON Lines with ``_id``, ``title``, ``text``."""
    key = _key(VOCAB.read_bytes(), CORPUS_DOCS, SEED)
    return str(_once(cache_root() / f"scidocs-{key}", _write_corpus) / "corpus.jsonl")


def corpus_words() -> list:
    """The vocabulary's whole words (no special tokens, punctuation or ``##`` pieces)."""
    return [w for w in VOCAB.read_text().split() if w.isalpha()]


def _write_tiny_bert(folder: pathlib.Path) -> None:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    tokenizer = BertTokenizer(vocab_file=str(VOCAB), do_lower_case=True)
    config = BertConfig(vocab_size=len(tokenizer.vocab), **TINY_BERT_CONFIG)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(SEED)
        model = BertModel(config)
    tokenizer.save_pretrained(str(folder))
    model.save_pretrained(str(folder), safe_serialization=True)


def _write_corpus(folder: pathlib.Path) -> None:
    rng = random.Random(SEED)
    words = corpus_words()

    def sentence() -> str:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 18)))
        return text[0].upper() + text[1:] + "."

    with open(folder / "corpus.jsonl", "w") as f:
        for i in range(CORPUS_DOCS):
            doc = {"_id": f"doc-{i:05d}",
                   "title": " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))).capitalize(),
                   "text": " ".join(sentence() for _ in range(rng.randint(1, 4)))}
            f.write(json.dumps(doc) + "\n")


def _key(*parts: object) -> str:
    h = hashlib.sha256(_VERSION.encode())
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:12]


def _once(target: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """``target`` made by ``write`` into a temporary sibling folder, then renamed into place."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        os.rename(tmp, target)  # atomic; fails if another process got there first, which is fine
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
