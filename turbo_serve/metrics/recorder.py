"""The recording API the serving code calls: one ServingMetrics per replica, created in __init__.

Two backends write the same Prometheus series (catalog.py):
- "ray": ray.serve.metrics instruments, exported through the node's Ray metrics port. Inside a Serve
  replica Ray adds the application/deployment/replica labels; in a plain Ray worker or driver it
  does not. Needs ray.init() first, or Ray silently drops every sample.
- "local": a prometheus_client registry owned by this object, for code running without Ray (the
  offline CLI, benchmarks, unit tests). Read it with `registry` or `sample()`, or serve it with
  prometheus_client.start_http_server(port, registry=metrics.registry).
"auto" (the default) picks "ray" when Ray is initialised in this process and "local" otherwise, and
says so in `backend`, so a test without Ray sees its samples instead of recording into the void.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from turbo_serve.metrics import catalog
from turbo_serve.metrics.catalog import CacheResult, JobState, MetricDef, Outcome, Stage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from turbo_serve.pipeline.spec import GenerationSpec

Backend = Literal["auto", "ray", "local"]
BACKENDS = ("auto", "ray", "local")

OTHER = "other"
MAX_VALUES_PER_LABEL = 32
"""Free-form label values (model, field, ...) beyond this many distinct ones per process become "other":
a client sending a thousand made-up model names must not create a thousand series."""
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


@dataclass(frozen=True)
class JobLabels:
    """The labels every per-job metric carries. Build with for_spec() so the values stay bounded."""

    model: str
    resolution: str
    attention_type: str

    @classmethod
    def for_spec(cls, spec: GenerationSpec) -> JobLabels:
        return cls(spec.model, catalog.resolution_class(spec.width, spec.height), spec.attention_type)

    def as_dict(self) -> dict[str, str]:
        return {"model": self.model, "resolution": self.resolution, "attention_type": self.attention_type}


def _enum_value(enum_cls: type, value: object) -> str:
    try:
        return enum_cls(value).value
    except ValueError:
        valid = ", ".join(member.value for member in enum_cls)
        raise ValueError(f"{enum_cls.__name__.lower()} must be one of {valid}, got {value!r}") from None


class _LabelGuard:
    """Caps the distinct values of each free-form label; thread-safe (DiT steps record from a worker thread)."""

    def __init__(self, limit: int = MAX_VALUES_PER_LABEL) -> None:
        self._limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, value: str) -> str:
        if not isinstance(value, str) or not _LABEL_VALUE.match(value):
            return OTHER
        with self._lock:
            seen = self._seen.setdefault(key, set())
            if value in seen:
                return value
            if len(seen) >= self._limit:
                return OTHER
            seen.add(value)
            return value


class _Instrument:
    """One metric in one backend, with a uniform inc/set/observe taking a label dict."""

    def __init__(self, metric: MetricDef, backend: str, registry: CollectorRegistry | None) -> None:
        self.metric = metric
        if backend == "ray":
            from ray.serve import metrics as ray_metrics

            if metric.kind == "histogram":
                self._ray = ray_metrics.Histogram(
                    metric.name, metric.description, boundaries=list(metric.buckets), tag_keys=metric.labels
                )
            else:
                cls = ray_metrics.Counter if metric.kind == "counter" else ray_metrics.Gauge
                self._ray = cls(metric.name, metric.description, tag_keys=metric.labels)
            self._prom = None
        else:
            import prometheus_client

            # prometheus_client appends _total to counters itself, so it gets the name without it.
            name = catalog.RAY_PREFIX + metric.name
            kwargs = {"labelnames": metric.labels, "registry": registry}
            if metric.kind == "histogram":
                self._prom = prometheus_client.Histogram(name, metric.description, buckets=metric.buckets, **kwargs)
            elif metric.kind == "counter":
                self._prom = prometheus_client.Counter(name, metric.description, **kwargs)
            else:
                self._prom = prometheus_client.Gauge(name, metric.description, **kwargs)
            self._ray = None

    def record(self, value: float, labels: Mapping[str, str]) -> None:
        if self._ray is not None:
            method = {"counter": "inc", "gauge": "set", "histogram": "observe"}[self.metric.kind]
            getattr(self._ray, method)(value, tags=dict(labels))
            return
        child = self._prom.labels(**labels)
        if self.metric.kind == "counter":
            child.inc(value)
        elif self.metric.kind == "gauge":
            child.set(value)
        else:
            child.observe(value)


def _ray_initialized() -> bool:
    # Ray cannot be initialised in a process that never imported it; checking first keeps the
    # offline CLI from importing Ray just to decide where metrics go.
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


class ServingMetrics:
    """Records job, stage and request metrics. Create once per replica (in __init__), then call freely."""

    def __init__(self, backend: Backend = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend: Literal["ray", "local"] = (
            ("ray" if _ray_initialized() else "local") if backend == "auto" else backend
        )
        self.registry: CollectorRegistry | None = None
        if self.backend == "local":
            from prometheus_client import CollectorRegistry

            self.registry = CollectorRegistry(auto_describe=True)
        self._instruments = {m.name: _Instrument(m, self.backend, self.registry) for m in catalog.APP_METRICS}
        self._guard = _LabelGuard()

    def _record(self, metric: MetricDef, value: float, labels: Mapping[str, str]) -> None:
        self._instruments[metric.name].record(value, labels)

    def _job(self, labels: JobLabels) -> dict[str, str]:
        return {key: self._guard(key, value) for key, value in labels.as_dict().items()}

    # Durations --------------------------------------------------------------------------------------

    def observe_stage(self, stage: Stage | str, seconds: float, labels: JobLabels) -> None:
        self._record(catalog.STAGE, seconds, {**self._job(labels), "stage": _enum_value(Stage, stage)})

    @contextmanager
    def time_stage(self, stage: Stage | str, labels: JobLabels) -> Iterator[None]:
        """Times the block and records it as `stage` if it finishes; a stage that raises is not a
        latency sample (the job's outcome counter records the failure)."""
        stage_value = _enum_value(Stage, stage)
        start = time.perf_counter()
        yield
        self.observe_stage(stage_value, time.perf_counter() - start, labels)

    def observe_dit_step(self, seconds: float, labels: JobLabels) -> None:
        self._record(catalog.DIT_STEP, seconds, self._job(labels))

    def step_timer(self, labels: JobLabels) -> Callable[[int, int], None]:
        """An `on_step(done, total)` callback for DenoiseStage that records each step's duration,
        measured from the call that created it (i.e. create it just before denoising starts)."""
        last = [time.perf_counter()]

        def on_step(done: int, total: int) -> None:
            now = time.perf_counter()
            self.observe_dit_step(now - last[0], labels)
            last[0] = now

        return on_step

    def observe_queue_wait(self, seconds: float, labels: JobLabels) -> None:
        self._record(catalog.QUEUE_WAIT, seconds, self._job(labels))

    def observe_job(self, seconds: float, labels: JobLabels) -> None:
        """End-to-end seconds of a completed job (submission to finished mp4)."""
        self._record(catalog.JOB_E2E, seconds, self._job(labels))

    # Counts -----------------------------------------------------------------------------------------

    def count_finished(self, outcome: Outcome | str, labels: JobLabels) -> None:
        self._record(catalog.JOBS_FINISHED, 1, {**self._job(labels), "outcome": _enum_value(Outcome, outcome)})

    def count_rejected(self, model: str) -> None:
        """A submission refused with 429 (queue full)."""
        self._record(catalog.JOBS_REJECTED, 1, {"model": self._guard("model", model)})

    def count_validation_error(self, field: str) -> None:
        """A request refused with 422; `field` is the first offending field of the request body."""
        self._record(catalog.VALIDATION_ERRORS, 1, {"field": self._guard("field", field)})

    def count_text_cache(self, hit: bool, model: str) -> None:
        result = CacheResult.HIT if hit else CacheResult.MISS
        self._record(catalog.TEXT_CACHE, 1, {"model": self._guard("model", model), "result": result.value})

    def set_jobs_by_state(self, counts: Mapping[JobState | str, int]) -> None:
        """Sets every non-terminal state's gauge; states missing from `counts` are set to 0, so a
        state that emptied does not keep its last value."""
        values = {_enum_value(JobState, state): count for state, count in counts.items()}
        for state in JobState:
            self._record(catalog.JOBS_BY_STATE, values.get(state.value, 0), {"state": state.value})

    # Reading back (local backend) -------------------------------------------------------------------

    def sample(self, series: str, labels: Mapping[str, str] | None = None) -> float | None:
        """Current value of one local series, e.g. sample("ray_turbo_jobs_finished_total", {...})."""
        if self.registry is None:
            raise RuntimeError("the ray backend exports through Ray's metrics port; scrape that instead")
        return self.registry.get_sample_value(series, dict(labels or {}))
