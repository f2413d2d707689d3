"""A small in-process autotuner shared by the kernels here.

`triton.autotune` times every config on first use, also under the CPU interpreter (where there is
no GPU timer), and fixes the block sizes per kernel; here each entry point passes the candidates
that fit its call (sparse kernels take their tile from the LUT geometry) and the whole launch to
time. CUDA only: the interpreter, or TURBO_KERNELS_AUTOTUNE=0, takes the first candidate.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, TypeVar

import triton

from turbo_kernels.dispatch import interpreting

ConfigT = TypeVar("ConfigT", bound=Hashable)

_TUNED: dict[tuple, object] = {}
_LAST: dict[str, object] = {}


def autotune_enabled() -> bool:
    return os.environ.get("TURBO_KERNELS_AUTOTUNE", "1") != "0" and not interpreting()


def length_bucket(length: int) -> int:
    """Autotune key for a sequence length: the next power of two."""
    return 1 << max(0, (length - 1).bit_length())


def pick_config(key: tuple, candidates: list[ConfigT], run: Callable[[ConfigT], object]) -> ConfigT:
    """Fastest of ``candidates`` for ``key``, timed once per process with triton.testing.do_bench.

    ``run(config)`` is the whole launch and must be idempotent. A candidate that fails to compile or
    runs out of resources is skipped.
    """
    if key in _TUNED:
        _LAST[key[0]] = _TUNED[key]
        return _TUNED[key]  # type: ignore[return-value]
    if len(candidates) == 1 or not autotune_enabled():
        best = candidates[0]
    else:
        timings: dict[ConfigT, float] = {}
        for cand in candidates:
            try:
                timings[cand] = triton.testing.do_bench(lambda: run(cand), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config that does not compile is not a candidate
                continue
        if not timings:
            raise RuntimeError(f"no candidate config ran for {key}: {candidates}")
        best = min(timings, key=timings.get)
    _TUNED[key] = best
    _LAST[key[0]] = best
    return best


def tuned_configs() -> dict[tuple, object]:
    """What the autotuner chose so far (the benchmarks record it)."""
    return dict(_TUNED)


def last_config(kind: str) -> object | None:
    """The config the latest autotuned call of ``kind`` (its key's first entry) ran with."""
    return _LAST.get(kind)
