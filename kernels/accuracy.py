"""Kernel-level accuracy metrics (SageAttention/SpargeAttn's precision_metric), in fp32."""

from __future__ import annotations

import torch


def cosine_similarity(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine of the two outputs flattened."""
    a, b = out.detach().double().flatten(), ref.detach().double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def relative_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    """sum |out - ref| / sum |ref|."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30))


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """The metrics the benchmarks and tests report."""
    return {"cosine": cosine_similarity(out, ref), "rel_l1": relative_l1(out, ref)}
