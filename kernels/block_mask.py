"""SLA's block mask: which key blocks each query block attends to exactly.

Recipe (thu-ml/SLA ``get_block_map``): mean-pool Q per query block of ``blkq`` tokens and
(K minus its token mean) per key block of ``blkk`` tokens (a ragged last block is divided by its
true length), score = pooled_q @ pooled_k^T, keep the top ``max(1, int(topk * key_blocks))`` key
blocks of every query block. The LUT is int32 (B, H, query blocks, kept), sorted ascending.

Mean-pooling is linear, so pool(K - mean(K)) = pool(K) - mean(K): one pass over K produces the
block sums, and the mean falls out of them. The same passes carry the work that also has to read
Q/K/V once: Sage's INT8 quantisation of Q (`pool_queries`) and SLA's linear-branch reductions
S = phi(K)^T V, z = sum phi(k) plus the FP8 V range (`pool_keys`), so sparse attention pays one
read of Q, K and V before its main kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from turbo_kernels.dispatch import use_triton

GEOMETRIES = ((128, 64), (64, 128))
"""(blkq, blkk) pairs: SLA/Sparge's 128x64 and SageAttention's Hopper 64x128."""


@triton.jit
def round_half_away(x):
    """Round to nearest, ties away from zero (SageAttention's int8 rounding)."""
    return tl.where(x >= 0, tl.floor(x + 0.5), tl.ceil(x - 0.5))


@triton.jit(do_not_specialize=["H", "L"])
def _pool_queries_kernel(Q, Pooled, QInt8, QScale,  #
                         stride_qb, stride_ql, stride_qh,  #
                         H, L, quant_scale,  #
                         BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, QUANTIZE: tl.constexpr):
    """Mean of one query block; QUANTIZE: also int8 of (q * quant_scale) with one block scale."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    base = Q + (pid_bh // H).to(tl.int64) * stride_qb + (pid_bh % H).to(tl.int64) * stride_qh
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = rows[:, None] < L
    x = tl.load(base + rows.to(tl.int64)[:, None] * stride_ql + offs_d[None, :], mask=valid, other=0.0)
    x = x.to(tl.float32)
    count = tl.minimum(L - pid * BLOCK, BLOCK).to(tl.float32)
    tl.store(Pooled + (pid_bh * tl.num_programs(0) + pid) * HEAD_DIM + offs_d, tl.sum(x, 0) / count)
    if QUANTIZE:
        x = x * quant_scale
        scale = tl.maximum(tl.max(tl.abs(x)) / 127.0, 1e-20)
        xq = round_half_away(x / scale).to(tl.int8)
        tl.store(QInt8 + (pid_bh.to(tl.int64) * L + rows[:, None]) * HEAD_DIM + offs_d[None, :], xq, mask=valid)
        tl.store(QScale + pid_bh * tl.num_programs(0) + pid, scale)


@triton.jit(do_not_specialize=["H", "L", "num_blocks", "blocks_per_program"])
def _pool_keys_kernel(K, V, BlockSum, SPart, ZPart, VAmaxPart, PhiK,  #
                      stride_kb, stride_kl, stride_kh,  #
                      stride_vb, stride_vl, stride_vh,  #
                      H, L, num_blocks, blocks_per_program,  #
                      BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, LINEAR: tl.constexpr,  #
                      PHI_OUT: tl.constexpr, V_AMAX: tl.constexpr):
    """Sums of a run of key blocks; LINEAR: partial phi(K)^T V and sum phi(k) over the run;
    PHI_OUT: also store phi(K); V_AMAX: partial per-channel max |v|."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    offs_r = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    acc_s = tl.zeros([HEAD_DIM, HEAD_DIM], dtype=tl.float32)
    acc_z = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_amax = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for j in tl.range(0, blocks_per_program):
        blk = split * blocks_per_program + j
        rows = blk * BLOCK + offs_r
        valid = rows[:, None] < L
        k = tl.load(k_base + rows.to(tl.int64)[:, None] * stride_kl + offs_d[None, :], mask=valid, other=0.0)
        kf = k.to(tl.float32)
        tl.store(BlockSum + (pid_bh * num_blocks + blk) * HEAD_DIM + offs_d, tl.sum(kf, 0), mask=blk < num_blocks)
        if LINEAR or V_AMAX:
            v = tl.load(v_base + rows.to(tl.int64)[:, None] * stride_vl + offs_d[None, :], mask=valid, other=0.0)
            if V_AMAX:
                v_amax = tl.maximum(v_amax, tl.max(tl.abs(v.to(tl.float32)), 0))
            if LINEAR:
                e = tl.math.exp2((kf - tl.max(kf, 1)[:, None]) * 1.4426950408889634)
                phi = tl.where(valid, e / tl.sum(e, 1)[:, None], 0.0)
                acc_z += tl.sum(phi, 0)
                phi = phi.to(v.dtype)
                acc_s = tl.dot(tl.trans(phi), v, acc_s)
                if PHI_OUT:
                    tl.store(PhiK + (pid_bh.to(tl.int64) * L + rows[:, None]) * HEAD_DIM + offs_d[None, :], phi,
                             mask=valid)
    part = pid_bh * tl.num_programs(0) + split
    if LINEAR:
        tl.store(SPart + part.to(tl.int64) * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :], acc_s)
        tl.store(ZPart + part * HEAD_DIM + offs_d, acc_z)
    if V_AMAX:
        tl.store(VAmaxPart + part * HEAD_DIM + offs_d, v_amax)


