"""Several GPUs: throughput of data-parallel Denoiser replicas, latency of one sequence-parallel Denoiser.

Phases (each variant in its own try/except; the JSON is rewritten after each; variants past the
time budget are skipped, so one command stays inside a 10-minute device slot; results of earlier
commands in the same --out file are kept, so the phases can be run one command at a time):

  throughput  jobs/min through the HTTP API (POST /v1/videos + polling) with k = 1, 2, 4, 8 Denoiser
              replicas under saturating load (3k jobs in flight), 1.3B 480p, random weights. Each GPU
              holds one Denoiser (0.7 GPU) and, scaled up from zero under the load, one VAE replica
              (0.2; decode costs about as much as 4-step sampling at 480p, so the VAE must grow with
              the DiT); the TextEncoder takes 0.1 of one GPU. Which deployment landed on which GPU is
              read back through NVML and recorded. Target: jobs/min(4) >= 0.9 x 4 x jobs/min(1).
  autoscale   one Denoiser deployment autoscaling 1..max replicas: saturating load until every replica
              is up (at most --load-s), the submitted jobs drained, then idle until one replica is
              left (at most --idle-s); the replica count over time (Serve's status). Pass: reaches max
              under load, back to 1 after.
  latency     14B 720p, 4 rCM steps, in ONE sequence-parallel group of N = 1, 2, 4, 8 GPUs (the ranks
              are the same ParallelDenoiseStage the multi-GPU replica runs, started with
              torch.multiprocessing, NCCL). Sampling time with CUDA graphs (the stage's default), and
              an eager run with CUDA events around every all-to-all: the all-to-all share of the time.
              Target: t(1) / t(4) >= 0.8 x 4.
  shards      what ONE GPU can show of sequence parallelism: the per-rank compute of an N-way split
              with no communication (attention on H/N heads over all L tokens, the rest of a block on
              L/N tokens), for each head count the models allow; the compute-only speedup bound.

    python bench/scaling.py --gpus 8 --phases throughput --replicas 1,2   # one command per slot
    python bench/scaling.py --gpus 8 --phases throughput --replicas 4,8
    python bench/scaling.py --gpus 8 --phases autoscale
    python bench/scaling.py --gpus 8 --phases latency                     # N = 1, 2, 4, 8
    python bench/scaling.py --gpus 1                                      # 1 replica, N = 1, shards
    python bench/scaling.py --smoke --out /tmp/scaling.json               # CPU, gloo, tiny preset

Writes bench/results/scaling_h200x<gpus>.json and a .png next to it (throughput and latency against
linear, all-to-all share, replicas over time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  (makes turbo_serve/turbo_kernels importable from a checkout)

REPO = serve_bench.REPO
PHASES = ("throughput", "autoscale", "latency", "shards")
TARGETS = {"throughput_efficiency_at_4": 0.9, "latency_efficiency_at_4": 0.8}
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)  # before anything can create an NCCL communicator, in every child too

# (preset, width, height, frames) of each workload; the smoke twins are tiny and odd-sized.
GPU_WORKLOADS = {"throughput": ("wan2.1-t2v-1.3b", 832, 480, 81), "latency": ("wan2.1-t2v-14b", 1280, 720, 81)}
SMOKE_WORKLOADS = {"throughput": ("tiny-t2v", 64, 64, 1), "latency": ("tiny-t2v", 144, 112, 9)}
SMOKE_REQUEST = {"sampler": "euler", "guidance_scale": 1, "num_steps": 60}
"""On a CPU the tiny VAE decode outweighs a few tiny DiT steps; many cheap steps on a one-frame
clip make the Denoiser the bottleneck, as it is on the GPU, so its autoscaling has a queue to see."""
SHARD_MODELS = {"wan2.1-t2v-1.3b": (832, 480, 81), "wan2.1-t2v-14b": (1280, 720, 81)}
SMOKE_SHARD_MODELS = {"tiny-t2v": (144, 112, 9)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=None, help="GPUs of this node to use (default: all visible)")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny preset, short windows")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--replicas", default=None, help="throughput: replica counts (default 1,2,4,8 up to --gpus)")
    parser.add_argument("--ranks", default=None, help="latency: group sizes (default 1,2,4,8 up to --gpus)")
    parser.add_argument("--attention", default="sagesla")
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--window-s", type=float, default=90.0,
                        help="throughput: measured window per k (stretched to 2 completions per replica)")
    parser.add_argument("--load-s", type=float, default=180.0, help="autoscale: most seconds of load (ends at max replicas)")
    parser.add_argument("--idle-s", type=float, default=180.0, help="autoscale: most seconds idle (ends at 1 replica)")
    parser.add_argument("--repeats", type=int, default=2, help="latency: timed samplings per variant")
    parser.add_argument("--time-budget-s", type=float, default=540.0, help="variants past it are skipped")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    if args.gpus is None:
        args.gpus = 2 if args.smoke else _visible_gpus()
    if args.smoke:
        args.window_s, args.load_s, args.idle_s = min(args.window_s, 12.0), min(args.load_s, 60.0), min(args.idle_s, 60.0)
        args.repeats = 1
    args.workloads = SMOKE_WORKLOADS if args.smoke else GPU_WORKLOADS
    args.shard_models = SMOKE_SHARD_MODELS if args.smoke else SHARD_MODELS
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; valid: {', '.join(PHASES)}")
    powers = [n for n in (1, 2, 4, 8) if n <= args.gpus]
    args.replicas = _int_list(args.replicas) if args.replicas else powers
    args.ranks = _int_list(args.ranks) if args.ranks else powers
    args.out = args.out or REPO / "bench" / "results" / f"scaling_h200x{args.gpus}.json"
    return args


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


# --- report -----------------------------------------------------------------------------------


class Report:
    """The JSON at --out, kept across commands: each phase's variants by key, errors by variant."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.path: Path = args.out
        previous = json.loads(self.path.read_text()) if self.path.exists() else {}
        if previous.get("smoke") != args.smoke or previous.get("gpus") != args.gpus:
            previous = {}
        self.data: dict[str, Any] = {
            "benchmark": "scaling",
            "smoke": args.smoke,
            "gpus": args.gpus,
            "device": args.device,
            "attention_type": args.attention,
            "num_steps": args.num_steps,
            "targets": TARGETS,
            "platform": platform.platform(),
            "phases": previous.get("phases", {}),
            "errors": previous.get("errors", {}),
            "commands": [*previous.get("commands", []), " ".join(sys.argv)],
        }
        if args.device == "cuda":
            import torch

            self.data["gpu"] = torch.cuda.get_device_name(0)

    def variant(self, phase: str, key: str, deadline: float, fn: Callable[[], dict]) -> None:
        name = f"{phase}/{key}"
        if time.monotonic() > deadline:
            self.data["errors"][name] = "skipped: time budget spent"
        else:
            self.data["errors"].pop(name, None)
            try:
                self.data["phases"].setdefault(phase, {})[key] = fn()
            except Exception as error:  # record and go on with the next variant
                self.data["errors"][name] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=10)}"
        self.data["verdicts"] = verdicts(self.data["phases"])
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def _efficiency(phase: dict[str, dict], key: str, larger_is_better: bool) -> dict[str, float]:
    base = phase.get("1", {}).get(key)
    out = {}
    for n, run in phase.items():
        if base and run.get(key):
            speedup = run[key] / base if larger_is_better else base / run[key]
            out[n] = speedup / int(n)
    return out


