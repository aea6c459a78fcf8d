"""Train :class:`DigitsCNN` on the digits PNGs and save ``examples/weights/digits_cnn.pt``.

The images are read through :class:`batchproc.images.ImageFiles` with the same preprocessing as
inference. Split: ``train_test_split`` of the 1,797 ``load_digits()`` rows, 25% held out,
stratified, ``random_state=0``. Deterministic (seeded, single-threaded); about 10 s on one CPU.

Usage: python examples/train_digits_cnn.py [--data ROOT] [--epochs N] [--out FILE]
"""

from __future__ import annotations

import argparse
from typing import Tuple

import torch
from torch import nn

from batchproc.images import ImageFiles
from digits_cnn import WEIGHTS_FILE, DigitsCNN, digits_preprocess
from digits_data import digits_index, ensure_digits_folder

SEED = 0


def load_split(root: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All images (N, 1, 8, 8), labels (N,), and a held-out mask, in ``load_digits()`` row order."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    ds = ImageFiles(ensure_digits_folder(root), transform=digits_preprocess())
    order = sorted(range(len(ds)), key=lambda i: digits_index(ds.files[i]))
    images = torch.stack([ds[i]["image"] for i in order])
    labels = torch.tensor([int(ds.classes[ds.labels[i]]) for i in order])
    rows = np.arange(len(order))
    _, test_rows = train_test_split(rows, test_size=0.25, stratify=labels.numpy(), random_state=SEED)
    held_out = torch.zeros(len(order), dtype=torch.bool)
    held_out[torch.from_numpy(test_rows)] = True
    return images, labels, held_out


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def train(images: torch.Tensor, labels: torch.Tensor, epochs: int) -> DigitsCNN:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(images) + 63) // 64))
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(images), generator=gen).split(64):
            x = _shift(images[batch], gen)
            loss = nn.functional.cross_entropy(model(x), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augmentation: shift each image by up to one pixel (handwriting is not centered exactly)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=float(x.min()))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="root of the digits folder (default ./data)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=str(WEIGHTS_FILE))
    args = parser.parse_args()
    torch.set_num_threads(1)  # same float summation order on every machine
    torch.use_deterministic_algorithms(True)
    images, labels, held_out = load_split(args.data)
    model = train(images[~held_out], labels[~held_out], args.epochs)
    torch.save(model.state_dict(), args.out)
    print(f"held-out accuracy ({int(held_out.sum())} images): {accuracy(model, images[held_out], labels[held_out]):.4f}")
    print(f"accuracy on all {len(images)} images: {accuracy(model, images, labels):.4f}")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
