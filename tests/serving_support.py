"""Shared by the tests that drive the application over HTTP (tests/serving, tests/load, tests/reliability)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from turbo_serve.settings import Settings

SMALL = {"size": "128x128", "num_frames": 5, "num_steps": 2}
LONG = {"size": "256x256", "num_frames": 5, "sampler": "euler", "guidance_scale": 1, "num_steps": 100}
"""100 DiT steps, for acting on a job mid-denoise. On the 2-core CPU machine a job retried after
a replica kill finishes within about 2.5 minutes (the kill test took 155-170 s), so waits for one
allow RETRIED_JOB_S."""
RETRIED_JOB_S = 300.0


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
    import ray

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
