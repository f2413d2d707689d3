"""The exporter on this host, which has no NVIDIA driver: the no-GPU path runs for real.
The GPU path runs on an H200 in bench/gpu_metrics.py."""

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from turbo_serve.metrics import catalog
from turbo_serve.metrics.gpu_exporter import GpuExporter, ReplicaHolding
from turbo_serve.metrics.gpu_fleet import write_service_discovery
from turbo_serve.metrics.nvml import GpuRef, Nvml, visible_gpu_refs

pytestmark = pytest.mark.skipif(Nvml().available, reason="this module covers hosts without an NVIDIA driver")


def samples(url, name):
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return [s for family in text_string_to_metric_families(body) for s in family.samples if s.name == name]


@pytest.fixture
def exporter():
    with GpuExporter(host="127.0.0.1", port=0) as e:
        yield e


def test_without_a_driver_it_serves_gpu_present_zero_and_the_reason(exporter):
    [present] = samples(exporter.url, "turbo_gpu_present")
    [count] = samples(exporter.url, "turbo_gpu_count")
    [info] = samples(exporter.url, "turbo_gpu_exporter_info")
    assert present.value == 0 and count.value == 0
    assert "NVMLError" in info.labels["nvml_error"] and info.labels["driver_version"] == ""
    for name in catalog.GPU_HARDWARE_SERIES:
        assert samples(exporter.url, name) == []


def test_every_exported_name_is_in_the_catalog(exporter):
    body = urllib.request.urlopen(exporter.url, timeout=5).read().decode()
    names = {f.name for f in text_string_to_metric_families(body)}
    documented = {m.prometheus_name.removesuffix("_total") for m in catalog.GPU_METRICS}
    assert names == documented


def test_replica_holdings_are_served_while_the_process_lives(exporter):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gpus = (GpuRef("0", ""), GpuRef("1", "GPU-1234"))
        exporter.register_replica(ReplicaHolding(child.pid, "turbo", "Denoiser", "Denoiser#abc", gpus))
        exporter.register_replica(ReplicaHolding(os.getpid(), "turbo", "VAE", "VAE#def", gpus[:1]))
        held = {
            (s.labels["deployment"], s.labels["gpu"], s.labels["uuid"])
            for s in samples(exporter.url, "turbo_gpu_replica_info")
        }
        assert held == {("Denoiser", "0", ""), ("Denoiser", "1", "GPU-1234"), ("VAE", "0", "")}
    finally:
        child.kill()
        child.wait()
    remaining = {s.labels["deployment"] for s in samples(exporter.url, "turbo_gpu_replica_info")}
    assert remaining == {"VAE"}


def test_process_gpus_map_uuids_as_given_and_indices_without_nvml(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-5f2a")
    assert visible_gpu_refs() == [GpuRef("2", ""), GpuRef("GPU-5f2a", "GPU-5f2a")]
    assert visible_gpu_refs([0]) == [GpuRef("0", "")]


def test_service_discovery_file_is_prometheus_file_sd(tmp_path):
    path = tmp_path / "sd" / "gpu.json"
    write_service_discovery(str(path), {"node-b": "10.0.0.2:9401", "node-a": "10.0.0.1:9401"})
    groups = json.loads(path.read_text())
    assert groups == [
        {"targets": ["10.0.0.1:9401"], "labels": {"ray_node_id": "node-a"}},
        {"targets": ["10.0.0.2:9401"], "labels": {"ray_node_id": "node-b"}},
    ]
    assert [p.name for p in path.parent.iterdir()] == ["gpu.json"]
