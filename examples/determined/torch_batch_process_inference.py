"""Determined's CIFAR-10 batch inference example (torch_batch_process), ported to batchproc.

Source: determined-ai/determined, examples/features/torch_batch_process_core_api_comparison/
torch_batch_process_inference.py (Apache License 2.0), with its siblings ``constants.py`` and
``model.py``. Every rank classifies its share of CIFAR-10's test split and saves each batch's
predictions, with the batch itself, through ``context.upload_path()``: batchproc publishes them
under ``<run_dir>/outputs/`` when the checkpoint that covers them is committed.

    python -m launch.torch_distributed --nproc-per-node 2 -- python examples/determined/torch_batch_process_inference.py

Changed lines, and why (everything else is Determined's code as it is):

* ``from determined.pytorch import experimental`` became ``import batchproc as experimental``.
* ``import offline`` was added: the stand-ins for the downloads (``offline.py`` beside this file).
* ``tv.datasets.CIFAR10(root=constants.DATA_DIRECTORY, train=False, download=True,
  transform=transform)`` (a download) became ``tv.datasets.FakeData(size=offline.CIFAR10_TEST_SIZE,
  image_size=(3, 32, 32), num_classes=10, transform=transform)``: torchvision's generated images of
  CIFAR-10's shape and classes, each one made from its index, so every rank and attempt sees the
  same data; 10,000 of them as CIFAR-10's test split (``BATCHPROC_EXAMPLE_CIFAR10_SIZE`` to change).

``model.py`` builds Determined's CNN with randomly initialised weights (fixed seed): Determined's
loads trained weights from a Determined checkpoint, which does not exist here.
"""

import os
import pathlib

import constants
import filelock
import model
import offline
import torch
import torchvision as tv
import torchvision.transforms as transforms

import batchproc as experimental


class MyProcessor(experimental.TorchBatchProcessor):
    def __init__(self, context):
        self.model = context.prepare_model_for_inference(model.build_model())
        self.context = context

    def process_batch(self, batch, batch_idx) -> None:
        output_list = []
        model_input = batch[0]
        model_input = self.context.to_device(model_input)
        file_name = f"prediction_output_{batch_idx}"
        with torch.no_grad():
            pred = self.model(model_input)
            output = {"predictions": pred, "input": batch}
            output_list.append(output)

        # Automatic upload to output to the same storage used by determined checkpoints
        with self.context.upload_path() as path:
            file_path = pathlib.Path(path, file_name)
            torch.save(output_list, file_path)


def main():
    pathlib.Path.mkdir(pathlib.Path(constants.DATA_DIRECTORY), parents=True, exist_ok=True)
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    )
    lock = filelock.FileLock(constants.LOCK_FILE)
    with lock:
        inference_data = tv.datasets.FakeData(
            size=offline.CIFAR10_TEST_SIZE, image_size=(3, 32, 32), num_classes=10, transform=transform
        )

    experimental.torch_batch_process(
        MyProcessor,
        inference_data,
        batch_size=200,
        checkpoint_interval=5,
    )


if __name__ == "__main__":
    main()