@dataclass
class QueryPass:
    pooled: torch.Tensor
    """(B, H, query blocks, D) fp32 block means."""
    q_int8: torch.Tensor | None = None
    """(B, H, L, D) int8 of q * quant_scale (Sage), else None."""
    q_scale: torch.Tensor | None = None
    """(B, H, query blocks) fp32 dequantisation scales."""


@dataclass
class KeyPass:
    pooled: torch.Tensor
    """(B, H, key blocks, D) fp32 means of K - mean(K)."""
    mean: torch.Tensor
    """(B, H, D) fp32 token mean of K (Sage's smoothing vector)."""
    kv_state: torch.Tensor | None = None
    """(B, H, D, D) mean over tokens of phi(k)^T v, in v's dtype (SLA's linear branch)."""
    k_state: torch.Tensor | None = None
    """(B, H, D) fp32 mean over tokens of phi(k)."""
    phi_k: torch.Tensor | None = None
    """(B, H, L, D) phi(K) in v's dtype (only for SLA's paper variant)."""
    v_amax: torch.Tensor | None = None
    """(B, H, D) fp32 per-channel max |v| (FP8 V scale)."""


def _block_lengths(length: int, block: int, device: torch.device) -> torch.Tensor:
    """Tokens in each block; the last one is ragged."""
    starts = torch.arange(0, length, block, device=device)
    return (length - starts).clamp(max=block).float()


def _programs_per_head(batch_heads: int, num_blocks: int, device: torch.device) -> int:
    """Split each head's key blocks so the key pass fills the GPU about twice over."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(num_blocks, triton.cdiv(2 * sms, batch_heads)))


def pool_queries(q: torch.Tensor, block: int, quant_scale: float | None = None) -> QueryPass:
    """Triton pass over Q: block means, and with ``quant_scale`` Sage's int8 Q (scale folded in)."""
    B, L, H, D = q.shape
    nb = triton.cdiv(L, block)
    pooled = torch.empty(B, H, nb, D, device=q.device, dtype=torch.float32)
    quantize = quant_scale is not None
    q_int8 = torch.empty(B, H, L, D, device=q.device, dtype=torch.int8) if quantize else None
    q_scale = torch.empty(B, H, nb, device=q.device, dtype=torch.float32) if quantize else None
    _pool_queries_kernel[(nb, B * H)](
        q, pooled, q_int8 if quantize else pooled, q_scale if quantize else pooled,  #
        q.stride(0), q.stride(1), q.stride(2), H, L, quant_scale or 1.0,  #
        BLOCK=block, HEAD_DIM=D, QUANTIZE=quantize, num_warps=4 if block * D <= 64 * 128 else 8,
    )
    return QueryPass(pooled, q_int8, q_scale)


