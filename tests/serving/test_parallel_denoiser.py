"""A Denoiser replica of two ranks (sequence parallel, gloo on the CPU) serving a job through the real
application, next to the one-process replica of the shared test cluster: same request, same video."""

import io
import time

import av
import httpx
import pytest
import ray
from ray import serve

from turbo_serve.settings import Settings

pytestmark = pytest.mark.ray
APP = "turbo-serve-parallel"
# 144x112, 9 frames: 3 x 7 x 9 = 189 DiT tokens, odd, so the two ranks pad; sagesla (the default
# backend) runs its sparse kernels on each rank's one head.
REQUEST = {"prompt": "two ranks, one video", "model": "tiny-t2v", "size": "144x112", "num_frames": 9,
           "num_steps": 2, "seed": 3}  # fmt: skip


def frames(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def parallel_app(served_app, tmp_path_factory):
    rank = {"num_cpus": 0.25, "graceful_shutdown_timeout_s": 5.0}
    settings = Settings(
        models=["tiny-t2v"],
        storage_dir=str(tmp_path_factory.mktemp("parallel-storage")),
        cache_dir=str(tmp_path_factory.mktemp("parallel-cache")),
        deployments={
            "Denoiser-tiny-t2v": {**rank, "num_gpus": 0.25, "sequence_parallel": 2},
            "VAE": rank, "TextEncoder": rank, "Ingress": rank,
        },
    )  # fmt: skip
    from turbo_serve.serving.app import build_app

    serve.run(build_app(settings), name=APP, route_prefix="/parallel")
    try:
        yield f"{served_app.url}/parallel"
    finally:
        serve.delete(APP)


def test_two_rank_denoiser_serves_the_same_video_as_one_process(served_app, parallel_app):
    with httpx.Client(timeout=300) as http:
        deadline = time.monotonic() + 60
        while http.get(f"{parallel_app}/v1/models").status_code != 200:  # the proxy learns new routes by long poll
            assert time.monotonic() < deadline
            time.sleep(0.5)
        parallel = http.post(f"{parallel_app}/v1/videos/sync", json=REQUEST)
        single = http.post(f"{served_app.url}/v1/videos/sync", json=REQUEST)
    assert parallel.status_code == 200, parallel.text
    assert single.status_code == 200, single.text
    got, expected = frames(parallel.content), frames(single.content)
    assert len(got) == 9 and got[0].shape == (112, 144, 3)
    assert all((a == b).all() for a, b in zip(got, expected, strict=True))


def test_the_replica_reserved_one_bundle_per_rank_on_one_node(parallel_app):
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    two_rank = [g for g in groups if len(g["bundles"]) == 2 and g["strategy"] == "STRICT_PACK"]
    assert len(two_rank) == 1, groups
    assert list(two_rank[0]["bundles"].values()) == [{"CPU": 0.25, "GPU": 0.25}] * 2
