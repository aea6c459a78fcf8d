"""The files behind a source: resolving a URL, listing a folder, a glob or a file, cheaply.

What :class:`~batchproc.data.images.ImageFiles` and :class:`~batchproc.data.tables.TableRows`
share, so that one rule decides what a source names:

* :class:`FileSource`: a source URL resolved once (local paths normalized, a local folder whose
  name holds ``[`` not taken for a glob), one filesystem per process (async clients such as
  s3fs's must not cross a fork), S3's connection pool sized for reads ahead.
* :func:`find`: the files of a folder (walked recursively), a glob (``**`` included) or a single
  file, sorted by path, with their sizes and versions (mtime locally, ETag on S3). On S3 one flat
  LIST streamed page by page; locally ``os.scandir``, each real folder once (a symlink back up the
  tree neither loops nor repeats files: matches are keyed by their folder's device and inode);
  elsewhere fsspec's ``find``/``glob``. Hidden names below the source's fixed part are left out,
  by a rule the caller gives.
* File names that are not UTF-8 are kept as Python lists them (``surrogateescape``); the
  manifest stores their exact bytes (:mod:`batchproc.data.inputs`).
"""

from __future__ import annotations

import collections
import fnmatch
import glob
import os
import re
import stat
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union, overload

import fsspec
import fsspec.asyn
import fsspec.utils
from fsspec.implementations.local import LocalFileSystem

from batchproc.data.inputs import StringColumn, etag_version, mtime_version

#: Connections per process to S3 when ``storage_options`` do not say (aiobotocore's default is 10,
#: too few to keep two batches of requests in flight).
S3_POOL_CONNECTIONS = 64
#: Requests one process keeps in flight. Fewer than the connections, and started in the order they
#: were asked for: the files of the batch being loaded are not slowed down by those of the batches
#: read ahead (at start-up all three batches are asked for at once, and a server answers the
#: requests it holds together, not first come first served).
MAX_IN_FLIGHT = 32
MAGIC = re.compile(r"[*?\[]")


class FileSource:
    """A dataset's source of files: the URL resolved once, and a filesystem per process.

    Subclasses keep their per-process reader in ``_reader`` (dropped with the filesystem when the
    process changes, and when pickled)."""

    source: str
    storage_options: Dict[str, Any]
    _reader: Any

    def _open_source(self, source: "str | os.PathLike[str]", storage_options: Optional[Dict[str, Any]]) -> None:
        self.source = os.fspath(source)
        self.storage_options = dict(storage_options or {})
        fs, root = fsspec.core.url_to_fs(self.source, **self._fs_options())
        self._fs_cache: Any = fs
        self._fs_pid: Optional[int] = os.getpid()
        self._local = isinstance(fs, LocalFileSystem)
        if self._local and root:
            root = os.path.normpath(root)  # /a/./b, /a//b and /x/../a/b are one source
        self._root: str = root
        # A local folder named "photos [2024]" is that folder, not a glob. On object stores a
        # wildcard always globs (a literal "[" is written "[[]"): checking costs a request per rank.
        self._glob = bool(MAGIC.search(root)) and not (self._local and os.path.exists(root))
        if self._local and not self._glob and not os.path.exists(root):
            # A stat, not a listing: cheap, and a typo is better reported here than at the first batch.
            raise FileNotFoundError(f"no such file or folder: {root!r}")

    def _where(self) -> str:
        """The normalized URL: an absolute path locally."""
        return self._root if self._local else str(self._fs().unstrip_protocol(self._root))

    def _fs_options(self) -> Dict[str, Any]:
        options = dict(self.storage_options)
        if fsspec.core.split_protocol(self.source)[0] in ("s3", "s3a"):
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("max_pool_connections", S3_POOL_CONNECTIONS)
            options["config_kwargs"] = config
        return options

    def _fs(self) -> Any:
        # One filesystem per process: async clients (s3fs) must not be shared with forked workers.
        if self._fs_pid != os.getpid():
            self._fs_cache = fsspec.core.url_to_fs(self.source, **self._fs_options())[0]
            self._fs_pid = os.getpid()
            self._reader = None
        return self._fs_cache

    def _find(self, hidden: Callable[[str], bool]) -> Tuple[str, "Found", bool]:
        """:func:`find` over this source; s3fs's cache of info dicts is emptied after."""
        fs = self._fs()
        try:
            return find(fs, self._root, self._local, self._glob, hidden)
        finally:
            if not self._local:
                fs.invalidate_cache()  # s3fs would keep every object's info dict alive

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs_cache"], state["_fs_pid"], state["_reader"] = None, None, None  # rebuilt in the receiving process
        return state


def join_prefix(root: str) -> str:
    return "" if not root else (root if root.endswith("/") else root + "/")


