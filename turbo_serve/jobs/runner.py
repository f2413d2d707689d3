"""The job runner: claims queued jobs from the store and drives them through the stages.

It lives in every Ingress replica. Ownership and recovery:
- `claim` makes this runner the job's owner with a lease; the runner renews the leases of its jobs
  every poll and notices cancel requests there (a DELETE may land on another Ingress replica).
- Every write is fenced by the owner id: a runner that lost a job (its lease expired, the reaper
  gave the job to someone else) gets LeaseLost and drops it, never overwriting the new attempt.
- A stage whose replica died raises WorkerLost: the job goes back to the queue while attempts
  remain (it is retried, possibly here), else it fails with a message naming the stage.
- A runner that dies stops renewing; the reaper (run at start and every poll by every runner)
  re-queues or fails its jobs once their lease expires, so none stays in_progress forever and
  jobs survive an Ingress restart.
- On a graceful stop the runner lets its jobs finish for a while, then gives the rest back to the
  queue without counting the attempt.

All state transitions and stage timings go through `_advance` and `JobObserver`: the one place
where metrics can be recorded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from turbo_serve.jobs.record import (
    IllegalTransition,
    JobError,
    JobRecord,
    JobState,
    LeaseLost,
    denoise_progress,
)
from turbo_serve.jobs.storage import Storage, output_key
from turbo_serve.jobs.store import JobStore
from turbo_serve.models.configs import get_preset
from turbo_serve.pipeline.memory import OutOfMemory
from turbo_serve.pipeline.spec import GenerationSpec, output_name

logger = logging.getLogger(__name__)


class WorkerLost(RuntimeError):
    """A stage's replica died or became unreachable while it held the job (retryable)."""


class JobCancelled(Exception):
    """A stage noticed the job's cancel flag (the pipeline's GenerationCancelled, seen by the runner)."""


@dataclass
class DenoiseOutput:
    latents: Any
    """Final latents, a CPU tensor."""
    step_seconds: list[float] = field(default_factory=list)


class Stages(Protocol):
    """What the runner needs from the model stages; the serving layer implements it with
    DeploymentHandles, `LocalStages` in-process."""

    async def encode_text(self, prompt: str) -> Any: ...

    async def encode_image(self, image_key: str, width: int, height: int, num_frames: int) -> Any: ...

    async def denoise(self, job: JobRecord, text: Any, negative_text: Any, condition: Any) -> DenoiseOutput:
        """Must report progress and poll cancellation through the job store (`reported_denoise`)."""

    async def decode(self, latents: Any, key: str, fps: int) -> None:
        """Write the mp4 at storage key `key`."""


class JobObserver:
    """Hooks for metrics (issue 4): every state change, every stage duration, every DiT step."""

    def on_transition(self, before: JobRecord | None, after: JobRecord) -> None: ...

    def on_stage(self, job: JobRecord, stage: str, seconds: float) -> None: ...

    def on_steps(self, job: JobRecord, step_seconds: list[float]) -> None: ...


def needs_negative_prompt(spec: GenerationSpec) -> bool:
    """Teacher samplers run classifier-free guidance; rCM (distilled) does not."""
    return spec.sampler != "rcm" and spec.guidance_scale > 1.0


