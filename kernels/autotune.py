"""A small in-process autotuner shared by the kernels here.

`triton.autotune` times every config on first use, also under the CPU interpreter (where there is
no GPU timer), and fixes the block sizes per kernel; here each entry point passes the candidates
that fit its call (sparse kernels take their tile from the LUT geometry) and the whole launch to
time. CUDA only: the interpreter, or TURBO_KERNELS_AUTOTUNE=0, takes the first candidate.

The first candidate is the reference: every other candidate's output is checked against its
output (``accept``, e.g. `close_to_reference`) before it is timed, so a candidate that changes
numerics (FP8 P@V) must pass its own gate and one that a compiler bug breaks (a TMA or tile
variant) is rejected rather than chosen. Every decision is kept in `tuning_log` (times,
rejections with reasons, the choice) so benchmarks can record it.

Tuning synchronises the device, so it must happen outside CUDA-graph capture: run each shape once
before capturing. A key first seen during capture takes the first candidate, untimed, and is
tuned on its next eager call.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, TypeVar

import torch
import triton

from turbo_kernels.accuracy import cosine_similarity
from turbo_kernels.dispatch import interpreting

ConfigT = TypeVar("ConfigT", bound=Hashable)

_TUNED: dict[tuple, object] = {}
_LAST: dict[str, object] = {}
_LOG: dict[tuple, dict] = {}


def autotune_enabled() -> bool:
    return os.environ.get("TURBO_KERNELS_AUTOTUNE", "1") != "0" and not interpreting()


def length_bucket(length: int) -> int:
    """Autotune key for a sequence length: the next power of two."""
    return 1 << max(0, (length - 1).bit_length())


def _describe(config: object) -> str:
    describe = getattr(config, "describe", None)
    return describe() if callable(describe) else str(config)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def pick_config(
    key: tuple,
    candidates: list[ConfigT] | Callable[[], list[ConfigT]],
    run: Callable[[ConfigT], object],
    *,
    accept: Callable[[ConfigT, object, object], str | None] | None = None,
) -> ConfigT:
    """Fastest of ``candidates`` for ``key``, timed once per process with triton.testing.do_bench.

    ``candidates`` may be a function building the list, called only when ``key`` is not tuned yet
    (so a tuned call spends no host time on it).

    ``run(config)`` is the whole launch, must be idempotent and returns the output. ``accept(config,
    output, reference_output)`` returns None to admit a candidate or the reason to reject it; the
    reference is candidates[0]'s output, and candidates[0] itself is always admitted. A candidate
    that fails to compile or runs out of resources is skipped.
    """
    if key in _TUNED:
        _LAST[key[0]] = _TUNED[key]
        return _TUNED[key]  # type: ignore[return-value]
    if callable(candidates):
        candidates = candidates()
    if _capturing():
        _LOG[key] = {"chosen": _describe(candidates[0]), "reason": "first seen during CUDA-graph capture: untimed"}
        _LAST[key[0]] = candidates[0]
        return candidates[0]
    record: dict = {"candidates": [_describe(c) for c in candidates], "timings_ms": {}, "rejected": {}}
    if len(candidates) == 1 or not autotune_enabled():
        best = candidates[0]
        record["reason"] = "single candidate" if len(candidates) == 1 else "autotune off: first candidate"
    else:
        reference = None
        timings: dict[ConfigT, float] = {}
        for i, cand in enumerate(candidates):
            try:
                out = run(cand)
                if i == 0:
                    reference = out
                elif accept is not None and reference is not None:
                    reason = accept(cand, out, reference)
                    if reason is not None:
                        record["rejected"][_describe(cand)] = reason
                        continue
                timings[cand] = triton.testing.do_bench(lambda: run(cand), warmup=5, rep=20)
                record["timings_ms"][_describe(cand)] = round(timings[cand], 4)
            except Exception as error:  # noqa: BLE001 - a config that does not compile is not a candidate
                record["rejected"][_describe(cand)] = f"{type(error).__name__}: {str(error)[:160]}"
                continue
        if not timings:
            raise RuntimeError(f"no candidate config ran for {key}: {record['rejected']}")
        best = min(timings, key=timings.get)
        record["reason"] = "fastest admitted candidate"
    record["chosen"] = _describe(best)
    _LOG[key] = record
    _TUNED[key] = best
    _LAST[key[0]] = best
    return best


EXACT_MIN_COSINE = 0.9999
"""Candidates that compute the same thing in another order (tiles, stages, TMA) must agree with
the first candidate this closely; anything less is a miscompile, not a config."""


def close_to_reference(
    min_cosine: Callable[[ConfigT], float] = lambda cfg: EXACT_MIN_COSINE,
    output: Callable[[object], torch.Tensor] = lambda out: out,
) -> Callable[[ConfigT, object, object], str | None]:
    """An ``accept`` for pick_config: the candidate's output (``output`` picks the tensor out of
    run()'s result) must keep cosine >= min_cosine(config) to the first candidate's."""

    def accept(cfg: ConfigT, out: object, reference: object) -> str | None:
        cos = cosine_similarity(output(out), output(reference))
        need = min_cosine(cfg)
        return None if cos >= need else f"cosine {cos:.6f} to the first candidate's output < {need}"

    return accept


def tuned_configs() -> dict[tuple, object]:
    """What the autotuner chose so far (the benchmarks record it)."""
    return dict(_TUNED)


def tuning_log() -> dict[tuple, dict]:
    """Per key: candidates, their times (ms), rejections with reasons, the choice and why."""
    return {k: dict(v) for k, v in _LOG.items()}


def last_config(kind: str) -> object | None:
    """The config the latest autotuned call of ``kind`` (its key's first entry) ran with."""
    return _LAST.get(kind)
