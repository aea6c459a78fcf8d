"""Fixtures: processes started through the real launcher and cleaned up, and an S3 server.

``procs``: a :class:`tests.support.Procs` per test; everything it started is killed at teardown.
``s3_server``: moto's S3 server on 127.0.0.1, one per session (so one per xdist worker), with its
credentials and endpoint in ``os.environ`` for s3fs in this process; a dict with ``endpoint``,
``env`` (for child processes) and ``server`` (the :class:`tests.support.S3Server`).
``s3_bucket``: a fresh bucket on it per test, as an ``s3://`` URL.
The helpers are in ``tests/support.py``.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Dict, Iterator

import pytest

from tests.support import Procs, S3Server


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.cleanup()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Dict[str, Any]]:
    """A real S3-protocol HTTP server (moto's server mode) on 127.0.0.1, stopped after the session."""
    server = S3Server().start()
    creds = server.env
    saved = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)  # for s3fs in this process; children get them through base_env
    yield {"endpoint": server.endpoint, "env": creds, "server": server}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: Dict[str, Any]) -> str:
    """A fresh bucket per test: returns its s3:// URL."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server["server"].fs().mkdir(name)
    return f"s3://{name}"