class StepReporter:
    """Progress and cancellation of one job as seen from inside the Denoiser (any process).

    The store is written and read on a thread of its own, so the sampling loop never waits on it:
    a store round trip between two steps would leave the GPU idle. `on_step` hands the progress
    over; `should_stop` answers from the latest reading (taken after each progress write and every
    `poll_s`). Use it as a context manager: leaving it flushes the last progress.
    """

    def __init__(self, store: JobStore, job_id: str, owner: str, poll_s: float = 0.5):
        self._store, self._job_id, self._owner = store, job_id, owner
        self._poll_s = poll_s
        self.step_seconds: list[float] = []
        self._last = time.perf_counter()
        self._stop = False
        self._poll()  # a job cancelled before its first step never starts it
        self._updates: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._report_loop, name=f"progress-{job_id}", daemon=True)
        self._thread.start()

    def on_step(self, done: int, total: int) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self._last = now
        self._updates.put(denoise_progress(done, total))

    def should_stop(self) -> bool:
        return self._stop

    def close(self) -> None:
        """Flush the progress; from now on should_stop is True (nobody is waiting for the steps)."""
        self._updates.put(None)
        self._thread.join()
        self._stop = True

    def __enter__(self) -> "StepReporter":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _report_loop(self) -> None:
        while True:
            try:
                progress = self._updates.get(timeout=self._poll_s)
            except queue.Empty:
                progress = -1  # nothing new: only look for a cancellation
            if progress is None:
                return
            if progress >= 0:
                self._write(progress)
            self._poll()

    def _write(self, progress: int) -> None:
        try:
            self._store.set_progress(self._job_id, self._owner, progress)
        except (LeaseLost, KeyError):
            self._stop = True
        except self._store.unavailable:  # progress is best effort: a store outage must not fail the job
            logger.warning("job %s: progress not recorded, the job store is unavailable", self._job_id)

    def _poll(self) -> None:
        if self._stop:
            return
        try:
            self._stop = self._store.should_stop(self._job_id, self._owner)
        except self._store.unavailable:  # carry on; the owner's lease settles who owns the job
            pass