class PrefixedColumn(Sequence[str]):
    """``prefix + s`` for every ``s`` of a :class:`StringColumn`, computed on access."""

    __slots__ = ("prefix", "column")

    def __init__(self, prefix: str, column: StringColumn) -> None:
        self.prefix = prefix
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> List[str]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[str, List[str]]:
        if isinstance(i, slice):
            return [self.prefix + s for s in self.column[i]]
        return self.prefix + self.column[i]

    def __iter__(self) -> Iterator[str]:
        for s in self.column:
            yield self.prefix + s

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PrefixedColumn({self.prefix!r}, {len(self)} strings)"


def is_s3(fs: Any) -> bool:
    # An S3FileSystem exists only once s3fs was imported: importing it here just to ask would cost
    # every local job 0.4 s of CPU per process (s3fs pulls in botocore and aiohttp).
    s3fs = sys.modules.get("s3fs")
    return s3fs is not None and isinstance(fs, s3fs.S3FileSystem) and hasattr(fs, "_call_s3")


def reader_kind(fs: Any, local: bool) -> str:
    """How a process reads from ``fs``: ``local`` (plain reads), ``s3`` (our own GETs on fsspec's
    loop), ``async`` (fsspec's async calls), ``sync`` (fsspec's blocking calls)."""
    return "local" if local else "s3" if is_s3(fs) else "async" if getattr(fs, "async_impl", False) else "sync"


# -- listing ---------------------------------------------------------------------------------


class Found:
    """Files found by a listing, as three parallel lists (transient: the manifest is columnar)."""

    def __init__(self) -> None:
        self.paths: List[str] = []
        self.sizes: List[int] = []
        self.versions: List[int] = []

    def add(self, path: str, size: int, version: int) -> None:
        self.paths.append(path)
        self.sizes.append(size)
        self.versions.append(version)

    def keep(self, pred: Callable[[str], bool]) -> "Found":
        out = Found()
        for p, s, v in zip(self.paths, self.sizes, self.versions):
            if pred(p):
                out.add(p, s, v)
        return out


def version_kind(fs: Any, local: bool) -> str:
    return "mtime" if local else "etag" if is_s3(fs) else "none"


def info_version(info: Dict[str, Any], kind: str) -> int:
    if kind == "mtime":
        mtime = info.get("mtime")
        if info.get("islink"):  # fsspec reports the link's own time; reads see the target's
            mtime = os.stat(info["name"]).st_mtime
        return mtime_version(mtime) if mtime is not None else 0
    if kind == "etag" and info.get("ETag"):
        return etag_version(info["ETag"])
    return 0


def find(fs: Any, root: str, local: bool, is_glob: bool, hidden: Callable[[str], bool]) -> Tuple[str, Found, bool]:
    """The files ``root`` names on ``fs`` (a glob, a folder or a single file): ``(base, files,
    named)``. ``base`` is the folder the paths are below (the glob's fixed part, the folder, or
    the file's folder); ``named`` is True for a glob or a single file (the caller takes what it
    matched as is) and False for a folder (the caller filters by suffix). Names below ``base``
    for which ``hidden`` is true, and everything below them, are left out."""
    kind = version_kind(fs, local)
    s3 = is_s3(fs)
    magic = MAGIC.search(root) if is_glob else None
    if magic:
        # Like a shell glob, wildcards do not match hidden names (".DS_Store", ".cache/").
        base = root[:magic.start()].rsplit("/", 1)[0]
        if s3:
            pattern = re.compile(fsspec.utils.glob_translate(root))
            matched = s3_walk(fs, base).keep(lambda p: bool(pattern.match(p)))
        elif local:
            matched = local_glob(root)
        else:
            matched = from_infos(fs.glob(root, detail=True), kind)
        return base, matched.keep(lambda p: not any(hidden(c) for c in p[len(base) + 1:].split("/"))), True
    root = root.rstrip("/") or root
    found: Optional[Found] = s3_walk(fs, root) if s3 else None
    if not found or not found.paths:
        if fs.isfile(root):
            info = fs.info(root)
            single = Found()
            single.add(root, int(info.get("size", -1)), info_version(info, kind))
            return root.rsplit("/", 1)[0] if "/" in root else "", single, True
        if s3 or not fs.isdir(root):
            raise FileNotFoundError(f"no such file or folder: {fs.unstrip_protocol(root)!r}")
        found = local_walk(root) if local else from_infos(fs.find(root, detail=True), kind)
    cut = len(root) + 1 if root != "/" else 1
    return root, found.keep(lambda p: not any(hidden(c) for c in p[cut:].split("/"))), False


def s3_walk(fs: Any, root: str) -> Found:
    """Every object under ``root/``, one flat LIST page per 1,000 keys, streamed page by page (no
    info dict is kept: ``find``/``glob`` would cache them all, and walk a glob folder by folder)."""
    bucket, key, _ = fs.split_path(root)
    prefix = key.rstrip("/") + "/" if key else ""
    found = Found()

    async def walk() -> None:
        async for info in fs._iterdir(bucket, prefix=prefix, delimiter=""):
            name = info["name"]
            if not name.endswith("/"):  # folder markers
                found.add(name, int(info["size"]), etag_version(info["ETag"]) if info.get("ETag") else 0)

    fsspec.asyn.sync(fs.loop, walk)
    return found


