"""The whole service on one GPU under load: sustained jobs/min, p99 end-to-end latency, GPU
utilization in the steady state and the 429 rate at 2x overload.

Deploys serve_config.yaml's one-GPU layout (every deployment on the same GPU through fractional
num_gpus) with Wan2.1 1.3B random weights, then, each phase guarded and under one time budget:
1. warm-up: two jobs one after another; the first compiles the Triton kernels and captures the
   DiT's CUDA graphs, the second gives the single-job time;
2. capacity: --capacity-jobs submitted at once; the completion rate between the first and the last
   completion is the sustained jobs/min (stages of different jobs overlap on the GPU);
3. steady: `turbo-serve loadtest` soak at --steady-load x capacity: end-to-end p50/p95/p99, queue
   wait, goodput, and GPU utilization sampled with NVML by this process;
4. overload: soak at 2 x capacity: the 429 rate, 5xx (none expected), and whether every admitted
   job completed within the SLO. Admission is --max-queued-jobs unfinished jobs (about SLO / job
   time), so a 2x overload meets 429s within seconds rather than after the queue took minutes.
Writes bench/results/load_h200.json (rewritten after every phase) and load_h200.png (latency,
throughput, queue depth, replicas and GPU utilization across the steady and overload phases).

    python bench/load_h200.py                                  # H200: about 3 min with Ray start
    python bench/load_h200.py --smoke --out /tmp/load.json     # CPU, tiny model, seconds per phase
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve import REPO, free_port, settings_for  # bench/serve.py: config -> Settings, bare-checkout imports

PROFILE = REPO / "deploy" / "loadtest" / "profiles" / "h200.yaml"
SMOKE_BODY = {"model": "tiny-t2v", "size": "128x128", "num_frames": 5, "num_steps": 2, "attention_type": "original"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny-t2v, 128x128x5 frames, short phases")
    parser.add_argument("--config", type=Path, default=REPO / "serve_config.yaml", help="layout to deploy")
    parser.add_argument("--profile", type=Path, default=PROFILE, help="request mix (its first request warms up)")
    parser.add_argument("--slo-s", type=float, default=30.0)
    parser.add_argument("--max-queued-jobs", type=int, default=12, help="admission limit (unfinished jobs)")
    parser.add_argument("--capacity-jobs", type=int, default=8)
    parser.add_argument("--steady-s", type=float, default=35.0)
    parser.add_argument("--steady-load", type=float, default=0.8, help="steady arrival rate / capacity")
    parser.add_argument("--overload-s", type=float, default=25.0)
    parser.add_argument("--time-budget-s", type=float, default=240.0, help="phases that would end past it are skipped")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_h200.json")
    args = parser.parse_args(argv)
    # bench/serve.py's settings_for reads these
    args.model, args.attention, args.jobs = None, None, args.capacity_jobs
    if args.smoke:
        args.slo_s, args.max_queued_jobs, args.capacity_jobs = 60.0, 4, 4
        args.steady_s, args.overload_s = 8.0, 8.0
    return args


def smoke_profile(workdir: Path) -> Path:
    """The H200 profile with the tiny model's request, for a CPU run of every phase."""
    data = yaml.safe_load(PROFILE.read_text())
    data.update(name="smoke-tiny-t2v", requests=[{"name": "t2v-128", "body": SMOKE_BODY}], user_interval_s=5,
                poll={"initial_s": 0.2, "factor": 1.5, "max_s": 1.0}, drain_s=60)  # fmt: skip
    path = workdir / "smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def first_request(profile_path: Path) -> dict[str, Any]:
    from turbo_serve.loadtest.profile import load_profile

    profile = load_profile(profile_path)
    return {"prompt": profile.prompts[0], **profile.requests[0].body}


def wait_done(http: httpx.Client, video_id: str, deadline: float) -> dict[str, Any]:
    while time.monotonic() < deadline:
        video = http.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed", "cancelled"):
            return video
        time.sleep(0.05)
    raise TimeoutError(f"video {video_id} unfinished at the deadline")


def run_warmup(http: httpx.Client, body: dict[str, Any], deadline: float) -> dict[str, Any]:
    runs = []
    for seed in range(2):
        started = time.perf_counter()
        video = wait_done(http, http.post("/v1/videos", json={**body, "seed": seed}).json()["id"], deadline)
        if video["status"] != "completed":
            raise RuntimeError(f"warm-up job {video['id']} {video['status']}: {video['error']}")
        runs.append({"client_s": time.perf_counter() - started, "timings": video["timings"]})
    return {"first_job_s": runs[0]["client_s"], "job_s": runs[1]["client_s"], "runs": runs}