def reported_denoise(store: JobStore, job_id: str, owner: str, denoise: Callable[..., Any], spec: GenerationSpec,
                     text: Any, negative_text: Any, condition: Any) -> DenoiseOutput:
    """Run a denoise stage with its progress and cancellation going through the job store. Call it
    on the sampling thread: a cancelled caller leaves that thread running, and it must still see
    the cancellation and stop."""
    with StepReporter(store, job_id, owner) as reporter:
        latents = denoise(spec, text, negative_text=negative_text, condition=condition, on_step=reporter.on_step,
                          should_stop=reporter.should_stop)
    return DenoiseOutput(latents=latents, step_seconds=reporter.step_seconds)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        stages: Stages,
        storage: Storage,
        *,
        max_running: int,
        lease_s: float,
        poll_interval_s: float,
        max_attempts: int,
        retention_s: float,
        default_retry_after_s: int = 10,
        observer: JobObserver | None = None,
    ):
        self.owner = f"runner-{uuid.uuid4().hex[:12]}"
        self._store, self._stages, self._storage = store, stages, storage
        self._max_running, self._lease_s, self._poll_s = max_running, lease_s, poll_interval_s
        self._max_attempts, self._retention_s = max_attempts, retention_s
        self._observer = observer or JobObserver()
        self._tasks: dict[str, asyncio.Task] = {}
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._mean_job_s: float | None = None
        self._default_retry_after_s = default_retry_after_s
        self._last_purge = 0.0

    @classmethod
    def from_settings(cls, settings, store: JobStore, stages: Stages, storage: Storage, **kwargs) -> "JobRunner":
        return cls(
            store, stages, storage,
            max_running=settings.max_running_jobs,
            lease_s=settings.lease_s,
            poll_interval_s=settings.poll_interval_s,
            max_attempts=settings.job_max_attempts,
            retention_s=settings.retention_s,
            default_retry_after_s=settings.retry_after_s,
            **kwargs,
        )  # fmt: skip

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        await self._reap()
        self._loop_task = asyncio.create_task(self._loop(), name=f"{self.owner}-loop")

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; let running jobs finish for up to grace_s, then give them back."""
        self._stopping = True
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=grace_s)
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=10.0)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    def failed(self) -> bool:
        """The loop ended without being stopped (the replica should be restarted)."""
        return self._loop_task is not None and self._loop_task.done() and not self._stopping

    @property
    def running_jobs(self) -> list[str]:
        return list(self._tasks)

    def retry_after_s(self) -> int:
        """A client told 429 should come back after about one job's time."""
        if self._mean_job_s is None:
            return self._default_retry_after_s
        return max(1, math.ceil(self._mean_job_s))

    def wake(self) -> None:
        """Look for work now rather than at the next poll (a job was just created here)."""
        if self._wake is not None:
            self._wake.set()

    def cancel_local(self, job_id: str) -> bool:
        """Stop a job this runner drives right away (the DELETE landed on this replica)."""
        task = self._tasks.get(job_id)
        if task is None:
            return False
        task.cancel()
        return True

    async def wait_finished(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """The job once it is completed, failed or cancelled (or its latest record at timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            record = await asyncio.to_thread(self._store.get, job_id)
            remaining = deadline - time.monotonic()
            if record is None or record.state.terminal or remaining <= 0:
                return record
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(job_id, []).append(waiter)
            try:  # woken by this runner at once; polled in case another replica runs the job
                await asyncio.wait_for(waiter, timeout=min(remaining, max(self._poll_s, 0.25)))
            except asyncio.TimeoutError:
                pass
            finally:
                waiters = self._waiters.get(job_id, [])
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._waiters.pop(job_id, None)

    # ---- the loop --------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._renew_leases()
                await self._reap()
                await self._claim()
                await self._purge()
            except Exception:  # the loop must outlive any store hiccup (e.g. Redis restarting)
                logger.exception("job runner loop iteration failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _claim(self) -> None:
        while not self._stopping and len(self._tasks) < self._max_running:
            job = await asyncio.to_thread(self._store.claim, self.owner, self._lease_s)
            if job is None:
                return
            self._observer.on_transition(None, job)
            self._tasks[job.id] = asyncio.create_task(self._run(job), name=f"job-{job.id}")

    async def _renew_leases(self) -> None:
        for job_id, task in list(self._tasks.items()):
            try:
                record = await asyncio.to_thread(self._store.renew, job_id, self.owner, self._lease_s)
            except (LeaseLost, KeyError):
                logger.warning("job %s: lease lost; dropping it", job_id)
                task.cancel()
                continue
            if record.cancel_requested:
                task.cancel()

    async def _reap(self) -> None:
        settled = await asyncio.to_thread(self._store.reap, max_attempts=self._max_attempts)
        for record in settled:
            logger.warning("job %s: owner's lease expired; now %s", record.id, record.state.value)
            self._observer.on_transition(None, record)
            self._notify(record)

    async def _purge(self) -> None:
        now = time.time()
        if now - self._last_purge < 60.0:
            return
        self._last_purge = now
        for record in await asyncio.to_thread(self._store.purge, finished_before=now - self._retention_s):
            await asyncio.to_thread(self._storage.delete_job, record.id)

    def _notify(self, record: JobRecord) -> None:
        if record.state.terminal:
            for waiter in self._waiters.pop(record.id, []):
                if not waiter.done():
                    waiter.set_result(record)

    async def _advance(self, job: JobRecord, state: JobState, **changes) -> JobRecord:
        retried = False

        def advance() -> JobRecord:
            nonlocal retried
            try:
                return self._store.advance(job.id, self.owner, state, **changes)
            except (LeaseLost, IllegalTransition):
                current = self._store.get(job.id) if retried else None
                if current is not None and current.state is state and (state.terminal or current.owner == self.owner):
                    return current  # the try before the outage had landed; only its answer was lost
                raise
            finally:
                retried = True

        after = await self._while_store_unavailable(advance)
        self._observer.on_transition(job, after)
        self._notify(after)
        return after

    async def _while_store_unavailable(self, write):
        """write() in a worker thread, retried while the store is unreachable (a Redis restart) for
        up to one lease: past that the reaper settles the job anyway."""
        deadline, delay = time.monotonic() + self._lease_s, 0.1
        while True:
            try:
                return await asyncio.to_thread(write)
            except self._store.unavailable as error:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("job store unavailable (%s: %s); retrying in %.1f s", type(error).__name__, error, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    # ---- one job ---------------------------------------------------------------------------
    async def _run(self, job: JobRecord) -> None:
        started = time.perf_counter()
        stage = "text_encode"
        timings: dict[str, float] = {"queue_wait": max(0.0, job.entered_at[JobState.ENCODING.value] - job.created_at)}

        async def timed(name: str, call):
            nonlocal stage
            stage = name
            t0 = time.perf_counter()
            value = await call
            timings[name] = time.perf_counter() - t0
            self._observer.on_stage(job, name, timings[name])
            return value

        try:
            spec = job.spec
            task = get_preset(spec.model).task
            text = await timed("text_encode", self._stages.encode_text(spec.prompt))
            negative = None
            if needs_negative_prompt(spec):
                negative = await timed("negative_encode", self._stages.encode_text(spec.negative_prompt))
            condition = None
            if task == "i2v":
                if not spec.image_path:
                    raise ValueError(f"model {spec.model} is image-to-video and needs an input_reference image")
                condition = await timed(
                    "image_encode",
                    self._stages.encode_image(spec.image_path, spec.width, spec.height, spec.num_frames),
                )
            job = await self._advance(job, JobState.DENOISING)
            denoised = await timed("denoise", self._stages.denoise(job, text, negative, condition))
            self._observer.on_steps(job, denoised.step_seconds)
            job = await self._advance(job, JobState.DECODING)
            key = output_key(job.id, output_name(task, spec))
            await timed("decode", self._stages.decode(denoised.latents, key, spec.fps))
            timings["total"] = time.perf_counter() - started
            await self._advance(job, JobState.COMPLETED, result_key=key, timings=timings, progress=100)
            self._record_duration(timings["total"])
        except asyncio.CancelledError:
            await self._settle_interrupted(job)
        except JobCancelled:
            await self._finish(job, JobState.CANCELLED, timings=timings)
        except WorkerLost as error:
            await self._give_back(job, f"{stage} failed: {error}")
        except LeaseLost:
            logger.warning("job %s: lost ownership during %s; the new owner carries on", job.id, stage)
        except OutOfMemory as error:  # the replica freed its memory; the same request would fail again
            logger.warning("job %s: %s", job.id, error)
            await self._finish(job, JobState.FAILED, error=JobError("out_of_memory", f"{stage}: {error}"))
        except ValueError as error:
            await self._finish(job, JobState.FAILED, error=JobError("invalid_request", f"{stage}: {error}"))
        except Exception as error:
            logger.exception("job %s failed in %s", job.id, stage)
            message = f"{stage} failed: {type(error).__name__}: {error}"
            await self._finish(job, JobState.FAILED, error=JobError("generation_failed", message))
        finally:
            self._tasks.pop(job.id, None)
            self.wake()  # a slot is free: claim the next job now

    async def _finish(self, job: JobRecord, state: JobState, **changes) -> None:
        try:
            await self._advance(job, state, **changes)
        except (LeaseLost, IllegalTransition, KeyError) as error:
            logger.info("job %s: not marked %s: %s", job.id, state.value, error)

    async def _give_back(self, job: JobRecord, reason: str) -> None:
        try:
            after = await self._while_store_unavailable(
                lambda: self._store.give_back(job.id, self.owner, max_attempts=self._max_attempts, reason=reason)
            )
        except (LeaseLost, IllegalTransition, KeyError):
            return
        logger.warning("job %s: %s; now %s", job.id, reason, after.state.value)
        self._observer.on_transition(job, after)
        self._notify(after)

    async def _settle_interrupted(self, job: JobRecord) -> None:
        """Our task was cancelled: by a cancel request, a lost lease, or a stop of this runner."""
        record = await asyncio.to_thread(self._store.get, job.id)
        if record is None or record.owner != self.owner or record.state.terminal:
            return
        if record.cancel_requested:
            await self._finish(record, JobState.CANCELLED)
        elif self._stopping:
            # Not the job's fault: back to the queue without using up an attempt.
            try:
                after = await asyncio.to_thread(self._store.release, job.id, self.owner)
            except (LeaseLost, IllegalTransition, KeyError):
                return
            self._observer.on_transition(record, after)

    def _record_duration(self, seconds: float) -> None:
        self._mean_job_s = seconds if self._mean_job_s is None else 0.8 * self._mean_job_s + 0.2 * seconds
