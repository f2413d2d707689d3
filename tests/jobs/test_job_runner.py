"""The runner on the real tiny stages and a real store: retries, lease expiry, shutdown hand-back."""

import asyncio
import time

import pytest

from turbo_serve.jobs.local_stages import LocalStages
from turbo_serve.jobs.record import JobRecord, JobState
from turbo_serve.jobs.runner import JobRunner, WorkerLost
from turbo_serve.jobs.sqlite_store import SqliteJobStore
from turbo_serve.jobs.storage import Storage
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.settings import Settings

SPEC = GenerationSpec(prompt="a lighthouse", width=128, height=128, num_frames=5, num_steps=2)


@pytest.fixture
def parts(tmp_path):
    settings = Settings(storage_dir=str(tmp_path / "s"), cache_dir=str(tmp_path / "c"),
                        poll_interval_s=0.05, lease_s=0.5, job_max_attempts=2)  # fmt: skip
    store = SqliteJobStore(tmp_path / "s" / "jobs.sqlite3")
    storage = Storage(settings.storage_dir)
    yield settings, store, storage, LocalStages(settings, store, storage)
    store.close()


class DiesOnFirstDenoise:
    """The real stages, except that the first denoise call fails as a killed replica would."""

    def __init__(self, stages):
        self._stages, self.denoise_calls = stages, 0

    def __getattr__(self, name):
        return getattr(self._stages, name)

    async def denoise(self, job, *args):
        self.denoise_calls += 1
        if self.denoise_calls == 1:
            raise WorkerLost("the Denoiser replica died")
        return await self._stages.denoise(job, *args)


def run_until(settings, store, stages, storage, predicate, *, grace_s=1.0, timeout_s=30.0):
    """Start a runner, wait for predicate(), stop the runner with `grace_s`."""

    async def main():
        runner = JobRunner.from_settings(settings, store, stages, storage)
        await runner.start()
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)
        await runner.stop(grace_s=grace_s)

    asyncio.run(main())


def test_a_lost_worker_is_retried_and_the_job_completes(parts):
    settings, store, storage, stages = parts
    flaky = DiesOnFirstDenoise(stages)
    store.create(JobRecord(id="video_a", spec=SPEC))

    run_until(settings, store, flaky, storage, lambda: store.get("video_a").state.terminal)
    job = store.get("video_a")
    assert job.state is JobState.COMPLETED and job.attempts == 2 and flaky.denoise_calls == 2
    assert storage.path(job.result_key).stat().st_size > 0


def test_a_job_whose_worker_keeps_dying_fails_clearly(parts):
    settings, store, storage, stages = parts

    class AlwaysDies(DiesOnFirstDenoise):
        async def denoise(self, job, *args):
            raise WorkerLost("the Denoiser replica died")

    store.create(JobRecord(id="video_b", spec=SPEC))

    run_until(settings, store, AlwaysDies(stages), storage, lambda: store.get("video_b").state.terminal)
    job = store.get("video_b")
    assert job.state is JobState.FAILED and job.error.code == "worker_lost"
    assert "denoise failed: the Denoiser replica died" in job.error.message and "attempt 2 of 2" in job.error.message


def test_a_dead_runner_s_job_is_reaped_and_finished_by_another(parts):
    settings, store, storage, stages = parts
    store.create(JobRecord(id="video_c", spec=SPEC))
    dead_owner = store.claim("runner-that-died", lease_s=settings.lease_s).owner  # then it vanished

    run_until(settings, store, stages, storage, lambda: store.get("video_c").state is JobState.COMPLETED)
    job = store.get("video_c")
    assert job.attempts == 2 and job.owner is None and dead_owner == "runner-that-died"


def test_stop_hands_running_jobs_back_without_using_an_attempt(parts):
    settings, store, storage, stages = parts
    slow = GenerationSpec(**{**SPEC.to_dict(), "sampler": "euler", "guidance_scale": 1.0, "num_steps": 100})
    store.create(JobRecord(id="video_d", spec=slow))

    run_until(settings, store, stages, storage, lambda: store.get("video_d").state is JobState.DENOISING, grace_s=0.0)
    job = store.get("video_d")
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.owner is None
