"""Determined's BERT embedding example, ported to batchproc.

Source: determined-ai/determined, examples/features/torch_batch_process_embeddings/
bert_embedding_generation.py (Apache License 2.0). Every rank embeds its share of the corpus with
BERT, flushes its embeddings to files at each checkpoint, and after the last checkpoint of every
rank, rank 0 upserts all of them into a Chroma collection (``/tmp/chroma``, as in Determined).

    python -m launch.torch_distributed --nproc-per-node 2 -- python examples/determined/bert_embedding_generation.py

Changed lines, and why (everything else is Determined's code as it is):

* ``from determined.pytorch import experimental`` became ``import batchproc as experimental``.
* ``import offline`` was added: the stand-ins for the downloads (``offline.py`` beside this file).
* ``BertTokenizer.from_pretrained("bert-base-uncased")`` and
  ``BertModel.from_pretrained("bert-base-uncased", output_hidden_states=True)`` take
  ``offline.tiny_bert()`` in place of ``"bert-base-uncased"`` (a download from the Hugging Face
  hub): a local folder with a real WordPiece tokenizer on a small vocabulary and a tiny, randomly
  initialised ``BertModel`` (2 layers, hidden size 32, 512 positions).
* ``load_dataset("BeIR/scidocs", "corpus", split="corpus")`` (a download) became
  ``load_dataset("json", data_files=offline.scidocs_corpus(), split="train")``: a local corpus of
  600 generated documents with BeIR's columns (``_id``, ``title``, ``text``), loaded by the real
  ``datasets.load_dataset``.
* ``torch.load(file_path, map_location="cuda:0")`` became ``map_location=self.device`` (not a
  download): Determined's example assumes a GPU, and on a machine without one that call raises.
  Rank 0's device is ``cuda:0`` wherever there are GPUs, so nothing changes there.

Its ``on_finish`` is not idempotent at one point: killed after ``shutil.rmtree`` removed the
embedding files but before it returned, a rerun finds no file and Chroma refuses the empty upsert.
Killed anywhere before that, a rerun upserts the same ids again and the collection is unchanged.
"""

import logging
import os
import pathlib
import shutil

import chromadb
import offline
import torch
from datasets import load_dataset
from transformers import BertModel, BertTokenizer

import batchproc as experimental


class EmbeddingProcessor(experimental.TorchBatchProcessor):
    def __init__(self, context):
        self.tokenizer = BertTokenizer.from_pretrained(offline.tiny_bert())
        self.model = BertModel.from_pretrained(offline.tiny_bert(), output_hidden_states=True)

        self.device = context.device

        self.model = context.prepare_model_for_inference(self.model)

        self.output = []

        self.context = context
        self.last_index = 0
        self.rank = self.context.distributed.get_rank()

        self.output_dir = "/tmp/data/bert_scidocs_embeddings"
        os.makedirs(self.output_dir, exist_ok=True)

    def process_batch(self, batch, batch_idx) -> None:
        with torch.no_grad():
            tokenized_text = self.tokenizer.batch_encode_plus(
                batch["text"],
                truncation=True,
                padding="max_length",
                max_length=512,
                add_special_tokens=True,
            )
            inputs = torch.tensor(tokenized_text["input_ids"])
            inputs = inputs.to(self.device)
            masks = torch.tensor(tokenized_text["attention_mask"])
            masks = masks.to(self.device)

            outputs = self.model(inputs, masks)

            # To create an embedding vector for each document,
            # 1. we take the hidden states from the last layer (output["hidden_states"][-1]),
            #    which is a tensor of (#examples, #tokens, #hidden_states) size.
            # 2. we calculate the average across the token-dimension, resulting in a tensor of
            #    (#examples, #hidden_states) size.
            outputs = torch.mean(outputs["hidden_states"][-1], dim=1)

            self.output.append({"embeddings": outputs, "id": batch["_id"], "text": batch["text"]})
            self.last_index = batch_idx

    def on_checkpoint_start(self):
        """
        In this function, each worker persists the in-memory embeddings to the file system of the agent machine.
           - Note that our set-up is for demonstration purpose only. Production use cases should save to a
             shared file system directory bind-mounted to all agent machines and experiment containers.
        File names contain rank and batch index information to avoid duplication between:
        - files created by different workers
        - files created by the same worker for different batches of input data
        """
        if len(self.output) == 0:
            return
        file_name = f"bert_embedding_worker_{self.rank}_end_batch_{self.last_index}"
        file_path = pathlib.Path(self.output_dir, file_name)
        torch.save(self.output, file_path)
        self.output = []

    def on_finish(self):
        """
        In this function, the chief worker (rank 0):
        - initializes a Chroma client and creates a Chroma collection. The collection is persisted in the
          directory "/tmp/chroma" of the container. The "/tmp" directory in the container is a bind-mount of the
          "/tmp" directory on the agent machine (see distributed.yaml file).
          - Note that our set-up is for demonstration purpose only. Production use cases should use a
            shared file system directory bind-mounted to all agent machines and experiment containers.
        - reads in and insert embedding files generated from all workers to the Chroma collection
        """
        if self.rank == 0:
            chroma_dir = "/tmp/chroma"
            os.makedirs(chroma_dir, exist_ok=True)
            chroma_client = chromadb.PersistentClient(chroma_dir)
            collection = chroma_client.get_or_create_collection(name="scidocs_embedding")

            embeddings = []
            documents = []
            ids = []

            for file in os.listdir(self.output_dir):
                file_path = pathlib.Path(self.output_dir, file)
                batches = torch.load(file_path, map_location=self.device)
                for batch in batches:
                    for embedding in batch["embeddings"]:
                        embedding = embedding.tolist()
                        embeddings.append(embedding)
                    ids += batch["id"]
                    documents += batch["text"]

            collection.upsert(embeddings=embeddings, documents=documents, ids=ids)
            logging.info(f"Embedding contains {collection.count()} entries")

            # Clean-up temporary embedding files
            shutil.rmtree(self.output_dir)


if __name__ == "__main__":
    dataset = load_dataset("json", data_files=offline.scidocs_corpus(), split="train")
    # Persisting embeddings can take quite a while on Chroma
    # Adding a limit on dataset size to ensure the example finishes fast
    dataset = dataset.select(list(range(500)))
    experimental.torch_batch_process(
        EmbeddingProcessor,
        dataset,
        batch_size=64,
        checkpoint_interval=10,
    )
