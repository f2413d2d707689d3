"""A real Prometheus discovers the GPU exporter through its file_sd file and scrapes it; the
dashboards' GPU queries are evaluated through Prometheus's HTTP API (no Ray here). Without an NVIDIA
driver the hardware series (utilization, memory, ...) must be absent; with one, present."""

import os

import pytest
from prom_harness import PrometheusServer, evaluable_queries, has_finite_value, metric_names, render_config, wait_for

from turbo_serve.metrics import catalog
from turbo_serve.metrics.gpu_exporter import GpuExporter, ReplicaHolding
from turbo_serve.metrics.gpu_fleet import write_service_discovery
from turbo_serve.metrics.nvml import GpuRef

@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    with GpuExporter(host="127.0.0.1", port=0) as exporter:
        exporter.register_replica(ReplicaHolding(os.getpid(), "turbo", "Denoiser", "abc123", (GpuRef("0", ""),)))
        host, port = exporter.address
        write_service_discovery(str(workdir / "gpu_sd.json"), {"node-1": f"{host}:{port}"})
        (workdir / "ray_sd.json").write_text("[]")
        config = render_config(ray_sd=str(workdir / "ray_sd.json"), gpu_sd=str(workdir / "gpu_sd.json"))
        with PrometheusServer(config, workdir) as prometheus:
            wait_for(lambda: prometheus.query('up{job="turbo_gpu"} == 1'), 30, 0.5, "exporter scraped")
            yield prometheus


def gpu_exporter_queries():
    gpu_series = {name for m in catalog.GPU_METRICS for name in m.series_names}
    return [(q, expr) for q, expr in evaluable_queries() if metric_names(q.expr) <= gpu_series]


def gpus_present(prometheus) -> bool:
    [present] = prometheus.query("max(turbo_gpu_present)")
    return present["value"][1] == "1"


def test_the_exporter_is_discovered_with_its_node_label(scraped):
    [target] = scraped.active_targets("turbo_gpu")
    assert target["health"] == "up" and target["labels"]["ray_node_id"] == "node-1"
    [count] = scraped.query("turbo_gpu_count")
    assert (float(count["value"][1]) > 0) == gpus_present(scraped)


def test_dashboard_gpu_queries_through_prometheus(scraped):
    queries = gpu_exporter_queries()
    assert len(queries) >= 5
    with_gpus = gpus_present(scraped)
    for query, expr in queries:
        result = scraped.query(expr)
        if metric_names(query.expr) & catalog.GPU_HARDWARE_SERIES and not with_gpus:
            assert result == [], f"{query.label}: GPU series on a host without NVIDIA driver"
        else:
            assert has_finite_value(result), f"{query.label}: no data for {expr}"
    [holder] = scraped.query(catalog.GPU_REPLICA.prometheus_name)
    assert holder["metric"]["deployment"] == "Denoiser" and holder["metric"]["replica"] == "abc123"