def run_capacity(http: httpx.Client, body: dict[str, Any], jobs: int, running: int, deadline: float) -> dict[str, Any]:
    """`jobs` at once. The first `running` of them start together and finish close together, so
    the rate is taken from the `running`-th completion on: completions per minute with the
    pipeline full."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        responses = list(pool.map(lambda i: http.post("/v1/videos", json={**body, "seed": 100 + i}), range(jobs)))
    ids = [r.json()["id"] for r in responses if r.status_code == 200]
    done: dict[str, float] = {}
    while len(done) < len(ids) and time.monotonic() < deadline:
        for video_id in ids:
            if video_id not in done and http.get(f"/v1/videos/{video_id}").json()["status"] == "completed":
                done[video_id] = time.monotonic()
        time.sleep(0.05)
    times = sorted(done.values())
    if len(times) <= running:
        raise RuntimeError(f"only {len(times)} of {jobs} capacity jobs completed; {running} run at once")
    return {
        "jobs": jobs,
        "accepted": len(ids),
        "completed": len(times),
        "wall_s": times[-1] - started,
        "jobs_per_min": 60.0 * (len(times) - running) / (times[-1] - times[running - 1]),
        "jobs_per_min_wall": 60.0 * len(times) / (times[-1] - started),
    }


def run_load(url: str, profile: Path, out: Path, *, rate: float, duration_s: float, slo_s: float) -> dict[str, Any]:
    from turbo_serve.loadtest import runner

    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = parser.parse_args(["--host", url, "--profile", str(profile), "--duration", f"{duration_s:g}",
                              "--rate", f"{rate:.2f}", "--slo-s", f"{slo_s:g}", "--out", str(out), "--local-gpu",
                              "--progress-s", "10", "--sample-s", "0.5", "--drain-s", f"{max(30.0, 2 * slo_s):g}"])  # fmt: skip
    code = runner.run(args)
    if code not in (0, 1):
        raise RuntimeError(f"turbo-serve loadtest exited {code}; see {out / 'locust.log'}")
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("files", None)  # machine paths
    summary.pop("arguments", None)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_budget_s
    workdir = Path(tempfile.mkdtemp(prefix="turbo-serve-load-"))
    profile = smoke_profile(workdir) if args.smoke else args.profile
    settings = settings_for(args, workdir)
    settings = settings.model_copy(update={"max_queued_jobs": args.max_queued_jobs})
    body = first_request(profile)
    results: dict[str, Any] = {
        "benchmark": "load",
        "smoke": args.smoke,
        "model": settings.default_model,
        "device": settings.device,
        "attention_type": settings.attention_type,
        "request": body,
        "slo_s": args.slo_s,
        "max_queued_jobs": args.max_queued_jobs,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "command": " ".join(["python", "bench/load_h200.py", *(sys.argv[1:] if argv is None else argv)]),
        "phases": {},
        "errors": {},
    }

    def save() -> None:
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    def phase(name: str, fn, cost_s: float = 0.0):
        if time.monotonic() + cost_s > deadline:
            results["errors"][name] = f"skipped: time budget ({args.time_budget_s:g} s) spent"
        else:
            print(f"-- {name}", flush=True)
            try:
                results["phases"][name] = fn()
            except Exception as error:  # record and go on: later phases may still run
                results["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=6)}"
                print(results["errors"][name], file=sys.stderr, flush=True)
        save()
        return results["phases"].get(name)

    import ray
    from ray import serve

    from turbo_serve.serving.app import build_app

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        cuda = settings.device.startswith("cuda")
        if cuda:
            import torch

            results["gpu"] = torch.cuda.get_device_name(0)
        ray.init(num_gpus=1 if cuda else 0, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(settings), name="turbo-serve", route_prefix="/")
        results["deploy_s"] = round(time.perf_counter() - t0, 1)
        save()
        with httpx.Client(base_url=url, timeout=600.0) as http:
            warmup = phase("warmup", lambda: run_warmup(http, body, deadline + 120))
            capacity = phase("capacity", lambda: run_capacity(http, body, args.capacity_jobs, settings.max_running_jobs,
                                                              deadline + 60), cost_s=10)  # fmt: skip
        rate = (capacity or {}).get("jobs_per_min") or (60.0 / warmup["job_s"] if warmup else None)
        if rate:
            steady_out, overload_out = workdir / "steady", workdir / "overload"
            phase("steady", lambda: run_load(url, profile, steady_out, rate=args.steady_load * rate,
                                             duration_s=args.steady_s, slo_s=args.slo_s), cost_s=args.steady_s)  # fmt: skip
            results["denoiser_memory"] = denoiser_memory(settings, body)
            phase("overload", lambda: run_load(url, profile, overload_out, rate=2 * rate, duration_s=args.overload_s,
                                               slo_s=args.slo_s), cost_s=args.overload_s)  # fmt: skip
            plot_phases(args.out.with_suffix(".png"), {"steady": steady_out, "overload": overload_out}, args.slo_s,
                        title=f"{settings.default_model} on {results.get('gpu', settings.device)}: "
                              f"{body['size']} x {body['num_frames']} frames, {body['num_steps']} steps")  # fmt: skip
    except Exception as error:
        results["errors"]["serve"] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    results["headline"] = headline(results)
    save()
    print_table(results, args.out)
    return 0


def denoiser_memory(settings, body: dict[str, Any]) -> dict[str, Any]:
    """Peak allocated memory of the Denoiser replica (CUDA graphs' pools included) against the
    estimate the API refuses requests with (turbo_serve.pipeline.memory)."""
    from turbo_serve.pipeline.memory import GIB, estimate_denoise_memory

    estimate = estimate_denoise_memory(body["model"], *map(int, body["size"].split("x")), body["num_frames"],
                                       dtype=settings.dtype, quant_linear=settings.quant_linear)  # fmt: skip
    record: dict[str, Any] = {"estimated_gib": round(estimate.total_bytes / GIB, 2),
                              "budget_gib": settings.denoiser_memory_gib}  # fmt: skip
    if not settings.device.startswith("cuda"):
        return {**record, "peak_gib": None, "reason": "not on CUDA"}
    try:
        import ray

        name = f"Denoiser-{settings.default_model}"
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and a["name"].split("#")[1] == name]  # fmt: skip
        replica = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])

        def peak(_actor):
            import torch

            return torch.cuda.max_memory_allocated()

        record["peak_gib"] = round(ray.get(replica.__ray_call__.remote(peak), timeout=30) / GIB, 2)
    except Exception as error:  # the number is a cross-check, not the benchmark
        record["peak_gib"], record["reason"] = None, f"{type(error).__name__}: {error}"
    return record


def plot_phases(path: Path, folders: dict[str, Path], slo_s: float, title: str) -> None:
    """One timeline across the load phases (each phase's jobs and status samples)."""
    from turbo_serve.loadtest.report import plot, read_jsonl

    jobs, samples, phases, origin = [], [], [], None
    for name, folder in folders.items():
        rows = read_jsonl(folder / "jobs.jsonl")
        start = next((r["at"] for r in rows if r.get("event") == "start"), None)
        if start is None:
            continue
        origin = start if origin is None else origin
        summary = json.loads((folder / "summary.json").read_text())
        phases.append((f"{name} {summary['rate_per_min']:.0f}/min", start - origin, start - origin + summary["arrival_s"]))
        jobs += [r for r in rows if r.get("event") == "job"]
        samples += read_jsonl(folder / "status.jsonl")
    if jobs:
        plot(path, jobs, samples, slo_s=slo_s, started_at=origin, phases=phases, title=title)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    phases = results["phases"]
    steady, overload = phases.get("steady", {}), phases.get("overload", {})
    return {
        "sustained_jobs_per_min": phases.get("capacity", {}).get("jobs_per_min"),
        "single_job_s": phases.get("warmup", {}).get("job_s"),
        "steady_jobs_per_min": steady.get("jobs_per_min"),
        "steady_p50_e2e_s": steady.get("e2e_s", {}).get("p50"),
        "steady_p99_e2e_s": steady.get("e2e_s", {}).get("p99"),
        "steady_goodput_jobs_per_min": steady.get("goodput_jobs_per_min"),
        "steady_gpu_util_percent": steady.get("status", {}).get("gpu_util_mean_percent"),
        "overload_429_rate": overload.get("rejected_429_rate"),
        "overload_5xx": overload.get("http_5xx"),
        "overload_admitted_p99_e2e_s": overload.get("e2e_s", {}).get("p99"),
        "overload_checks": overload.get("checks"),
    }


def print_table(results: dict[str, Any], out: Path) -> None:
    head = results["headline"]
    fmt = lambda v, unit="": "-" if v is None else (f"{v:.2f}{unit}" if isinstance(v, float) else f"{v}{unit}")  # noqa: E731
    print(f"\nload benchmark: {results['model']} on {results.get('gpu', results['device'])}, request "
          f"{results['request']['size']} x {results['request']['num_frames']} frames, {results['request']['num_steps']} steps, "
          f"SLO {results['slo_s']:g} s, admission {results['max_queued_jobs']} jobs")  # fmt: skip
    print(f"  single job (warm)          {fmt(head['single_job_s'], ' s')}")
    print(f"  sustained jobs/min         {fmt(head['sustained_jobs_per_min'])}")
    print(f"  steady: jobs/min {fmt(head['steady_jobs_per_min'])}, p50 {fmt(head['steady_p50_e2e_s'], ' s')}, "
          f"p99 {fmt(head['steady_p99_e2e_s'], ' s')}, goodput {fmt(head['steady_goodput_jobs_per_min'])}/min, "
          f"GPU util {fmt(head['steady_gpu_util_percent'], '%')}")  # fmt: skip
    rate = head["overload_429_rate"]
    print(f"  2x overload: 429 rate {'-' if rate is None else f'{100 * rate:.1f}%'}, 5xx {head['overload_5xx']}, "
          f"admitted p99 {fmt(head['overload_admitted_p99_e2e_s'], ' s')}")  # fmt: skip
    if head["overload_checks"]:
        failed = [k for k, ok in head["overload_checks"].items() if not ok]
        print(f"  overload checks: {'all passed' if not failed else 'FAILED ' + ', '.join(failed)}")
    for name, error in results["errors"].items():
        print(f"  ERROR {name}: {error.splitlines()[0]}")
    print(f"  -> {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    raise SystemExit(main())
