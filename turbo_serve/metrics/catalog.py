"""Every metric turbo-serve exports, defined once: name, kind, labels, buckets, Prometheus name.

The recorders (recorder.py), the GPU exporter (gpu_exporter.py), the dashboards builder and the tests all
read these definitions, so a renamed metric or label breaks a test instead of silently emptying a panel.

Application metrics are recorded inside Ray replicas with Ray's metrics API, which exports a metric
named ``x`` as ``ray_x`` (and a counter as ``ray_x_total``) on the node's metrics port. Outside Ray the
recorders write the same Prometheus names into a prometheus_client registry, so one dashboard reads both.
GPU metrics come from our own per-node exporter (prometheus_client) and carry no ``ray_`` prefix.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

MetricKind = Literal["counter", "gauge", "histogram"]

RAY_PREFIX = "ray_"

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0,
)  # fmt: skip
"""Seconds, 10 ms .. 30 min: a DiT step on an H200 is tens of ms, a 720p 14B job many minutes. Ray's own
latency histograms stop at 10 min, and older Ray at 5 s, so long jobs need buckets of our own."""


class Stage(str, enum.Enum):
    """Pipeline stages; values equal the stage names of the job runner's and the pipeline's timings."""

    TEXT_ENCODE = "text_encode"
    NEGATIVE_ENCODE = "negative_encode"
    """Text encode of the negative prompt (teacher samplers with classifier-free guidance)."""
    IMAGE_ENCODE = "image_encode"
    DENOISE = "denoise"
    DECODE = "decode"
    """VAE decode; when frames are streamed into the mp4 writer it includes the interleaved mp4 encode."""
    MP4_ENCODE = "mp4_encode"
    """H.264 encode on its own, when the frames were decoded first."""


class Outcome(str, enum.Enum):
    """How a job ended (the terminal states of the job state machine)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobState(str, enum.Enum):
    """Non-terminal job states, the ones a gauge can count."""

    QUEUED = "queued"
    ENCODING = "encoding"
    DENOISING = "denoising"
    DECODING = "decoding"


class CacheResult(str, enum.Enum):
    HIT = "hit"
    MISS = "miss"


JOB_LABELS = ("model", "resolution", "attention_type")
"""Labels of every per-job metric. Values are bounded: presets, resolution classes, attention backends."""


