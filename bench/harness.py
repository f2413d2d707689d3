"""Plumbing shared by the benchmarks in bench/: environment record, synchronised timing, a time
budget, guarded variants, and a JSON report rewritten after every variant (so a run cut short by
its time limit still leaves everything it measured)."""

from __future__ import annotations

import gc
import json
import platform
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


class Report:
    """Guarded variants under a time budget, saved as JSON after each one."""

    def __init__(self, script: str, argv: list[str], out: Path, budget_s: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.data: dict[str, Any] = {**environment(argv, script), "budget_s": budget_s, "results": {}}

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, measure: Callable[[], dict[str, Any]], *, cost_s: float = 0.0) -> dict[str, Any]:
        """Record measure()'s dict under `name`, or why it was skipped or failed; never raises."""
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
