"""GPU readings through NVML (pynvml from nvidia-ml-py), the library nvidia-smi itself reads.

NVML numbers GPUs in PCI bus order and ignores CUDA_VISIBLE_DEVICES, so a process's own GPUs are
mapped by UUID (visible_gpu_uuids), never by torch's device index.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import pynvml

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment. A field is None where this GPU or driver does not support it."""

    index: int
    uuid: str
    name: str
    utilization_percent: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    temperature_celsius: float | None
    power_watts: float | None
    sm_clock_hertz: float | None
    errors: tuple[str, ...] = field(default=())
    """Names of the fields whose NVML query failed this time."""


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Nvml:
    """An NVML session. On a host without the NVIDIA driver it still constructs: `available` is False,
    `error` says why, and `read()` returns no GPUs, so callers need no branch of their own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error = ""
        self.driver_version = ""
        self.nvml_version = ""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.available = False
            logger.info("NVML unavailable, reporting no GPUs (%s)", self.error)
            return
        self.available = True
        self.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        self.nvml_version = _text(pynvml.nvmlSystemGetNVMLVersion())
        self._memory_v2 = hasattr(pynvml, "nvmlMemory_v2")

    def close(self) -> None:
        if self.available:
            self.available = False
            pynvml.nvmlShutdown()

    def __enter__(self) -> Nvml:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def count(self) -> int:
        return pynvml.nvmlDeviceGetCount() if self.available else 0

    def uuids(self) -> list[str]:
        """UUIDs in NVML index order."""
        if not self.available:
            return []
        return [_text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(self.count())]

    def _memory(self, handle: object) -> tuple[float, float]:
        # v2 reports "used" without the driver-reserved memory, which is what current nvidia-smi shows.
        if self._memory_v2:
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
                return float(info.used), float(info.total)
            except pynvml.NVMLError:
                self._memory_v2 = False
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return float(info.used), float(info.total)

    def read(self) -> list[GpuReading]:
        if not self.available:
            return []
        with self._lock:
            return [self._read_one(i) for i in range(self.count())]

    def _read_one(self, index: int) -> GpuReading:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        errors: list[str] = []

        def query(name: str, fn, *args):
            try:
                return fn(handle, *args)
            except pynvml.NVMLError:
                errors.append(name)
                return None

        utilization = query("utilization", pynvml.nvmlDeviceGetUtilizationRates)
        memory = query("memory", self._memory)
        temperature = query("temperature", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        power_mw = query("power", pynvml.nvmlDeviceGetPowerUsage)
        sm_mhz = query("sm_clock", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        return GpuReading(
            index=index,
            uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
            name=_text(pynvml.nvmlDeviceGetName(handle)),
            utilization_percent=None if utilization is None else float(utilization.gpu),
            memory_used_bytes=None if memory is None else memory[0],
            memory_total_bytes=None if memory is None else memory[1],
            temperature_celsius=None if temperature is None else float(temperature),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            sm_clock_hertz=None if sm_mhz is None else sm_mhz * 1e6,
            errors=tuple(errors),
        )


@dataclass(frozen=True)
class GpuRef:
    """A GPU as a process sees it: Ray's id for it, and the NVML UUID where NVML can resolve it."""

    gpu: str
    uuid: str


def visible_gpu_refs(gpu_ids: list[str] | None = None) -> list[GpuRef]:
    """This process's GPUs: Ray's ids (ray.get_gpu_ids()) if given, else CUDA_VISIBLE_DEVICES.

    Entries that are UUIDs ("GPU-...", "MIG-...") are taken as they are; integer ids are NVML indices,
    which holds when the node's GPUs are identical (CUDA's fastest-first order then falls back to
    PCI bus order, NVML's order). Without NVML (logical GPUs on a CPU host) the uuid stays empty.
    """
    if gpu_ids is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        gpu_ids = [part.strip() for part in visible.split(",") if part.strip()]
    ids = [str(g) for g in gpu_ids]
    with Nvml() as nvml:
        uuids = nvml.uuids()
    refs = []
    for gpu in ids:
        if gpu.startswith(("GPU-", "MIG-")):
            refs.append(GpuRef(gpu, gpu))
        elif gpu.isdigit() and int(gpu) < len(uuids):
            refs.append(GpuRef(gpu, uuids[int(gpu)]))
        else:
            refs.append(GpuRef(gpu, ""))
    return refs
