"""The Redis job store across a redis-server restart (append-only file fsynced on every write): jobs
the API acknowledged are all there afterwards, the jobs in flight finish, and while Redis is down the
API answers 503 with Retry-After (not 500), then serves again by itself."""

from __future__ import annotations

import time

from redis_support import RedisServer

JOB = {"size": "64x64", "num_frames": 1, "num_steps": 1, "attention_type": "original"}
SLOWER = {"size": "128x128", "num_frames": 5, "sampler": "euler", "guidance_scale": 1, "num_steps": 30,
          "attention_type": "original"}  # fmt: skip


def wait_until(predicate, timeout_s=120.0, what=""):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_committed_jobs_survive_a_redis_restart_and_running_jobs_finish(make_api, tmp_path):
    redis = RedisServer(tmp_path / "redis", persistent=True)
    (tmp_path / "redis").mkdir()
    redis.start()
    try:
        with make_api(job_store_url=redis.url, lease_s=3.0, max_queued_jobs=8) as (client, context):
            finished = client.post("/v1/videos", json={"prompt": "before", **JOB}).json()["id"]
            wait_until(lambda: client.get(f"/v1/videos/{finished}").json()["status"] == "completed", what="first job")
            running = client.post("/v1/videos", json={"prompt": "in flight", **SLOWER}).json()["id"]
            queued = [client.post("/v1/videos", json={"prompt": f"queued {i}", **JOB}).json()["id"] for i in range(3)]
            wait_until(lambda: client.get(f"/v1/videos/{running}").json()["progress"] > 10, what="denoising")
            before = {i: context.store.get(i) for i in (finished, running, *queued)}

            redis.stop(kill=True)  # no chance to save: only what was fsynced to the log survives
            down = client.post("/v1/videos", json={"prompt": "while down", **JOB})
            assert down.status_code == 503 and int(down.headers["Retry-After"]) >= 1, down.text
            assert down.json()["error"]["code"] == "store_unavailable"
            assert client.get(f"/v1/videos/{finished}").status_code == 503
            assert client.get("/healthz").status_code == 503
            time.sleep(1.0)  # the runner and the in-flight job hit the outage too
            redis.start()

            after = {i: context.store.get(i) for i in before}
            assert all(after[i] is not None for i in before), "a committed job was lost"
            assert after[finished].state == before[finished].state and after[finished].result_key == before[finished].result_key
            later = client.post("/v1/videos", json={"prompt": "after", **JOB})
            assert later.status_code == 200, later.text
            ids = [finished, running, *queued, later.json()["id"]]
            final = {i: wait_until(lambda i=i: (v := client.get(f"/v1/videos/{i}").json())["status"] in
                                   ("completed", "failed", "cancelled") and v, what=i) for i in ids}  # fmt: skip
            assert {v["status"] for v in final.values()} == {"completed"}, {i: (v["status"], v["error"]) for i, v in final.items()}
            assert final[running]["attempts"] == 1  # the outage did not cost the running job its attempt
            assert client.get("/healthz").status_code == 200
    finally:
        redis.stop()