def verdicts(phases: dict[str, Any]) -> dict[str, Any]:
    """Efficiency against linear for every measured size; pass/fail where the 4-GPU point exists."""
    result: dict[str, Any] = {}
    throughput = phases.get("throughput", {})
    if throughput:
        eff = _efficiency(throughput, "jobs_per_min", larger_is_better=True)
        result["throughput_efficiency"] = eff
        if "4" in eff:
            result["throughput_pass"] = eff["4"] >= TARGETS["throughput_efficiency_at_4"]
    latency = phases.get("latency", {})
    if latency:
        eff = _efficiency(latency, "sampling_s", larger_is_better=False)
        result["latency_efficiency"] = eff
        if "4" in eff:
            result["latency_pass"] = eff["4"] >= TARGETS["latency_efficiency_at_4"]
    autoscale = phases.get("autoscale", {}).get("run")
    if autoscale:
        result["autoscale_pass"] = autoscale["pass"]
    return result


# --- throughput and autoscale: the application over HTTP -----------------------------------------


def app_settings(args, workdir: Path, denoiser_autoscaling: dict, vae_max: int):
    """One GPU per Denoiser (0.7) with room for one VAE replica (0.2) and, on one GPU, the
    TextEncoder (0.1). The VAE scales up from zero, so it only starts once the Denoisers hold their
    GPUs: Ray fits a fraction where it fits best, i.e. into a Denoiser GPU's 0.2-0.3 gap, never
    onto a free GPU a Denoiser will need."""
    from turbo_serve.models.tokenizer import ensure_tiny_tokenizer
    from turbo_serve.settings import Settings

    model, *_ = args.workloads["throughput"]
    gpu = 0.0 if args.smoke else 1.0
    cpus = 0.25 if args.smoke else 2.0
    fast = {"upscale_delay_s": 2.0, "metrics_interval_s": 1.0, "look_back_period_s": 4.0}
    deployments = {
        "Ingress": {"num_cpus": cpus, "max_ongoing_requests": 400},
        "TextEncoder": {"num_cpus": cpus, "num_gpus": 0.1 * gpu},
        "Denoiser": {"num_cpus": cpus, "num_gpus": 0.7 * gpu, "max_ongoing_requests": 1,
                     "autoscaling": denoiser_autoscaling},
        "VAE": {"num_cpus": cpus, "num_gpus": 0.2 * gpu, "max_ongoing_requests": 1,
                "autoscaling": {"min_replicas": 0, "max_replicas": vae_max, "target_ongoing_requests": 1.0,
                                "downscale_delay_s": 600.0, **fast}},
    }  # fmt: skip
    most = denoiser_autoscaling["max_replicas"]
    # Random weights: the real UMT5 architecture reads token ids of the tiny tokenizer (no download).
    tokenizer = str(ensure_tiny_tokenizer(workdir / "tokenizer"))
    return Settings(
        models=[model],
        checkpoints={model: {"tokenizer": tokenizer}},
        device=args.device,
        dtype="float32" if args.smoke else "bfloat16",
        attention_type=args.attention,
        storage_dir=str(workdir / "storage"),
        cache_dir=str(workdir / "cache"),
        max_running_jobs=4 * most,
        max_queued_jobs=16 * most,
        poll_interval_s=0.2,
        deployments=deployments,
    )


