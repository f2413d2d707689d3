"""The issue's "must show": a real Prometheus scrapes Ray's metrics agent (found through Ray's own
service-discovery file) and the GPU exporter while the app runs on real Ray Serve on the CPU; then
every PromQL expression of every dashboard panel is evaluated through Prometheus's HTTP API.

Where NVML finds no GPU (CI), the few queries over GPU hardware series (utilization, memory, ...)
must come back empty while turbo_gpu_present says 0; everything else must return data. Where it
finds GPUs, every query must return data.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prom_harness import (
    PrometheusServer,
    evaluable_queries,
    free_port,
    has_finite_value,
    metric_names,
    render_config,
    wait_for,
)

from turbo_serve.metrics import catalog

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

SMALL = {"size": "256x256", "num_frames": 5, "num_steps": 2}


def job_done(http: httpx.Client, video_id: str) -> bool:
    return http.get(f"/v1/videos/{video_id}").json()["status"] in ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def observed_app(tmp_path_factory):
    from turbo_serve.metrics.gpu_fleet import GpuExporterSettings, ensure_gpu_exporters, stop_gpu_exporters
    from turbo_serve.serving.app import build_app
    from turbo_serve.settings import Settings

    workdir = tmp_path_factory.mktemp("observability")
    metrics_port, http_port = free_port(), free_port()
    # Logical GPUs: the Denoiser asks for one, so it reports a GPU holding to the exporter.
    ray.init(
        num_cpus=4, num_gpus=1, include_dashboard=True, log_to_driver=False,
        _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000},
    )  # fmt: skip
    prometheus = None
    try:
        exporter = GpuExporterSettings(port=0, host="127.0.0.1", sd_file=str(workdir / "gpu_sd.json"))
        gpu_sd, _ = ensure_gpu_exporters(exporter)
        ray_sd = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "prom_metrics_service_discovery.json"
        wait_for(ray_sd.exists, 60, 0.5, "Ray's service-discovery file")
        prometheus = PrometheusServer(render_config(ray_sd=str(ray_sd), gpu_sd=gpu_sd), workdir).start()
        settings = Settings(
            models=["tiny-t2v"],
            attention_type="original",
            storage_dir=str(workdir / "storage"),
            cache_dir=str(workdir / "cache"),
            max_queued_jobs=3,
            max_running_jobs=1,
            poll_interval_s=0.2,
            gpu_exporter_port=0,
            gpu_exporter_host="127.0.0.1",
            deployments={
                kind: {"num_cpus": 0.25, "num_gpus": 1.0 if kind == "Denoiser" else 0.0, "graceful_shutdown_timeout_s": 5.0}
                for kind in ("Ingress", "TextEncoder", "Denoiser", "VAE")
            },
        )
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app(settings), name="turbo-serve", route_prefix="/")
        yield httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60.0), prometheus
    finally:
        serve.shutdown()
        stop_gpu_exporters()
        ray.shutdown()
        if prometheus is not None:
            prometheus.stop()


def send_jobs(http: httpx.Client) -> None:
    """Completed jobs (two with one prompt, for a cache hit), a 422 and a 429."""
    assert http.post("/v1/videos", json={"prompt": "rain", "size": "250x256", "num_frames": 6}).status_code == 422
    ids = [http.post("/v1/videos", json={"prompt": p, **SMALL}).json()["id"] for p in ("a fox", "a fox", "a boat")]
    wait_for(lambda: all(job_done(http, i) for i in ids), 180, 0.5, "first jobs finished")
    # max_running_jobs=1 and max_queued_jobs=3: a burst of five leaves at least one 429.
    statuses = [http.post("/v1/videos", json={"prompt": f"burst {i}", **SMALL}).status_code for i in range(5)]
    assert 429 in statuses, statuses
    accepted = [r["id"] for r in http.get("/v1/videos", params={"limit": 20}).json()["data"]]
    wait_for(lambda: all(job_done(http, i) for i in accepted), 180, 0.5, "burst jobs finished")


def test_every_dashboard_query_returns_data_from_a_live_prometheus(observed_app):
    http, prometheus = observed_app
    send_jobs(http)
    queries = evaluable_queries()
    [present] = wait_for(lambda: prometheus.query("max(turbo_gpu_present)"), 30, 1, "GPU exporter scraped")
    with_gpus = present["value"][1] == "1"

    def without_gpus(query) -> bool:
        return bool(metric_names(query.expr) & catalog.GPU_HARDWARE_SERIES) and not with_gpus

    def unanswered():
        return [q.label for q, expr in queries if not without_gpus(q) and not has_finite_value(prometheus.query(expr))]

    started = time.monotonic()
    last = None
    while (last := unanswered()) and time.monotonic() - started < 90:
        time.sleep(2)
    assert not last, f"queries without data after {time.monotonic() - started:.0f}s: {last}"
    for query, expr in queries:
        if without_gpus(query):
            assert prometheus.query(expr) == [], f"{query.label}: GPU series on a host without a GPU"


def test_ray_really_exports_the_builtin_series_the_dashboards_use(observed_app):
    _, prometheus = observed_app
    exported = prometheus.series_names()
    assert set(catalog.RAY_BUILTIN_SERIES) <= exported, sorted(set(catalog.RAY_BUILTIN_SERIES) - exported)
    ours = {name for m in catalog.APP_METRICS for name in m.series_names}
    assert ours <= exported, sorted(ours - exported)


def test_app_metrics_carry_serve_labels_and_no_job_ids(observed_app):
    _, prometheus = observed_app
    [*series] = prometheus.query(f'{catalog.STAGE.prometheus_name}_count{{stage="denoise"}}')
    assert series
    for s in series:
        labels = s["metric"]
        assert labels["model"] == "tiny-t2v" and labels["resolution"] == "below_480p"
        assert labels["deployment"] == "Ingress" and labels["application"] == "turbo-serve"
    allowed = set().union(*(m.labels for m in catalog.APP_METRICS)) | {
        "__name__", "le", "instance", "job", "deployment", "replica", "application", "route",
        "Component", "NodeAddress", "SessionName", "Version", "WorkerId", "otel_scope_name",
        "otel_scope_schema_url", "otel_scope_version",
    }  # fmt: skip
    for metric in catalog.APP_METRICS:
        for s in prometheus.query(metric.series_names[0]):
            assert set(s["metric"]) <= allowed, f"{metric.name}: unexpected labels {set(s['metric']) - allowed}"
    # The Denoiser holds Ray's GPU 0; without NVML its uuid is empty, which Prometheus drops.
    [holder] = prometheus.query(catalog.GPU_REPLICA.prometheus_name)
    assert holder["metric"]["deployment"] == "Denoiser-tiny-t2v" and holder["metric"]["gpu"] == "0"
    [present] = prometheus.query("max(turbo_gpu_present)")
    assert holder["metric"].get("uuid", "").startswith("GPU-") == (present["value"][1] == "1")
