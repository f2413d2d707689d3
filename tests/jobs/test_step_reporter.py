"""StepReporter keeps the job store off the sampling loop: steps never wait for a store round
trip, the progress still lands, and a cancellation is still seen between steps."""

from __future__ import annotations

import threading
import time

from turbo_serve.jobs.record import LeaseLost, denoise_progress
from turbo_serve.jobs.runner import StepReporter

STORE_LATENCY_S = 0.05


class SlowStore:
    """A store whose every call takes STORE_LATENCY_S, recording what it was told."""

    unavailable = (ConnectionError,)

    def __init__(self, lose_lease_at: int | None = None):
        self.progress: list[int] = []
        self.cancelled = threading.Event()
        self.lose_lease_at = lose_lease_at

    def set_progress(self, job_id, owner, progress):
        time.sleep(STORE_LATENCY_S)
        if self.lose_lease_at is not None and progress >= self.lose_lease_at:
            raise LeaseLost(job_id)
        self.progress.append(progress)

    def should_stop(self, job_id, owner):
        time.sleep(STORE_LATENCY_S)
        return self.cancelled.is_set()


def test_steps_do_not_wait_for_the_store_and_the_last_progress_is_flushed():
    store = SlowStore()
    with StepReporter(store, "video_1", "runner-a") as reporter:
        start = time.perf_counter()
        for done in range(1, 5):
            assert not reporter.should_stop()
            reporter.on_step(done, 4)
        loop_s = time.perf_counter() - start
    assert loop_s < STORE_LATENCY_S  # eight store calls would take 8 x 50 ms inline
    assert store.progress and store.progress[-1] == max(store.progress)
    assert store.progress == sorted(store.progress)
    assert len(reporter.step_seconds) == 4


def test_a_cancellation_is_seen_within_the_poll_interval():
    store = SlowStore()
    with StepReporter(store, "video_1", "runner-a", poll_s=0.05) as reporter:
        assert not reporter.should_stop()
        store.cancelled.set()
        deadline = time.monotonic() + 2.0
        while not reporter.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reporter.should_stop()


def test_a_job_cancelled_before_its_first_step_stops_at_once():
    store = SlowStore()
    store.cancelled.set()
    with StepReporter(store, "video_1", "runner-a") as reporter:
        assert reporter.should_stop()


def test_a_lost_lease_stops_the_loop():
    store = SlowStore(lose_lease_at=denoise_progress(2, 4))
    with StepReporter(store, "video_1", "runner-a", poll_s=0.05) as reporter:
        reporter.on_step(2, 4)
        deadline = time.monotonic() + 2.0
        while not reporter.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert reporter.should_stop()


def test_a_closed_reporter_stops_a_loop_still_running():
    """A caller that left (its task cancelled) closes the reporter; a sampling thread it left
    behind must stop at its next step rather than run the job out."""
    reporter = StepReporter(SlowStore(), "video_1", "runner-a")
    assert not reporter.should_stop()
    reporter.close()
    assert reporter.should_stop()
