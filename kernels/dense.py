"""Dense flash attention in Triton: the fallback and the dense bar we control.

The kernel is `turbo_kernels.flash._flash_fwd` with ``DENSE=True``: Q tile resident, online softmax
in exp2 with fp32 statistics, only the ragged last key block masked, (B, L, H, D) through strides.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from turbo_kernels.autotune import close_to_reference, length_bucket, pick_config
from turbo_kernels.dispatch import use_triton
from turbo_kernels.flash import FlashConfig, check_qkv, launch_flash, with_tma_twins
from turbo_kernels.tma import tma_candidates_allowed

DENSE_CONFIGS = [
    FlashConfig(128, 128, num_warps=8, num_stages=3),
    FlashConfig(128, 64, num_warps=8, num_stages=3),
    FlashConfig(64, 128, num_warps=4, num_stages=3),
]
"""Autotune candidates (Hopper hd128 practice: 128-row tiles on two warpgroups, one 64-row
one-warpgroup tile); each is compiled once per (length bucket, head_dim, dtype). 128x128 won at
both Wan lengths on the H200 (128x64 with 4 stages never did and is gone); on Hopper each also
gets a TMA twin (`with_tma_twins`)."""


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Exact softmax attention in fp32; (B, L, H, D) in, q's dtype out."""
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), scale=scale
    )
    return out.transpose(1, 2).to(q.dtype)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    config: FlashConfig | None = None,
) -> torch.Tensor:
    """Dense softmax attention, (B, L, H, D) in and out; ``config`` skips the autotuner."""
    check_qkv(q, k, v)
    if not use_triton(q, k, v):
        return attention_ref(q, k, v, scale)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])

    def run(cfg: FlashConfig) -> torch.Tensor:
        return launch_flash(q, k, v, cfg, sm_scale=sm_scale)

    if config is None:
        key = ("dense", length_bucket(q.shape[1]), q.shape[-1], q.dtype, q.device.type)
        config = pick_config(key, lambda: with_tma_twins(DENSE_CONFIGS, tma_candidates_allowed(q, k, v)), run,
                             accept=close_to_reference())
    return run(config)
