"""Job-runner events -> ServingMetrics: the JobObserver the Ingress hands its JobRunner, and the
periodic jobs-by-state gauge read from the job store."""

from __future__ import annotations

import asyncio
import logging

from turbo_serve.jobs.record import JobRecord, JobState
from turbo_serve.jobs.runner import JobObserver
from turbo_serve.jobs.store import JobStore
from turbo_serve.metrics.catalog import JobState as GaugedState
from turbo_serve.metrics.catalog import Outcome
from turbo_serve.metrics.recorder import JobLabels, ServingMetrics

logger = logging.getLogger(__name__)

_OUTCOMES = {JobState.COMPLETED: Outcome.COMPLETED, JobState.FAILED: Outcome.FAILED, JobState.CANCELLED: Outcome.CANCELLED}


class JobMetrics(JobObserver):
    """Records queue wait at each claim, stage and DiT-step durations, outcomes and end-to-end time."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def on_transition(self, before: JobRecord | None, after: JobRecord) -> None:
        labels = JobLabels.for_spec(after.spec)
        if after.state is JobState.ENCODING and (before is None or before.state is JobState.QUEUED):
            # A retried job re-enters the queue; its wait counts from then, not from submission.
            queued_at = after.entered_at.get(JobState.QUEUED.value, after.created_at)
            self.metrics.observe_queue_wait(max(0.0, after.entered_at[JobState.ENCODING.value] - queued_at), labels)
        if after.state.terminal and (before is None or not before.state.terminal):
            self.metrics.count_finished(_OUTCOMES[after.state], labels)
            if after.state is JobState.COMPLETED:
                self.metrics.observe_job(max(0.0, after.entered_at[JobState.COMPLETED.value] - after.created_at), labels)

    def on_stage(self, job: JobRecord, stage: str, seconds: float) -> None:
        self.metrics.observe_stage(stage, seconds, JobLabels.for_spec(job.spec))

    def on_steps(self, job: JobRecord, step_seconds: list[float]) -> None:
        labels = JobLabels.for_spec(job.spec)
        for seconds in step_seconds:
            self.metrics.observe_dit_step(seconds, labels)


async def report_job_states(store: JobStore, metrics: ServingMetrics, interval_s: float = 5.0) -> None:
    """Forever: set the jobs-by-state gauge from the store's counts (submissions change the queue
    without any runner event, so the gauge is polled rather than updated on transitions)."""
    while True:
        try:
            counts = await asyncio.to_thread(store.counts)
            metrics.set_jobs_by_state({s.value: counts.get(s.value, 0) for s in GaugedState})
        except Exception:  # a store hiccup must not end the reporting
            logger.exception("reading job counts for metrics failed; retrying")
        await asyncio.sleep(interval_s)
