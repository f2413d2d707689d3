"""Job-store fixtures: every store test runs against SQLite and a real redis-server."""

from __future__ import annotations

import time

import pytest

from redis_support import RedisServer
from turbo_serve.jobs.redis_store import RedisJobStore
from turbo_serve.jobs.sqlite_store import SqliteJobStore


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    """A redis-server of our own on a loopback port, without persistence, for the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        url = request.getfixturevalue("redis_url")
        # A fresh key prefix per test keeps tests independent on the shared server.
        store = RedisJobStore(url, prefix=f"test-{time.monotonic_ns()}")
    yield store
    store.close()
