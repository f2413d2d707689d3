"""The load profile files, the arrival shapes and the report's arithmetic, without a service."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from turbo_serve.loadtest.profile import load_profile, parse_profile
from turbo_serve.loadtest.report import percentiles, plot, summarize

PROFILES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "loadtest" / "profiles").glob("*.yaml"))
MINIMAL = {"rate_per_min": 30, "slo_s": 10, "requests": [{"name": "a", "body": {"size": "64x64"}}]}


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_shipped_profiles_parse_and_name_real_api_fields(path):
    from turbo_serve.api.schemas import VideoCreateRequest

    profile = load_profile(path)
    for kind in profile.requests:
        assert set(kind.body) <= set(VideoCreateRequest.model_fields), kind
    for shape in ("soak", "step", "burst"):
        assert profile.with_shape(shape).rate_at(1.0, 60.0) > 0


def test_shapes_follow_their_definitions():
    profile = parse_profile({**MINIMAL, "shapes": {"step": {"levels": [1, 2, 4]},
                                                   "burst": {"base": 0.5, "peak": 3, "period_s": 10, "burst_s": 2}}})  # fmt: skip
    soak, step, burst = (profile.with_shape(k) for k in ("soak", "step", "burst"))
    assert {soak.rate_at(t, 60) for t in range(60)} == {30.0}
    assert [step.rate_at(t, 60) for t in (0, 19.9, 20, 39.9, 40, 59.9)] == [30, 30, 60, 60, 120, 120]
    assert [burst.rate_at(t, 60) for t in (0, 7.9, 8, 9.9, 10, 18.5)] == [15, 15, 90, 90, 15, 90]
    assert soak.rate_at(60, 60) == soak.rate_at(-1, 60) == 0  # outside the arrival window
    assert soak.rate_at(5, 60, rate_per_min=300) == 300
    assert [profile.users_for(r) for r in (0, 1, 12, 12.01, 60)] == [0, 1, 1, 2, 5]  # user_interval_s 5
    rng = random.Random(1)
    assert {profile.pick(rng).name for _ in range(5)} == {"a"}


@pytest.mark.parametrize("change, message", [
    ({"rate_per_min": 0}, "rate_per_min must be a positive number"),
    ({"requests": []}, "requests must be a non-empty list"),
    ({"requests": [{"name": "a", "body": {"prompt": "x"}}]}, "the prompt and image are added per request"),
    ({"requests": [{"name": "a"}, {"name": "a"}]}, "names must be unique"),
    ({"requests": [{"name": "a", "image": {"width": 0, "height": 4}}]}, "image must be {width: int, height: int}"),
    ({"shape": "ramp"}, "shape must be one of soak, step, burst"),
    ({"shapes": {"burst": {"period_s": 5, "burst_s": 9}}}, "0 < burst_s <= period_s"),
    ({"shapes": {"step": {"levels": []}}}, "levels must be a non-empty list"),
    ({"shapes": {"soak": {"levels": [1]}}}, "shapes.soak takes no settings"),
    ({"arrivals": "bursty"}, "arrivals must be one of poisson, uniform"),
    ({"poll": {"every": 1}}, "poll takes initial_s, factor and max_s"),
    ({"rate": 3}, "unknown keys ['rate']"),
])  # fmt: skip
def test_bad_profiles_name_the_key_and_rule(change, message):
    with pytest.raises(ValueError, match="p.yaml: .*" + message.replace("[", r"\[").replace("{", r"\{")):
        parse_profile({**MINIMAL, **change}, source="p.yaml")


def test_percentiles_are_observed_values():
    values = list(range(1, 101))
    assert percentiles(values) == {"n": 100, "p50": 50, "p95": 95, "p99": 99, "max": 100, "mean": 50.5}
    assert percentiles([3.0])["p99"] == 3.0 and percentiles([])["p50"] is None


def job(kind="a", submitted=1.0, status=200, outcome="completed", e2e=2.0, **extra):
    return {"event": "job", "kind": kind, "submitted_at": submitted, "status_code": status, "outcome": outcome,
            "finished_at": submitted + e2e, "e2e_s": e2e, **extra}  # fmt: skip


def test_summary_counts_rates_goodput_and_checks(tmp_path):
    jobs = [job(e2e=2.0, queue_wait_s=0.5, server_e2e_s=1.5), job(submitted=2, e2e=12.0, queue_wait_s=8),
            job(submitted=3, status=429, outcome="rejected", e2e=0.01, retry_after="4"),
            job(submitted=4, outcome="failed", e2e=3.0, error="denoise failed"),
            job(submitted=5, outcome="unfinished", e2e=30.0)]  # fmt: skip
    samples = [{"t": 0.5, "queue_depth": 2, "running": 1, "replicas": {"Denoiser": 1}, "gpu_util": 50.0},
               {"t": 1.5, "queue_depth": 4, "running": 2, "replicas": {"Denoiser": 2}, "gpu_util": 70.0},
               {"t": 2.0, "error": "ConnectError"}]  # fmt: skip
    summary = summarize(jobs, samples, slo_s=10.0, arrival_s=60.0, started_at=0.0)
    assert (summary["submitted"], summary["accepted"], summary["completed"], summary["rejected_429"]) == (5, 4, 2, 1)
    assert summary["rejected_429_rate"] == 0.2 and summary["failure_rate"] == 0.4  # the failed and the unfinished
    assert summary["wall_s"] == 60.0 and summary["jobs_per_min"] == 2.0 and summary["goodput_jobs_per_min"] == 1.0
    assert summary["e2e_s"]["p50"] == 2.0 and summary["e2e_s"]["p99"] == 12.0 and summary["queue_wait_s"]["max"] == 8
    assert summary["status"]["max_queue_depth"] == 4 and summary["status"]["max_replicas"] == {"Denoiser": 2}
    assert summary["status"]["gpu_util_mean_percent"] == 60.0 and summary["status"]["failed_samples"] == 1
    checks = summary["checks"]
    assert checks["no_5xx"] and checks["every_429_has_retry_after"] and checks["only_200_or_429_on_submit"]
    assert not checks["every_accepted_job_finished"] and not checks["accepted_p99_within_slo"]
    broken = summarize([*jobs, job(status=503, outcome="error"), job(status=429, outcome="rejected")], samples,
                       slo_s=10.0, arrival_s=60.0, started_at=0.0)  # fmt: skip
    assert not broken["checks"]["no_5xx"] and not broken["checks"]["every_429_has_retry_after"]

    png = tmp_path / "report.png"
    plot(png, jobs, samples, slo_s=10.0, started_at=0.0, phases=[("steady", 0.0, 30.0), ("overload", 30.0, 60.0)], title="unit")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
