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
from typing import Any, Dict, Iterator, List

import pytest

from tests.support import Procs, S3Server


# The longest tests (or xdist groups), longest first: `make test` schedules them before the rest
# (--no-loadscope-reorder keeps this order), so that no worker starts one of them at the end while
# the others sit idle. Only the order depends on this list; a test missing from it runs anyway.
SLOW_FIRST = (
    "test_embed_texts_",         # group text-embed, ~220 s (its first test makes the tiny models)
    "test_generate_texts_",      # group text-generate, ~140 s
    "test_digits_",              # group digits-reference, ~110 s
    "test_hung_rank_",           # ~65 s and ~35 s
    "test_lost_host_node_", "test_lost_node_started_again_", "test_a_cut_node_",  # ~100 s and ~75 s
    "test_damaged_latest_record_", "test_no_valid_record_",  # group stopped-twice, ~50 s
    "test_preempt_twice_", "test_long_outage_", "test_skipped_batches_are_recorded_once_",
    "test_s3_listing_happens_once_", "test_a_script_failing_after_", "test_out_of_memory_batches_",
    "test_signal_while_the_workers_start_", "test_a_killed_worker_", "test_preempted_then_resumed_on_s3",
    "test_preemption_during_on_finish_",
)


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = getattr(item, "originalname", item.name)
        return next((i for i, prefix in enumerate(SLOW_FIRST) if name.startswith(prefix)), len(SLOW_FIRST))

    items.sort(key=rank)  # stable: the rest keep their collection order


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