def pool_keys(
    k: torch.Tensor,
    block: int,
    v: torch.Tensor | None = None,
    *,
    linear: bool = False,
    phi_out: bool = False,
    v_amax: bool = False,
) -> KeyPass:
    """Triton pass over K (and V when asked): smoothed block means, K's token mean, and the
    optional SLA linear state / phi(K) / V channel range."""
    B, L, H, D = k.shape
    if (linear or v_amax) and v is None:
        raise ValueError("pool_keys needs v for the linear state or the V range")
    v = k if v is None else v
    nb = triton.cdiv(L, block)
    splits = _programs_per_head(B * H, nb, k.device)
    per_program = triton.cdiv(nb, splits)
    splits = triton.cdiv(nb, per_program)
    dev = k.device
    block_sum = torch.empty(B, H, nb, D, device=dev, dtype=torch.float32)
    s_part = torch.empty(B * H, splits, D, D, device=dev, dtype=torch.float32) if linear else block_sum
    z_part = torch.empty(B * H, splits, D, device=dev, dtype=torch.float32) if linear else block_sum
    amax_part = torch.empty(B * H, splits, D, device=dev, dtype=torch.float32) if v_amax else block_sum
    phi_k = torch.empty(B, H, L, D, device=dev, dtype=v.dtype) if linear and phi_out else None
    _pool_keys_kernel[(splits, B * H)](
        k, v, block_sum, s_part, z_part, amax_part, phi_k if phi_k is not None else block_sum,  #
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),  #
        H, L, nb, per_program,  #
        BLOCK=block, HEAD_DIM=D, LINEAR=linear, PHI_OUT=phi_k is not None, V_AMAX=v_amax,  #
        num_warps=8 if linear and D == 128 else 4,
    )
    mean = block_sum.sum(2) / L
    pooled = block_sum / _block_lengths(L, block, dev)[:, None] - mean[:, :, None, :]
    result = KeyPass(pooled, mean, phi_k=phi_k)
    if linear:
        result.kv_state = (s_part.sum(1) / L).view(B, H, D, D).to(v.dtype)
        result.k_state = (z_part.sum(1) / L).view(B, H, D)
    if v_amax:
        result.v_amax = amax_part.amax(1).view(B, H, D)
    return result


def kept_blocks(topk: float, num_key_blocks: int) -> int:
    """Key blocks each query block keeps: max(1, int(topk * num_key_blocks))."""
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    return min(num_key_blocks, max(1, int(topk * num_key_blocks)))


def select_blocks(pooled_q: torch.Tensor, pooled_k: torch.Tensor, topk: float) -> torch.Tensor:
    """Top key blocks per query block from pooled (B, H, blocks, D) tensors: int32 LUT, ascending."""
    score = pooled_q @ pooled_k.transpose(-1, -2)
    kept = kept_blocks(topk, pooled_k.shape[-2])
    idx = torch.topk(score, kept, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values.to(torch.int32).contiguous()


def _pool_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, L, H, D) -> (B, H, blocks, D) fp32 block means (ragged last block by its length)."""
    B, L, H, D = x.shape
    nb = triton.cdiv(L, block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, nb * block - L))
    sums = padded.view(B, nb, block, H, D).sum(2).permute(0, 2, 1, 3)
    return sums / _block_lengths(L, block, x.device)[:, None]


def build_block_mask_ref(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = 128, blkk: int = 64) -> torch.Tensor:
    """PyTorch reference of `build_block_mask`."""
    k_mean = k.float().mean(1, keepdim=True)
    return select_blocks(_pool_ref(q, blkq), _pool_ref(k.float() - k_mean, blkk), topk)


def build_block_mask(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = 128, blkk: int = 64) -> torch.Tensor:
    """int32 LUT (B, H, ceil(L / blkq), max(1, int(topk * ceil(L / blkk)))), sorted ascending."""
    if (blkq, blkk) not in GEOMETRIES:
        raise ValueError(f"block geometry {(blkq, blkk)} not supported; valid: {GEOMETRIES}")
    if not use_triton(q, k):
        return build_block_mask_ref(q, k, topk, blkq, blkk)
    return select_blocks(pool_queries(q, blkq).pooled, pool_keys(k, blkk).pooled, topk)
