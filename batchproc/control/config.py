"""``experiment.yaml`` -> frozen, validated dataclasses (no torch import: ``batchproc`` stays fast).

Each dataclass checks its own fields in ``__post_init__`` (as torch's ``LaunchConfig`` does);
:func:`load_config` adds what only the loader knows: the file, the dotted key path, unknown and
missing keys, and the ``--set`` override a bad value came from.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import yaml

from batchproc.errors import ConfigError
from batchproc.settings import SCHEDULES, RunSettings

DEFAULT_STORAGE_PATH = "./runs"
_ENTRYPOINT = "a non-empty str or list of str (the command to run)"


class _Invalid(ConfigError):
    """A bad value of ``key`` (a path relative to the dataclass that raised it)."""

    def __init__(self, key: str, message: str, names_key: bool = False) -> None:
        super().__init__(message if names_key or not key else f"{key}: {message}")
        self.key = key
        self.message = message
        self.names_key = names_key  # the message already spells the dotted key(s)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is not a count


def _check_int(key: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise _Invalid(key, f"expected an int >= {minimum}, got {_describe(value)}")


def _check_str(key: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise _Invalid(key, f"expected a non-empty str, got {_describe(value)}")


def _check_mapping(key: str, value: Any) -> None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _Invalid(key, f"expected a mapping with str keys, got {_describe(value)}")


def _is_local_path(url: str) -> bool:
    return "://" not in url and "::" not in url


def _join(root: str, name: str) -> str:
    return os.path.join(root, name) if _is_local_path(root) else root.rstrip("/") + "/" + name


#: ``slots_per_trial: auto`` (or the key left out): one process per GPU, one process on a host without.
AUTO_SLOTS = "auto"


@dataclasses.dataclass(frozen=True)
class Resources:
    """``slots_per_trial``: processes per node, an int, or ``auto`` (the default): one per GPU, and
    one on a CPU-only host, where a second process on the same cores measured slower than one
    (docs/SCALING.md). The launcher counts the GPUs (:func:`batchproc.control.launcher.gpu_count`)."""

    slots_per_trial: Union[int, str, None] = None

    def __post_init__(self) -> None:
        slots = self.slots_per_trial
        if slots is not None and slots != AUTO_SLOTS:
            if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
                raise _Invalid("slots_per_trial", f"expected an int >= 1 or {AUTO_SLOTS!r}, "
                                                  f"got {_describe(self.slots_per_trial)}")

    def slots(self) -> Optional[int]:
        """The processes per node asked for; None for ``auto`` (the launcher decides)."""
        return None if self.slots_per_trial in (None, AUTO_SLOTS) else cast(int, self.slots_per_trial)


@dataclasses.dataclass(frozen=True)
class SharedFSStorage:
    """A directory on a filesystem every node mounts; a relative path is relative to the cwd."""

    host_path: str = dataclasses.field(metadata={"expected": "a str (a directory path)"})
    storage_path: Optional[str] = None
    type: str = "shared_fs"

    def __post_init__(self) -> None:
        _check_str("host_path", self.host_path)
        _check_str("storage_path", self.storage_path, optional=True)

    def root(self) -> Tuple[str, Dict[str, Any]]:
        path = os.path.abspath(os.path.expanduser(self.host_path))
        return (os.path.join(path, self.storage_path) if self.storage_path else path), {}


@dataclasses.dataclass(frozen=True)
class S3Storage:
    bucket: str = dataclasses.field(metadata={"expected": "a str (the bucket name)"})
    prefix: Optional[str] = None
    endpoint_url: Optional[str] = None
    type: str = "s3"

    def __post_init__(self) -> None:
        _check_str("bucket", self.bucket)
        _check_str("prefix", self.prefix, optional=True)
        _check_str("endpoint_url", self.endpoint_url, optional=True)

    def root(self) -> Tuple[str, Dict[str, Any]]:
        url = f"s3://{self.bucket.strip('/')}"
        if self.prefix and self.prefix.strip("/"):
            url += "/" + self.prefix.strip("/")
        options = {"client_kwargs": {"endpoint_url": self.endpoint_url}} if self.endpoint_url else {}
        return url, options


@dataclasses.dataclass(frozen=True)
class FsspecStorage:
    """Any fsspec URL (``memory://``, ``gs://``, ...) or plain path, with its storage options."""

    url: str = dataclasses.field(metadata={"expected": "a str (an fsspec URL or path)"})
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    type: str = "fsspec"

    def __post_init__(self) -> None:
        _check_str("url", self.url)
        _check_mapping("storage_options", self.storage_options)

    def root(self) -> Tuple[str, Dict[str, Any]]:
        # Workers get the run dir through the environment: pin a relative path to today's cwd.
        url = os.path.abspath(os.path.expanduser(self.url)) if _is_local_path(self.url) else self.url
        return url, dict(self.storage_options)


StorageConfig = Union[SharedFSStorage, S3Storage, FsspecStorage]
STORAGE_TYPES = {"shared_fs": SharedFSStorage, "s3": S3Storage, "fsspec": FsspecStorage}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A validated ``experiment.yaml``."""

    name: str = dataclasses.field(metadata={"expected": "a str (it names the run directory)"})
    entrypoint: Union[str, Tuple[str, ...]] = dataclasses.field(metadata={"expected": _ENTRYPOINT})
    description: Optional[str] = None
    resources: Resources = Resources()
    max_restarts: int = 0
    process_group_timeout_s: float = 1800.0
    checkpoint_storage: StorageConfig = SharedFSStorage(host_path=DEFAULT_STORAGE_PATH)
    hyperparameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: torch_batch_process's default schedule for this experiment: "static" or "dynamic".
    schedule: Optional[str] = None

    def __post_init__(self) -> None:
        _check_str("name", self.name)
        if "/" in self.name or self.name in (".", ".."):
            raise _Invalid("name", f"expected a single path segment (it names the run directory), got {self.name!r}")
        if ":" in self.name:
            # fsspec reads "a::b" as a chain of filesystems: the run would land in another directory.
            raise _Invalid("name", f"expected a name without ':' (fsspec reads it as a URL chain), got {self.name!r}")
        entry = self.entrypoint
        ok = (isinstance(entry, str) and entry.strip()) or (
            isinstance(entry, (list, tuple)) and entry and all(isinstance(w, str) for w in entry))
        if not ok:
            raise _Invalid("entrypoint", f"expected {_ENTRYPOINT}, got {_describe(entry)}")
        if isinstance(entry, list):
            object.__setattr__(self, "entrypoint", tuple(entry))  # frozen means immutable too
        _check_str("description", self.description, optional=True)
        _check_int("max_restarts", self.max_restarts, 0)
        t = self.process_group_timeout_s
        if not (isinstance(t, (int, float)) and not isinstance(t, bool)) or t <= 0:
            raise _Invalid("process_group_timeout_s", f"expected a number > 0, got {_describe(t)}")
        object.__setattr__(self, "process_group_timeout_s", float(t))
        _check_mapping("hyperparameters", self.hyperparameters)
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise _Invalid("schedule", f"expected one of {', '.join(SCHEDULES)}, got {_describe(self.schedule)}")

    def entrypoint_argv(self) -> List[str]:
        """The entrypoint as an argv list (a string is split as a shell would)."""
        return shlex.split(self.entrypoint) if isinstance(self.entrypoint, str) else list(self.entrypoint)

    def storage_root(self) -> Tuple[str, Dict[str, Any]]:
        """``(url, storage_options)`` of the checkpoint storage root; local paths made absolute."""
        return self.checkpoint_storage.root()

    def run_dir(self) -> str:
        """The run directory: the storage root joined with the experiment name."""
        return _join(self.storage_root()[0], self.name)

    def run_settings(self, lock_held: bool) -> RunSettings:
        """What the entrypoint's workers need to know, to be put into their environment."""
        _, options = self.storage_root()
        return RunSettings(
            name=self.name,
            run_dir=self.run_dir(),
            storage_options=options,
            hparams=dict(self.hyperparameters),
            slots_per_trial=self.resources.slots(),
            max_restarts=self.max_restarts,
            pg_timeout_s=self.process_group_timeout_s,
            lock_held=lock_held,
            schedule=self.schedule,
        )


# -- loading -------------------------------------------------------------------------------


def _required(cls: type) -> Dict[str, str]:
    """Required field names -> the type they expect, in declaration order."""
    return {f.name: f.metadata.get("expected", "a value") for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def _build(cls: type, raw: Any, path: str, nested: Optional[Mapping[str, Any]] = None) -> Any:
    """``cls(**raw)`` with unknown/missing keys and bad values reported at dotted ``path``."""
    prefix = path + "." if path else ""
    nested = nested or {}
    if not isinstance(raw, Mapping):
        raise _Invalid(path, f"expected a mapping, got {_describe(raw)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(prefix + str(k) for k in raw if k not in fields)
    if unknown:
        where = f"in {path}" if path else "at the top level"
        raise _Invalid(unknown[0], f"unknown key(s) {', '.join(unknown)} "
                                   f"(allowed {where}: {', '.join(sorted(fields))})", names_key=True)
    required = _required(cls)
    missing = [k for k in required if k not in raw]
    if missing:
        raise _Invalid(prefix + missing[0], f"missing required key; expected {required[missing[0]]}")
    # An optional key left empty in YAML (`resources:`) means "use the default".
    kwargs = {k: (nested[k](v, prefix + k) if k in nested else v)
              for k, v in raw.items() if v is not None or k in required}
    try:
        return cls(**kwargs)
    except _Invalid as e:
        raise _Invalid(prefix + e.key, e.message, e.names_key) from None


def _storage(raw: Any, path: str) -> StorageConfig:
    if isinstance(raw, str):
        return cast(StorageConfig, _build(FsspecStorage, {"url": raw}, path))
    if not isinstance(raw, Mapping):
        raise _Invalid(path, f"expected a URL str or a mapping with a `type`, got {_describe(raw)}")
    kind = raw.get("type")
    if kind not in STORAGE_TYPES:
        kinds = ", ".join(sorted(STORAGE_TYPES))
        message = (f"missing required key; expected one of {kinds}" if "type" not in raw
                   else f"expected one of {kinds}, got {_describe(kind)}")
        raise _Invalid(f"{path}.type", message)
    return cast(StorageConfig, _build(STORAGE_TYPES[kind], raw, path))


def _experiment(raw: Any) -> ExperimentConfig:
    return cast(ExperimentConfig, _build(ExperimentConfig, raw, "", nested={
        "resources": lambda v, p: _build(Resources, v, p),
        "checkpoint_storage": _storage,
    }))


def _apply_override(raw: Dict[str, Any], override: str) -> str:
    """Apply ``a.b=v`` to ``raw`` in place; return the dotted key it set."""
    key, sep, text = override.partition("=")
    parts = key.split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {override!r}: expected KEY.PATH=VALUE, e.g. resources.slots_per_trial=2")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML: {e}") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or left empty in YAML (`hyperparameters:`)
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(parts[:i + 1])} is {_describe(child)}, "
                              f"not a mapping, so it has no key {parts[i + 1]!r}")
        node = child
    node[parts[-1]] = value
    return key


def load_config(path: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate ``path``; ``overrides`` are ``KEY.PATH=VALUE`` strings (``--set``)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    set_by: Dict[str, str] = {}
    for override in overrides:
        try:
            set_by[_apply_override(raw, override)] = override
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    try:
        return _experiment(raw)
    except _Invalid as e:
        # A value that came from --set is not in the file: say so, or the user looks in vain.
        source = next((f" (from --set {o})" for k, o in set_by.items()
                       if e.key == k or e.key.startswith(k + ".") or k.startswith(e.key + ".")), "")
        key = f"{e.key}: " if e.key and not e.names_key else ""
        raise ConfigError(f"{path}: {key}{e.message}{source}") from None
