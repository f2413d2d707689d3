"""The API in-process (FastAPI TestClient, no Ray) on the real tiny pipeline stages."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from turbo_serve.api.app import ApiContext, create_app
from turbo_serve.jobs.local_stages import LocalStages
from turbo_serve.jobs.runner import JobRunner
from turbo_serve.jobs.sqlite_store import SqliteJobStore
from turbo_serve.jobs.storage import Storage
from turbo_serve.settings import Settings

@pytest.fixture
def make_api(tmp_path):
    """make_api(run_jobs=True, **settings) -> (TestClient, ApiContext). Without run_jobs the runner
    never starts, so jobs stay queued (deterministic admission tests)."""

    @contextmanager
    def make(run_jobs: bool = True, **overrides):
        settings = Settings(**{"storage_dir": str(tmp_path / "storage"),
                               "cache_dir": str(tmp_path / "cache"), "poll_interval_s": 0.05, **overrides})  # fmt: skip
        store = SqliteJobStore(tmp_path / "storage" / "jobs.sqlite3")
        storage = Storage(settings.storage_dir)
        stages = LocalStages(settings, store, storage) if run_jobs else None
        runner = JobRunner.from_settings(settings, store, stages, storage)
        context = ApiContext(settings, store, storage, runner, shutdown_grace_s=5.0)
        client = TestClient(create_app(context), raise_server_exceptions=False)
        if run_jobs:
            with client:  # runs the lifespan: the runner starts and stops with it
                yield client, context
        else:
            yield client, context
        store.close()

    return make
