"""One suite, both stores (see conftest.store): the same rules must hold for SQLite and Redis."""

import multiprocessing
import time

import pytest

from turbo_serve.jobs.record import (
    IdempotencyConflict,
    IllegalTransition,
    JobRecord,
    JobState,
    LeaseLost,
    QueueFull,
)
from turbo_serve.jobs.sqlite_store import SqliteJobStore
from turbo_serve.pipeline.spec import GenerationSpec


def job(i: int, **kw) -> JobRecord:
    return JobRecord(id=f"video_{i}", spec=GenerationSpec(prompt=f"prompt {i}"), created_at=1000.0 + i, **kw)


def test_create_get_and_counts(store):
    created, is_new = store.create(job(1))
    assert is_new and created.state is JobState.QUEUED and created.entered_at == {"queued": 1001.0}
    assert store.get("video_1") == created
    assert store.get("video_missing") is None
    assert store.counts()["queued"] == 1 and sum(store.counts().values()) == 1


def test_admission_limit_counts_unfinished_jobs(store):
    for i in range(3):
        store.create(job(i), max_active=3)
    with pytest.raises(QueueFull, match="limit 3"):
        store.create(job(9), max_active=3)
    store.request_cancel("video_0")  # a finished job frees its slot
    store.create(job(9), max_active=3)
    assert store.active_count() == 3


def test_idempotency_key_returns_same_job_or_conflicts(store):
    first, _ = store.create(job(1, idempotency_key="k1", fingerprint="f1"))
    again, is_new = store.create(job(2, idempotency_key="k1", fingerprint="f1"))
    assert not is_new and again.id == first.id
    with pytest.raises(IdempotencyConflict, match="different request"):
        store.create(job(3, idempotency_key="k1", fingerprint="other"))
    assert store.counts()["queued"] == 1


def test_claim_takes_oldest_first_and_fences_writes(store):
    for i in range(2):
        store.create(job(i))
    claimed = store.claim("runner-a", lease_s=30.0, now=2000.0)
    assert (claimed.id, claimed.state, claimed.owner, claimed.attempts) == ("video_0", JobState.ENCODING, "runner-a", 1)
    assert claimed.lease_expires_at == 2030.0
    assert store.claim("runner-b", lease_s=30.0).id == "video_1"
    assert store.claim("runner-b", lease_s=30.0) is None
    with pytest.raises(LeaseLost):
        store.advance("video_0", "runner-b", JobState.DENOISING)
    with pytest.raises(LeaseLost):
        store.set_progress("video_0", "runner-b", 50)
    moved = store.advance("video_0", "runner-a", JobState.DENOISING)
    assert store.set_progress("video_0", "runner-a", 40).progress == 40
    assert moved.state is JobState.DENOISING
    with pytest.raises(IllegalTransition):
        store.advance("video_0", "runner-a", JobState.COMPLETED)


def test_full_run_and_listing_pages(store):
    for i in range(5):
        store.create(job(i))
    for _ in range(5):
        j = store.claim("r", 30.0)
        for state in (JobState.DENOISING, JobState.DECODING, JobState.COMPLETED):
            store.advance(j.id, "r", state, **({"result_key": f"{j.id}/out.mp4"} if state is JobState.COMPLETED else {}))
    assert store.counts()["completed"] == 5
    page, more = store.list(limit=2)
    assert [r.id for r in page] == ["video_4", "video_3"] and more
    page, more = store.list(after="video_3", limit=2)
    assert [r.id for r in page] == ["video_2", "video_1"] and more
    page, more = store.list(after="video_1", limit=2)
    assert [r.id for r in page] == ["video_0"] and not more
    page, more = store.list(order="asc", after="video_2", limit=10)
    assert [r.id for r in page] == ["video_3", "video_4"] and not more
    with pytest.raises(KeyError):
        store.list(after="video_unknown")


def test_cancel_queued_is_immediate_and_running_is_flagged(store):
    store.create(job(1))
    store.create(job(2))
    assert store.request_cancel("video_1").state is JobState.CANCELLED
    running = store.claim("r", 30.0)
    assert running.id == "video_2"
    flagged = store.request_cancel("video_2")
    assert flagged.state is JobState.ENCODING and flagged.cancel_requested
    assert store.should_stop("video_2", "r")
    assert store.renew("video_2", "r", 30.0).cancel_requested
    assert store.advance("video_2", "r", JobState.CANCELLED).state is JobState.CANCELLED
    assert store.request_cancel("video_missing") is None


