"""Kernel-level timing for the op benchmarks (attention, w8a8, fused_norm, scaling): the median of
CUDA-event timed calls after a warm-up call, as many as fit a time budget. Whole stages and
requests (wall clock, fixed iterations, peak memory) go through harness.time_call instead."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: str, max_s: float = 1.0, min_reps: int = 3, max_reps: int = 50) -> dict:
    """Median ms over reps after a warm-up call; the first call (compile + autotune) is timed apart.

    On the CPU (interpreter smoke runs) one timed call is enough: the numbers only prove the path.
    """
    start = time.perf_counter()
    fn()
    sync(device)
    first_s = time.perf_counter() - start
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return {"ms": (time.perf_counter() - start) * 1e3, "reps": 1, "first_call_s": round(first_s, 3)}
    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (len(times) < min_reps or spent < max_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
        spent += times[-1] / 1e3
    return {"ms": statistics.median(times), "reps": len(times), "first_call_s": round(first_s, 3)}
