"""Observability: application metrics recorded in replicas, the per-node GPU exporter, metric catalog.

Ray is imported only by gpu_fleet (and by recorder's "ray" backend when used), so the catalog, the
recorders' local backend and the exporter work in plain Python.
"""

from turbo_serve.metrics.catalog import CacheResult, JobState, Outcome, Stage
from turbo_serve.metrics.recorder import JobLabels, ServingMetrics

__all__ = ["CacheResult", "JobLabels", "JobState", "Outcome", "ServingMetrics", "Stage"]
