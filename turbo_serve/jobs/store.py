"""The job store: one interface, two backends (sqlite on disk, Redis).

The store knows jobs, states and leases, nothing of HTTP or Ray. Every rule lives in this base class
on top of a few atomic primitives the backends implement (insert with admission control, one
record's read-modify-write, index queries), so both backends behave the same by construction and
share one test suite.

Ownership: a runner `claim`s a queued job (it becomes the owner with a lease), renews the lease
while it works, and every write it makes is fenced by the owner id, so a stale attempt (its lease
expired and the job went to another runner) can never overwrite the new attempt's state.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import Callable, Literal

from turbo_serve.jobs.record import (
    ACTIVE_STATES,
    IdempotencyConflict,
    IllegalTransition,
    JobError,
    JobRecord,
    JobState,
    LeaseLost,
)

Order = Literal["asc", "desc"]
WORKER_LOST = "worker_lost"


class JobStore(abc.ABC):
    """Durable job records shared by every replica of the application."""

    # ---- primitives the backends implement -------------------------------------------------
    @abc.abstractmethod
    def _insert(self, record: JobRecord, max_active: int | None) -> tuple[JobRecord, bool]:
        """Atomically: return (existing, False) if record.idempotency_key is taken, raise QueueFull
        if max_active unfinished jobs exist, else store the record and return (record, True)."""

    @abc.abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abc.abstractmethod
    def _update(self, job_id: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        """Atomically replace the record by change(record); KeyError if absent. `change` may raise
        to abort without writing."""

    @abc.abstractmethod
    def _queued_ids(self, limit: int) -> list[str]:
        """Oldest queued jobs first."""

    @abc.abstractmethod
    def _expired_lease_ids(self, now: float) -> list[str]:
        """Running jobs whose lease expired before `now`."""

    @abc.abstractmethod
    def _finished_before(self, when: float) -> list[str]:
        """Terminal jobs that reached their final state before `when`."""

    @abc.abstractmethod
    def _delete(self, job_id: str) -> None: ...

    @abc.abstractmethod
    def list(self, *, after: str | None = None, limit: int = 20, order: Order = "desc") -> tuple[list[JobRecord], bool]:
        """A page of jobs by creation order and whether more follow; KeyError for an unknown `after`."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of jobs in every state (all states present)."""

    def close(self) -> None:
        """Release connections."""

    # ---- the rules ------------------------------------------------------------------------
    def create(self, record: JobRecord, *, max_active: int | None = None) -> tuple[JobRecord, bool]:
        """Store a new queued job. Same idempotency key and fingerprint: the existing job and False.
        Raises QueueFull past `max_active` unfinished jobs, IdempotencyConflict for a reused key with
        a different fingerprint."""
        if record.state is not JobState.QUEUED:
            raise IllegalTransition(f"job {record.id}: new jobs start queued, got {record.state.value}")
        record = _replace(record, entered_at={JobState.QUEUED.value: record.created_at})
        stored, created = self._insert(record, max_active)
        if not created and stored.fingerprint != record.fingerprint:
            raise IdempotencyConflict(
                f"Idempotency-Key {record.idempotency_key!r} was already used for job {stored.id} "
                "with a different request; use a new key for a new request"
            )
        return stored, created

    def claim(self, owner: str, lease_s: float, *, now: float | None = None) -> JobRecord | None:
        """Take the oldest queued job: it enters `encoding`, owned by `owner` until the lease runs out."""
        for job_id in self._queued_ids(limit=8):
            def take(record: JobRecord) -> JobRecord:
                if record.state is not JobState.QUEUED:
                    raise IllegalTransition(f"job {record.id} was taken by another runner")
                at = time.time() if now is None else now
                return record.transition(
                    JobState.ENCODING, now=at, owner=owner, lease_expires_at=at + lease_s,
                    attempts=record.attempts + 1, error=None,
                )  # fmt: skip

            try:
                return self._update(job_id, take)
            except (IllegalTransition, KeyError):
                continue
        return None

    def _fenced(self, job_id: str, owner: str, change: Callable[[JobRecord], JobRecord]) -> JobRecord:
        def guarded(record: JobRecord) -> JobRecord:
            if record.owner != owner or record.state.terminal:
                raise LeaseLost(
                    f"job {record.id} is no longer owned by {owner} (state {record.state.value}, "
                    f"owner {record.owner})"
                )
            return change(record)

        return self._update(job_id, guarded)

    def advance(self, job_id: str, owner: str, new_state: JobState, **changes) -> JobRecord:
        """The owner moves its job on (encoding -> denoising -> decoding -> completed | failed | cancelled)."""
        return self._fenced(job_id, owner, lambda r: r.transition(new_state, **changes))

    def set_progress(self, job_id: str, owner: str, progress: int) -> JobRecord:
        return self._fenced(job_id, owner, lambda r: r.with_progress(progress))

    def renew(self, job_id: str, owner: str, lease_s: float, *, now: float | None = None) -> JobRecord:
        """Extend the owner's lease; the returned record tells it whether a cancel was requested."""
        at = time.time() if now is None else now
        return self._fenced(job_id, owner, lambda r: _replace(r, lease_expires_at=at + lease_s))

    def should_stop(self, job_id: str, owner: str) -> bool:
        """True when the job was cancelled or this owner lost it (polled between DiT steps)."""
        record = self.get(job_id)
        return record is None or record.cancel_requested or record.owner != owner or record.state.terminal

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Queued: cancelled at once. Running: flagged; its owner stops at the next step or stage.
        Finished: unchanged. None if the job does not exist."""

        def cancel(record: JobRecord) -> JobRecord:
            if record.state is JobState.QUEUED:
                return record.transition(JobState.CANCELLED, cancel_requested=True)
            if record.state.running:
                return _replace(record, cancel_requested=True)
            return record

        try:
            return self._update(job_id, cancel)
        except KeyError:
            return None

    def give_back(self, job_id: str, owner: str | None, *, max_attempts: int, reason: str,
                  now: float | None = None) -> JobRecord:  # fmt: skip
        """A running job whose worker was lost: queued again while attempts remain, else failed with
        `reason`; cancelled if a cancel was requested. `owner` fences the call (None: the reaper,
        which may only take jobs whose lease expired)."""
        at = time.time() if now is None else now

        def settle(record: JobRecord) -> JobRecord:
            if not record.state.running:
                raise IllegalTransition(f"job {record.id} is {record.state.value}, not running")
            if owner is not None and record.owner != owner:
                raise LeaseLost(f"job {record.id} is no longer owned by {owner}")
            if owner is None and (record.lease_expires_at or 0.0) > at:
                raise LeaseLost(f"job {record.id}'s lease is still valid")
            if record.cancel_requested:
                return record.transition(JobState.CANCELLED, now=at)
            if record.attempts < max_attempts:
                return record.transition(JobState.QUEUED, now=at)
            message = f"{reason} (attempt {record.attempts} of {max_attempts}; no retries left)"
            return record.transition(JobState.FAILED, now=at, error=JobError(WORKER_LOST, message))

        return self._update(job_id, settle)

    def release(self, job_id: str, owner: str) -> JobRecord:
        """The owner hands a running job back untouched (it is shutting down): queued again, and
        the attempt it made does not count."""

        def requeue(record: JobRecord) -> JobRecord:
            if record.owner != owner or not record.state.running:
                raise LeaseLost(f"job {record.id} is no longer owned by {owner}")
            if record.cancel_requested:
                return record.transition(JobState.CANCELLED)
            return record.transition(JobState.QUEUED, attempts=max(0, record.attempts - 1))

        return self._update(job_id, requeue)

    def reap(self, *, max_attempts: int, now: float | None = None) -> list[JobRecord]:
        """Settle every running job whose owner stopped renewing its lease (see give_back)."""
        at = time.time() if now is None else now
        settled = []
        for job_id in self._expired_lease_ids(at):
            try:
                settled.append(self.give_back(
                    job_id, None, max_attempts=max_attempts, now=at,
                    reason="the replica running this job stopped responding (lease expired)",
                ))  # fmt: skip
            except (IllegalTransition, LeaseLost, KeyError):
                continue  # renewed, finished or deleted meanwhile
        return settled

    def delete(self, job_id: str) -> JobRecord | None:
        """Remove a finished job; IllegalTransition for one still active (cancel it first)."""
        record = self.get(job_id)
        if record is None:
            return None
        if not record.state.terminal:
            raise IllegalTransition(f"job {job_id} is {record.state.value}; only finished jobs can be deleted")
        self._delete(job_id)
        return record

    def purge(self, *, finished_before: float) -> list[JobRecord]:
        """Delete jobs finished before the given time; returns them so their files can go too."""
        purged = []
        for job_id in self._finished_before(finished_before):
            record = self.get(job_id)
            if record is not None and record.state.terminal:
                self._delete(job_id)
                purged.append(record)
        return purged

    def active_count(self) -> int:
        counts = self.counts()
        return sum(counts[s.value] for s in ACTIVE_STATES)


def _replace(record: JobRecord, **changes) -> JobRecord:
    return dataclasses.replace(record, **changes)


def open_store(url: str) -> JobStore:
    """sqlite:///relative/or//absolute/path.sqlite3 or redis://host:port/db."""
    if url.startswith("sqlite:///"):
        from turbo_serve.jobs.sqlite_store import SqliteJobStore

        return SqliteJobStore(url.removeprefix("sqlite:///"))
    if url.startswith(("redis://", "rediss://", "unix://")):
        from turbo_serve.jobs.redis_store import RedisJobStore

        return RedisJobStore(url)
    raise ValueError(f"job store URL must start with sqlite:/// or redis://, got {url!r}")
