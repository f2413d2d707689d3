"""The job runner's events and the API's refusals, recorded in-process (no Ray): the runner runs the
real tiny pipeline stages, and ServingMetrics' local registry shows what the replicas would export."""

import asyncio
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from turbo_serve.api.app import ApiContext, create_app
from turbo_serve.jobs.local_stages import LocalStages
from turbo_serve.jobs.runner import JobRunner
from turbo_serve.jobs.sqlite_store import SqliteJobStore
from turbo_serve.jobs.storage import Storage
from turbo_serve.metrics import ServingMetrics
from turbo_serve.metrics.job_metrics import JobMetrics, report_job_states
from turbo_serve.settings import Settings

SMALL = {"size": "128x128", "num_frames": 5, "num_steps": 2}
JOB = {"model": "tiny-t2v", "resolution": "below_480p", "attention_type": "original"}


@contextmanager
def api(tmp_path, run_jobs=True, **overrides):
    settings = Settings(storage_dir=str(tmp_path / "storage"), cache_dir=str(tmp_path / "cache"),
                        poll_interval_s=0.05, attention_type="original", **overrides)  # fmt: skip
    store = SqliteJobStore(tmp_path / "storage" / "jobs.sqlite3")
    storage = Storage(settings.storage_dir)
    metrics = ServingMetrics()
    stages = LocalStages(settings, store, storage) if run_jobs else None
    runner = JobRunner.from_settings(settings, store, stages, storage, observer=JobMetrics(metrics))
    context = ApiContext(settings, store, storage, runner, metrics=metrics, shutdown_grace_s=5.0)
    client = TestClient(create_app(context))
    try:
        if run_jobs:
            with client:
                yield client, metrics, store
        else:
            yield client, metrics, store
    finally:
        store.close()


def test_a_completed_job_records_queue_wait_stages_steps_outcome_and_e2e(tmp_path):
    with api(tmp_path) as (client, metrics, _):
        response = client.post("/v1/videos/sync", json={"prompt": "a fox", **SMALL})
        assert response.status_code == 200
    for stage in ("text_encode", "denoise", "decode"):
        assert metrics.sample("ray_turbo_stage_seconds_count", {**JOB, "stage": stage}) == 1
    assert metrics.sample("ray_turbo_dit_step_seconds_count", JOB) == SMALL["num_steps"]
    assert metrics.sample("ray_turbo_jobs_finished_total", {**JOB, "outcome": "completed"}) == 1
    assert metrics.sample("ray_turbo_job_queue_wait_seconds_count", JOB) == 1
    stages = sum(metrics.sample("ray_turbo_stage_seconds_sum", {**JOB, "stage": s}) for s in ("text_encode", "denoise"))
    assert stages <= metrics.sample("ray_turbo_job_e2e_seconds_sum", JOB) < 120


def test_refusals_count_422_by_field_and_429(tmp_path):
    with api(tmp_path, run_jobs=False, max_queued_jobs=1) as (client, metrics, store):
        assert client.post("/v1/videos", json={"prompt": "x", "size": "250x256", "num_frames": 6}).status_code == 422
        assert client.post("/v1/videos", json={"prompt": "x", **SMALL}).status_code == 200
        assert client.post("/v1/videos", json={"prompt": "y", **SMALL}).status_code == 429
    assert metrics.sample("ray_turbo_validation_errors_total", {"field": "size"}) == 1
    assert metrics.sample("ray_turbo_jobs_rejected_total", {"model": "tiny-t2v"}) == 1


def test_jobs_by_state_follows_the_store(tmp_path):
    with api(tmp_path, run_jobs=False) as (client, metrics, store):
        for prompt in ("a", "b"):
            assert client.post("/v1/videos", json={"prompt": prompt, **SMALL}).status_code == 200

        async def one_report():
            task = asyncio.create_task(report_job_states(store, metrics, interval_s=60))
            await asyncio.sleep(0.2)
            task.cancel()

        asyncio.run(one_report())
    assert metrics.sample("ray_turbo_jobs_by_state", {"state": "queued"}) == 2
    assert metrics.sample("ray_turbo_jobs_by_state", {"state": "denoising"}) == 0