def request_body(args, seed: int) -> dict[str, Any]:
    model, width, height, frames = args.workloads["throughput"]
    body = {"prompt": "a red fox running through fresh snow at dawn, cinematic", "model": model,
            "size": f"{width}x{height}", "num_frames": frames, "num_steps": args.num_steps, "seed": seed}  # fmt: skip
    return {**body, **SMOKE_REQUEST} if args.smoke else body


@contextmanager
def ray_cluster(args) -> Iterator[int]:
    """One Ray for the whole phase (starting Ray is slow); yields the HTTP port."""
    import ray
    from ray import serve

    port = serve_bench.free_port()
    ray.init(num_cpus=4 if args.smoke else None, num_gpus=0 if args.smoke else args.gpus,
             include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": MULTICAST_OFF})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextmanager
def deployed(settings, name: str = "turbo-serve") -> Iterator[float]:
    from ray import serve

    from turbo_serve.serving.app import build_app

    start = time.perf_counter()
    serve.run(build_app(settings), name=name, route_prefix="/")
    try:
        yield time.perf_counter() - start
    finally:
        serve.delete(name)


class LoadDriver:
    """Closed-loop load: keeps `in_flight` jobs submitted, polls them, records completions."""

    def __init__(self, http: httpx.Client, args, in_flight: int) -> None:
        self.http, self.args, self.in_flight = http, args, in_flight
        self.pending: dict[str, float] = {}
        self.completed: list[tuple[float, dict]] = []
        self.failed: list[str] = []
        self.rejected = 0
        self._seed = 0

    def step(self, submit: bool) -> None:
        while submit and len(self.pending) < self.in_flight:
            response = self.http.post("/v1/videos", json=request_body(self.args, self._seed))
            self._seed += 1
            if response.status_code != 200:
                self.rejected += 1
                break
            self.pending[response.json()["id"]] = time.monotonic()
        for video_id in list(self.pending):
            video = self.http.get(f"/v1/videos/{video_id}").json()
            if video["status"] == "completed":
                self.completed.append((time.monotonic(), video))
                del self.pending[video_id]
            elif video["status"] in ("failed", "cancelled"):
                self.failed.append(str(video.get("error")))
                del self.pending[video_id]

    def run(self, seconds: float, submit: bool = True, until: Callable[[], bool] | None = None) -> None:
        """Drive for `seconds`, or until `until()` turns true (polled between steps)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.step(submit)
            if until is not None and until():
                return
            time.sleep(0.2)

    def drain(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < end:
            self.step(submit=False)
            time.sleep(0.2)


def denoiser_replicas(app: str = "turbo-serve") -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    (deployment,) = [d for name, d in status.deployments.items() if name.startswith("Denoiser-")]
    return int(sum(n for state, n in deployment.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING"))


def gpu_placement() -> dict[str, list[str]]:
    """GPU index -> deployments whose replica processes hold memory there (NVML + process titles)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # noqa: BLE001 - no driver (smoke): nothing to place
        return {"unavailable": [f"{type(error).__name__}: {error}"]}
    try:
        placement: dict[str, list[str]] = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            names = []
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                try:
                    title = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                except OSError:
                    continue
                names.append(title.rsplit(":", 1)[-1] if title.startswith("ray::ServeReplica") else title)
            placement[str(index)] = sorted(names)
        return placement
    finally:
        pynvml.nvmlShutdown()


def one_denoiser_per_gpu(placement: dict[str, list[str]], replicas: int) -> bool | None:
    if "unavailable" in placement:
        return None
    counts = [sum(n.startswith("Denoiser-") for n in names) for names in placement.values()]
    return sorted(counts, reverse=True)[:replicas] == [1] * replicas and sum(counts) == replicas


def run_throughput(args, port: int, k: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="turbo-serve-scaling-") as workdir:
        fixed = {"min_replicas": k, "max_replicas": k, "target_ongoing_requests": 1.0}
        settings = app_settings(args, Path(workdir), fixed, vae_max=k)
        with deployed(settings) as deploy_s, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            warm = LoadDriver(http, args, in_flight=2 * k)  # every replica compiles its kernels first
            warm.step(submit=True)
            warm.in_flight = 0
            warm.drain(timeout_s=600)
            driver = LoadDriver(http, args, in_flight=3 * k)
            driver.run(10.0 if not args.smoke else 2.0)  # reach the steady state (VAE replicas scaled up)
            start = time.monotonic()
            done_before = len(driver.completed)

            def enough() -> bool:  # the window, and at least 2 completions per replica (a slow machine stretches it)
                return time.monotonic() - start >= args.window_s and len(driver.completed) - done_before >= 2 * k

            driver.run(max(600.0, 4 * args.window_s), until=enough)
            window = time.monotonic() - start
            completed = len(driver.completed) - done_before
            placement = gpu_placement()
            replicas = denoiser_replicas()
            driver.in_flight = 0
            driver.drain(timeout_s=300)
        timings = [v["timings"] for _, v in driver.completed]
        return {
            "replicas": k,
            "running_denoisers": replicas,
            "deploy_s": deploy_s,
            "window_s": window,
            "completed_in_window": completed,
            "jobs_per_min": 60.0 * completed / window,
            "failed": driver.failed + warm.failed,
            "rejected": driver.rejected,
            "stage_s": {name: statistics.median(t[name] for t in timings if name in t)
                        for name in ("queue_wait", "text_encode", "denoise", "decode", "total")
                        if any(name in t for t in timings)},  # fmt: skip
            "gpu_placement": placement,
            "one_denoiser_per_gpu": one_denoiser_per_gpu(placement, k),
            "request": request_body(args, 0),
        }


def run_autoscale(args, port: int, most: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="turbo-serve-scaling-") as workdir:
        scaling = {"min_replicas": 1, "max_replicas": most, "target_ongoing_requests": 1.0, "upscale_delay_s": 5.0,
                   "downscale_delay_s": 20.0, "metrics_interval_s": 1.0, "look_back_period_s": 5.0}  # fmt: skip
        settings = app_settings(args, Path(workdir), scaling, vae_max=most)
        with deployed(settings), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            warm = LoadDriver(http, args, in_flight=1)
            warm.step(submit=True)
            warm.in_flight = 0
            warm.drain(timeout_s=600)
            timeline: list[tuple[float, int, str]] = []
            start = time.monotonic()

            def replicas(phase: str) -> int:
                """The replica count, sampled about once a second into the timeline."""
                if not timeline or time.monotonic() - start - timeline[-1][0] >= 1.0:
                    timeline.append((round(time.monotonic() - start, 1), denoiser_replicas(), phase))
                return timeline[-1][1]

            driver = LoadDriver(http, args, in_flight=(2 if args.smoke else 3) * most)

            def drained() -> bool:
                replicas("drain")
                return not driver.pending

            driver.run(args.load_s, until=lambda: replicas("load") == most)  # load until every replica is up
            driver.in_flight = 0
            driver.run(900.0, submit=False, until=drained)
            driver.run(args.idle_s, submit=False, until=lambda: replicas("idle") == 1)  # idle until one is left
        under_load = [n for _, n, phase in timeline if phase == "load"]
        peak, final = max(under_load, default=0), timeline[-1][1]
        idle_start = next((t for t, _, phase in timeline if phase == "idle"), None)
        return {
            "max_replicas": most,
            "peak_under_load": peak,
            "final_after_idle": final,
            "seconds_to_peak": next((t for t, n, _ in timeline if n == peak), None),
            "seconds_from_idle_to_one": None if idle_start is None or final != 1 else timeline[-1][0] - idle_start,
            "timeline": timeline,
            "completed": len(driver.completed),
            "failed": driver.failed,
            "pass": peak == most and final == 1,
        }


# --- latency: one sequence-parallel group ---------------------------------------------------------


def latency_spec(args):
    from turbo_serve.pipeline.spec import GenerationSpec

    model, width, height, frames = args["workload"]
    return GenerationSpec("a lighthouse in a storm", model=model, width=width, height=height, num_frames=frames,
                          num_steps=args["num_steps"], attention_type=args["attention"])  # fmt: skip


def _timed(stage, spec, text, device: str, repeats: int) -> list[float]:
    import torch
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        stage(spec, text)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def latency_rank(rank: int, init_method: str, world: int, args: dict) -> dict[str, Any] | None:
    """One rank: build the stage, warm up (autotune, graph capture), time sampling; then the same
    eagerly with the all-to-alls timed. Rank 0 returns the numbers."""
    import gc

    import torch

    from turbo_serve.models.configs import get_preset
    from turbo_serve.parallel.distributed import ParallelConfig, init_parallel, shutdown_parallel
    from turbo_serve.parallel.stage import ParallelDenoiseStage, rank_config
    from turbo_serve.parallel.ulysses import CollectiveTimer
    from turbo_serve.pipeline.stages import PipelineConfig

    device = args["device"]
    spec = latency_spec(args)
    config = rank_config(PipelineConfig(model=spec.model, device=device, dtype=args["dtype"],
                                        cache_dir=args["cache_dir"]), rank)  # fmt: skip
    groups = init_parallel(ParallelConfig(sequence_parallel=world), rank, init_method, config.device, timeout_s=900)
    try:
        dit = get_preset(spec.model).dit
        text = torch.randn(dit.text_len, dit.text_dim, generator=torch.Generator().manual_seed(0))
        result: dict[str, Any] = {"ranks": world, "tokens": None}
        for variant, graphs in (("graphs", True), ("eager", False)):
            timer = CollectiveTimer() if not graphs else None
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            stage = ParallelDenoiseStage(replace(config, cuda_graphs=graphs), groups, timer)
            start = time.perf_counter()
            stage(spec, text)  # warm-up: Triton autotuning, CUDA graph capture
            first_s = time.perf_counter() - start
            if timer is not None:
                timer.reset()
            times = _timed(stage, spec, text, device, args["repeats"])
            entry: dict[str, Any] = {"sampling_s": statistics.median(times), "times_s": times, "first_call_s": first_s}
            if timer is not None:
                all_to_all = timer.seconds() / len(times)
                entry.update(all_to_all_s=all_to_all, all_to_all_share=all_to_all / entry["sampling_s"],
                             all_to_alls_per_sampling=timer.calls // len(times))  # fmt: skip
            if device == "cuda":
                entry["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            result[variant] = entry
            del stage
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        return result if rank == 0 else None
    finally:
        shutdown_parallel()


def run_latency(args, world: int, cache_dir: str) -> dict[str, Any]:
    from turbo_serve.models.configs import get_preset
    from turbo_serve.parallel.local import run_ranks
    from turbo_serve.pipeline.resolution import latent_frames

    model, width, height, frames = args.workloads["latency"]
    rank_args = {"workload": args.workloads["latency"], "num_steps": args.num_steps, "attention": args.attention,
                 "device": args.device, "dtype": "float32" if args.smoke else "bfloat16", "repeats": args.repeats,
                 "cache_dir": cache_dir}  # fmt: skip
    (result, *_) = run_ranks(latency_rank, world, world, rank_args, timeout_s=max(60.0, args.time_budget_s))
    patch = get_preset(model).dit.patch_size
    result["tokens"] = latent_frames(frames) * (height // 8 // patch[1]) * (width // 8 // patch[2])
    result["sampling_s"] = result["graphs"]["sampling_s"]
    result["workload"] = {"model": model, "size": f"{width}x{height}", "num_frames": frames, "num_steps": args.num_steps}
    return result


# --- shards: the per-rank compute of an N-way split, no communication -----------------------------


def run_shards(args, model: str, geometry: tuple[int, int, int]) -> dict[str, Any]:
    """Time attention on H/N heads x L tokens and the rest of one block on L/N tokens, per N."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from timing import measure

    from turbo_kernels.registry import AttentionMetadata, get_attention_backend
    from turbo_serve.models.configs import get_preset
    from turbo_serve.models.wan_dit import WanBlock, init_random_weights, keeps_fp32, rope_tables
    from turbo_serve.parallel.distributed import head_divisors
    from turbo_serve.pipeline.resolution import latent_frames

    config = get_preset(model).dit
    width, height, frames = geometry
    grid = (latent_frames(frames), height // 8 // config.patch_size[1], width // 8 // config.patch_size[2])
    tokens = grid[0] * grid[1] * grid[2]
    device = torch.device(args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    with torch.device(device):
        block = init_random_weights(WanBlock(config))
    for name, tensor in block.named_parameters():
        tensor.data = tensor.data.to(torch.float32 if keeps_fp32(name) else dtype)
    backend = get_attention_backend(args.attention)
    meta = AttentionMetadata(args.attention)
    generator = torch.Generator(device=device).manual_seed(0)
    rope = rope_tables(grid, config.head_dim, device)
    context = torch.randn(1, config.text_len, config.dim, device=device, dtype=dtype, generator=generator)
    e0 = torch.randn(1, 6, config.dim, device=device, generator=generator) * 0.02

    def no_attention(q, k, v, meta, proj_l):  # the block without its attention: measured apart
        return torch.zeros_like(v)

    degrees = [n for n in head_divisors(config.num_heads) if n <= 12]
    per_degree: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for n in degrees:
            shard = -(-tokens // n)
            x = torch.randn(1, shard, config.dim, device=device, dtype=dtype, generator=generator)
            shard_rope = tuple(t[:shard] for t in rope)
            q, k, v = (torch.randn(1, tokens, config.num_heads // n, config.head_dim, device=device, dtype=dtype,
                                   generator=generator) for _ in range(3))  # fmt: skip
            attention = measure(lambda: backend(q, k, v, meta, block.self_attn.proj_l), args.device)["ms"]
            rest = measure(lambda: block(x, e0, context, shard_rope, no_attention, meta), args.device)["ms"]
            per_degree[str(n)] = {"attention_ms": attention, "rest_of_block_ms": rest, "layer_ms": attention + rest}
    base = per_degree["1"]["layer_ms"]
    for n, entry in per_degree.items():
        entry["compute_speedup"] = base / entry["layer_ms"]
        entry["compute_efficiency"] = entry["compute_speedup"] / int(n)
    return {"model": model, "tokens": tokens, "heads": config.num_heads, "layers": config.num_layers,
            "attention_type": args.attention, "degrees": per_degree}  # fmt: skip


# --- plot and table ---------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"skipped: {error}"
    phases = report["phases"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    throughput = phases.get("throughput", {})
    if throughput:
        ks = sorted(int(k) for k in throughput)
        jpm = [throughput[str(k)]["jobs_per_min"] for k in ks]
        base = throughput.get("1", {}).get("jobs_per_min")
        axes[0].plot(ks, jpm, "o-", label="measured")
        if base:
            axes[0].plot(ks, [base * k for k in ks], "--", label="linear")
            axes[0].plot(ks, [0.9 * base * k for k in ks], ":", label="0.9 x linear")
        request = throughput[str(ks[0])]["request"]
        axes[0].set(title=f"throughput, {request['model']} {request['size']}", xlabel="Denoiser replicas",
                    ylabel="jobs/min", xticks=ks)  # fmt: skip
        axes[0].legend()
    latency = phases.get("latency", {})
    if latency:
        ns = sorted(int(n) for n in latency)
        base = latency.get("1", {}).get("sampling_s")
        if base:
            axes[1].plot(ns, [base / latency[str(n)]["sampling_s"] for n in ns], "o-", label="measured")
            axes[1].plot(ns, ns, "--", label="linear")
            axes[1].plot(ns, [0.8 * n for n in ns], ":", label="0.8 x linear")
        work = latency[str(ns[0])]["workload"]
        axes[1].set(title=f"latency speedup, {work['model']} {work['size']} {work['num_steps']} steps",
                    xlabel="GPUs (sequence parallel)", ylabel="t(1) / t(N)", xticks=ns)  # fmt: skip
        axes[1].legend()
        shares = [latency[str(n)]["eager"].get("all_to_all_share", 0.0) for n in ns]
        axes[2].bar([str(n) for n in ns], [100 * s for s in shares])
        axes[2].set(title="all-to-all share of sampling (eager)", xlabel="GPUs", ylabel="%")
    autoscale = phases.get("autoscale", {}).get("run")
    if autoscale:
        t = [p[0] for p in autoscale["timeline"]]
        axes[3].step(t, [p[1] for p in autoscale["timeline"]], where="post")
        for phase, style in (("drain", ":"), ("idle", "--")):
            begin = next((p[0] for p in autoscale["timeline"] if p[2] == phase), None)
            if begin is not None:
                axes[3].axvline(begin, color="grey", linestyle=style, label=f"{phase} from here")
        axes[3].legend()
        axes[3].set(title="Denoiser replicas under load, then idle", xlabel="s", ylabel="replicas")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def print_table(report: dict[str, Any]) -> None:
    phases, verdict = report["phases"], report.get("verdicts", {})
    print(f"\nscaling benchmark on {report.get('gpu', report['device'])} x{report['gpus']}"
          f"{' (smoke)' if report['smoke'] else ''}")  # fmt: skip
    for k, run in sorted(phases.get("throughput", {}).items(), key=lambda kv: int(kv[0])):
        eff = verdict.get("throughput_efficiency", {}).get(k)
        print(f"  throughput  k={k:<2} {run['jobs_per_min']:8.2f} jobs/min"
              f"{'' if eff is None else f'  {eff:.2f} x linear'}  one Denoiser per GPU: {run['one_denoiser_per_gpu']}")  # fmt: skip
    if "throughput_pass" in verdict:
        print(f"  throughput >= 0.9 x linear at 4: {'PASS' if verdict['throughput_pass'] else 'FAIL'}")
    auto = phases.get("autoscale", {}).get("run")
    if auto:
        print(f"  autoscale   peak {auto['peak_under_load']}/{auto['max_replicas']} under load, "
              f"{auto['final_after_idle']} after idle: {'PASS' if auto['pass'] else 'FAIL'}")  # fmt: skip
    for n, run in sorted(phases.get("latency", {}).items(), key=lambda kv: int(kv[0])):
        eff = verdict.get("latency_efficiency", {}).get(n)
        share = run["eager"].get("all_to_all_share", 0.0)
        print(f"  latency     N={n:<2} {run['sampling_s']:8.3f} s (eager {run['eager']['sampling_s']:.3f} s, "
              f"all-to-all {100 * share:.1f}%){'' if eff is None else f'  {eff:.2f} x linear'}")  # fmt: skip
    if "latency_pass" in verdict:
        print(f"  latency >= 0.8 x linear at 4: {'PASS' if verdict['latency_pass'] else 'FAIL'}")
    for model, run in phases.get("shards", {}).items():
        cells = ", ".join(f"N={n}: {d['compute_speedup']:.2f}x" for n, d in run["degrees"].items())
        print(f"  shards      {model}: per-rank compute speedup without communication {cells}")
    for name, error in report["errors"].items():
        print(f"  ERROR {name}: {error.splitlines()[0]}")
    print(f"  -> {report.get('out')}")


# --- main ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.time_budget_s
    report = Report(args)
    report.data["out"] = str(args.out)
    if "shards" in args.phases:
        for model, geometry in args.shard_models.items():
            report.variant("shards", model, deadline, lambda: run_shards(args, model, geometry))
    if "latency" in args.phases:
        with tempfile.TemporaryDirectory(prefix="turbo-serve-scaling-") as cache_dir:
            for world in args.ranks:
                report.variant("latency", str(world), deadline, lambda: run_latency(args, world, cache_dir))
    http_phases = [p for p in ("throughput", "autoscale") if p in args.phases]
    if http_phases:
        try:
            with ray_cluster(args) as port:
                if "throughput" in args.phases:
                    for k in args.replicas:
                        report.variant("throughput", str(k), deadline, lambda: run_throughput(args, port, k))
                if "autoscale" in args.phases:
                    most = max(n for n in (1, 2, 4, 8) if n <= args.gpus)
                    if most < 2:
                        report.data["errors"]["autoscale/run"] = "skipped: autoscaling needs at least 2 GPUs"
                    else:
                        report.variant("autoscale", "run", deadline, lambda: run_autoscale(args, port, most))
        except Exception as error:  # Ray or Serve did not come up (or go down): the rest is still reported
            report.data["errors"]["ray"] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=10)}"
    report.data["plot"] = plot(report.data, args.out.with_suffix(".png"))
    report.save()
    print_table(report.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