def local_walk(root: str) -> Found:
    """Every file under a local folder, streamed (no info dict per file, as fsspec's ``find``
    builds); hidden folders are not entered. Symlinks count as their targets, folders included (as
    ImageFolder reads them), each real folder once; dangling ones are skipped."""
    found = Found()
    stack = [root]
    st = os.stat(root)
    seen = {(st.st_dev, st.st_ino)}  # a link back up the tree must not loop
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    st = e.stat()
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        stack.append(e.path)
                elif e.is_file():
                    st = e.stat()
                    found.add(e.path, st.st_size, mtime_version(st.st_mtime))
    return found


def local_glob(pattern: str) -> Found:
    """A local glob as the shell and Python's ``glob`` read it (``**`` included): symlinked folders
    are followed, wildcards skip hidden names, and dangling links are skipped.

    Each real folder is listed once, as the folder walk enters each one once. Python's ``**``
    follows a symlink back up the tree until the path is too long (a file under one loop matched
    41 times; two loops make 2**40 paths), so ``**`` is expanded here (:func:`glob_once`), and
    matches are keyed by their folder's (device, inode) and name, the shortest path of each kept."""
    best: Dict[Tuple[int, int, str], Tuple[str, os.stat_result]] = {}
    folders: Dict[str, Optional[Tuple[int, int]]] = {}
    for path in glob_once(pattern):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        folder, _, name = path.rpartition("/")
        if folder not in folders:
            try:
                fst = os.stat(folder or ("/" if path.startswith("/") else "."))
                folders[folder] = (fst.st_dev, fst.st_ino)
            except OSError:
                folders[folder] = None
        where = folders[folder]
        key = (*where, name) if where is not None else (-1, len(best), path)
        kept = best.get(key)
        if kept is None or (path.count("/"), path) < (kept[0].count("/"), kept[0]):
            best[key] = (path, st)
    found = Found()
    for path, st in sorted(best.values(), key=lambda kept: kept[0]):
        found.add(path, st.st_size, mtime_version(st.st_mtime))
    return found


def glob_once(pattern: str) -> Iterator[str]:
    """``glob.iglob(pattern, recursive=True)``, but each ``**`` enters every real folder once."""
    parts = pattern.split("/")
    if "**" not in parts:
        yield from glob.iglob(pattern)
        return
    at = parts.index("**")
    head, rest = "/".join(parts[:at]), "/".join(parts[at + 1:])
    tops = glob.iglob(head) if head and MAGIC.search(head) else [head]
    for top in tops:
        for folder in _folders_below(top or "."):
            prefix = _as_prefix(folder, relative=not head)
            if rest and ("/" in rest or not MAGIC.search(rest)):
                yield from glob_once(glob.escape(prefix) + rest)
            elif rest:  # one wildcard name, the usual last part ("*.jpg"): match this folder's names
                try:
                    with os.scandir(folder) as entries:
                        names = [e.name for e in entries]
                except OSError:
                    continue
                if not rest.startswith("."):
                    names = [n for n in names if not n.startswith(".")]
                yield from (prefix + name for name in fnmatch.filter(names, rest))
            else:  # a trailing **: everything below, files included (hidden names excepted, as glob)
                try:
                    with os.scandir(folder) as entries:
                        names = [e.name for e in entries if not e.name.startswith(".")]
                except OSError:
                    continue
                yield from (prefix + name for name in names)


def _as_prefix(folder: str, relative: bool) -> str:
    """``folder`` as glob spells the start of the paths below it (``relative``: the pattern began
    with ``**``, so they are relative to the current folder, without ``./``)."""
    if relative:
        folder = "" if folder == "." else folder[2:] if folder.startswith("./") else folder
    return folder if not folder or folder.endswith("/") else folder + "/"


def _folders_below(top: str) -> Iterator[str]:
    """``top`` and every folder below it, symlinks followed, hidden ones skipped (as ``**`` skips
    them), each real folder once, shallowest route first."""
    try:
        st = os.stat(top)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    seen = {(st.st_dev, st.st_ino)}
    queue = collections.deque([top])
    while queue:
        folder = queue.popleft()
        yield folder
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            try:
                if not e.is_dir():
                    continue
                st = e.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                queue.append(e.path)


def from_infos(infos: Any, kind: str) -> Found:
    found = Found()
    for path, info in sorted(infos.items()):
        if info.get("type") != "directory":
            try:
                version = info_version(info, kind)
            except FileNotFoundError:  # a dangling symlink: no file to read, as a folder walk skips it
                continue
            found.add(path, int(info.get("size") or 0) if info.get("size") is not None else -1, version)
    return found


__all__ = ["FileSource", "Found", "PrefixedColumn", "find", "glob_once", "local_glob", "local_walk", "s3_walk",
           "from_infos", "join_prefix", "is_s3", "reader_kind", "version_kind", "info_version", "MAGIC",
           "MAX_IN_FLIGHT", "S3_POOL_CONNECTIONS"]