@dataclass(frozen=True)
class MetricDef:
    name: str
    """Name as given to the recording API (Ray adds the ``ray_`` prefix on export)."""
    kind: MetricKind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    ray_prefixed: bool = True
    """False for the GPU exporter's metrics, which prometheus_client exports under their own name."""

    @property
    def prometheus_name(self) -> str:
        """The series name a PromQL query uses (histograms add _bucket/_sum/_count to it)."""
        base = RAY_PREFIX + self.name if self.ray_prefixed else self.name
        return base + "_total" if self.kind == "counter" else base

    @property
    def series_names(self) -> tuple[str, ...]:
        if self.kind == "histogram":
            return tuple(f"{self.prometheus_name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (self.prometheus_name,)


JOB_E2E = MetricDef(
    "turbo_job_e2e_seconds", "histogram",
    "Seconds from job submission to the finished mp4, completed jobs only.",
    JOB_LABELS, LATENCY_BUCKETS_S,
)  # fmt: skip
QUEUE_WAIT = MetricDef(
    "turbo_job_queue_wait_seconds", "histogram",
    "Seconds a job waited between submission and the start of its first stage.",
    JOB_LABELS, LATENCY_BUCKETS_S,
)  # fmt: skip
STAGE = MetricDef(
    "turbo_stage_seconds", "histogram",
    "Seconds spent in one pipeline stage of one job.",
    (*JOB_LABELS, "stage"), LATENCY_BUCKETS_S,
)  # fmt: skip
DIT_STEP = MetricDef(
    "turbo_dit_step_seconds", "histogram",
    "Seconds of one denoising step of the DiT (all CFG branches and experts of that step).",
    JOB_LABELS, LATENCY_BUCKETS_S,
)  # fmt: skip
JOBS_FINISHED = MetricDef(
    "turbo_jobs_finished", "counter",
    "Jobs that reached a terminal state, by outcome.",
    (*JOB_LABELS, "outcome"),
)  # fmt: skip
JOBS_REJECTED = MetricDef(
    "turbo_jobs_rejected", "counter",
    "Job submissions refused with 429 because the queue was full.",
    ("model",),
)  # fmt: skip
VALIDATION_ERRORS = MetricDef(
    "turbo_validation_errors", "counter",
    "Requests refused with 422, by the first offending request field.",
    ("field",),
)  # fmt: skip
JOBS_BY_STATE = MetricDef(
    "turbo_jobs_by_state", "gauge",
    "Jobs currently in each non-terminal state, as the job store counts them. Every replica that "
    "reports it sees the same store, so dashboards take max() across replicas, never sum().",
    ("state",),
)  # fmt: skip
TEXT_CACHE = MetricDef(
    "turbo_text_cache_lookups", "counter",
    "Text-encoder embedding cache lookups, by result (hit or miss).",
    ("model", "result"),
)  # fmt: skip

APP_METRICS: tuple[MetricDef, ...] = (
    JOB_E2E, QUEUE_WAIT, STAGE, DIT_STEP, JOBS_FINISHED, JOBS_REJECTED, VALIDATION_ERRORS,
    JOBS_BY_STATE, TEXT_CACHE,
)  # fmt: skip

GPU_LABELS = ("gpu", "uuid", "name")
"""gpu is the NVML index on its node, uuid the NVML UUID (stable across reboots), name the product name."""

GPU_PRESENT = MetricDef(
    "turbo_gpu_present", "gauge", "1 if NVML found at least one NVIDIA GPU on this node, else 0.", (),
    ray_prefixed=False,
)  # fmt: skip
GPU_COUNT = MetricDef("turbo_gpu_count", "gauge", "NVIDIA GPUs NVML sees on this node.", (), ray_prefixed=False)
GPU_EXPORTER_INFO = MetricDef(
    "turbo_gpu_exporter_info", "gauge",
    "Always 1; labels carry the driver and NVML versions, or why NVML could not start.",
    ("driver_version", "nvml_version", "nvml_error"), ray_prefixed=False,
)  # fmt: skip
GPU_UTILIZATION = MetricDef(
    "turbo_gpu_utilization_percent", "gauge",
    "Percent of the last sample period (1/6 s to 1 s, driver-defined) in which a kernel ran.",
    GPU_LABELS, ray_prefixed=False,
)  # fmt: skip
GPU_MEMORY_USED = MetricDef(
    "turbo_gpu_memory_used_bytes", "gauge", "Device memory in use, bytes (NVML, as nvidia-smi reports it).",
    GPU_LABELS, ray_prefixed=False,
)  # fmt: skip
GPU_MEMORY_TOTAL = MetricDef(
    "turbo_gpu_memory_total_bytes", "gauge", "Device memory size, bytes.", GPU_LABELS, ray_prefixed=False,
)  # fmt: skip
GPU_TEMPERATURE = MetricDef(
    "turbo_gpu_temperature_celsius", "gauge", "GPU core temperature.", GPU_LABELS, ray_prefixed=False,
)  # fmt: skip
GPU_POWER = MetricDef("turbo_gpu_power_watts", "gauge", "Board power draw.", GPU_LABELS, ray_prefixed=False)
GPU_SM_CLOCK = MetricDef("turbo_gpu_sm_clock_hertz", "gauge", "Current SM clock.", GPU_LABELS, ray_prefixed=False)
GPU_READ_ERRORS = MetricDef(
    "turbo_gpu_read_errors", "counter", "NVML queries that failed, by field (an unsupported field fails every scrape).",
    ("gpu", "field"), ray_prefixed=False,
)  # fmt: skip
GPU_REPLICA = MetricDef(
    "turbo_gpu_replica_info", "gauge",
    "1 for each (GPU, Serve replica) pair the replica reported at start; uuid is empty where NVML is "
    "absent (logical GPUs on a CPU host).",
    ("gpu", "uuid", "application", "deployment", "replica"), ray_prefixed=False,
)  # fmt: skip

GPU_METRICS: tuple[MetricDef, ...] = (
    GPU_PRESENT, GPU_COUNT, GPU_EXPORTER_INFO, GPU_UTILIZATION, GPU_MEMORY_USED, GPU_MEMORY_TOTAL,
    GPU_TEMPERATURE, GPU_POWER, GPU_SM_CLOCK, GPU_READ_ERRORS, GPU_REPLICA,
)  # fmt: skip

GPU_HARDWARE_SERIES = frozenset(
    m.prometheus_name
    for m in (GPU_UTILIZATION, GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_TEMPERATURE, GPU_POWER, GPU_SM_CLOCK)
)
"""Series that exist only where NVML sees a GPU; on a CPU host their queries are empty by design."""

# Ray built-in series the dashboards query. Ray defines them in its own code, not here, so the
# integration test checks each name against a live Ray 2.60 metrics port; a Ray upgrade that renames
# one fails that test instead of leaving a panel empty.
RAY_BUILTIN_SERIES: dict[str, str] = {
    # Gauge per replica, 1 while healthy (deployment_state.py): replicas per deployment over time.
    "ray_serve_deployment_replica_healthy": "gauge",
    # Controller's autoscaling decision and target (autoscaling_state.py / deployment_state.py).
    "ray_serve_autoscaling_target_replicas": "gauge",
    "ray_serve_autoscaling_desired_replicas": "gauge",
    # Requests waiting in a handle/router queue for a replica (router.py): Serve-side queue depth.
    "ray_serve_deployment_queued_queries": "gauge",
    # Requests a replica is executing now (replica.py).
    "ray_serve_replica_processing_queries": "gauge",
    # Batch sizes @serve.batch actually formed (batching.py), e.g. the text encoder's prompt batches.
    "ray_serve_actual_batch_size_bucket": "histogram",
    "ray_serve_actual_batch_size_sum": "histogram",
    "ray_serve_actual_batch_size_count": "histogram",
    # HTTP requests through Serve's proxy, by status code (429s included).
    "ray_serve_num_http_requests_total": "counter",
}


def all_series_names() -> frozenset[str]:
    """Every series name a dashboard may reference."""
    ours = {name for m in (*APP_METRICS, *GPU_METRICS) for name in m.series_names}
    return frozenset(ours | set(RAY_BUILTIN_SERIES))


def resolution_class(width: int, height: int) -> str:
    """Bounded resolution label from a size: the table entries' pixel areas bound each class, so the
    adaptive I2V sizes (same area, other aspect) land in the class they were derived from."""
    from turbo_serve.pipeline.resolution import RESOLUTIONS

    area = width * height
    areas = {name: [w * h for w, h in sizes.values()] for name, sizes in RESOLUTIONS.items()}
    smallest = min(min(a) for a in areas.values())
    if area < smallest * 0.9:
        return "below_" + min(areas, key=lambda n: min(areas[n]))
    for name in sorted(areas, key=lambda n: max(areas[n])):
        if area <= max(areas[name]) * 1.1:
            return name
    return "above_" + max(areas, key=lambda n: max(areas[n]))
