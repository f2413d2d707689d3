"""One real Ray cluster and one deployed application for all serving tests (Ray start is slow).

The deployments ask for fractional GPUs as on a one-GPU host; Ray provides logical GPUs, so the
GPU placement of the production config is what gets scheduled, and the replicas run on the CPU.
"""

from __future__ import annotations

import pytest
import ray
from ray import serve

from serving_support import ServedApp, free_port
from turbo_serve.settings import Settings


@pytest.fixture(scope="session")
def served_app(tmp_path_factory) -> ServedApp:
    from turbo_serve.serving.app import build_app

    storage = tmp_path_factory.mktemp("serve-storage")
    port = free_port()
    gpu_share = {"num_cpus": 0.25}
    settings = Settings(
        models=["tiny-t2v", "tiny-i2v"],
        storage_dir=str(storage),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        max_queued_jobs=6,
        max_running_jobs=2,
        lease_s=3.0,
        poll_interval_s=0.2,
        job_max_attempts=2,
        gpu_exporter_port=0,  # any free port: several test sessions may share a host
        gpu_exporter_host="127.0.0.1",
        deployments={
            "Denoiser": {**gpu_share, "num_gpus": 0.5, "graceful_shutdown_timeout_s": 5.0},
            "VAE": {**gpu_share, "num_gpus": 0.25, "graceful_shutdown_timeout_s": 5.0},
            "TextEncoder": {**gpu_share, "num_gpus": 0.25, "graceful_shutdown_timeout_s": 5.0},
            "Ingress": {**gpu_share, "graceful_shutdown_timeout_s": 5.0},
        },
    )
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name="turbo-serve", route_prefix="/")
        yield ServedApp(url=f"http://127.0.0.1:{port}", settings=settings, storage=storage)
    finally:
        serve.shutdown()
        ray.shutdown()
