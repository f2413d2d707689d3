"""Top-k block-sparse attention: exact softmax over the key blocks a LUT names, nothing else.

The kernel is `turbo_kernels.flash._flash_fwd` walking the LUT (the dense kernel's inner loop with
the block index read from the table). With every block in the LUT it performs the dense kernel's
exact sequence of operations, so topk = 1.0 reproduces dense attention bit for bit.
"""

from __future__ import annotations

import math

import torch
import triton

from turbo_kernels.autotune import close_to_reference, length_bucket, pick_config
from turbo_kernels.dispatch import use_triton
from turbo_kernels.flash import FlashConfig, check_qkv, launch_flash, with_tma_twins
from turbo_kernels.tma import tma_candidates_allowed

SPARSE_CONFIGS: dict[tuple[int, int], list[FlashConfig]] = {
    (128, 64): [FlashConfig(128, 64, 8, 3), FlashConfig(128, 64, 8, 5), FlashConfig(128, 128, 8, 3),
                FlashConfig(128, 64, 8, 3, maxnreg=128)],
    (64, 128): [FlashConfig(64, 128, 4, 3), FlashConfig(64, 128, 4, 5), FlashConfig(64, 128, 4, 3, maxnreg=168)],
}
"""Autotune candidates per LUT geometry (blkq, blkk). block_n is blkk, or 2 * blkk to walk two
LUT blocks per step (128-wide MMAs for the 64-key LUT; what made dense 128x128 the fastest dense
config on the H200). The LUT read takes one pipeline stage of its own, so num_stages 3
prefetches K/V one block ahead and 5 two blocks ahead (4 and 6 compile to the same schedules on
sm90: see bench/compile_check.py). The register caps fit two 8-warp CTAs (128x64, 98 KB of
shared memory at 3 stages) or three 4-warp ones (64x128; Sage's SLA epilogue otherwise takes 244
registers) on an SM. 64x128 with 8 warps lost every H200 comparison and is gone.
On Hopper `sparse_candidates` adds the TMA twin of every one-block config."""


def check_lut(lut: torch.Tensor, q: torch.Tensor, blkq: int, blkk: int) -> None:
    B, L, H, _ = q.shape
    rows, nk = triton.cdiv(L, blkq), triton.cdiv(L, blkk)
    if lut.dim() != 4 or tuple(lut.shape[:3]) != (B, H, rows) or not 1 <= lut.shape[3] <= nk:
        raise ValueError(f"LUT must be (B, H, {rows}, 1..{nk}) for L={L}, blocks {blkq}x{blkk}; got {tuple(lut.shape)}")


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    blkq: int,
    blkk: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact masked attention in fp32 over the LUT's key blocks; q's dtype out.

    Gathers each query block's selected K/V blocks (one head at a time), so memory stays at the
    sparse size even at Wan lengths.
    """
    B, L, H, D = q.shape
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(D)
    mq, nk, topk = triton.cdiv(L, blkq), triton.cdiv(L, blkk), lut.shape[-1]
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, mq * blkq - L)).view(B, mq, blkq, H, D)
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, nk * blkk - L)).view(B, nk, blkk, H, D)
    vp = torch.nn.functional.pad(v.float(), (0, 0, 0, 0, 0, nk * blkk - L)).view(B, nk, blkk, H, D)
    key_valid = (torch.arange(nk * blkk, device=q.device) < L).view(nk, blkk)
    out = torch.empty(B, mq, blkq, H, D, device=q.device, dtype=torch.float32)
    for b in range(B):
        for h in range(H):
            idx = lut[b, h].long()
            kg = kp[b, :, :, h][idx].reshape(mq, topk * blkk, D)
            vg = vp[b, :, :, h][idx].reshape(mq, topk * blkk, D)
            scores = (qp[b, :, :, h] @ kg.transpose(1, 2)) * sm_scale
            scores = scores.masked_fill(~key_valid[idx].reshape(mq, 1, topk * blkk), float("-inf"))
            out[b, :, :, h] = torch.softmax(scores, dim=-1) @ vg
    return out.view(B, mq * blkq, H, D)[:, :L].to(q.dtype)


def sparse_configs(blkq: int, blkk: int) -> list[FlashConfig]:
    try:
        return SPARSE_CONFIGS[(blkq, blkk)]
    except KeyError:
        raise ValueError(f"block geometry {(blkq, blkk)} not supported; valid: {list(SPARSE_CONFIGS)}") from None


def sparse_candidates(blkq: int, blkk: int, *tensors: torch.Tensor) -> list[FlashConfig]:
    """Autotune candidates for these operands: SPARSE_CONFIGS, plus TMA twins on Hopper."""
    return with_tma_twins(sparse_configs(blkq, blkk), tma_candidates_allowed(*tensors), blkk)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: torch.Tensor,
    *,
    blkq: int = 128,
    blkk: int = 64,
    scale: float | None = None,
    config: FlashConfig | None = None,
) -> torch.Tensor:
    """Softmax attention restricted to the LUT's blocks; (B, L, H, D) in and out.

    lut: int32 (B, H, ceil(L/blkq), topk), ascending (from `turbo_kernels.block_mask`).
    ``config`` (block_n blkk or 2 * blkk, block_m dividing blkq) skips the autotuner.
    """
    check_qkv(q, k, v)
    check_lut(lut, q, blkq, blkk)
    if not use_triton(q, k, v, lut):
        return block_sparse_attention_ref(q, k, v, lut, blkq, blkk, scale)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])

    def run(cfg: FlashConfig) -> torch.Tensor:
        return launch_flash(q, k, v, cfg, sm_scale=sm_scale, lut=lut, lut_block_m=blkq, lut_block_n=blkk)

    if config is None:
        key = ("sparse", blkq, blkk, length_bucket(q.shape[1]), q.shape[-1], q.dtype, q.device.type)
        config = pick_config(key, lambda: sparse_candidates(blkq, blkk, q, k, v), run, accept=close_to_reference())
    if config.block_n not in (blkk, 2 * blkk):
        raise ValueError(f"config block_n {config.block_n} must be the LUT's key block {blkk} or twice it")
    return run(config)
