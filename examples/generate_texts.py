"""Text generation over a table of prompts, checkpointed and resumable.

Prompts come from JSON Lines or Parquet (or CSV; a file, folder, glob or fsspec URL) through
``batchproc.tables.TableRows``; a ``transformers`` causal LM continues each one with
``generate``. Every prompt gets an output row (``id``, ``index``, ``prompt``, ``completion``,
``prompt_tokens``, ``completion_tokens``, ``finish_reason``: ``stop`` at the end-of-text token,
else ``length``) in Parquet or JSON Lines shards under ``<run_dir>/outputs/``. The metrics count
prompts and tokens exactly across ranks and resumes, and give ``tokens_per_s``: completion tokens
per second of ``generate`` per process (the job's throughput is about that times the processes).

Decoding is greedy unless ``do_sample: true``; sampling is seeded per global batch
(``seed + batch``), so a batch redone after a preemption gets the same completions.

By default it continues the first lines of the standard library's module docstrings (written to
``./data/texts`` on first use) with a tiny GPT-2-shaped model with random weights, made offline
(``examples/text_data.py``): the text is noise, the job is real. ``model`` takes a folder written
by ``save_pretrained`` or a Hugging Face name (``gpt2``, ...) where you have the weights.

    batchproc run examples/generate_texts.yaml
    python examples/generate_texts.py --model /models/Qwen2.5-0.5B --max-new-tokens 64
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

import torch

from batchproc import MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext
from batchproc.writers import RowWriter

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling example modules
import text_data  # noqa: E402
from text_jobs import Options, as_bool, log, parse_options, resolve_model, run_text_job, token_limit  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks after the tokenizer ran
ROWS = "completions"  # the RowWriter's name: outputs/completions.<tag>.<ext>

OPTIONS: Options = {
    "data": (str, None, "table of prompts: file, folder, glob or fsspec URL (default: first lines of the "
             "standard library's docstrings, made under <data_root>/texts)"),
    "data_format": (str, "jsonl", "the default prompts' format, jsonl or parquet (a given data= goes by its suffix)"),
    "id_column": (str, "id", "column holding each prompt's id"),
    "prompt_column": (str, "prompt", "column holding each prompt"),
    "model": (str, "tiny", "tiny (a random GPT-2-shaped model made offline), a save_pretrained folder, or a "
              "Hugging Face model name"),
    "max_prompt_tokens": (int, 128, "prompt tokens at most (the start of a longer prompt is cut)"),
    "max_new_tokens": (int, 32, "tokens generated per prompt at most"),
    "do_sample": (as_bool, False, "sample instead of greedy decoding"),
    "temperature": (float, 1.0, "with do_sample: the sampling temperature"),
    "top_p": (float, 1.0, "with do_sample: nucleus sampling's probability mass"),
    "seed": (int, 0, "with do_sample: global batch g samples with seed + g"),
    "format": (str, "parquet", "outputs: parquet or jsonl"),
}


class TokenRate(MetricReducer):
    """Prompts and tokens summed over every slot, and completion tokens per second of generate."""

    def reset(self) -> None:
        self.prompts, self.prompt_tokens, self.completion_tokens, self.seconds = 0, 0, 0, 0.0

    def update(self, prompts: int, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.prompts += prompts
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.seconds += seconds

    def per_slot_reduce(self) -> Dict[str, Any]:
        return {"prompts": self.prompts, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "seconds": self.seconds}

    def cross_slot_reduce(self, per_slot_metrics: List[Dict[str, Any]]) -> Dict[str, Any]:
        total = {k: sum(s[k] for s in per_slot_metrics) for k in ("prompts", "prompt_tokens", "completion_tokens")}
        seconds = sum(s["seconds"] for s in per_slot_metrics)
        # Seconds of every slot of every attempt, summed: a rate per process, whatever the world size.
        total["tokens_per_s"] = total["completion_tokens"] / seconds if seconds > 0 else None
        total["generate_s"] = seconds
        return total


def completion_lengths(new_tokens: torch.Tensor, stop_ids: Set[int], pad_id: Optional[int]) -> List[int]:
    """Tokens each row generated: up to and including its first stop token, else up to padding."""
    lengths = []
    for row in new_tokens.tolist():
        n = next((k + 1 for k, t in enumerate(row) if t in stop_ids), None)
        if n is None:
            n = row.index(pad_id) if pad_id is not None and pad_id in row else len(row)
        lengths.append(n)
    return lengths


def stop_token_ids(tokenizer: Any, model: Any) -> Set[int]:
    """The ids generate stops at: the tokenizer's end of text and the model's (some models have several)."""
    ids: Set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update([value] if isinstance(value, int) else list(value or []))
    return ids


class GenerateProcessor(TorchBatchProcessor):
    """One completion per prompt, with its token counts; tokens/s in the metrics."""

    opts: Dict[str, Any]  # set on a subclass by text_jobs.run_text_job (the engine constructs the processor)

    def __init__(self, context: TorchBatchProcessorContext) -> None:
        super().__init__(context)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        o = self.opts
        tokenizer = AutoTokenizer.from_pretrained(o["model_path"])
        tokenizer.padding_side = "left"  # a batch's prompts all end where generation starts
        tokenizer.truncation_side = "left"  # keep a long prompt's end: that is what gets continued
        if tokenizer.pad_token is None:  # GPT-2 and many others have none
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        model = AutoModelForCausalLM.from_pretrained(o["model_path"], dtype=getattr(torch, o["dtype"]))
        self.model = context.prepare_model_for_inference(model)
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.max_prompt_tokens = token_limit(o["max_prompt_tokens"], tokenizer)
        self.rate = context.wrap_reducer(TokenRate())
        self.writer = RowWriter(context, ROWS, o["format"])

    def process_batch(self, batch: Dict[str, Any], batch_idx: int) -> None:
        o, tok = self.opts, self.tokenizer
        prompts = [str(p) for p in batch[o["prompt_column"]]]
        ids = [str(i) for i in batch[o["id_column"]]]
        enc = tok(prompts, padding=True, truncation=True, max_length=self.max_prompt_tokens, return_tensors="pt")
        enc = self.context.to_device(dict(enc))
        sampling: Dict[str, Any] = {"do_sample": False}
        if o["do_sample"]:
            sampling = {"do_sample": True, "temperature": o["temperature"], "top_p": o["top_p"]}
            torch.manual_seed(o["seed"] + self.context.global_batch_idx)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=o["max_new_tokens"], pad_token_id=tok.pad_token_id,
                                      **sampling)
        new = out[:, enc["input_ids"].shape[1]:].cpu()  # the copy waits for the device: timed with it
        seconds = time.perf_counter() - started
        lengths = completion_lengths(new, self.stop_ids, tok.pad_token_id)
        prompt_tokens = enc["attention_mask"].sum(dim=1).cpu().tolist()
        for j, index in enumerate(self.context.batch_indices):
            n = lengths[j]
            stopped = n > 0 and int(new[j, n - 1]) in self.stop_ids
            self.writer.add_row({
                "id": ids[j], "index": index, "prompt": prompts[j],
                "completion": tok.decode(new[j, :n], skip_special_tokens=True),
                "prompt_tokens": int(prompt_tokens[j]), "completion_tokens": n,
                "finish_reason": "stop" if stopped else "length",
            })
        self.rate.update(len(ids), int(sum(prompt_tokens)), int(sum(lengths)), seconds)

    def on_checkpoint_start(self) -> None:
        self.writer.flush()


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_options("generate_texts", __doc__ or "", OPTIONS, argv)
    opts["model_path"] = resolve_model(opts["model"], text_data.ensure_tiny_causal_lm, opts["data_root"])
    data = opts["data"] or text_data.ensure_prompts(opts["data_root"], opts["data_format"])  # locks: any rank may
    log(f"generate_texts: continuing the prompts of {data} with {opts['model_path']}")
    return run_text_job("generate_texts", GenerateProcessor, opts, data,
                        [opts["id_column"], opts["prompt_column"]], "completions")


if __name__ == "__main__":
    sys.exit(main())
