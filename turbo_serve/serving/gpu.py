"""GPU state through NVML, for the status endpoint; a host without an NVIDIA driver reports so.

NVML enumerates every GPU of the host whatever CUDA_VISIBLE_DEVICES says, so this reads the node,
not one replica's share of it.
"""

from __future__ import annotations

from typing import Any


def gpu_snapshot() -> dict[str, Any]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # no driver, no library: both mean no GPU to report
        return {"available": False, "reason": f"no GPU: NVML unavailable ({type(error).__name__}: {error})", "devices": []}
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            devices.append({
                "index": index,
                "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_used_bytes": int(memory.used),
                "memory_total_bytes": int(memory.total),
                "utilization_percent": int(utilization.gpu),
            })  # fmt: skip
        if not devices:
            return {"available": False, "reason": "no GPU: NVML found no devices", "devices": []}
        return {"available": True, "devices": devices}
    finally:
        pynvml.nvmlShutdown()
