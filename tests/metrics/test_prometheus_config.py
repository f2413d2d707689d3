import subprocess

import pytest
import yaml
from prom_harness import PROMETHEUS_YML, render_config


def test_promtool_accepts_the_deployed_config():
    result = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_it_scrapes_rays_discovery_file_and_the_gpu_exporters():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    files = {job["job_name"]: job["file_sd_configs"][0]["files"] for job in config["scrape_configs"]}
    assert files == {
        "ray": ["/tmp/ray/prom_metrics_service_discovery.json"],
        "turbo_gpu": ["/tmp/ray/turbo_gpu_service_discovery.json"],
    }


def test_the_test_config_changes_only_paths_and_intervals(tmp_path):
    config = render_config(ray_sd="/x/ray.json", gpu_sd="/x/gpu.json", scrape_interval="1s")
    path = tmp_path / "p.yml"
    path.write_text(yaml.safe_dump(config))
    assert subprocess.run(["promtool", "check", "config", str(path)], capture_output=True).returncode == 0
    assert [job["job_name"] for job in config["scrape_configs"]] == ["ray", "turbo_gpu"]
