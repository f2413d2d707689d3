"""Jobs through the API in-process: the runner drives the real tiny stages."""

import io
import time

import av

from api_support import SLOW, SMALL, png_bytes


def wait_for(client, video_id, statuses=("completed", "failed", "cancelled"), timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in statuses or time.monotonic() > deadline:
            return video
        time.sleep(0.05)


def mp4_frames(data: bytes) -> list:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_create_poll_download_delete(make_api):
    with make_api() as (client, context):
        created = client.post("/v1/videos", json={"prompt": "a red fox", **SMALL})
        assert created.status_code == 200 and created.json()["status"] == "queued"
        video = wait_for(client, created.json()["id"])
        assert video["status"] == "completed" and video["progress"] == 100, video
        assert video["completed_at"] >= video["created_at"] and video["expires_at"] > video["completed_at"]
        assert set(video["timings"]) >= {"queue_wait", "text_encode", "denoise", "decode", "total"}
        content = client.get(f"/v1/videos/{video['id']}/content")
        assert content.headers["content-type"] == "video/mp4"
        frames = mp4_frames(content.content)
        assert len(frames) == 5 and frames[0].shape == (128, 128, 3)
        deleted = client.delete(f"/v1/videos/{video['id']}").json()
        assert deleted == {"id": video["id"], "object": "video.deleted", "deleted": True, "status": "completed"}
        assert client.get(f"/v1/videos/{video['id']}").status_code == 404
        assert not any(p.suffix == ".mp4" for p in context.storage.root.rglob("*"))


def test_sync_returns_the_mp4(make_api):
    with make_api() as (client, _):
        response = client.post("/v1/videos/sync", json={"prompt": "waves", **SMALL})
        assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
        assert len(mp4_frames(response.content)) == 5
        assert client.get(f"/v1/videos/{response.headers['X-Video-Id']}").json()["status"] == "completed"


def test_multipart_i2v(make_api):
    with make_api(models=["tiny-i2v"]) as (client, _):
        response = client.post(
            "/v1/videos",
            data={"prompt": "the ball rolls", "size": "128x128", "num_frames": "5", "num_steps": "2", "seed": "3"},
            files={"input_reference": ("ball.jpg", png_bytes(128, 128, "JPEG"), "image/jpeg")},
        )
        assert response.status_code == 200, response.text
        video = wait_for(client, response.json()["id"])
        assert video["status"] == "completed", video
        assert video["parameters"]["seed"] == 3 and video["parameters"]["boundary"] == 0.9
        assert "image_encode" in video["timings"]


def test_cancel_a_running_job(make_api):
    with make_api() as (client, _):
        video = client.post("/v1/videos", json={"prompt": "slow", **SLOW}).json()
        running = wait_for(client, video["id"], statuses=("in_progress",))
        assert running["status"] == "in_progress"
        answer = client.delete(f"/v1/videos/{video['id']}").json()
        assert answer["deleted"] is False
        cancelled = wait_for(client, video["id"])
        assert cancelled["status"] == "cancelled" and cancelled["progress"] < 95, cancelled
        # The worker is free again: the next job completes.
        after = client.post("/v1/videos", json={"prompt": "next", **SMALL}).json()
        assert wait_for(client, after["id"])["status"] == "completed"
        assert client.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True


def test_jobs_survive_a_restart_of_the_app(make_api):
    with make_api() as (client, _):
        done = wait_for(client, client.post("/v1/videos", json={"prompt": "kept", **SMALL}).json()["id"])
    with make_api(run_jobs=False) as (client, _):  # a new process on the same store and storage
        kept = client.get(f"/v1/videos/{done['id']}").json()
        assert kept["status"] == "completed"
        assert len(mp4_frames(client.get(f"/v1/videos/{done['id']}/content").content)) == 5


def test_status_reports_queue_and_no_cluster(make_api):
    with make_api(run_jobs=False) as (client, _):
        client.post("/v1/videos", json={"prompt": "wait", **SMALL})
        status = client.get("/v1/status").json()
        assert status["queue_depth"] == 1 and status["jobs"]["queued"] == 1 and status["running"] == 0
        assert status["gpus"]["available"] is False
