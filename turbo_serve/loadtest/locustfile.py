"""The locust workload: simulated users submit video jobs at the profile's arrival rate, and one
follower greenlet per accepted job polls it with backoff, downloads the mp4 and reports the job as
request types of its own next to the HTTP requests:

    JOB    e2e <kind>          submit -> mp4 downloaded, as the client saw it
    QUEUE  queue_wait <kind>   created -> claimed by a job runner (the server's timings)

Arrivals are open loop: a user does not wait for its previous job before submitting the next, so
the offered rate stays what the profile says when the service slows down (closed-loop users slow
down with it and hide overload). A 429 is a rejected arrival, not retried. Every submission ends as
one JSON line in --jobs-log (turbo_serve.loadtest.report reads it).

    locust -f turbo_serve/loadtest/locustfile.py --headless -H http://127.0.0.1:8000 \\
        --workload deploy/loadtest/profiles/cpu.yaml --arrival-s 60 --jobs-log jobs.jsonl

`turbo-serve loadtest` runs exactly that and writes the report.
"""

from __future__ import annotations

import io
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.pool import Pool
from locust import HttpUser, LoadTestShape, events, task
from PIL import Image

from turbo_serve.loadtest.profile import SHAPES, LoadProfile, RequestKind, load_profile

TERMINAL = ("completed", "failed", "cancelled")
USERS_LINGER_S = 2.0
"""Users outlive the arrival window by this much, so none is stopped in the middle of a submit."""


class JobFailed(Exception):
    """Reported as the JOB request's failure: the job ended other than completed, or was lost."""


@dataclass
class RunState:
    """What the users, the followers and the shape share (one locust process)."""

    profile: LoadProfile | None = None
    rate_per_min: float = 0.0
    arrival_s: float = 60.0
    drain_s: float = 300.0
    api_key: str = ""
    rng: random.Random = field(default_factory=random.Random)
    started_at: float | None = None
    followers: Pool = field(default_factory=Pool)
    log: Any = None
    images: dict[str, bytes] = field(default_factory=dict)

    def configure(self, options) -> None:
        if not options.workload:
            raise SystemExit("turbo-serve locustfile: --workload PROFILE.yaml is required")
        profile = load_profile(options.workload)
        self.profile = profile.with_shape(options.arrival_shape) if options.arrival_shape else profile
        self.rate_per_min = options.arrival_rate or self.profile.rate_per_min
        self.arrival_s = options.arrival_s
        self.drain_s = options.drain_s or self.profile.drain_s
        self.api_key = options.api_key
        self.rng = random.Random(options.workload_seed)
        self.log = open(options.jobs_log, "a", buffering=1) if options.jobs_log else None  # noqa: SIM115

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.time() - self.started_at

    def rate_now(self) -> float:
        return self.profile.rate_at(self.elapsed(), self.arrival_s, self.rate_per_min)

    def record(self, entry: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(json.dumps(entry) + "\n")

    def image(self, kind: RequestKind) -> bytes:
        """A PNG of the kind's size (a gradient: compressible, but not trivially)."""
        if kind.name not in self.images:
            width, height = kind.image
            gradient = Image.linear_gradient("L").resize((width, height))
            picture = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))
            buffer = io.BytesIO()
            picture.save(buffer, "PNG")
            self.images[kind.name] = buffer.getvalue()
        return self.images[kind.name]


RUN = RunState()


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--workload", default="", help="load profile YAML (deploy/loadtest/profiles/)")
    parser.add_argument("--arrival-shape", default="", choices=["", *SHAPES], help="override the profile's shape")
    parser.add_argument("--arrival-rate", type=float, default=0.0, help="base jobs per minute (default: the profile's)")
    parser.add_argument("--arrival-s", type=float, default=60.0, help="seconds of arrivals; then the jobs drain")
    parser.add_argument("--drain-s", type=float, default=0.0, help="longest wait for running jobs (default: the profile's)")
    parser.add_argument("--jobs-log", default="", help="one JSON line per submission")
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--api-key", default="", is_secret=True)


@events.init.add_listener
def _configure(environment, **_) -> None:
    RUN.configure(environment.parsed_options)


@events.test_start.add_listener
def _started(**_) -> None:
    RUN.started_at = time.time()
    RUN.record({"event": "start", "at": RUN.started_at})


@events.quitting.add_listener
def _quitting(**_) -> None:
    RUN.followers.kill()  # each records its job as unfinished
    if RUN.log is not None:
        RUN.log.close()
        RUN.log = None


