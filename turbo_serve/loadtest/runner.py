"""`turbo-serve loadtest`: drive a running service with the locust workload, then report.

    turbo-serve loadtest --host http://127.0.0.1:8000 --profile deploy/loadtest/profiles/cpu.yaml \\
        --duration 60 --slo-s 30 [--shape step|burst|soak] [--rate JOBS_PER_MIN] [--out DIR]

Runs locust headless in a subprocess (it monkey-patches its process with gevent) on
turbo_serve/loadtest/locustfile.py, samples GET /v1/status meanwhile (queue depth, replicas, GPU
use) and prints progress. `--duration` is the arrival window; the jobs still running afterwards
drain (up to the profile's drain_s) before the report is written. In --out:
    locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv
    jobs.jsonl      one line per submission (outcome, latencies, status code, Retry-After)
    status.jsonl    the /v1/status samples
    summary.json    p50/p95/p99 end to end and queue wait, jobs/min, goodput, 429 and failure
                    rates, and the overload checks (see turbo_serve.loadtest.report)
    report.png      latency, throughput, queue depth and replicas over time
Exit status: 0; 1 with --strict when a check failed; 2 for bad arguments or an unreachable host;
3 when locust itself failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from turbo_serve.loadtest.profile import SHAPES, load_profile
from turbo_serve.loadtest.report import percentiles, plot, read_jsonl, summarize

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--profile", required=True, type=Path, help="load profile YAML (deploy/loadtest/profiles/)")
    parser.add_argument("--duration", type=float, required=True, help="seconds of arrivals (the jobs then drain)")
    parser.add_argument("--slo-s", type=float, help="end-to-end SLO for goodput (default: the profile's)")
    parser.add_argument("--shape", choices=SHAPES, help="arrival shape (default: the profile's)")
    parser.add_argument("--rate", type=float, help="base arrival rate in jobs/min (default: the profile's)")
    parser.add_argument("--drain-s", type=float, help="longest wait for running jobs after the arrivals")
    parser.add_argument("--out", type=Path, default=Path("loadtest-results"), help="folder for the report")
    parser.add_argument("--api-key", default=os.environ.get("TURBO_SERVE_API_KEY"), help="bearer key (env TURBO_SERVE_API_KEY)")
    parser.add_argument("--seed", type=int, default=0, help="workload randomness (request mix, arrivals, seeds)")
    parser.add_argument("--sample-s", type=float, default=1.0, help="/v1/status sampling period")
    parser.add_argument("--progress-s", type=float, default=10.0, help="progress line period")
    parser.add_argument("--local-gpu", action="store_true",
                        help="sample GPU utilization with NVML in this process (same host as the GPU)")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check of the summary fails")


class StatusSampler:
    """GET /v1/status every `period_s` on a thread: queue depth, running jobs, RUNNING replicas per
    deployment and GPU utilization (the service's NVML view, or this host's with local_gpu)."""

    def __init__(self, host: str, headers: dict[str, str], path: Path, period_s: float, local_gpu: bool):
        self._client = httpx.Client(base_url=host, headers=headers, timeout=max(5.0, period_s))
        self._path, self._period_s = path, period_s
        self._nvml = None
        if local_gpu:
            from turbo_serve.metrics.nvml import Nvml

            self._nvml = Nvml()
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-sampler", daemon=True)

    def start(self) -> "StatusSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._client.close()
        if self._nvml is not None:
            self._nvml.close()

    def _run(self) -> None:
        with self._path.open("a") as out:
            while not self._stop.is_set():
                sample = self._sample()
                self.samples.append(sample)
                out.write(json.dumps(sample) + "\n")
                out.flush()
                self._stop.wait(self._period_s)

    def _sample(self) -> dict[str, Any]:
        sample: dict[str, Any] = {"t": time.time()}
        try:
            response = self._client.get("/v1/status")
            status = response.json()
            if response.status_code != 200:
                return {**sample, "error": f"{response.status_code}: {status.get('error', {}).get('message')}"}
        except (httpx.HTTPError, ValueError) as error:
            return {**sample, "error": f"{type(error).__name__}: {error}"}
        if self._nvml is not None:
            devices = [(r.utilization_percent, r.memory_used_bytes) for r in self._nvml.read()]
        else:
            devices = [(d["utilization_percent"], d["memory_used_bytes"]) for d in status.get("gpus", {}).get("devices", [])]
        utilization = [u for u, _ in devices if u is not None]
        memory = [m for _, m in devices if m is not None]
        sample.update(
            queue_depth=status["queue_depth"],
            running=status["running"],
            jobs=status["jobs"],
            replicas={name: d.get("replicas", {}).get("RUNNING", 0) for name, d in status.get("deployments", {}).items()},
            gpu_util=sum(utilization) / len(utilization) if utilization else None,
            gpu_memory_used_gib=sum(memory) / 2**30 if memory else None,
        )
        return sample


def locust_command(args: argparse.Namespace, out: Path, drain_s: float) -> list[str]:
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", args.host, "--csv", str(out / "locust"), "--csv-full-history", "--loglevel", "WARNING",
        "--stop-timeout", "10", "--workload", str(args.profile), "--arrival-s", str(args.duration),
        "--drain-s", str(drain_s), "--jobs-log", str(out / "jobs.jsonl"), "--workload-seed", str(args.seed),
    ]  # fmt: skip
    if args.shape:
        command += ["--arrival-shape", args.shape]
    if args.rate:
        command += ["--arrival-rate", str(args.rate)]
    if args.api_key:
        command += ["--api-key", args.api_key]
    return command


def wait_healthy(host: str, timeout_s: float = 30.0) -> str | None:
    """None once GET /healthz answers 200, else why not."""
    deadline, reason = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{host.rstrip('/')}/healthz", timeout=5.0)
            if response.status_code == 200:
                return None
            reason = f"/healthz answered {response.status_code}"
        except httpx.HTTPError as error:
            reason = f"{type(error).__name__}: {error}"
        time.sleep(0.5)
    return reason


def progress_line(elapsed: float, duration: float, jobs: list[dict[str, Any]], sampler: StatusSampler) -> str:
    done = [j for j in jobs if j.get("event") == "job"]
    counts = {o: sum(1 for j in done if j.get("outcome") == o) for o in ("completed", "rejected", "failed")}
    others = len(done) - sum(counts.values())
    last = next((s for s in reversed(sampler.samples) if "queue_depth" in s), {})
    p95 = percentiles(j["e2e_s"] for j in done if j.get("outcome") == "completed")["p95"]
    return (f"[{elapsed:6.0f}s / {duration:.0f}s arrivals] finished {len(done):4d}: completed {counts['completed']}, "
            f"rejected(429) {counts['rejected']}, failed {counts['failed']}, other {others} | "
            f"queued {last.get('queue_depth', '?')} running {last.get('running', '?')} | "
            f"p95 e2e {'-' if p95 is None else f'{p95:.1f}s'}")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.profile)
        if args.shape:
            profile = profile.with_shape(args.shape)
    except ValueError as error:
        print(f"turbo-serve loadtest: {error}")
        return 2
    if args.duration <= 0:
        print("turbo-serve loadtest: --duration must be positive")
        return 2
    slo_s = args.slo_s or profile.slo_s
    drain_s = args.drain_s or profile.drain_s
    rate = args.rate or profile.rate_per_min
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("jobs.jsonl", "status.jsonl"):
        (out / stale).unlink(missing_ok=True)
    problem = wait_healthy(args.host)
    if problem is not None:
        print(f"turbo-serve loadtest: {args.host} is not healthy: {problem}")
        return 2

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    print(f"turbo-serve loadtest: {profile.name}, {profile.shape.kind} shape at {rate:g} jobs/min for "
          f"{args.duration:g} s (then up to {drain_s:g} s drain), SLO {slo_s:g} s -> {out}", flush=True)  # fmt: skip
    sampler = StatusSampler(args.host, headers, out / "status.jsonl", args.sample_s, args.local_gpu).start()
    launched = time.time()
    with (out / "locust.log").open("w") as log:
        process = subprocess.Popen(locust_command(args, out, drain_s), stdout=log, stderr=subprocess.STDOUT)
        hard_deadline = time.monotonic() + args.duration + drain_s + 120.0
        next_progress = time.monotonic() + args.progress_s
        while process.poll() is None:
            time.sleep(0.5)
            if time.monotonic() > hard_deadline:
                print("turbo-serve loadtest: locust overran its time; stopping it", flush=True)
                process.send_signal(signal.SIGINT)  # lets it write its CSVs
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            if time.monotonic() >= next_progress:
                next_progress += args.progress_s
                print(progress_line(time.time() - launched, args.duration, read_jsonl(out / "jobs.jsonl"), sampler), flush=True)
    sampler.stop()

    log_rows = read_jsonl(out / "jobs.jsonl")
    started = next((r["at"] for r in log_rows if r.get("event") == "start"), None)
    if started is None:
        print(f"turbo-serve loadtest: locust never started the test (exit {process.returncode}); see {out / 'locust.log'}")
        return 3
    jobs = [r for r in log_rows if r.get("event") == "job"]
    summary = {
        "profile": profile.name,
        "host": args.host,
        "shape": profile.shape.kind,
        "rate_per_min": rate,
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"},
        "locust_exit_code": process.returncode,
        **summarize(jobs, sampler.samples, slo_s=slo_s, arrival_s=args.duration, started_at=started),
        "files": {name: str(out / name) for name in ("jobs.jsonl", "status.jsonl", "locust_stats.csv",
                                                     "locust_stats_history.csv", "locust.log", "report.png")},  # fmt: skip
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if jobs:
        plot(out / "report.png", jobs, sampler.samples, slo_s=slo_s, started_at=started,
             phases=[(f"{profile.shape.kind} arrivals", 0.0, args.duration)],
             title=f"{profile.name}: {profile.shape.kind} at {rate:g} jobs/min, SLO {slo_s:g} s")  # fmt: skip
    print_summary(summary)
    if process.returncode not in (0, 1):  # locust exits 1 when any request failed (a 429 included)
        print(f"turbo-serve loadtest: locust exited with {process.returncode}; see {out / 'locust.log'}")
        return 3
    if args.strict and not all(summary["checks"].values()):
        return 1
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    e2e, queue = summary["e2e_s"], summary["queue_wait_s"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\n  submitted {summary['submitted']}  accepted {summary['accepted']}  completed {summary['completed']}  "
          f"429 {summary['rejected_429']} ({100 * summary['rejected_429_rate']:.1f}%)  "
          f"failure rate {100 * summary['failure_rate']:.1f}%  5xx {summary['http_5xx']}")  # fmt: skip
    print(f"  e2e s        p50 {fmt(e2e['p50'])}  p95 {fmt(e2e['p95'])}  p99 {fmt(e2e['p99'])}  max {fmt(e2e['max'])}")
    print(f"  queue wait s p50 {fmt(queue['p50'])}  p95 {fmt(queue['p95'])}  p99 {fmt(queue['p99'])}")
    print(f"  jobs/min {summary['jobs_per_min']:.2f}  goodput (<= {summary['slo_s']:g} s) {summary['goodput_jobs_per_min']:.2f}"
          f"  offered {summary['offered_jobs_per_min']:.2f}")  # fmt: skip
    failed = [name for name, ok in summary["checks"].items() if not ok]
    print(f"  checks: {'all passed' if not failed else 'FAILED ' + ', '.join(failed)}")
    print(f"  -> {Path(summary['files']['jobs.jsonl']).parent}")
