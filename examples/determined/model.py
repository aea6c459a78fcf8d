"""The CIFAR-10 classifier of Determined's torch_batch_process example (its sibling ``model.py``).

A small CNN for 3x32x32 images and 10 classes, as in Determined's example. Determined's module
can load trained weights from a Determined checkpoint; there is no Determined here, so the
weights are randomly initialised with a fixed seed: every rank and every attempt builds the same
model, and its predictions can be checked against a single-process reference.
"""

import torch
from torch import nn

IMAGE_SIZE = 32
NUM_CHANNELS = 3
NUM_CLASSES = 10
SEED = 0


def build_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(SEED)
        return nn.Sequential(
            nn.Conv2d(NUM_CHANNELS, 32, kernel_size=(3, 3)),
            nn.ReLU(),
            nn.Conv2d(32, 32, kernel_size=(3, 3)),
            nn.ReLU(),
            nn.MaxPool2d((2, 2)),
            nn.Dropout2d(0.25),
            nn.Conv2d(32, 64, (3, 3), padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, (3, 3)),
            nn.ReLU(),
            nn.MaxPool2d((2, 2)),
            nn.Dropout2d(0.25),
            nn.Flatten(),
            nn.Linear(2304, 512),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(512, NUM_CLASSES),
        )
