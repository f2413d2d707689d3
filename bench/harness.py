"""Plumbing shared by the benchmarks in bench/: environment record, synchronised timing, a time
budget, guarded variants, and a JSON report rewritten after every variant (so a run cut short by
its time limit still leaves everything it measured)."""

from __future__ import annotations

import gc
import json
import platform
import re
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(argv: list[str], script: str) -> dict[str, Any]:
    """Device, library versions and the exact command of this run."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu"),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "ray": _version("ray"),
        "python": platform.python_version(),
        "command": " ".join(["python", f"bench/{script}", *argv]),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def time_call(call: Callable[[], Any], *, warmup: int, iters: int, device: torch.device | str) -> dict[str, Any]:
    """Wall time of `call` with the device synchronised around each run; warm-up runs excluded.

    Peak memory is reset after the warm-up and measured over the timed runs only.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        call()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        synchronize(device)
        begin = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    result = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": [round(t, 4) for t in times],
        "warmup_runs": warmup,
        "warmup_s": round(warmup_s, 2),
    }
    if cuda:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


KERNEL_CATEGORIES = (  # first match wins: a kernel's name says what it computes
    ("attention", r"_flash_fwd|sdpa|fmha|flash_fwd|attention"),
    ("sparse mask + quantization", r"_block_scores|_pool_(keys|queries)|_select_topk|_finalize_keys|_quantize"),
    ("fused norm / rope / gate", r"_rmsnorm_rope|_layernorm_modulate|_gated_residual|layer_norm|rms_norm"),
    ("convolution", r"conv|fprop|dgrad|implicit|winograd"),
    ("linear (GEMM)", r"gemm|nvjet|cutlass|xmma|cublas|_w8a8_matmul|matmul"),
    ("copy / layout", r"copy|cat|transpose|permute|pad"),
)


def kernel_profile(call: Callable[[], Any], device: torch.device | str, top: int = 15) -> dict[str, Any]:
    """Where one run of `call` spends GPU time: kernel time per category (KERNEL_CATEGORIES, the
    rest "other"), the busiest kernels, and idle GPU time (wall minus the union of kernel spans:
    launch overhead and host work). The "why" behind a missed target. On the CPU the top-level aten
    ops stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    call()  # warm: autotuning and graph capture stay out of the profile
    synchronize(device)
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        call()
        synchronize(device)
        wall_s = time.perf_counter() - begin
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    else:  # no device kernels: the host's top-level ops stand in (the CPU smoke runs this path)
        kernels = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy_us, reach = 0.0, float("-inf")
    for start, end in spans:  # union of kernel spans: concurrent streams count once
        busy_us += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    per_name: dict[str, float] = {}
    for event in kernels:
        per_name[event.name] = per_name.get(event.name, 0.0) + event.time_range.elapsed_us()
    categories: dict[str, float] = {}
    for name, us in per_name.items():
        category = next((c for c, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.I)), "other")
        categories[category] = categories.get(category, 0.0) + us / 1e6
    busiest = sorted(per_name.items(), key=lambda item: -item[1])[:top]
    return {
        "wall_s": round(wall_s, 4),
        "gpu_busy_s": round(busy_us / 1e6, 4),
        "gpu_idle_s": round(max(0.0, wall_s - busy_us / 1e6), 4),
        "kernel_s_by_category": {c: round(v, 4) for c, v in sorted(categories.items(), key=lambda item: -item[1])},
        "top_kernels": [{"name": name[:160], "s": round(us / 1e6, 4)} for name, us in busiest],
        "kernel_launches": len(kernels),
    }


class Report:
    """Guarded variants under a time budget, saved as JSON after each one."""

    def __init__(self, script: str, argv: list[str], out: Path, budget_s: float, only: str | None = None) -> None:
        self.out = out
        self.only = re.compile(only) if only else None
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {**environment(argv, script), "budget_s": budget_s, "results": {}}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, measure: Callable[[], dict[str, Any]], *, cost_s: float = 0.0) -> dict[str, Any]:
        """Record measure()'s dict under `name`, or why it was skipped or failed; never raises.
        Variants that `only` (a regex) does not select are neither run nor recorded."""
        if self.only and not self.only.search(name):
            return {"skipped": "not selected"}
        if self.left_s() < cost_s:
            record: dict[str, Any] = {"skipped": f"time budget: {self.left_s():.0f} s left, needs ~{cost_s:.0f} s"}
        else:
            print(f"-- {name}", flush=True)
            try:
                record = measure()
            except Exception as error:  # record and go on: one failing variant must not lose the rest
                record = {"error": f"{type(error).__name__}: {error}"[:800], "traceback": traceback.format_exc(limit=8)}
                print(record["traceback"], file=sys.stderr, flush=True)
        self.data["results"][name] = record
        free_memory()
        self.save()
        return record

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
