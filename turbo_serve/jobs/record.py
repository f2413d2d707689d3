"""The job record and its state machine (pure Python: no HTTP, no Ray, no storage).

    queued -> encoding -> denoising -> decoding -> completed
       \\________\\____________\\___________\\-----> failed | cancelled
    encoding | denoising | decoding -> queued     (a retry after the worker was lost)

Every change of state goes through `JobRecord.transition`, which refuses illegal moves, stamps the
time the state was entered, and keeps the progress monotonic within one attempt.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from turbo_serve.pipeline.spec import GenerationSpec


class JobState(str, Enum):
    QUEUED = "queued"
    ENCODING = "encoding"
    DENOISING = "denoising"
    DECODING = "decoding"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def running(self) -> bool:
        return self in RUNNING_STATES

    @property
    def api_status(self) -> str:
        """The OpenAI Videos status: queued | in_progress | completed | failed | cancelled."""
        return "in_progress" if self.running else self.value


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
RUNNING_STATES = frozenset({JobState.ENCODING, JobState.DENOISING, JobState.DECODING})
ACTIVE_STATES = RUNNING_STATES | {JobState.QUEUED}
"""States that count against the admission limit."""

_ENDINGS = {JobState.FAILED, JobState.CANCELLED}
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.ENCODING} | _ENDINGS),
    JobState.ENCODING: frozenset({JobState.DENOISING, JobState.QUEUED} | _ENDINGS),
    JobState.DENOISING: frozenset({JobState.DECODING, JobState.QUEUED} | _ENDINGS),
    JobState.DECODING: frozenset({JobState.COMPLETED, JobState.QUEUED} | _ENDINGS),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

# Share of the progress bar each stage covers: denoising is >90% of the time of a real job.
_PROGRESS_AT_START = {JobState.ENCODING: 0, JobState.DENOISING: 5, JobState.DECODING: 95, JobState.COMPLETED: 100}


def denoise_progress(steps_done: int, total_steps: int) -> int:
    """Overall progress (0-100) after `steps_done` of `total_steps` DiT steps."""
    span = _PROGRESS_AT_START[JobState.DECODING] - _PROGRESS_AT_START[JobState.DENOISING]
    fraction = steps_done / total_steps if total_steps > 0 else 1.0
    return _PROGRESS_AT_START[JobState.DENOISING] + int(span * min(max(fraction, 0.0), 1.0))


class IllegalTransition(ValueError):
    """Raised for a state change the machine does not allow (callers branch on it)."""


class LeaseLost(RuntimeError):
    """Raised when a worker writes to a job it no longer owns (another attempt took over)."""


class QueueFull(RuntimeError):
    """Raised by create when the admission limit is reached."""


class IdempotencyConflict(ValueError):
    """Raised by create when an Idempotency-Key is reused with a different request."""


@dataclass(frozen=True)
class JobError:
    code: str
    """Machine-readable: worker_lost, invalid_request, generation_failed, internal_error."""
    message: str


@dataclass(frozen=True)
class JobRecord:
    """One job as the store keeps it. Immutable: every change makes a new record."""

    id: str
    spec: GenerationSpec
    state: JobState = JobState.QUEUED
    progress: int = 0
    created_at: float = field(default_factory=time.time)
    entered_at: dict[str, float] = field(default_factory=dict)
    """Time each state was last entered, by state name."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage of the finished attempt (text_encode, image_encode, denoise, decode...)."""
    error: JobError | None = None
    result_key: str | None = None
    """Storage key of the mp4 (relative to the storage folder)."""
    attempts: int = 0
    idempotency_key: str | None = None
    fingerprint: str | None = None
    """Hash of the request that created the job; an Idempotency-Key is bound to it."""
    owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.progress <= 100:
            raise ValueError(f"progress must be in [0, 100], got {self.progress}")

    @property
    def finished_at(self) -> float | None:
        return self.entered_at.get(self.state.value) if self.state.terminal else None

    def transition(self, new_state: JobState, *, now: float | None = None, **changes: Any) -> "JobRecord":
        """The record in `new_state`; raises IllegalTransition naming both states and the allowed ones."""
        new_state = JobState(new_state)
        if new_state not in ALLOWED_TRANSITIONS[self.state]:
            allowed = ", ".join(sorted(s.value for s in ALLOWED_TRANSITIONS[self.state])) or "none (terminal)"
            raise IllegalTransition(
                f"job {self.id}: cannot go from {self.state.value} to {new_state.value}; allowed: {allowed}"
            )
        now = time.time() if now is None else now
        progress = changes.pop("progress", None)
        if progress is None:
            progress = 0 if new_state is JobState.QUEUED else max(self.progress, _PROGRESS_AT_START.get(new_state, 0))
        if new_state.terminal or new_state is JobState.QUEUED:
            changes.setdefault("owner", None)
            changes.setdefault("lease_expires_at", None)
        return dataclasses.replace(
            self,
            state=new_state,
            progress=progress,
            entered_at={**self.entered_at, new_state.value: now},
            **changes,
        )

    def with_progress(self, progress: int) -> "JobRecord":
        """Progress only moves forward within an attempt."""
        return dataclasses.replace(self, progress=max(self.progress, min(int(progress), 100)))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobRecord":
        data = dict(data)
        data["spec"] = GenerationSpec.from_dict(data["spec"])
        data["state"] = JobState(data["state"])
        if data.get("error") is not None:
            data["error"] = JobError(**data["error"])
        return cls(**data)
