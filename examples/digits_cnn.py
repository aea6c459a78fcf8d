"""A small CNN for scikit-learn's 8x8 handwritten digits, and the preprocessing it was trained with.

Trained by ``examples/train_digits_cnn.py``; weights in ``examples/weights/digits_cnn.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

DIGIT_CLASSES = [str(i) for i in range(10)]
WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "digits_cnn.pt"
SIZE = 8
# Pixel statistics of the 1,797 digits (gray levels scaled to [0, 1]).
MEAN, STD = 0.305, 0.376


class DigitsCNN(nn.Module):
    """Two conv blocks and a linear head: (N, 1, 8, 8) normalized gray -> (N, 10) logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),                                      # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),                                      # 4x4 -> 2x2
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 2 * 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_preprocess() -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 RGB CHW tensor (any size) -> normalized float (1, 8, 8), as in training."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Grayscale(1), v2.Resize((SIZE, SIZE), antialias=True),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD])])


def load_digits_cnn(weights: "str | Path" = WEIGHTS_FILE) -> DigitsCNN:
    """A :class:`DigitsCNN` with the trained weights (a plain state_dict, loaded weights-only)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"digits CNN weights not found at {path}; "
                                "train them with `python examples/train_digits_cnn.py`")
    model = DigitsCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model