def test_should_stop_when_owner_changed(store):
    store.create(job(1))
    store.claim("r", 30.0)
    assert not store.should_stop("video_1", "r")
    assert store.should_stop("video_1", "someone-else")


def test_reaper_requeues_then_fails_after_max_attempts(store):
    store.create(job(1))
    store.claim("dead-runner", lease_s=10.0, now=100.0)
    assert store.reap(max_attempts=2, now=105.0) == []  # lease still valid
    (requeued,) = store.reap(max_attempts=2, now=111.0)
    assert requeued.state is JobState.QUEUED and requeued.owner is None and requeued.attempts == 1
    # The dead runner's stale writes are refused once the job moved on.
    with pytest.raises(LeaseLost):
        store.advance("video_1", "dead-runner", JobState.DENOISING)
    store.claim("second", lease_s=10.0, now=200.0)
    (failed,) = store.reap(max_attempts=2, now=211.0)
    assert failed.state is JobState.FAILED and failed.error.code == "worker_lost"
    assert "attempt 2 of 2" in failed.error.message and "lease expired" in failed.error.message
    assert store.counts()["failed"] == 1 and store.counts()["encoding"] == 0


def test_renewed_lease_is_not_reaped(store):
    store.create(job(1))
    store.claim("r", lease_s=10.0, now=100.0)
    store.renew("video_1", "r", lease_s=10.0, now=108.0)
    assert store.reap(max_attempts=2, now=112.0) == []
    assert store.get("video_1").state is JobState.ENCODING


def test_reaper_cancels_a_flagged_orphan(store):
    store.create(job(1))
    store.claim("r", lease_s=1.0, now=100.0)
    store.request_cancel("video_1")
    (settled,) = store.reap(max_attempts=5, now=200.0)
    assert settled.state is JobState.CANCELLED


def test_give_back_by_owner_and_release(store):
    store.create(job(1))
    store.claim("r", 30.0)
    back = store.give_back("video_1", "r", max_attempts=2, reason="Denoiser replica died")
    assert back.state is JobState.QUEUED and back.attempts == 1
    store.claim("r", 30.0)
    released = store.release("video_1", "r")
    assert released.state is JobState.QUEUED and released.attempts == 1  # a shutdown costs no attempt
    store.claim("r", 30.0)
    failed = store.give_back("video_1", "r", max_attempts=2, reason="Denoiser replica died")
    assert failed.state is JobState.FAILED and "Denoiser replica died" in failed.error.message


def test_delete_only_finished_and_purge_by_age(store):
    store.create(job(1))
    with pytest.raises(IllegalTransition, match="only finished"):
        store.delete("video_1")
    store.request_cancel("video_1")
    assert store.delete("video_1").id == "video_1"
    assert store.get("video_1") is None and store.delete("video_1") is None
    store.create(job(2, idempotency_key="again", fingerprint="f"))
    store.request_cancel("video_2")
    store.create(job(3))
    purged = store.purge(finished_before=time.time() + 1)
    assert [r.id for r in purged] == ["video_2"] and store.get("video_3") is not None
    # A purged job's idempotency key is free again.
    _, is_new = store.create(job(4, idempotency_key="again", fingerprint="g"))
    assert is_new


def _claim_all(path: str, owner: str, out) -> None:
    store = SqliteJobStore(path)
    claimed = []
    while (j := store.claim(owner, 30.0)) is not None:
        claimed.append(j.id)
    out.put(claimed)


def test_sqlite_claims_are_exclusive_across_processes(tmp_path):
    path = str(tmp_path / "jobs.sqlite3")
    store = SqliteJobStore(path)
    for i in range(40):
        store.create(job(i))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(path, f"p{n}", out)) for n in range(3)]
    for w in workers:
        w.start()
    claimed = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    ids = [i for part in claimed for i in part]
    assert sorted(ids) == sorted(f"video_{i}" for i in range(40))  # each job exactly once
    assert store.counts()["encoding"] == 40
