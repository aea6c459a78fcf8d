"""experiment.yaml validation: good configs load, and every error names the file and the key."""

from __future__ import annotations

import os
import textwrap

import pytest

from batchproc.control.config import ExperimentConfig, FsspecStorage, S3Storage, SharedFSStorage, load_config
from batchproc.errors import ConfigError

VALID = """
name: digits
entrypoint: python3 -m launch.torch_distributed python3 examples/digits.py
description: a test
resources:
  slots_per_trial: 2
max_restarts: 2
process_group_timeout_s: 60
checkpoint_storage:
  type: shared_fs
  host_path: ./runs
hyperparameters:
  batch_size: 64
"""


@pytest.fixture
def write(tmp_path):
    def _write(text: str, name: str = "experiment.yaml") -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)

    return _write


def error_of(path: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_valid_config(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write(VALID))
    assert config.name == "digits"
    assert config.resources.slots_per_trial == 2
    assert config.max_restarts == 2
    assert config.process_group_timeout_s == 60.0
    assert config.hyperparameters == {"batch_size": 64}
    assert config.entrypoint_argv()[:3] == ["python3", "-m", "launch.torch_distributed"]
    assert config.run_dir() == os.path.join(str(tmp_path), "runs", "digits")

    settings = config.run_settings(lock_held=True)
    assert settings.name == "digits" and settings.run_dir == config.run_dir()
    assert settings.slots_per_trial == 2 and settings.max_restarts == 2
    assert settings.pg_timeout_s == 60.0 and settings.hparams == {"batch_size": 64}
    assert settings.lock_held


def test_defaults(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write("name: n\nentrypoint: [python3, x.py]\n"))
    assert config.entrypoint == ("python3", "x.py")
    assert config.resources.slots_per_trial is None
    assert (config.max_restarts, config.process_group_timeout_s, config.hyperparameters) == (0, 1800.0, {})
    assert config.checkpoint_storage == SharedFSStorage(host_path="./runs")
    assert config.run_dir() == os.path.join(str(tmp_path), "runs", "n")
    assert config.run_settings(lock_held=False).lock_held is False


def test_empty_optional_sections_mean_defaults(write):
    config = load_config(write("name: n\nentrypoint: x\nresources:\nhyperparameters:\n"))
    assert config.resources.slots_per_trial is None and config.hyperparameters == {}


def test_relative_host_path_resolves_against_cwd_not_yaml_dir(write, tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "work").mkdir()
    path = write("name: n\nentrypoint: x\n", name="conf/e.yaml")
    monkeypatch.chdir(tmp_path / "work")
    assert load_config(path).run_dir() == str(tmp_path / "work" / "runs" / "n")


def test_config_is_frozen(write):
    config = load_config(write(VALID))
    with pytest.raises(AttributeError):
        config.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("text, key, expected", [
    ("name: n\nentrypoint: x\nresources: {slots_per_trial: two}\n", "resources.slots_per_trial", "int >= 1"),
    ("name: n\nentrypoint: x\nresources: {slots_per_trial: 0}\n", "resources.slots_per_trial", "int >= 1"),
    ("name: n\nentrypoint: x\nmax_restarts: -1\n", "max_restarts", "int >= 0"),
    ("name: n\nentrypoint: x\nmax_restarts: true\n", "max_restarts", "int >= 0"),
    ("name: n\nentrypoint: x\nprocess_group_timeout_s: 0\n", "process_group_timeout_s", "number > 0"),
    ("name: n\nentrypoint: x\nprocess_group_timeout_s: soon\n", "process_group_timeout_s", "number > 0"),
    ("name: 3\nentrypoint: x\n", "name", "str"),
    ("name: a/b\nentrypoint: x\n", "name", "single path segment"),
    ("name: n\nentrypoint: [x, 1]\n", "entrypoint", "str or list of str"),
    ("name: n\nentrypoint: x\ndescription: [a]\n", "description", "str"),
    ("name: n\nentrypoint: x\nhyperparameters: [1, 2]\n", "hyperparameters", "mapping"),
    ("name: n\nentrypoint: x\nresources: 2\n", "resources", "mapping"),
    ("name: n\nentrypoint: x\ncheckpoint_storage: {type: s3, bucket: 5}\n", "checkpoint_storage.bucket", "str"),
    ("name: n\nentrypoint: x\ncheckpoint_storage: {type: fsspec, url: memory://, storage_options: 1}\n",
     "checkpoint_storage.storage_options", "mapping"),
    ("name: n\nentrypoint: x\ncheckpoint_storage: 7\n", "checkpoint_storage", "URL str or a mapping"),
])
def test_wrong_type_names_file_key_and_expected_type(write, text, key, expected):
    path = write(text)
    message = error_of(path)
    assert message.startswith(path + ": ")
    assert f"{key}: " in message
    assert expected in message


@pytest.mark.parametrize("text, key", [
    ("entrypoint: x\n", "name"),
    ("name: n\n", "entrypoint"),
    ("name: n\nentrypoint: x\ncheckpoint_storage: {type: shared_fs}\n", "checkpoint_storage.host_path"),
    ("name: n\nentrypoint: x\ncheckpoint_storage: {type: s3}\n", "checkpoint_storage.bucket"),
    ("name: n\nentrypoint: x\ncheckpoint_storage: {type: fsspec}\n", "checkpoint_storage.url"),
    ("name: n\nentrypoint: x\ncheckpoint_storage: {host_path: x}\n", "checkpoint_storage.type"),
])
def test_missing_required_key_names_it_and_its_type(write, text, key):
    path = write(text)
    message = error_of(path)
    assert message.startswith(path + ": ")
    assert f"{key}: missing required key" in message
    assert "expected" in message


def test_unknown_keys_are_listed_sorted_with_their_paths(write):
    path = write("name: n\nentrypoint: x\nzeta: 1\nalpha: 2\n")
    message = error_of(path)
    assert path in message and "unknown key(s) alpha, zeta" in message
    assert "max_restarts" in message  # the allowed keys are listed too

    message = error_of(write("name: n\nentrypoint: x\nresources: {gpus: 2, slots: 1}\n"))
    assert "unknown key(s) resources.gpus, resources.slots" in message
    assert "slots_per_trial" in message


def test_unknown_storage_type(write):
    message = error_of(write("name: n\nentrypoint: x\ncheckpoint_storage: {type: gcs, url: x}\n"))
    assert "checkpoint_storage.type" in message and "fsspec, s3, shared_fs" in message and "'gcs'" in message


def test_file_errors(write, tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert missing in error_of(missing)
    bad = write("name: [unclosed\n")
    assert bad in error_of(bad) and "YAML" in error_of(bad)
    top = write("- a\n- b\n")
    assert "mapping" in error_of(top)


def test_errors_are_value_errors_too(write):
    with pytest.raises(ValueError):
        load_config(write("name: n\n"))


# -- --set overrides -------------------------------------------------------------------------


def test_set_parses_values_as_yaml(write):
    config = load_config(write(VALID), [
        "resources.slots_per_trial=4", "max_restarts=0", "hyperparameters.lr=0.5",
        "hyperparameters.flag=true", "hyperparameters.tag=abc", "description=",
    ])
    assert config.resources.slots_per_trial == 4 and config.max_restarts == 0
    assert config.hyperparameters == {"batch_size": 64, "lr": 0.5, "flag": True, "tag": "abc"}
    assert config.description is None  # an empty value is YAML null: the default


def test_set_creates_intermediate_mappings(write):
    config = load_config(write("name: n\nentrypoint: x\n"),
                         ["resources.slots_per_trial=2", "hyperparameters.model.depth=3"])
    assert config.resources.slots_per_trial == 2
    assert config.hyperparameters == {"model": {"depth": 3}}


def test_set_into_an_empty_section(write):
    config = load_config(write("name: n\nentrypoint: x\nhyperparameters:\n"), ["hyperparameters.lr=0.1"])
    assert config.hyperparameters == {"lr": 0.1}


def test_set_can_supply_required_keys_and_replace_storage(write):
    config = load_config(write("entrypoint: x\n"), ["name=late", "checkpoint_storage=memory://bucket/root"])
    assert config.name == "late"
    assert config.storage_root() == ("memory://bucket/root", {})
    assert config.run_dir() == "memory://bucket/root/late"


def test_set_type_error_names_key_and_override(write):
    path = write(VALID)
    message = error_of(path, ["resources.slots_per_trial=two"])
    assert path in message and "resources.slots_per_trial" in message and "int >= 1" in message
    assert "--set resources.slots_per_trial=two" in message


def test_set_unknown_key(write):
    message = error_of(write(VALID), ["resources.gpus=2"])
    assert "unknown key(s) resources.gpus" in message and "--set resources.gpus=2" in message


def test_set_through_a_non_mapping_is_an_error(write):
    path = write(VALID)
    message = error_of(path, ["name.first=x"])
    assert path in message and "name.first=x" in message and "not a mapping" in message
    message = error_of(path, ["hyperparameters.batch_size.x=1"])
    assert "hyperparameters.batch_size" in message and "not a mapping" in message


@pytest.mark.parametrize("override", ["novalue", "=3", "a..b=1", "resources.=1"])
def test_malformed_set(write, override):
    assert "KEY.PATH=VALUE" in error_of(write(VALID), [override])


def test_set_invalid_yaml_value(write):
    assert "not valid YAML" in error_of(write(VALID), ["description=[unclosed"])


# -- checkpoint storage ------------------------------------------------------------------------


def test_shared_fs_storage_path(write, tmp_path):
    config = load_config(write(f"name: n\nentrypoint: x\ncheckpoint_storage:\n  type: shared_fs\n"
                               f"  host_path: {tmp_path}/mnt\n  storage_path: team\n"))
    assert config.storage_root() == (f"{tmp_path}/mnt/team", {})
    assert config.run_dir() == f"{tmp_path}/mnt/team/n"


def test_s3_storage(write):
    config = load_config(write("name: n\nentrypoint: x\ncheckpoint_storage:\n  type: s3\n  bucket: bk\n"
                               "  prefix: /a/b/\n  endpoint_url: http://127.0.0.1:5000\n"))
    assert isinstance(config.checkpoint_storage, S3Storage)
    url, options = config.storage_root()
    assert url == "s3://bk/a/b"
    assert options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000"}}
    assert config.run_dir() == "s3://bk/a/b/n"
    assert config.run_settings(lock_held=False).storage_options == options

    bare = load_config(write("name: n\nentrypoint: x\ncheckpoint_storage: {type: s3, bucket: bk}\n"))
    assert bare.storage_root() == ("s3://bk", {}) and bare.run_dir() == "s3://bk/n"


def test_fsspec_storage(write):
    config = load_config(write("name: n\nentrypoint: x\ncheckpoint_storage:\n  type: fsspec\n"
                               "  url: gs://bk/root/\n  storage_options: {token: anon}\n"))
    assert isinstance(config.checkpoint_storage, FsspecStorage)
    assert config.storage_root() == ("gs://bk/root/", {"token": "anon"})
    assert config.run_dir() == "gs://bk/root/n"


def test_storage_as_plain_string(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = load_config(write("name: n\nentrypoint: x\ncheckpoint_storage: s3://bk/p\n"))
    assert url.storage_root() == ("s3://bk/p", {}) and url.run_dir() == "s3://bk/p/n"
    rel = load_config(write("name: n\nentrypoint: x\ncheckpoint_storage: out/dir\n"))
    assert rel.run_dir() == str(tmp_path / "out" / "dir" / "n")


def test_dataclasses_validate_when_built_directly():
    with pytest.raises(ConfigError, match="max_restarts: expected an int >= 0"):
        ExperimentConfig(name="n", entrypoint="x", max_restarts=-1)
    with pytest.raises(ConfigError, match="host_path"):
        SharedFSStorage(host_path="")


def test_a_run_name_with_a_colon_is_refused_naming_it(write):
    # fsspec reads "prod::x" as a URL chain: the run's lock and status would land elsewhere.
    path = write("""
        name: prod::x
        entrypoint: python3 job.py
    """)
    with pytest.raises(ConfigError, match=r"name.*':'.*prod::x"):
        load_config(path)
