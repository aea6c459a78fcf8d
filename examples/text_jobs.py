"""What the two text examples share: their options, the model to load, the run's last words.

Options come from the experiment's ``hyperparameters`` (``batchproc run``); command-line flags are
the fallback when a hyperparameter is absent, then the example's defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from batchproc import get_hparams

# name -> (convert, default, help)
Options = Dict[str, Tuple[Callable[[Any], Any], Any, str]]


def as_json(text: Any) -> Dict[str, Any]:
    return json.loads(text) if isinstance(text, str) else dict(text)


def opt_int(text: Any) -> Optional[int]:
    return None if text in (None, "", "none", "None") else int(text)


def as_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def as_dtype(text: Any) -> str:
    if str(text) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"expected float32, bfloat16 or float16, got {text!r}")
    return str(text)


#: The options both examples take, after their own.
COMMON: Options = {
    "data_root": (str, "data", "folder where the default corpus and tiny models are made on first use"),
    "data_storage_options": (as_json, {}, "fsspec options for reading the data, as JSON"),
    "dtype": (as_dtype, "float32", "the model's weights: float32, bfloat16 or float16 (the latter two for GPUs)"),
    "batch_size": (int, 32, "rows per batch"),
    "checkpoint_interval": (int, 4, "batches per rank between checkpoints"),
    "max_batches": (opt_int, None, "cap on the batches each rank processes"),
    "num_workers": (opt_int, None, "DataLoader worker processes per rank (default: batchproc's, from the cores)"),
    "bad_batches": (str, "raise", "raise, or skip (a batch the model fails on is recorded in errors.jsonl)"),
    "max_bad_batches": (opt_int, None, "with skip: fail once more batches than this were skipped"),
    "storage": (str, None, "run directory (path or fsspec URL); default from batchproc run, else ./runs/<script>"),
}


def parse_options(name: str, doc: str, options: Options, argv: Optional[List[str]] = None,
                  hparams: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Hyperparameters, else command-line flags, else the defaults of ``options`` and :data:`COMMON`."""
    every = {**options, **COMMON}
    parser = argparse.ArgumentParser(prog=name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, (_, _, help_text) in every.items():
        parser.add_argument("--" + key.replace("_", "-"), dest=key, default=None, help=help_text)
    args = vars(parser.parse_args(argv))
    hparams = get_hparams() if hparams is None else hparams
    unknown = sorted(set(hparams) - set(every))
    if unknown and is_chief():
        print(f"{name}: ignoring unknown hyperparameters {unknown}", file=sys.stderr)
    opts = {}
    for key, (convert, default, _) in every.items():
        value = hparams[key] if key in hparams else args[key]
        try:
            opts[key] = default if value is None else convert(value)
        except ValueError as e:
            raise ValueError(f"{name}: option {key!r}: {e}") from None
    return opts


def is_chief() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    """Print on rank 0 only: every rank runs the same main()."""
    if is_chief():
        print(msg, flush=True)


def resolve_model(model: str, make_tiny: Callable[[str], str], data_root: str) -> str:
    """``tiny``: the offline tiny model (made under ``data_root`` on first use); a folder: that
    folder; anything else: a Hugging Face model name, loaded as ``transformers`` loads it (from
    its cache; set ``HF_HUB_OFFLINE=1`` to be sure nothing is fetched)."""
    if model == "tiny":
        return make_tiny(data_root)
    if Path(model).is_dir():
        return model
    if model.startswith((os.sep, ".", "~")) or Path(model).exists():  # meant as a path, not a hub name
        raise FileNotFoundError(f"model folder not found: {model} (use 'tiny', a folder written by "
                                "save_pretrained, or a Hugging Face model name)")
    return model


def token_limit(requested: int, tokenizer: Any) -> int:
    """``requested``, or less when the tokenizer knows its model takes fewer tokens."""
    known = getattr(tokenizer, "model_max_length", None)
    return min(requested, known) if isinstance(known, int) and known > 0 else requested


def run_dir_storage_options() -> Dict[str, Any]:
    """The run directory's fsspec options, as ``batchproc run`` passed them to the job."""
    from batchproc.settings import RunSettings

    return dict(RunSettings.from_env().storage_options)


def run_text_job(name: str, processor: type, opts: Dict[str, Any], data: str, columns: List[str],
                 rows: str) -> int:
    """Both examples' run: the rows of ``data`` (``columns`` only) through ``processor``, which
    reads ``opts`` from a class attribute (the engine constructs the processor), then :func:`report`."""
    from batchproc import torch_batch_process
    from batchproc.tables import TableRows

    dataset = TableRows(data, columns=columns, storage_options=opts["data_storage_options"] or None)
    loader_kwargs: Dict[str, Any] = {}
    if opts["num_workers"] is not None:
        loader_kwargs["num_workers"] = opts["num_workers"]
    result = torch_batch_process(
        type(processor.__name__, (processor,), {"opts": opts}), dataset, batch_size=opts["batch_size"],
        checkpoint_interval=opts["checkpoint_interval"], max_batches=opts["max_batches"],
        dataloader_kwargs=loader_kwargs, storage=opts["storage"], bad_batches=opts["bad_batches"],
        max_bad_batches=opts["max_bad_batches"])
    return report(name, result, rows)


def report(name: str, result: Any, rows: str) -> int:
    """The run's last lines on rank 0; the exit code (0 also when preempted: the launcher reports
    that from the run state, and a non-zero code would make torchrun restart the job)."""
    if result.preempted:
        log(f"{name}: preempted after {result.steps_completed}/{result.total_batches} batches; progress is saved "
            f"in {result.run_dir}: run the same command again to resume")
        return 0
    run_dir = result.run_dir.rstrip("/")
    log(f"{name}: done: {result.total_batches} batches; {rows} in {run_dir}/outputs/ "
        f"(batchproc.writers.read_rows({run_dir!r})), metrics in {run_dir}/metrics.json")
    log("metrics: " + json.dumps(result.metrics, sort_keys=True))
    return 0
