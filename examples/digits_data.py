"""Real images for the default experiment, offline: scikit-learn's handwritten digits as PNG files.

``load_digits()`` ships inside scikit-learn: 1,797 real 8x8 scans (UCI optdigits, 16 gray levels),
so nothing is downloaded. They are written once in ImageFolder layout::

    <root>/digits/<class>/<index>.png      # e.g. data/digits/7/0017.png; <index> is the row of load_digits()

The PNGs keep the native 8x8 resolution (gray 0..16 scaled to 0..255): upscaling would add bytes
but no information, the digits CNN reads 8x8 directly, and other models' preprocessing resizes
anyway. ``<index>`` is zero-padded so the sorted file order follows ``load_digits()`` per class.

Usage: python examples/digits_data.py [ROOT]      (ROOT defaults to ./data)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

N_DIGITS = 1797
MARKER = ".complete"  # written last: its presence means every file is there


def digits_index(path: "str | os.PathLike[str]") -> int:
    """The ``load_digits()`` row a digits PNG was made from (its file name)."""
    return int(Path(path).stem)


def ensure_digits_folder(root: "str | os.PathLike[str]" = "data") -> str:
    """Write the digits PNGs under ``<root>/digits`` unless already there; return that folder.

    Safe to call from every rank at once: a file lock serializes the writers, and the marker file
    written last makes an interrupted write start over instead of passing for complete.
    """
    from filelock import FileLock

    folder = Path(root) / "digits"
    if (folder / MARKER).exists():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / ".digits.lock")):
        if not (folder / MARKER).exists():  # another process may have finished meanwhile
            _write_digits(folder)
    return str(folder)


def _write_digits(folder: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert len(digits.images) == N_DIGITS, len(digits.images)
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        Image.fromarray(image).save(folder / str(int(label)) / f"{i:04d}.png")
    (folder / MARKER).write_text(f"{N_DIGITS}\n")


if __name__ == "__main__":
    print(ensure_digits_folder(sys.argv[1] if len(sys.argv) > 1 else "data"))
