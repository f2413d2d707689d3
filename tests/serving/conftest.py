"""One real Ray cluster and one deployed application for all serving tests (Ray start is slow).

The deployments ask for fractional GPUs as on a one-GPU host; Ray provides logical GPUs, so the
GPU placement of the production config is what gets scheduled, and the replicas run on the CPU.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from turbo_serve.settings import Settings  # noqa: E402

SMALL = {"size": "256x256", "num_frames": 5, "num_steps": 2}
LONG = {"size": "480x480", "num_frames": 17, "num_steps": 100}
"""A job of several seconds on the CPU, for cancelling and killing mid-denoise."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServedApp:
    url: str
    settings: Settings
    storage: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0)


def replica_actors(deployment: str) -> list:
    """Live replica actors of one deployment (Serve names them SERVE_REPLICA::app#deployment#id)."""
    return [
        ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and a["name"].split("#")[1] == deployment
    ]


def wait_for(client: httpx.Client, video_id: str, statuses=("completed", "failed", "cancelled"), timeout_s=120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/v1/videos/{video_id}")
        video = response.json() if response.status_code == 200 else {"status": f"http {response.status_code}"}
        if video.get("status") in statuses:
            return video
        assert time.monotonic() < deadline, f"video {video_id} still {video} after {timeout_s} s"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def served_app(tmp_path_factory) -> ServedApp:
    from turbo_serve.serving.app import build_app

    storage = tmp_path_factory.mktemp("serve-storage")
    port = free_port()
    gpu_share = {"num_cpus": 0.25}
    settings = Settings(
        models=["tiny-t2v", "tiny-i2v"],
        attention_type="original",
        storage_dir=str(storage),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        max_queued_jobs=6,
        max_running_jobs=2,
        lease_s=3.0,
        poll_interval_s=0.2,
        job_max_attempts=2,
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
