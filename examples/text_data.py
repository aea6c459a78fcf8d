"""Real text and tiny models for the text examples, offline: Python's own module docstrings.

Every Python installation ships its standard library as source, and most modules open with a
docstring written for people: a few hundred real documents, from one sentence to several pages.
They are read without importing anything (the first token of each file) and written once under
``<root>/texts/``::

    corpus/documents.parquet   # id (dotted module name), title (its first line), text (the docstring)
    corpus/prompts.jsonl       # id, prompt: the first line of each docstring, for generate_texts.py
    corpus/prompts.parquet     # the same rows as Parquet
    tiny-encoder/              # a BERT-shaped encoder with random weights (seed 0) and a WordPiece tokenizer
    tiny-causal-lm/            # a GPT-2-shaped causal LM with random weights (seed 0) and a byte-level BPE tokenizer

The tokenizers are trained on the documents with Hugging Face ``tokenizers`` and saved with the
models by ``save_pretrained``, so the examples load them with ``AutoTokenizer``/``AutoModel``
exactly as they load real pretrained weights from a folder.

Usage: python examples/text_data.py [ROOT]      (ROOT defaults to ./data)
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

MARKER = ".complete"  # written last in each folder: its presence means the folder is whole
SEED = 0
VOCAB_SIZE = 4000
MAX_POSITIONS = 256
# Folders of the standard library that hold tests, demos or GUI code rather than modules to read.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo",
             "lib2to3", "__pycache__", "ensurepip"}
MIN_CHARS = 40  # shorter docstrings ("Constants.") say too little to embed


def texts_folder(root: "str | os.PathLike[str]" = "data") -> Path:
    return Path(root) / "texts"


def ensure_documents(root: "str | os.PathLike[str]" = "data") -> str:
    """``<root>/texts/corpus/documents.parquet`` (made on first use); returns its path."""
    folder = _ensure(texts_folder(root) / "corpus", _write_corpus, root)
    return str(folder / "documents.parquet")


def ensure_prompts(root: "str | os.PathLike[str]" = "data", format: str = "jsonl") -> str:
    """``<root>/texts/corpus/prompts.jsonl`` (or ``.parquet``), made on first use; returns its path."""
    if format not in ("jsonl", "parquet"):
        raise ValueError(f"format must be jsonl or parquet, got {format!r}")
    folder = _ensure(texts_folder(root) / "corpus", _write_corpus, root)
    return str(folder / f"prompts.{format}")


def ensure_tiny_encoder(root: "str | os.PathLike[str]" = "data") -> str:
    """A folder ``AutoModel``/``AutoTokenizer.from_pretrained`` load: a tiny random BERT."""
    return str(_ensure(texts_folder(root) / "tiny-encoder", _write_tiny_encoder, root))


def ensure_tiny_causal_lm(root: "str | os.PathLike[str]" = "data") -> str:
    """A folder ``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` load: a tiny random GPT-2."""
    return str(_ensure(texts_folder(root) / "tiny-causal-lm", _write_tiny_causal_lm, root))


def _ensure(folder: Path, write: Callable[[Path, "str | os.PathLike[str]"], None],
            root: "str | os.PathLike[str]") -> Path:
    """``write(folder, root)`` once; safe from every rank at once (a file lock, a marker written last)."""
    from filelock import FileLock

    if (folder / MARKER).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if not (folder / MARKER).exists():  # another process may have finished meanwhile
            folder.mkdir(exist_ok=True)
            write(folder, root)
            (folder / MARKER).write_text("ok\n")
    return folder


# -- the corpus ------------------------------------------------------------------------------


def stdlib_docstrings(stdlib: Optional[Path] = None) -> Dict[str, str]:
    """Dotted module name -> module docstring, for the pure-Python standard library, sorted by name."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs: Dict[str, str] = {}
    for path in _module_files(stdlib):
        parts = list(path.relative_to(stdlib).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if not parts or not all(p.isidentifier() for p in parts):
            continue
        doc = _first_docstring(path)
        if doc and len(doc) >= MIN_CHARS:
            docs[".".join(parts)] = doc
    return dict(sorted(docs.items()))


def _module_files(folder: Path) -> Iterator[Path]:
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in SKIP_DIRS and not entry.name.startswith("."):
                yield from _module_files(Path(entry.path))
        elif entry.name.endswith(".py"):
            yield Path(entry.path)


def _first_docstring(path: Path) -> Optional[str]:
    """The module's docstring from its first tokens (no parse of the whole file, no import)."""
    skip = {tokenize.ENCODING, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT}
    try:
        with open(path, "rb") as f:
            for tok in tokenize.tokenize(f.readline):
                if tok.type in skip:
                    continue
                if tok.type != tokenize.STRING:
                    return None
                value = ast.literal_eval(tok.string)
                return _clean(value) if isinstance(value, str) else None
    except (SyntaxError, ValueError, UnicodeDecodeError, tokenize.TokenError):
        return None
    return None


def _clean(doc: str) -> str:
    import inspect

    return inspect.cleandoc(doc).strip()


def _write_corpus(folder: Path, root: "str | os.PathLike[str]") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = stdlib_docstrings()
    ids = list(docs)
    titles = [docs[i].splitlines()[0].strip() for i in ids]
    # Several row groups, as a real table has: readers of the examples go by row group.
    pq.write_table(pa.table({"id": ids, "title": titles, "text": [docs[i] for i in ids]}),
                   str(folder / "documents.parquet"), row_group_size=128)
    prompts = [{"id": i, "prompt": f"{i}: {t}"} for i, t in zip(ids, titles)]
    pq.write_table(pa.Table.from_pylist(prompts), str(folder / "prompts.parquet"), row_group_size=128)
    import json

    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts)


def corpus_texts(root: "str | os.PathLike[str]") -> List[str]:
    import pyarrow.parquet as pq

    return [str(t) for t in pq.read_table(ensure_documents(root), columns=["text"]).column("text").to_pylist()]


# -- the tiny models -------------------------------------------------------------------------


def _seeded(make: Callable[[], object]) -> object:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return make()


def _write_tiny_encoder(folder: Path, root: "str | os.PathLike[str]") -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus_texts(root), trainers.WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=MAX_POSITIONS)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=MAX_POSITIONS,
                        pad_token_id=tok.token_to_id("[PAD]"))
    model = _seeded(lambda: BertModel(config))
    tokenizer.save_pretrained(str(folder))
    model.save_pretrained(str(folder))


def _write_tiny_causal_lm(folder: Path, root: "str | os.PathLike[str]") -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    eos, pad = "<|endoftext|>", "<pad>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_texts(root), trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[eos, pad], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Left padding: a decoder-only model continues every prompt of a batch from its last token.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=pad,
                                        padding_side="left", model_max_length=MAX_POSITIONS)
    ids = {"bos_token_id": tok.token_to_id(eos), "eos_token_id": tok.token_to_id(eos),
           "pad_token_id": tok.token_to_id(pad)}
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=MAX_POSITIONS, n_embd=64, n_layer=2, n_head=2,
                        **ids)
    model = _seeded(lambda: GPT2LMHeadModel(config))
    model.generation_config = GenerationConfig(**ids)
    tokenizer.save_pretrained(str(folder))
    model.save_pretrained(str(folder))


if __name__ == "__main__":
    base = sys.argv[1] if len(sys.argv) > 1 else "data"
    for made in (ensure_documents(base), ensure_prompts(base), ensure_prompts(base, "parquet"),
                 ensure_tiny_encoder(base), ensure_tiny_causal_lm(base)):
        print(made)
