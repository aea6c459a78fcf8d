"""Image files as a map-style dataset, from a local folder, a glob or any fsspec URL.

``ImageFiles("s3://bucket/dogs/Images/*/*.jpg", transform=standard_preprocess())`` lists the files
once, sorted (a resumed job must see the same order), and decodes each one with torchvision's
native decoders (JPEG, PNG, WebP, GIF) into a 3-channel ``uint8`` CHW tensor; PIL is only a
fallback for the formats torchvision cannot read (BMP, TIFF, ...).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

#: File name endings a folder listing keeps (a glob keeps whatever it matches).
IMG_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                                   ".ppm", ".pgm", ".pbm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABEL_MODES = ("auto", "parent", "none")
UNKNOWN_LABEL = -1

# torchvision 0.29 warns on every decode that its decoders are deprecated in favour of TorchCodec;
# they are what this module deliberately uses (pinned torchvision), so that one warning is silenced.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning, module="torchvision.io.image")

Transform = Callable[[torch.Tensor], Any]
_MAGIC = re.compile(r"[*?\[]")
_CPP_LOCATION = re.compile(r"^\w+, \S+\.cpp:\d+, ")  # "decode_jpeg, /__w/.../decode_jpeg.cpp:171, "


class ImageFiles(Dataset):
    """Image files named by a folder, a glob, a single file, or any fsspec URL of those.

    Items are ``{"image": transform(uint8 CHW RGB tensor), "label": int, "path": str}``.

    Labels (``labels=``):
      * ``"auto"``: a folder with sub-folders and no images directly in it is read in ImageFolder
        layout — each sub-folder is a class (``classes`` sorted by name, labels their indices),
        images found recursively inside it. Any other input (a glob, a flat folder, a single file) has no
        labels: every label is ``-1`` (:data:`UNKNOWN_LABEL`) and ``classes`` is empty.
      * ``"parent"``: the class of a file is the name of its parent folder, for any input (e.g.
        the glob ``Images/*/*.jpg`` of Stanford Dogs).
      * ``"none"``: every label is ``-1``.

    A folder listing keeps the files ending in ``extensions``; a glob keeps what it matches. Both
    skip hidden names (``.x``) below the folder or the glob's fixed prefix. Without a
    ``transform`` that makes every image the same size, batches of more than one image cannot be
    stacked by the default collate function.
    """

    def __init__(self, source: "str | os.PathLike[str]", transform: Optional[Transform] = None, *,
                 storage_options: Optional[Dict[str, Any]] = None, labels: str = "auto",
                 extensions: Sequence[str] = IMG_EXTENSIONS) -> None:
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        self.source = os.fspath(source)
        self.transform = transform
        self.storage_options = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(self.source, **self.storage_options)
        self._fs_cache: Any = fs
        self._fs_pid: Optional[int] = os.getpid()
        files, class_of = _list_files(fs, root, labels, tuple(e.lower() for e in extensions))
        if not files:
            raise ValueError(f"no image files found at {self.source!r} "
                             f"(a folder is searched for {', '.join(extensions)}; a glob is taken as is)")
        #: Class names, sorted; ``labels[i]`` indexes into it (empty when the input has no labels).
        self.classes: List[str] = sorted(set(class_of)) if class_of else []
        index = {c: i for i, c in enumerate(self.classes)}
        self.files: List[str] = files  # paths as the filesystem names them
        self.labels: List[int] = [index[c] for c in class_of] if class_of else [UNKNOWN_LABEL] * len(files)
        local = isinstance(fs, LocalFileSystem)
        #: What ``path`` holds per item: a local path, or a full URL (``s3://...``).
        self.paths: List[str] = files if local else [fs.unstrip_protocol(f) for f in files]

    def _fs(self) -> Any:
        # One filesystem per process: async clients (s3fs) must not be shared with forked workers.
        if self._fs_pid != os.getpid():
            self._fs_cache = fsspec.core.url_to_fs(self.source, **self.storage_options)[0]
            self._fs_pid = os.getpid()
        return self._fs_cache

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs_cache"], state["_fs_pid"] = None, None  # rebuilt in the receiving process
        return state

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        data = self._fs().cat_file(self.files[i])
        image = decode_image_bytes(data, self.paths[i])
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": self.labels[i], "path": self.paths[i]}

    def describe_sample(self, i: int) -> str:
        """The file behind sample ``i`` (batchproc names it when loading the sample fails)."""
        return self.paths[i]

    def __repr__(self) -> str:
        return f"ImageFiles({self.source!r}, {len(self)} files, {len(self.classes)} classes)"


def _list_files(fs: Any, root: str, labels: str, extensions: Tuple[str, ...]) -> Tuple[List[str], List[str]]:
    """Sorted file paths under ``root`` (a path on ``fs``), and their class names (empty when unlabeled)."""
    magic = _MAGIC.search(root)
    if magic:
        # Like a shell glob, wildcards do not match hidden names (".DS_Store", ".cache/").
        base = root[:magic.start()].rsplit("/", 1)[0]
        found = fs.glob(root, detail=True)
        files = sorted(p for p, info in found.items() if info.get("type") != "directory"
                       and not any(_hidden(c) for c in p[len(base) + 1:].split("/")))
        return files, ([_parent_name(p) for p in files] if labels == "parent" else [])
    if fs.isfile(root):
        return [root], ([_parent_name(root)] if labels == "parent" else [])
    if not fs.isdir(root):
        raise FileNotFoundError(f"no such file or folder: {fs.unstrip_protocol(root)!r}")
    root = root.rstrip("/")
    top = fs.ls(root, detail=True)
    subdirs = sorted(e["name"].rstrip("/") for e in top if e["type"] == "directory" and not _hidden(e["name"]))
    top_images = [e for e in top if e["type"] != "directory" and not _hidden(e["name"])
                  and e["name"].lower().endswith(extensions)]
    files = _images_under(fs, root, extensions)
    if labels == "parent":
        return files, [_parent_name(p) for p in files]
    if labels == "auto" and subdirs and not top_images:
        # ImageFolder layout: the first path component below the root is the class.
        return files, [p[len(root) + 1:].split("/", 1)[0] for p in files]
    return files, []


def _images_under(fs: Any, root: str, extensions: Tuple[str, ...]) -> List[str]:
    rel_start = len(root) + 1
    return sorted(p for p in fs.find(root)
                  if p.lower().endswith(extensions) and not any(_hidden(c) for c in p[rel_start:].split("/")))


def _hidden(name: str) -> bool:
    return name.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def _parent_name(path: str) -> str:
    parts = path.rstrip("/").split("/")
    return parts[-2] if len(parts) > 1 else ""


def decode_image_bytes(data: bytes, path: str = "<bytes>") -> torch.Tensor:
    """Encoded image bytes -> ``uint8`` RGB tensor (3, H, W), whatever the file's mode.

    torchvision converts grayscale, alpha, palette and CMYK (JPEG) images to RGB natively, and
    16-bit PNGs are scaled to 8 bits. Formats it cannot read go through PIL. A file neither can
    decode raises ``ValueError`` naming ``path``.
    """
    if not data:
        raise ValueError(f"cannot decode {path}: the file is empty")
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        image = _decode_with_pil(data, path, _CPP_LOCATION.sub("", str(e).strip()))
    if image.dtype != torch.uint8:  # 16-bit PNG
        from torchvision.transforms.v2.functional import to_dtype

        image = to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pil(data: bytes, path: str, tv_error: str) -> torch.Tensor:
    try:
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"cannot decode {path}: {tv_error} (PIL: {type(e).__name__}: {e})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


# -- preprocessing ---------------------------------------------------------------------------


def standard_preprocess(size: int = 224, resize: int = 256,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Transform:
    """The usual ImageNet evaluation transform on uint8 CHW tensors: resize the short side to
    ``resize`` (antialiased), center-crop ``size``, scale to [0, 1] floats, normalize."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def preprocess_from_weights(weights: Any) -> Transform:
    """The evaluation transform that torchvision weights were trained with (works on tensors).

    ``weights`` is a weights enum (``ResNet50_Weights.DEFAULT``) or its name
    (``"ResNet50_Weights.IMAGENET1K_V2"``); nothing is downloaded.
    """
    if isinstance(weights, str):
        from torchvision.models import get_weight

        weights = get_weight(weights)
    return weights.transforms()


__all__ = ["ImageFiles", "decode_image_bytes", "standard_preprocess", "preprocess_from_weights",
           "IMG_EXTENSIONS", "UNKNOWN_LABEL"]
