"""The whole service on one GPU: per-stage latency, jobs/min, and the overhead of serving.

Deploys the application as serve_config.yaml lays it out on a one-GPU host (every deployment on the
same GPU through fractional num_gpus), with random weights, then measures:
1. in-process: the same pipeline called in this process (turbo_serve.pipeline.stages.Pipeline),
   no Ray, no HTTP: the baseline;
2. HTTP single job: POST /v1/videos/sync on 127.0.0.1, client-side end to end (body received),
   jobs one after another;
3. HTTP concurrent: N jobs submitted at once through POST /v1/videos and polled: jobs/min, end to
   end and queue wait per job, and each stage's latency as the runner recorded it.
Serving overhead = median(HTTP single) / median(in-process) - 1 (target < 5%). Each phase runs in
its own try/except (errors are recorded and the run goes on), the JSON is rewritten after each
phase, and phases past the time budget are skipped.

    python bench/serve.py                                   # GPU: 1.3B 480p; bench/results/serve_h200.json
    python bench/serve.py --smoke --out /tmp/serve.json     # CPU, tiny preset, small requests
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from source_checkout import importable_from_checkout  # bench/ is this script's folder

REPO = Path(__file__).resolve().parents[1]
importable_from_checkout()
DEFAULT_OUT = REPO / "bench" / "results" / "serve_h200.json"
KINDS = ("Ingress", "TextEncoder", "Denoiser", "VAE")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny-t2v, 128x128x5 frames, 2 steps")
    parser.add_argument("--config", type=Path, default=REPO / "serve_config.yaml", help="layout to deploy")
    parser.add_argument("--model", default=None, help="preset (default: the config's, wan2.1-t2v-1.3b)")
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--attention", default=None, help="attention_type (default: the config's)")
    parser.add_argument("--repeats", type=int, default=2, help="single jobs per path (after one warm-up)")
    parser.add_argument("--jobs", type=int, default=4, help="jobs submitted at once in the concurrent phase")
    parser.add_argument("--time-budget-s", type=float, default=270.0, help="phases past it are skipped")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.num_frames, args.num_steps = "128x128", 5, 2
        args.jobs = min(args.jobs, 3)
        args.repeats = min(args.repeats, 2)
    return args


def settings_for(args: argparse.Namespace, workdir: Path):
    """Settings of the config's application, with its per-deployment resources as code defaults
    (so the Python deploy below places replicas exactly as `serve run <config>` would)."""
    from turbo_serve.models.tokenizer import ensure_tiny_tokenizer
    from turbo_serve.settings import Settings

    config = yaml.safe_load(args.config.read_text())
    app = config["applications"][0]
    values: dict[str, Any] = dict(app.get("args", {}))
    deployments: dict[str, dict] = {}
    for entry in app.get("deployments", []):
        kind = "Denoiser" if entry["name"].startswith("Denoiser-") else entry["name"]
        options = {k: v for k, v in (entry.get("ray_actor_options") or {}).items() if k in ("num_cpus", "num_gpus")}
        for key in ("max_ongoing_requests", "graceful_shutdown_timeout_s", "health_check_timeout_s"):
            if key in entry:
                options[key] = entry[key]
        if "autoscaling_config" in entry:
            options["autoscaling"] = entry["autoscaling_config"]
        deployments[kind] = options
    values["deployments"] = deployments
    if args.smoke:
        values.update(models=["tiny-t2v"], device="cpu", dtype="float32")
        values["deployments"] = {kind: {"num_cpus": 0.25, "num_gpus": 0} for kind in KINDS}
    if args.model:
        values["models"] = [args.model]
    if args.attention:
        values["attention_type"] = args.attention
    values.update(storage_dir=str(workdir / "storage"), job_store_url=None, max_queued_jobs=max(64, args.jobs + 4))
    # Random weights: the real UMT5 reads token ids of the tiny tokenizer (nothing to download).
    tokenizer = str(ensure_tiny_tokenizer(workdir / "tokenizer"))
    values["checkpoints"] = {model: {"tokenizer": tokenizer} for model in values.get("models", [])}
    return Settings(**values)


def request_body(args: argparse.Namespace, settings) -> dict[str, Any]:
    return {"prompt": "a red fox running through fresh snow at dawn, cinematic", "model": settings.default_model,
            "size": args.size, "num_frames": args.num_frames, "num_steps": args.num_steps, "seed": 0}  # fmt: skip


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"n": len(values), "median": statistics.median(values), "min": ordered[0], "max": ordered[-1],
            "mean": statistics.fmean(values)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_process(args, settings, body, workdir: Path) -> dict[str, Any]:
    """The baseline: the pipeline of the same settings and request in this process."""
    import torch

    from turbo_serve.api.schemas import parse_request, resolve_spec
    from turbo_serve.pipeline.stages import Pipeline

    spec = resolve_spec(parse_request(body), settings)
    pipeline = Pipeline(settings.pipeline_config(settings.default_model))
    cuda = settings.device.startswith("cuda")
    latencies, stages = [], []
    try:
        for i in range(args.repeats + 1):  # the first run warms up (kernel autotuning, allocator)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = pipeline.generate(spec, None, workdir / f"inprocess-{i}")
            if cuda:
                torch.cuda.synchronize()
            if i:
                latencies.append(time.perf_counter() - start)
                stages.append(dict(result.timings))
    finally:
        del pipeline
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {"latency_s": summary(latencies), "stage_s": _stage_summary(stages)}


def _stage_summary(timings: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    names = sorted({k for t in timings for k in t})
    return {name: summary([t[name] for t in timings if name in t]) for name in names}


def run_http_single(args, body, http: httpx.Client) -> dict[str, Any]:
    """One sync job after another, each with a prompt of its own: the TextEncoder's cache of
    repeated prompts must not flatter the comparison with the in-process run."""
    latencies, stages, sizes = [], [], []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        response = http.post("/v1/videos/sync", json={**body, "prompt": f"{body['prompt']}, take {i}"})
        content = response.content
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"sync job failed: {response.status_code} {response.text[:500]}")
        if i:
            latencies.append(elapsed)
            video = http.get(f"/v1/videos/{response.headers['X-Video-Id']}").json()
            stages.append(video["timings"])
            sizes.append(len(content))
        assert content[4:8] == b"ftyp", "not an mp4"
    return {"latency_s": summary(latencies), "stage_s": _stage_summary(stages), "mp4_bytes": summary(sizes)}


def run_http_concurrent(args, body, http: httpx.Client, deadline: float) -> dict[str, Any]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        responses = list(pool.map(lambda i: http.post("/v1/videos", json={**body, "seed": i}), range(args.jobs)))
    ids = [r.json()["id"] for r in responses if r.status_code == 200]
    rejected = [r.status_code for r in responses if r.status_code != 200]
    done: dict[str, dict] = {}
    while len(done) < len(ids) and time.monotonic() < deadline:
        for video_id in ids:
            if video_id not in done:
                video = http.get(f"/v1/videos/{video_id}").json()
                if video["status"] in ("completed", "failed", "cancelled"):
                    done[video_id] = video
        time.sleep(0.1)
    wall = time.perf_counter() - start
    completed = [v for v in done.values() if v["status"] == "completed"]
    # Server-side end to end: time queued (created -> claimed) plus the runner's run of the job.
    e2e = [v["timings"]["queue_wait"] + v["timings"]["total"] for v in completed]
    return {
        "jobs": args.jobs,
        "completed": len(completed),
        "failed": [v.get("error") for v in done.values() if v["status"] != "completed"],
        "rejected_status_codes": rejected,
        "unfinished": len(ids) - len(done),
        "wall_s": wall,
        "jobs_per_min": 60.0 * len(completed) / wall if wall > 0 else 0.0,
        "e2e_s": summary(e2e),
        "queue_wait_s": summary([v["timings"]["queue_wait"] for v in completed]),
        "stage_s": _stage_summary([v["timings"] for v in completed]),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.time_budget_s
    workdir = Path(tempfile.mkdtemp(prefix="turbo-serve-bench-"))
    settings = settings_for(args, workdir)
    body = request_body(args, settings)
    results: dict[str, Any] = {
        "benchmark": "serve",
        "smoke": args.smoke,
        "model": settings.default_model,
        "device": settings.device,
        "dtype": settings.dtype,
        "attention_type": settings.attention_type,
        "request": body,
        "deployments": {k: d.model_dump() for k, d in settings.deployments.items()},
        "platform": platform.platform(),
        "out": str(args.out),
        "phases": {},
        "errors": {},
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    def phase(name: str, fn) -> None:
        if time.monotonic() > deadline:
            results["errors"][name] = "skipped: time budget spent"
        else:
            try:
                results["phases"][name] = fn()
            except Exception as error:  # record and go on to the next phase
                results["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"
        save()

    if settings.device.startswith("cuda"):
        import torch

        results["gpu"] = torch.cuda.get_device_name(0)
    phase("in_process", lambda: run_in_process(args, settings, body, workdir))

    import ray
    from ray import serve

    from turbo_serve.serving.app import build_app

    port = free_port()
    try:
        ray.init(num_gpus=1 if settings.device.startswith("cuda") else 0, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        serve.run(build_app(settings), name="turbo-serve", route_prefix="/")
        results["deploy_s"] = time.perf_counter() - t0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600.0) as http:
            phase("http_single", lambda: run_http_single(args, body, http))
            phase("http_concurrent", lambda: run_http_concurrent(args, body, http, deadline + 60.0))
    except Exception as error:
        results["errors"]["serve"] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    inproc = results["phases"].get("in_process", {}).get("latency_s", {}).get("median")
    single = results["phases"].get("http_single", {}).get("latency_s", {}).get("median")
    if inproc and single:
        ratio = single / inproc - 1.0
        results["serving_overhead"] = {"ratio": ratio, "seconds": single - inproc, "target": 0.05, "met": ratio < 0.05}
    save()
    print_table(results)
    return 0


def print_table(results: dict[str, Any]) -> None:
    phases = results["phases"]
    print(f"\nserve benchmark: {results['model']} on {results.get('gpu', results['device'])}, "
          f"request {results['request']['size']} x {results['request']['num_frames']} frames, "
          f"{results['request']['num_steps']} steps, attention {results['attention_type']}")  # fmt: skip
    for name in ("in_process", "http_single"):
        latency = phases.get(name, {}).get("latency_s", {})
        if latency:
            print(f"  {name:<16} median {latency['median']:.3f} s  (min {latency['min']:.3f}, max {latency['max']:.3f}, n={latency['n']})")
    overhead = results.get("serving_overhead")
    if overhead:
        print(f"  serving overhead {100 * overhead['ratio']:+.2f}% = {overhead['seconds']:+.3f} s per job "
              f"(target < 5%: {'met' if overhead['met'] else 'NOT met'})")  # fmt: skip
    concurrent = phases.get("http_concurrent")
    if concurrent:
        print(f"  concurrent       {concurrent['completed']}/{concurrent['jobs']} jobs in {concurrent['wall_s']:.1f} s = "
              f"{concurrent['jobs_per_min']:.2f} jobs/min")  # fmt: skip
        for stage, stats in concurrent["stage_s"].items():
            print(f"    {stage:<14} median {stats['median']:.3f} s  max {stats['max']:.3f} s")
    for name, error in results["errors"].items():
        print(f"  ERROR {name}: {error.splitlines()[0]}")
    print(f"  -> {results['out']}")


if __name__ == "__main__":
    raise SystemExit(main())