class VideoJobUser(HttpUser):
    """One source of arrivals; the users together submit at the shape's current rate."""

    def on_start(self) -> None:
        if RUN.api_key:
            self.client.headers["Authorization"] = f"Bearer {RUN.api_key}"
        gevent.sleep(RUN.rng.uniform(0, self._mean_gap()))  # users spread out instead of all firing at start

    @staticmethod
    def _mean_gap() -> float:
        """Each of the shape's users submits once per users x 60 / rate seconds on average. The
        shape's user count, not the running one: while users spawn, the rate ramps up to the
        target instead of overshooting it."""
        rate = RUN.rate_now()
        return max(1, RUN.profile.users_for(rate)) * 60.0 / rate if rate > 0 else 1.0

    def wait_time(self) -> float:
        mean = self._mean_gap()
        return RUN.rng.expovariate(1.0 / mean) if RUN.profile.arrivals == "poisson" else mean

    @task
    def submit(self) -> None:
        if RUN.rate_now() <= 0:
            return
        kind = RUN.profile.pick(RUN.rng)
        body = {"prompt": RUN.rng.choice(RUN.profile.prompts), **kind.body, "seed": RUN.rng.randrange(2**31)}
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        if kind.image is None:
            request: dict[str, Any] = {"json": body}
        else:
            fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}
            request = {"data": fields, "files": {"input_reference": ("input.png", RUN.image(kind), "image/png")}}
        entry: dict[str, Any] = {"event": "job", "kind": kind.name, "submitted_at": time.time()}
        with self.client.post("/v1/videos", headers=headers, name=f"POST /v1/videos [{kind.name}]",
                              catch_response=True, **request) as response:  # fmt: skip
            entry["status_code"] = response.status_code
            if response.status_code == 200:
                response.success()
                entry["job_id"] = response.json()["id"]
                RUN.followers.spawn(follow, self.client, kind, entry)
                return
            entry["retry_after"] = response.headers.get("Retry-After")
            entry["outcome"] = "rejected" if response.status_code == 429 else "error"
            entry["error"] = _error_message(response)
            response.failure(f"{response.status_code}: {entry['error']}")
        entry["finished_at"] = time.time()
        RUN.record(entry)


def follow(client, kind: RequestKind, entry: dict[str, Any]) -> None:
    """Poll the job with backoff until it ends, download its mp4, report it; always log it once."""
    poll, job_id = RUN.profile.poll, entry["job_id"]
    entry.update(outcome="unfinished", poll_errors={})
    delay, video = poll.initial_s, None
    try:
        while True:
            gevent.sleep(delay)
            delay = min(delay * poll.factor, poll.max_s)
            with client.get(f"/v1/videos/{job_id}", name="GET /v1/videos/{id}", catch_response=True) as response:
                if response.status_code == 200:
                    response.success()
                    video = response.json()
                    if video["status"] in TERMINAL:
                        break
                else:  # counted, and polling goes on: the job may outlive an Ingress restart
                    code = str(response.status_code)
                    entry["poll_errors"][code] = entry["poll_errors"].get(code, 0) + 1
                    response.failure(f"{response.status_code}: {_error_message(response)}")
            if time.time() - entry["submitted_at"] > RUN.profile.job_timeout_s:
                entry["outcome"] = "timeout"
                return
        entry["outcome"] = video["status"]
        entry["attempts"] = video.get("attempts")
        timings = video.get("timings") or {}
        if "queue_wait" in timings:
            entry["queue_wait_s"] = timings["queue_wait"]
        if "total" in timings:
            entry["server_e2e_s"] = timings["queue_wait"] + timings["total"]
        if video["status"] != "completed":
            entry["error"] = (video.get("error") or {}).get("message", video["status"])
            return
        with client.get(f"/v1/videos/{job_id}/content", name="GET /v1/videos/{id}/content", catch_response=True) as content:
            if content.status_code == 200 and content.content[4:8] == b"ftyp":
                content.success()
                entry["bytes"] = len(content.content)
            else:
                entry["outcome"], entry["error"] = "error", f"download: {content.status_code}"
                content.failure(entry["error"])
    finally:
        entry["finished_at"] = time.time()
        entry["e2e_s"] = entry["finished_at"] - entry["submitted_at"]
        ok = entry["outcome"] == "completed"
        events.request.fire(request_type="JOB", name=f"e2e {kind.name}", response_time=entry["e2e_s"] * 1000,
                            response_length=entry.get("bytes", 0), context={},
                            exception=None if ok else JobFailed(f"{entry['outcome']}: {entry.get('error', '')}"[:200]))  # fmt: skip
        if "queue_wait_s" in entry:
            events.request.fire(request_type="QUEUE", name=f"queue_wait {kind.name}", response_time=entry["queue_wait_s"] * 1000,
                                response_length=0, context={}, exception=None)  # fmt: skip
        RUN.record(entry)


def _error_message(response) -> str:
    try:
        return response.json()["error"]["message"][:300]
    except Exception:  # noqa: BLE001 - connection errors and non-JSON bodies have no error object
        return (response.text or str(getattr(response, "error", "")) or "no response")[:300]


class ArrivalShape(LoadTestShape):
    """Users in proportion to the shape's arrival rate during the arrival window; then no arrivals
    while accepted jobs finish (up to the drain time); then the test stops."""

    def tick(self):
        elapsed = self.get_run_time()
        if elapsed < RUN.arrival_s:
            users = max(1, RUN.profile.users_for(RUN.rate_now()))
            return users, users * 10
        if elapsed < RUN.arrival_s + USERS_LINGER_S:
            return self.get_current_user_count(), 100
        if len(RUN.followers) and elapsed < RUN.arrival_s + RUN.drain_s:
            return 0, 100
        return None
