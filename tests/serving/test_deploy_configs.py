"""The config files: Serve's own schema, KubeRay's RayService CRD schema, Ray's cluster launcher
schema, and agreement with the code (deployment names, settings). The CPU config is also deployed
through Ray's `serve run` CLI onto the test cluster and answers a job."""

import copy
import json
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from turbo_serve.serving.app import denoiser_name
from turbo_serve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).parent / "schemas"
SERVE_CONFIGS = [ROOT / "serve_config.yaml", ROOT / "deploy" / "serve_config.cpu.yaml"]
CLUSTER_ONLY_ARGS = {"storage_dir", "job_store_url"}
"""What a multi-pod cluster must set differently: shared storage and the Redis job store."""


def load(path: Path):
    return list(yaml.safe_load_all(path.read_text()))


def expected_deployments(args: dict) -> set[str]:
    settings = Settings(**args)
    return {"Ingress", "TextEncoder", "VAE"} | {denoiser_name(m) for m in settings.models}


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_matches_schema_and_code(path):
    (config,) = load(path)
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "turbo_serve.serving.app:build_app"
    assert {d.name for d in app.deployments} == expected_deployments(app.args)


def test_one_gpu_config_fits_one_gpu():
    (config,) = load(ROOT / "serve_config.yaml")
    total = 0.0
    for deployment in config["applications"][0]["deployments"]:
        replicas = deployment.get("autoscaling_config", {}).get("max_replicas", deployment.get("num_replicas", 1))
        total += replicas * deployment["ray_actor_options"]["num_gpus"]
    assert 0 < total <= 1.0, total


def test_rayservice_matches_crd_schema_and_embeds_serve_config():
    documents = load(ROOT / "deploy" / "kuberay" / "rayservice.yaml")
    (service,) = [d for d in documents if d["kind"] == "RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    jsonschema.validate(service, json.loads((SCHEMAS / "rayservice.v1.schema.json").read_text()))
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    (local,) = load(ROOT / "serve_config.yaml")
    strip = lambda c: {**c, "applications": [{**a, "args": {k: v for k, v in a["args"].items() if k not in CLUSTER_ONLY_ARGS}}  # noqa: E731
                                             for a in c["applications"]]}  # fmt: skip
    assert strip(embedded) == strip(local)
    assert embedded["applications"][0]["args"]["job_store_url"].startswith("redis://")
    # The storage folder is on the shared volume every pod mounts.
    mounts = {m["mountPath"] for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"],
                                           *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])}  # fmt: skip
    assert mounts == {"/data/turbo-serve"}
    assert embedded["applications"][0]["args"]["storage_dir"].startswith("/data/turbo-serve/")
    kinds = {d["kind"] for d in documents}
    assert {"PersistentVolumeClaim", "Deployment", "Service"} <= kinds


def test_cluster_launcher_config_matches_ray_schema():
    schema = json.loads(resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    (config,) = load(ROOT / "deploy" / "cluster" / "h200.yaml")
    jsonschema.validate(config, schema)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--metrics-export-port=8080" in head_start and "--head" in head_start


@pytest.mark.ray
def test_cpu_config_deploys_with_serve_run(served_app, tmp_path):
    import httpx
    import ray
    from ray import serve

    (config,) = load(ROOT / "deploy" / "serve_config.cpu.yaml")
    config = copy.deepcopy(config)
    config.pop("http_options")  # the test cluster's proxy is already up
    app = config["applications"][0]
    app.update(name="turbo-serve-config", route_prefix="/config-test")
    app["args"].update(storage_dir=str(tmp_path / "storage"), cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    serve_cli = Path(sys.executable).with_name("serve")
    result = subprocess.run([str(serve_cli), "run", "--non-blocking", str(path)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        with httpx.Client(base_url=served_app.url + "/config-test", timeout=120) as http:
            deadline = time.monotonic() + 60
            while (listed := http.get("/v1/models")).status_code != 200:  # the proxy learns new routes by long poll
                assert time.monotonic() < deadline, (listed.status_code, listed.text)
                time.sleep(0.5)
            models = [m["id"] for m in listed.json()["data"]]
            assert models == ["tiny-t2v", "tiny-i2v"]
            video = http.post("/v1/videos/sync", json={"prompt": "from a config file", "size": "128x128",
                                                       "num_frames": 5, "num_steps": 2})  # fmt: skip
            assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    finally:
        serve.delete("turbo-serve-config")
