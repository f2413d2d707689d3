"""`turbo-serve loadtest` against the application on real Ray Serve (loopback, tiny models): the
bounded CI smoke run of the report, and overload at 5x the measured sustainable arrival rate."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving_support import wait_for
from turbo_serve.loadtest.profile import load_profile

pytestmark = pytest.mark.ray
PROFILE = Path(__file__).resolve().parents[2] / "deploy" / "loadtest" / "profiles" / "cpu.yaml"
TURBO_SERVE = str(Path(sys.executable).with_name("turbo-serve"))


def loadtest(served_app, out: Path, *args: str, timeout_s: float = 300) -> dict:
    command = [TURBO_SERVE, "loadtest", "--host", served_app.url, "--profile", str(PROFILE), "--out", str(out),
               "--progress-s", "5", "--sample-s", "0.5", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    summary["_stdout"] = result.stdout
    return summary


def settle(http: httpx.Client, timeout_s: float = 120.0) -> None:
    """Earlier tests' jobs done: the load test starts on an idle service."""
    deadline = time.monotonic() + timeout_s
    while (status := http.get("/v1/status").json())["queue_depth"] + status["running"]:
        assert time.monotonic() < deadline, status["jobs"]
        time.sleep(0.2)


def test_smoke_run_writes_csv_summary_and_plot(served_app, tmp_path):
    with served_app.client() as http:
        settle(http)
    summary = loadtest(served_app, tmp_path, "--duration", "12", "--shape", "step", "--rate", "15", "--strict")
    assert summary["submitted"] >= 1 and summary["completed"] == summary["accepted"] >= 1, summary
    assert summary["checks"] == {name: True for name in summary["checks"]}, summary["checks"]
    assert summary["e2e_s"]["p50"] > 0 and summary["queue_wait_s"]["n"] == summary["completed"]
    assert summary["jobs_per_min"] > 0 and summary["goodput_jobs_per_min"] <= summary["jobs_per_min"]
    assert summary["status"]["samples"] >= 10 and summary["status"]["max_replicas"]["Ingress"] == 1
    with (tmp_path / "locust_stats.csv").open() as f:
        rows = {(row["Type"], row["Name"]) for row in csv.DictReader(f)}
    assert any(kind == "JOB" and name.startswith("e2e ") for kind, name in rows), rows
    assert any(kind == "QUEUE" and name.startswith("queue_wait ") for kind, name in rows), rows
    assert ("GET", "GET /v1/videos/{id}/content") in rows
    assert (tmp_path / "locust_stats_history.csv").stat().st_size > 0
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "arrivals] finished" in summary["_stdout"] and "checks: all passed" in summary["_stdout"]


def test_overload_at_5x_sustainable_gets_429s_and_keeps_admitted_latency_bounded(served_app, tmp_path):
    limit = served_app.settings.max_queued_jobs
    body = {"prompt": "measure", **load_profile(PROFILE).requests[0].body}  # the mix's main request
    with served_app.client() as http:
        settle(http)
        single = []
        for seed in range(2):  # one job alone, twice: the second is the steady-state cost
            started = time.monotonic()
            done = wait_for(http, http.post("/v1/videos", json={**body, "seed": seed}).json()["id"])
            assert done["status"] == "completed", done
            single.append(time.monotonic() - started)
    job_s = min(single)
    sustainable = 60.0 / job_s  # jobs/min one after another; CPU-bound jobs do not overlap on 2 cores
    # Admission bounds the wait: at most `limit` unfinished jobs, so an admitted job waits for at
    # most limit - 1 others. Generous for a shared CPU; unbounded without admission (the queue
    # would grow by 4 jobs per job time for the whole run).
    slo_s = 3 * limit * job_s + 10
    summary = loadtest(served_app, tmp_path, "--duration", "20", "--shape", "soak", "--rate", f"{5 * sustainable:.1f}",
                       "--slo-s", f"{slo_s:.1f}", "--drain-s", "120")  # fmt: skip
    context = f"single job {job_s:.2f} s, slo {slo_s:.1f} s, summary {json.dumps({k: summary[k] for k in ('submitted', 'accepted', 'completed', 'outcomes', 'e2e_s', 'checks')})}"
    checks = summary["checks"]
    assert checks["no_5xx"] and checks["only_200_or_429_on_submit"], context
    assert checks["every_429_has_retry_after"] and summary["rejected_429"] > 0, context
    assert checks["every_accepted_job_completed"], context
    assert checks["accepted_p99_within_slo"], context
    assert summary["offered_jobs_per_min"] > 2.5 * sustainable, context  # it was overload (Poisson: ~5x)
    assert summary["status"]["max_queue_depth"] <= limit, context
