"""The application on real Ray Serve on the CPU, driven over loopback HTTP (the openai client and
httpx). Tests run in file order; the disruptive ones (killing replicas) come last."""

import io
import time
import warnings

import av
import pytest
import ray
from openai import OpenAI
from PIL import Image

from serving_support import LONG, RETRIED_JOB_S, SMALL, replica_actors, wait_for

pytestmark = pytest.mark.ray
warnings.filterwarnings("ignore", category=DeprecationWarning)  # the client marks the Videos API deprecated


def mp4_frames(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def openai_client(served_app):
    return OpenAI(base_url=f"{served_app.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_creates_polls_lists_downloads_deletes(served_app, openai_client):
    video = openai_client.videos.create(prompt="a paper boat on a pond", model="tiny-t2v", size="128x128",
                                        seconds="0.25", extra_body={"num_steps": 3, "seed": 11})  # fmt: skip
    assert video.status == "queued" and video.size == "128x128" and video.seconds == "0.25"
    seen = []
    deadline = time.monotonic() + 120
    while (video := openai_client.videos.retrieve(video.id)).status not in ("completed", "failed"):
        seen.append(video.progress)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert seen == sorted(seen)
    assert video.id in [v.id for v in openai_client.videos.list(limit=10, order="desc").data]
    frames = mp4_frames(openai_client.videos.download_content(video.id).read())
    assert len(frames) == 5 and frames[0].shape == (128, 128, 3)
    deleted = openai_client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with served_app.client() as http:
        assert http.get(f"/v1/videos/{video.id}").status_code == 404


def test_image_to_video_with_an_uploaded_image(served_app, openai_client):
    buffer = io.BytesIO()
    Image.new("RGB", (320, 192), (30, 120, 200)).save(buffer, "PNG")
    # An explicit small size: 480p's area takes a while to decode on a CPU (adaptive sizes are
    # checked in tests/api).
    video = openai_client.videos.create(prompt="the sky darkens", model="tiny-i2v", size="192x128",
                                        input_reference=("sky.png", buffer.getvalue(), "image/png"),
                                        extra_body={"num_frames": 5, "num_steps": 2})  # fmt: skip
    with served_app.client() as http:
        done = wait_for(http, video.id)
        assert done["status"] == "completed", done
        assert "image_encode" in done["timings"] and done["parameters"]["boundary"] == 0.9
        frames = mp4_frames(http.get(f"/v1/videos/{video.id}/content").content)
    assert len(frames) == 5 and frames[0].shape == (128, 192, 3)


def test_sync_endpoint_idempotency_and_validation(served_app):
    with served_app.client() as http:
        response = http.post("/v1/videos/sync", json={"prompt": "rain", **SMALL}, headers={"Idempotency-Key": "sync-1"})
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        assert len(mp4_frames(response.content)) == 5
        again = http.post("/v1/videos", json={"prompt": "rain", **SMALL}, headers={"Idempotency-Key": "sync-1"})
        assert again.json()["id"] == response.headers["X-Video-Id"] and again.json()["status"] == "completed"
        bad = http.post("/v1/videos", json={"prompt": "rain", "size": "250x256", "num_frames": 6})
        assert bad.status_code == 422
        assert {d["param"] for d in bad.json()["error"]["details"]} == {"size", "num_frames"}


def test_text_encoder_caches_repeated_prompts(served_app):
    from ray import serve

    encoder = serve.get_deployment_handle("TextEncoder", app_name="turbo-serve")
    before = encoder.cache_stats.remote().result()
    with served_app.client() as http:
        ids = [http.post("/v1/videos", json={"prompt": "the same prompt", **SMALL, "seed": i}).json()["id"] for i in range(3)]
        assert all(wait_for(http, i)["status"] == "completed" for i in ids)
    after = encoder.cache_stats.remote().result()
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 2


def test_status_shows_replicas_queue_and_no_gpu(served_app):
    with served_app.client() as http:
        status = http.get("/v1/status").json()
        assert set(status["deployments"]) == {"Ingress", "TextEncoder", "VAE", "Denoiser-tiny-t2v", "Denoiser-tiny-i2v"}
        assert all(d["replicas"].get("RUNNING") == 1 for d in status["deployments"].values()), status["deployments"]
        assert status["gpus"]["available"] is False and status["gpus"]["reason"].startswith("no GPU")
        assert status["ray"]["gpus"] == 2.0 and status["queue_depth"] >= 0
        assert http.get("/healthz").json() == {"status": "ok"}


def test_cancel_mid_denoise_frees_the_denoiser(served_app):
    with served_app.client() as http:
        video = http.post("/v1/videos", json={"prompt": "a long one", **LONG}).json()
        deadline = time.monotonic() + 60
        while (current := http.get(f"/v1/videos/{video['id']}").json())["progress"] <= 10:
            assert time.monotonic() < deadline, current
            time.sleep(0.05)
        assert current["stage"] == "denoising"
        assert http.delete(f"/v1/videos/{video['id']}").json()["deleted"] is False
        cancelled = wait_for(http, video["id"], timeout_s=30)
        assert cancelled["status"] == "cancelled" and cancelled["progress"] < 95, cancelled
        started = time.monotonic()
        after = wait_for(http, http.post("/v1/videos", json={"prompt": "after", **SMALL}).json()["id"])
        assert after["status"] == "completed" and time.monotonic() - started < 30


def test_over_full_queue_gets_429_with_retry_after(served_app):
    limit = served_app.settings.max_queued_jobs
    with served_app.client() as http:
        deadline = time.monotonic() + 60
        while (status := http.get("/v1/status").json())["queue_depth"] + status["running"]:
            assert time.monotonic() < deadline, status["jobs"]  # earlier tests' jobs must have finished
            time.sleep(0.2)
        accepted = []
        for i in range(limit + 2):
            response = http.post("/v1/videos", json={"prompt": f"crowd {i}", **LONG})
            if response.status_code == 429:
                break
            assert response.status_code == 200
            accepted.append(response.json()["id"])
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "queue_full"
        assert len(accepted) == limit
        # Newest first: a cancelled running job frees its slot, which the runner fills at once.
        answers = {video_id: http.delete(f"/v1/videos/{video_id}").json() for video_id in reversed(accepted)}
        assert any(a["deleted"] for a in answers.values())  # queued ones go at once
        for video_id, answer in answers.items():
            if answer["deleted"]:
                assert http.get(f"/v1/videos/{video_id}").status_code == 404
            else:  # running ones are cancelled at their next step
                assert wait_for(http, video_id, timeout_s=60)["status"] == "cancelled"


def test_killed_denoiser_replica_mid_job_is_retried(served_app):
    with served_app.client() as http:
        video = http.post("/v1/videos", json={"prompt": "survive", **LONG}).json()
        deadline = time.monotonic() + 60
        while http.get(f"/v1/videos/{video['id']}").json()["progress"] <= 10:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (replica,) = replica_actors("Denoiser-tiny-t2v")
        ray.kill(replica)
        done = wait_for(http, video["id"], timeout_s=RETRIED_JOB_S)
        assert done["status"] == "completed", done
        assert done["attempts"] == 2


def test_ingress_restart_keeps_jobs_and_finishes_the_running_one(served_app):
    with served_app.client() as http:
        finished = wait_for(http, http.post("/v1/videos", json={"prompt": "before", **SMALL}).json()["id"])
        running = http.post("/v1/videos", json={"prompt": "in flight", **LONG}).json()
        while http.get(f"/v1/videos/{running['id']}").json()["stage"] != "denoising":
            time.sleep(0.05)
        (ingress,) = replica_actors("Ingress")
        ray.kill(ingress)
        deadline = time.monotonic() + 120
        while True:  # the proxy answers 5xx until Serve has started a new Ingress replica
            try:
                if http.get("/healthz").status_code == 200 and replica_actors("Ingress"):
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert http.get(f"/v1/videos/{finished['id']}").json()["status"] == "completed"
        done = wait_for(http, running["id"], timeout_s=RETRIED_JOB_S)
        assert done["status"] == "completed", done
        assert done["attempts"] == 2  # the first owner died with the Ingress; the reaper re-queued it
