"""A per-node GPU exporter: NVML readings and the replica-to-GPU map, served by prometheus_client.

Plain Python, no Ray: gpu_fleet.py runs one inside a Ray actor per node, and bench/gpu_metrics.py runs
one on its own. NVML is read at scrape time, so each scrape shows the GPUs at that moment. On a host
without the NVIDIA driver it serves turbo_gpu_present 0 (and why, in turbo_gpu_exporter_info) and
keeps serving everything else.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter as CounterDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from turbo_serve.metrics import catalog
from turbo_serve.metrics.catalog import MetricDef
from turbo_serve.metrics.nvml import GpuReading, GpuRef, Nvml

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9401
"""9400 is dcgm-exporter's default; one port up lets both run on a node."""


@dataclass(frozen=True)
class ReplicaHolding:
    """GPUs one Serve replica process holds, as it reported them when it started."""

    pid: int
    application: str
    deployment: str
    replica: str
    gpus: tuple[GpuRef, ...]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gauge(metric: MetricDef) -> GaugeMetricFamily:
    return GaugeMetricFamily(metric.prometheus_name, metric.description, labels=list(metric.labels))


_HARDWARE_FIELDS = (
    (catalog.GPU_UTILIZATION, "utilization_percent"),
    (catalog.GPU_MEMORY_USED, "memory_used_bytes"),
    (catalog.GPU_MEMORY_TOTAL, "memory_total_bytes"),
    (catalog.GPU_TEMPERATURE, "temperature_celsius"),
    (catalog.GPU_POWER, "power_watts"),
    (catalog.GPU_SM_CLOCK, "sm_clock_hertz"),
)


class GpuCollector(Collector):
    """prometheus_client collector reading NVML on every scrape."""

    def __init__(self, nvml: Nvml) -> None:
        self.nvml = nvml
        self._holdings: dict[int, ReplicaHolding] = {}
        self._read_errors: CounterDict[tuple[str, str]] = CounterDict()
        self._lock = threading.Lock()

    def register(self, holding: ReplicaHolding) -> None:
        with self._lock:
            self._holdings[holding.pid] = holding

    def holdings(self) -> list[ReplicaHolding]:
        """Live holdings; a replica process that exited (replica stopped, crashed, scaled down)
        drops out here, which works because replicas and their node's exporter share a host."""
        with self._lock:
            for pid in [pid for pid in self._holdings if not _pid_alive(pid)]:
                del self._holdings[pid]
            return list(self._holdings.values())

    def collect(self) -> Iterator[Metric]:
        readings = self.nvml.read()
        yield from self._hardware(readings)
        yield from self._status(readings)
        yield from self._replicas()

    def _hardware(self, readings: list[GpuReading]) -> Iterable[Metric]:
        families = [(_gauge(metric), attr) for metric, attr in _HARDWARE_FIELDS]
        for reading in readings:
            labels = [str(reading.index), reading.uuid, reading.name]
            for family, attr in families:
                value = getattr(reading, attr)
                if value is not None:
                    family.add_metric(labels, value)
            with self._lock:
                for name in reading.errors:
                    self._read_errors[(str(reading.index), name)] += 1
        return [family for family, _ in families]

    def _status(self, readings: list[GpuReading]) -> Iterable[Metric]:
        present = _gauge(catalog.GPU_PRESENT)
        present.add_metric([], 1.0 if readings else 0.0)
        count = _gauge(catalog.GPU_COUNT)
        count.add_metric([], float(len(readings)))
        info = _gauge(catalog.GPU_EXPORTER_INFO)
        info.add_metric([self.nvml.driver_version, self.nvml.nvml_version, self.nvml.error], 1.0)
        errors = CounterMetricFamily(
            catalog.GPU_READ_ERRORS.prometheus_name.removesuffix("_total"),
            catalog.GPU_READ_ERRORS.description,
            labels=list(catalog.GPU_READ_ERRORS.labels),
        )
        with self._lock:
            for (gpu, field), n in sorted(self._read_errors.items()):
                errors.add_metric([gpu, field], float(n))
        return [present, count, info, errors]

    def _replicas(self) -> Iterable[Metric]:
        family = _gauge(catalog.GPU_REPLICA)
        for holding in self.holdings():
            for ref in holding.gpus:
                family.add_metric([ref.gpu, ref.uuid, holding.application, holding.deployment, holding.replica], 1.0)
        return [family]


class GpuExporter:
    """NVML + collector + HTTP server. `port=0` takes a free port; `address` tells which one."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.host = host
        self.requested_port = port
        self.nvml = Nvml()
        self.collector = GpuCollector(self.nvml)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server = None
        self._thread = None

    def start(self) -> tuple[str, int]:
        if self._server is None:
            self._server, self._thread = start_http_server(self.requested_port, addr=self.host, registry=self.registry)
            logger.info("GPU exporter on http://%s:%d/metrics (%d GPUs)", *self.address, self.nvml.count())
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("exporter not started; call start()")
        return self.host, self._server.server_port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"

    def register_replica(self, holding: ReplicaHolding) -> None:
        self.collector.register(holding)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
        self.nvml.close()

    def __enter__(self) -> GpuExporter:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
