"""Kernel-level accuracy metrics (SageAttention/SpargeAttn's precision_metric), in fp32."""

from __future__ import annotations

import torch


_CHUNK = 1 << 24
"""Elements per float64 slice: a 720p attention output (387M values) never doubles in memory."""


def cosine_similarity(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine of the two outputs flattened (accumulated in float64, slice by slice)."""
    a, b = out.detach().reshape(-1), ref.detach().reshape(-1)
    dot = aa = bb = 0.0
    for start in range(0, a.numel(), _CHUNK):
        x, y = a[start:start + _CHUNK].double(), b[start:start + _CHUNK].double()
        dot, aa, bb = dot + float(x @ y), aa + float(x @ x), bb + float(y @ y)
    return dot / max((aa * bb) ** 0.5, 1e-30)


def relative_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum |out - ref| / sum |ref|."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30))


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """The metrics the benchmarks and tests report."""
    return {"cosine": cosine_similarity(out, ref), "rel_l1": relative_l1(out, ref)}
