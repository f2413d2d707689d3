"""GPU state through NVML, for the status endpoint; a host without an NVIDIA driver reports so.

NVML enumerates every GPU of the host whatever CUDA_VISIBLE_DEVICES says, so this reads the node,
not one replica's share of it. The readings are the GPU exporter's (turbo_serve.metrics.nvml).
"""

from __future__ import annotations

from typing import Any

from turbo_serve.metrics.gpu_fleet import GpuExporterSettings
from turbo_serve.metrics.nvml import Nvml
from turbo_serve.settings import Settings


def gpu_exporter_settings(settings: Settings) -> GpuExporterSettings:
    """Where the per-node GPU exporters listen (turbo_serve.metrics.gpu_fleet)."""
    return GpuExporterSettings(port=settings.gpu_exporter_port, host=settings.gpu_exporter_host)


def gpu_snapshot() -> dict[str, Any]:
    with Nvml() as nvml:
        if not nvml.available:
            return {"available": False, "reason": f"no GPU: NVML unavailable ({nvml.error})", "devices": []}
        readings = nvml.read()
    if not readings:
        return {"available": False, "reason": "no GPU: NVML found no devices", "devices": []}
    devices = [
        {
            "index": r.index,
            "uuid": r.uuid,
            "name": r.name,
            "memory_used_bytes": r.memory_used_bytes,
            "memory_total_bytes": r.memory_total_bytes,
            "utilization_percent": r.utilization_percent,
        }
        for r in readings
    ]
    return {"available": True, "devices": devices}
