"""Image files as a map-style dataset, from a local folder, a glob or any fsspec URL.

``ImageFiles("s3://bucket/dogs/Images/*/*.jpg", transform=standard_preprocess())`` serves the
files sorted by path, and decodes each one with torchvision's native decoders (JPEG, PNG, WebP,
GIF) into a 3-channel ``uint8`` CHW tensor; PIL is only a fallback for the formats torchvision
cannot read (BMP, TIFF, ...).

Listing is lazy. Under ``torch_batch_process`` the files are listed once per run, by rank 0 of
the first attempt, and every rank of every attempt serves that frozen list (see
:mod:`batchproc.data.inputs`): files added later are not part of the run, and a file gone or changed
since (size, or ETag on S3, or modification time on local disk) fails as a bad sample naming it.
Alone, the first ``len()`` or item lists the source.

Decoding is bounded: an image whose header claims more than ``max_pixels`` pixels (default
:data:`DEFAULT_MAX_PIXELS`, PIL's limit) is not decoded but fails as a bad sample naming the file
and its claimed size (a 633-byte JPEG may claim 65500x65500 pixels, 12 GiB decoded).

On object stores the files of a batch are fetched concurrently (and, under batchproc's loader,
those of the next batches while this one decodes), one request per file: :meth:`ImageFiles.prefetch`
and :meth:`ImageFiles.load_samples`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import os
import re
import struct
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image

from batchproc.errors import ImageTooLargeError, InputChangedError
from batchproc.data.inputs import IntColumn, Manifest, etag_version, mtime_version, printable
from batchproc.data.listing import MAX_IN_FLIGHT, FileSource, Found, PrefixedColumn, join_prefix, reader_kind, version_kind
from batchproc.data.samples import BatchLoads
from batchproc.data.listing import S3_POOL_CONNECTIONS, glob_once as _glob_once  # noqa: F401  # their old home

#: File name endings a folder listing keeps (a glob keeps whatever it matches).
IMG_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                                   ".ppm", ".pgm", ".pbm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LABEL_MODES = ("auto", "parent", "none")
UNKNOWN_LABEL = -1
#: Pixels an image's header may claim before it is refused undecoded (PIL's default error threshold,
#: ``2 * PIL.Image.MAX_IMAGE_PIXELS``: a 13,377 x 13,377 image, 537 MB as RGB).
DEFAULT_MAX_PIXELS = 178_956_970

# torchvision 0.29 warns on every decode that its decoders are deprecated in favour of TorchCodec;
# they are what this module deliberately uses (pinned torchvision), so that one warning is silenced.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning, module="torchvision.io.image")

Transform = Callable[[torch.Tensor], Any]
_CPP_LOCATION = re.compile(r"^\w+, \S+\.cpp:\d+, ")  # "decode_jpeg, /__w/.../decode_jpeg.cpp:171, "


class ImageFiles(FileSource, BatchLoads, Dataset[Dict[str, Any]]):
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

    ``max_pixels``: an image whose header claims more pixels (width x height, times the frames of
    a GIF) is not decoded; loading it raises :class:`~batchproc.errors.ImageTooLargeError` naming
    the file, a bad sample like any other. ``None`` decodes whatever the header claims (PIL's own
    ``Image.MAX_IMAGE_PIXELS`` still applies to the formats only PIL reads).

    ``files``, ``paths`` and ``labels`` are read-only sequences over the columnar manifest (they
    compare equal to lists); ``classes`` is a list.
    """

    item_noun = "files"

    def __init__(self, source: "str | os.PathLike[str]", transform: Optional[Transform] = None, *,
                 storage_options: Optional[Dict[str, Any]] = None, labels: str = "auto",
                 extensions: Sequence[str] = IMG_EXTENSIONS,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> None:
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        _check_max_pixels(max_pixels)
        self.max_pixels = max_pixels
        self.transform = transform
        self.label_mode = labels
        self.extensions = tuple(e.lower() for e in extensions)
        self._open_source(source, storage_options)
        self._manifest: Optional[Manifest] = None
        self._listing: Optional[Manifest] = None  # this process's own listing, until a run freezes one
        self._classes: List[str] = []
        self._classes_read = False
        self._reader: Optional[_Reader] = None

    # -- the frozen-inputs protocol (batchproc.data.inputs) ---------------------------------------

    def batchproc_source(self) -> str:
        """The normalized URL (an absolute path locally), plus the options that change the listing."""
        where = self._where()
        options = []
        if self.label_mode != "auto":
            options.append(f"labels={self.label_mode}")
        if self.extensions != IMG_EXTENSIONS:
            options.append(f"extensions={','.join(self.extensions)}")
        return f"{where} ({'; '.join(options)})" if options else where

    def batchproc_list_inputs(self) -> Manifest:
        """List the source (once per process: a listing already made here is reused)."""
        if self._listing is None:
            self._listing = _list_images(self, self.batchproc_source(), self.label_mode, self.extensions)
        if not len(self._listing):
            raise ValueError(f"no image files found at {self.source!r} "
                             f"(a folder is searched for {', '.join(self.extensions)}; a glob is taken as is)")
        return self._listing

    def batchproc_use_inputs(self, manifest: Manifest) -> None:
        """Serve ``manifest``'s files (the run's frozen inputs) from now on."""
        if self._classes_read and list(manifest.classes) != self._classes:
            warnings.warn(f"ImageFiles({self.source!r}): the classes read before the run started "
                          f"({len(self._classes)}) are not those of the run's frozen inputs "
                          f"({len(manifest.classes)}); labels follow the frozen inputs. Read `classes` "
                          f"after torch_batch_process() has started (e.g. in the processor) to get them.",
                          stacklevel=2)
        self._serve(manifest)
        self._listing = None  # a later run lists afresh

    def _serve(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._classes = list(manifest.classes)
        self._reader = None

    @property
    def manifest(self) -> Manifest:
        """The files served: the run's frozen inputs, or this process's listing (made on demand,
        and the one a run started next in this process freezes)."""
        if self._manifest is None:
            self._serve(self.batchproc_list_inputs())
        assert self._manifest is not None
        return self._manifest

    # -- the listing, as sequences --------------------------------------------------------------

    @property
    def classes(self) -> List[str]:
        """Class names, sorted; ``labels[i]`` indexes into it (empty when the input has no labels)."""
        self.manifest
        self._classes_read = True
        return self._classes

    @property
    def labels(self) -> IntColumn:
        return IntColumn(self.manifest.labels)

    @property
    def files(self) -> "PrefixedColumn":
        """Paths as the filesystem names them."""
        m = self.manifest
        return PrefixedColumn(join_prefix(m.root), m.paths)

    @property
    def paths(self) -> "PrefixedColumn":
        """What ``path`` holds per item: a local path, or a full URL (``s3://...``)."""
        m = self.manifest
        if self._local:
            return PrefixedColumn(join_prefix(m.root), m.paths)
        return PrefixedColumn(join_prefix(self._fs().unstrip_protocol(m.root) if m.root else ""), m.paths)

    def __len__(self) -> int:
        return len(self.manifest)

    # -- reading -------------------------------------------------------------------------------

    def _get_reader(self) -> "_Reader":
        fs = self._fs()
        if self._reader is None:
            self._reader = _Reader(fs, self.manifest, self._local, self.paths)
        return self._reader

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start fetching these samples' files now (on object stores; a no-op on local disk)."""
        self._get_reader().prefetch([self._index(i) for i in indices])

    def load_samples(self, indices: Sequence[int]) -> List[Any]:
        """Samples ``indices``, their files fetched concurrently; a sample that fails to load is the
        exception it raised, so one bad file is one bad sample."""
        reader = self._get_reader()
        good = []
        for i in indices:
            try:
                good.append(self._index(i))
            except IndexError:
                pass
        reader.prefetch(good)
        out: List[Any] = []
        for i in indices:
            try:
                i = self._index(i)
                path = reader.url(i)
                image = decode_image_bytes(reader.read(i), printable(path), max_pixels=self.max_pixels)
                if self.transform is not None:
                    image = self.transform(image)
                out.append({"image": image, "label": int(self.manifest.labels[i]), "path": path})
            except Exception as e:
                out.append(e)
        return out

    def describe_sample(self, i: int) -> str:
        """The file behind sample ``i`` (batchproc names it when loading the sample fails), as
        valid Unicode (:func:`~batchproc.data.inputs.printable`)."""
        return printable(self.paths[i])

    def __repr__(self) -> str:
        if self._manifest is None:
            return f"ImageFiles({self.source!r}, not listed yet)"
        return f"ImageFiles({self.source!r}, {len(self)} files, {len(self._classes)} classes)"


# -- reading files ---------------------------------------------------------------------------


async def _get_s3(fs: Any, path: str) -> Tuple[bytes, Optional[str]]:
    """One GET: the bytes and the ETag they came with (s3fs's ``cat_file`` drops the ETag, and
    with its default ``max_concurrency`` sends a HEAD first: two round trips)."""
    from batchproc.rundir.storage import is_transient

    bucket, key, version_id = fs.split_path(path)
    extra = {"VersionId": version_id} if version_id else {}
    for attempt in range(3):
        try:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)  # retries its own errors
            try:
                data = await resp["Body"].read()
            finally:
                resp["Body"].close()
            return data, resp.get("ETag")
        except Exception as e:  # a body cut short is worth another try; a missing key is not
            if attempt == 2 or not is_transient(e):
                raise
            await asyncio.sleep(0.2 * 2 ** attempt)
    raise AssertionError("unreachable")


async def _get_async(fs: Any, path: str) -> Tuple[bytes, Optional[str]]:
    return await fs._cat_file(path), None


async def _in_turn(limit: asyncio.Semaphore, get: Callable[[Any, str], Any], fs: Any, path: str) -> Any:
    async with limit:  # FIFO: requests start in the order prefetch() was given them
        return await get(fs, path)


class _Reader:
    """One process's reads of one manifest. On async filesystems (S3, GCS, HTTP, ...) each file is
    one request on fsspec's IO loop, started by :meth:`prefetch` and collected by :meth:`read`; on
    local disk reads are plain and synchronous (the page cache is faster than any overlap)."""

    MIN_PENDING = 1024  # prefetched files not yet read, at least (a wrong guess of the next batch is dropped)

    def __init__(self, fs: Any, manifest: Manifest, local: bool, urls: PrefixedColumn) -> None:
        self.fs = fs
        self.manifest = manifest
        self.urls = urls
        self.kind = reader_kind(fs, local)
        self.pending: "collections.OrderedDict[int, concurrent.futures.Future[Tuple[bytes, Optional[str]]]]" = \
            collections.OrderedDict()
        self.max_pending = self.MIN_PENDING
        self.limit = asyncio.Semaphore(MAX_IN_FLIGHT)  # bound to fsspec's IO loop when first awaited there

    def url(self, i: int) -> str:
        return self.urls[i]

    def name(self, i: int) -> str:
        """File ``i`` as messages name it."""
        return printable(self.urls[i])

    def prefetch(self, indices: Sequence[int]) -> None:
        if self.kind in ("local", "sync"):
            return
        get = _get_s3 if self.kind == "s3" else _get_async
        # Never so small that a hint evicts files of the batch being read (the oldest entries).
        self.max_pending = max(self.max_pending, 2 * len(indices))
        for i in indices:
            if i not in self.pending:
                self.pending[i] = asyncio.run_coroutine_threadsafe(
                    _in_turn(self.limit, get, self.fs, self.manifest.path(i)), self.fs.loop)
        while len(self.pending) > self.max_pending:
            self.pending.popitem(last=False)[1].cancel()

    def read(self, i: int) -> bytes:
        """File ``i``'s bytes, checked against the manifest; raises :class:`InputChangedError` naming
        the file if it is gone or changed."""
        try:
            if self.kind == "local":
                return self._read_local(i)
            if self.kind == "sync":
                data = self.fs.cat_file(self.manifest.path(i))
                self._check_size(i, len(data))
                return data  # type: ignore[no-any-return]
            future = self.pending.pop(i, None)
            if future is None:
                self.prefetch([i])
                future = self.pending.pop(i)
            data, etag = future.result()
        except FileNotFoundError:
            raise InputChangedError(f"{self.name(i)} is gone: it was listed when the run's inputs were frozen") from None
        self._check_size(i, len(data))
        expected = int(self.manifest.versions[i])
        if etag is not None and expected and self.manifest.version_kind == "etag" and etag_version(etag) != expected:
            raise InputChangedError(f"{self.name(i)} changed since the run's inputs were frozen: its ETag is not the "
                                    f"one listed then")
        return data

    def _read_local(self, i: int) -> bytes:
        path = self.manifest.path(i)
        st = os.stat(path)
        self._check_size(i, st.st_size)
        expected = int(self.manifest.versions[i])
        if expected and self.manifest.version_kind == "mtime" and mtime_version(st.st_mtime) != expected:
            raise InputChangedError(f"{printable(path)} changed since the run's inputs were frozen: it was modified since")
        with open(path, "rb") as f:
            return f.read()

    def _check_size(self, i: int, size: int) -> None:
        expected = int(self.manifest.sizes[i])
        if expected >= 0 and size != expected:
            raise InputChangedError(f"{self.name(i)} changed since the run's inputs were frozen: it has {size} "
                                    f"bytes, {expected} when listed")


def _list_images(source: FileSource, where: str, label_mode: str, extensions: Tuple[str, ...]) -> Manifest:
    """The manifest of ``source`` (a folder, a glob or a file), sorted by path."""
    kind = version_kind(source._fs(), source._local)
    base, found, named = source._find(_hidden)
    if named:  # a glob or a single file: what it matched, as is
        classes = [_parent_name(p) for p in found.paths] if label_mode == "parent" else []
        return _manifest(where, base, found, classes, kind)
    cut = len(base) + 1 if base != "/" else 1
    images = found.keep(lambda p: p.lower().endswith(extensions))
    if label_mode == "parent":
        classes = [_parent_name(p) for p in images.paths]
    elif (label_mode == "auto" and any("/" in p[cut:] for p in found.paths)
          and not any("/" not in p[cut:] for p in images.paths)):
        # ImageFolder layout: the first path component below the root is the class.
        classes = [p[cut:].split("/", 1)[0] for p in images.paths]
    else:
        classes = []
    return _manifest(where, base, images, classes, kind)


def _manifest(source: str, root: str, found: Found, class_of: List[str], kind: str) -> Manifest:
    order = sorted(range(len(found.paths)), key=found.paths.__getitem__)
    cut = len(join_prefix(root))
    classes = sorted(set(class_of))
    index = {c: i for i, c in enumerate(classes)}
    return Manifest.build(
        source, [found.paths[i][cut:] for i in order], sizes=[found.sizes[i] for i in order],
        versions=[found.versions[i] for i in order],
        labels=[index[class_of[i]] for i in order] if class_of else None, classes=classes, root=root,
        version_kind=kind)


def _hidden(name: str) -> bool:
    return name.rstrip("/").rsplit("/", 1)[-1].startswith(".")


def _parent_name(path: str) -> str:
    parts = path.rstrip("/").split("/")
    return parts[-2] if len(parts) > 1 else ""


def decode_image_bytes(data: bytes, path: str = "<bytes>",
                       max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> ``uint8`` RGB tensor (3, H, W), whatever the file's mode.

    torchvision converts grayscale, alpha, palette and CMYK (JPEG) images to RGB natively, and
    16-bit PNGs are scaled to 8 bits. Formats it cannot read go through PIL. A file neither can
    decode raises ``ValueError`` naming ``path``. An image whose header claims more than
    ``max_pixels`` pixels (``None``: no limit) raises :class:`~batchproc.errors.ImageTooLargeError`
    naming ``path`` and the claimed size, before anything is decoded.
    """
    if not data:
        raise ValueError(f"cannot decode {path}: the file is empty")
    if max_pixels is not None:
        claimed = claimed_size(data)
        if claimed is not None:
            _check_pixels(path, claimed, max_pixels)
    try:
        image: torch.Tensor = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        image = _decode_with_pil(data, path, _CPP_LOCATION.sub("", str(e).strip()), max_pixels)
    if image.dtype != torch.uint8:  # 16-bit PNG
        from torchvision.transforms.v2.functional import to_dtype

        image = to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pil(data: bytes, path: str, tv_error: str, max_pixels: Optional[int]) -> torch.Tensor:
    try:
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # the header only: pixels are read by convert()
            if max_pixels is not None:
                _check_pixels(path, (im.size[0], im.size[1], 1), max_pixels)
            rgb = np.asarray(im.convert("RGB"))
    except ImageTooLargeError:
        raise
    except Exception as e:
        raise ValueError(f"cannot decode {path}: {tv_error} (PIL: {type(e).__name__}: {e})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def _check_max_pixels(max_pixels: Optional[int]) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a positive int, or None for no limit; got {max_pixels!r}")


def _check_pixels(path: str, claimed: Tuple[int, int, int], max_pixels: int) -> None:
    width, height, frames = claimed
    pixels = width * height * frames
    if pixels > max_pixels:
        size = f"{width}x{height}" + (f" in {frames} frames" if frames > 1 else "")
        raise ImageTooLargeError(
            f"{path} claims {size} pixels ({pixels:,}), more than max_pixels={max_pixels:,}; it was not decoded "
            f"(a decompression bomb, or a truly huge image). To read it, raise the limit: "
            f"ImageFiles(..., max_pixels=N), or max_pixels=None for no limit")


# -- image headers: the size an image claims, read without decoding it -------------------------

_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_JPEG_NO_LENGTH = frozenset((0x01, *range(0xD0, 0xDA)))  # TEM, RSTn, SOI, EOI


def claimed_size(data: bytes) -> Optional[Tuple[int, int, int]]:
    """``(width, height, frames)`` as the header of a JPEG, PNG, GIF or WebP file claims them (the
    formats torchvision decodes), read from the first bytes without decoding; ``None`` for other
    formats or a header too damaged to say (the decoder then reports it)."""
    try:
        if data[:3] == b"\xff\xd8\xff":
            return _jpeg_size(data)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            if data[12:16] != b"IHDR":
                return None
            width, height = struct.unpack(">II", data[16:24])
            return width, height, 1
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif_size(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
    except (struct.error, IndexError):
        return None
    return None


def _jpeg_size(data: bytes) -> Optional[Tuple[int, int, int]]:
    """The first frame header (SOFn) after SOI, skipping the segments before it by their lengths."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            pos += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height, 1
        pos += 2 + length
    return None


def _gif_size(data: bytes) -> Tuple[int, int, int]:
    """The logical screen, times the frames (torchvision decodes each one at the screen's size)."""
    width, height = struct.unpack("<HH", data[6:10])
    flags, pos, frames, n = data[10], 13, 0, len(data)
    if flags & 0x80:
        pos += 3 << ((flags & 0x07) + 1)  # global color table
    while pos < n:
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            pos += 2
        elif block == 0x2C:  # image descriptor, local color table, LZW code size, then sub-blocks
            frames += 1
            local = data[pos + 9]
            pos += 10 + ((3 << ((local & 0x07) + 1)) if local & 0x80 else 0) + 1
        else:
            break
        while pos < n and data[pos]:
            pos += data[pos] + 1
        pos += 1
    return width, height, max(frames, 1)


def _webp_size(data: bytes) -> Optional[Tuple[int, int, int]]:
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: the canvas, 24 bits each, minus one
        return (int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1, 1)
    if chunk == b"VP8 ":  # lossy: a key frame's 14-bit width and height after its start code
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF, 1
    if chunk == b"VP8L":  # lossless: signature 0x2f, then 14 bits each, minus one
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 1
    return None


# -- preprocessing ---------------------------------------------------------------------------


def standard_preprocess(size: int = 224, resize: int = 256,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Transform:
    """The usual ImageNet evaluation transform on uint8 CHW tensors: resize the short side to
    ``resize`` (antialiased), center-crop ``size``, scale to [0, 1] floats, normalize."""
    from torchvision.transforms import v2

    transform: Transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size),
                                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    return transform


def preprocess_from_weights(weights: Any) -> Transform:
    """The evaluation transform that torchvision weights were trained with (works on tensors).

    ``weights`` is a weights enum (``ResNet50_Weights.DEFAULT``) or its name
    (``"ResNet50_Weights.IMAGENET1K_V2"``); nothing is downloaded.
    """
    if isinstance(weights, str):
        from torchvision.models import get_weight

        weights = get_weight(weights)
    transform: Transform = weights.transforms()
    return transform


__all__ = ["ImageFiles", "PrefixedColumn", "decode_image_bytes", "claimed_size", "standard_preprocess",
           "preprocess_from_weights", "IMG_EXTENSIONS", "UNKNOWN_LABEL", "DEFAULT_MAX_PIXELS"]
