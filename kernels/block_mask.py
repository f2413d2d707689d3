"""SLA's block mask: which key blocks each query block attends to exactly.

Recipe (thu-ml/SLA ``get_block_map``): mean-pool Q per query block of ``blkq`` tokens and
(K minus its token mean) per key block of ``blkk`` tokens (a ragged last block is divided by its
true length), score = pooled_q @ pooled_k^T, keep the top ``max(1, int(topk * key_blocks))`` key
blocks of every query block. The LUT is int32 (B, H, query blocks, kept), sorted ascending.

Mean-pooling is linear, so pool(K - mean(K)) = pool(K) - mean(K): one pass over K produces the
block sums, and the mean only shifts each score row by a constant (see `_block_scores_kernel`).
The same passes carry the work that also has to read Q/K/V once: Sage's INT8 quantisation of Q
(`pool_queries`) and SLA's linear branch, phi(K) and z = sum phi(k), plus the FP8 V range
(`pool_keys`, whose per-program partials one small launch reduces; S = phi(K)^T V is then one
cuBLAS GEMM), so sparse attention pays about one read of Q, K and V before its main kernel.

The selection runs on the GPU in two launches, a tf32x3 score GEMM and a radix select that
writes the sorted LUT; nothing in the mask waits on the host, so it can be CUDA-graph captured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from turbo_kernels.convert import int8_scale, quantize_values
from turbo_kernels.dispatch import use_triton

GEOMETRIES = ((128, 64), (64, 128))
"""(blkq, blkk) pairs: SLA/Sparge's 128x64 and SageAttention's Hopper 64x128."""


SAGE_MIN_SCALE = tl.constexpr(1e-20)
"""Floor of Sage's per-block int8 scale (`turbo_kernels.convert.int8_scale`)."""


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
        scale = int8_scale(tl.max(tl.abs(x)), SAGE_MIN_SCALE)
        xq = quantize_values(x, scale)
        tl.store(QInt8 + (pid_bh.to(tl.int64) * L + rows[:, None]) * HEAD_DIM + offs_d[None, :], xq, mask=valid)
        tl.store(QScale + pid_bh * tl.num_programs(0) + pid, scale)


@triton.jit
def _load_rows_tile(base, rows, stride, offs_d, L):
    """Rows ``rows`` (all columns offs_d) of a row-strided matrix; rows at or past L read as zero.
    (flash's `_load_rows` builds the same tile from a start row; in the key pass that layout took
    146-242 registers on sm90 against 99-190 here, bench/compile_check.py.)"""
    return tl.load(base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :], mask=rows[:, None] < L, other=0.0)


@triton.jit(do_not_specialize=["H", "L", "num_blocks", "blocks_per_program"])
def _pool_keys_kernel(K, V, BlockSum, KSumPart, ZPart, VAmaxPart, PhiK,  #
                      stride_kb, stride_kl, stride_kh,  #
                      stride_vb, stride_vl, stride_vh,  #
                      H, L, num_blocks, blocks_per_program,  #
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, LINEAR: tl.constexpr,  #
                      V_AMAX: tl.constexpr):
    """Sums of a run of key blocks (and their total, for K's mean); LINEAR: phi(K) stored (B, H, L, D)
    for the S = phi(K)^T V GEMM, and sum phi(k) over the run; V_AMAX: partial per-channel max |v|.

    The run is walked ROWS tokens at a time with the next tile's loads issued before the current
    one is reduced (register double buffering: Triton's pipeliner only stages loads that feed a dot).
    """
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    splits = tl.num_programs(0)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    TILES_PER_BLOCK: tl.constexpr = BLOCK // ROWS
    acc_k = tl.zeros([HEAD_DIM], dtype=tl.float32)
    acc_z = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_amax = tl.zeros([HEAD_DIM], dtype=tl.float32)
    block_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    first = split * blocks_per_program * BLOCK
    k_next = _load_rows_tile(k_base, first + offs_r, stride_kl, offs_d, L)
    if V_AMAX:
        v_next = _load_rows_tile(v_base, first + offs_r, stride_vl, offs_d, L)
    for t in tl.range(0, blocks_per_program * TILES_PER_BLOCK):
        rows = first + t * ROWS + offs_r
        k = k_next
        k_next = _load_rows_tile(k_base, rows + ROWS, stride_kl, offs_d, L)
        if V_AMAX:
            v = v_next
            v_next = _load_rows_tile(v_base, rows + ROWS, stride_vl, offs_d, L)
            v_amax = tl.maximum(v_amax, tl.max(tl.abs(v.to(tl.float32)), 0))
        kf = k.to(tl.float32)
        block_sum += tl.sum(kf, 0)
        if LINEAR:
            valid = rows[:, None] < L
            e = tl.math.exp2((kf - tl.max(kf, 1)[:, None]) * 1.4426950408889634)
            phi = tl.where(valid, e * (1.0 / tl.sum(e, 1))[:, None], 0.0)
            acc_z += tl.sum(phi, 0)
            tl.store(PhiK + (pid_bh.to(tl.int64) * L + rows[:, None]) * HEAD_DIM + offs_d[None, :],
                     phi.to(PhiK.dtype.element_ty), mask=valid)
        if t % TILES_PER_BLOCK == TILES_PER_BLOCK - 1:
            blk = split * blocks_per_program + t // TILES_PER_BLOCK
            tl.store(BlockSum + (pid_bh * num_blocks + blk) * HEAD_DIM + offs_d, block_sum, mask=blk < num_blocks)
            acc_k += block_sum
            block_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    part = pid_bh * splits + split
    tl.store(KSumPart + part * HEAD_DIM + offs_d, acc_k)
    if LINEAR:
        tl.store(ZPart + part * HEAD_DIM + offs_d, acc_z)
    if V_AMAX:
        tl.store(VAmaxPart + part * HEAD_DIM + offs_d, v_amax)


@triton.jit(do_not_specialize=["splits", "inv_len"])
def _finalize_keys_kernel(KSumPart, ZPart, VAmaxPart, KMean, KState, VScale, KVState, FoldW,  #
                          splits, inv_len,  #
                          HEAD_DIM: tl.constexpr, LINEAR: tl.constexpr, V_AMAX: tl.constexpr, FOLD: tl.constexpr):
    """Reduce `_pool_keys_kernel`'s per-program partials of one head: K's token mean, SLA's z / L,
    the FP8 V scale max|v| / 448. FOLD: S <- S W^T in place (proj_l folded into the state)."""
    pid_bh = tl.program_id(0)
    offs_d = tl.arange(0, HEAD_DIM)
    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    z_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_amax = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s in tl.range(0, splits):
        part = (pid_bh * splits + s) * HEAD_DIM + offs_d
        k_sum += tl.load(KSumPart + part)
        if LINEAR:
            z_sum += tl.load(ZPart + part)
        if V_AMAX:
            v_amax = tl.maximum(v_amax, tl.load(VAmaxPart + part))
    tl.store(KMean + pid_bh * HEAD_DIM + offs_d, k_sum * inv_len)
    if LINEAR:
        tl.store(KState + pid_bh * HEAD_DIM + offs_d, z_sum * inv_len)
    if V_AMAX:
        tl.store(VScale + pid_bh * HEAD_DIM + offs_d, tl.maximum(v_amax / 448.0, 1e-20))
    if FOLD:
        tile = pid_bh.to(tl.int64) * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :]
        state = tl.load(KVState + tile).to(tl.float32)
        weight = tl.load(FoldW + offs_d[:, None] * HEAD_DIM + offs_d[None, :]).to(tl.float32)
        folded = tl.dot(state, tl.trans(weight), input_precision="tf32x3")
        tl.store(KVState + tile, folded.to(KVState.dtype.element_ty))


@triton.jit(do_not_specialize=["L", "num_qblocks", "num_kblocks"])
def _block_scores_kernel(PooledQ, BlockSum, Score, L, num_qblocks, num_kblocks,  #
                         KEY_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,  #
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Score[bh, i, j] = pooled_q[i] . (mean of key block j - mean of key block 0).

    SLA subtracts K's token mean instead; any vector subtracted from every pooled key shifts a
    whole score row by one constant, so the top-k is the same, and block 0's mean removes the
    channel offsets common to all keys (what keeps fp32 scores well conditioned) without waiting
    for a reduction over the whole sequence. tf32x3 keeps fp32-level accuracy on tensor cores.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < num_qblocks
    col_ok = cols < num_kblocks
    pq = tl.load(PooledQ + (pid_bh * num_qblocks + rows[:, None]) * HEAD_DIM + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    sums = tl.load(BlockSum + (pid_bh * num_kblocks + cols[:, None]) * HEAD_DIM + offs_d[None, :],
                   mask=col_ok[:, None], other=0.0)
    length = tl.where(col_ok, tl.minimum(L - cols * KEY_BLOCK, KEY_BLOCK), 1).to(tl.float32)
    centre = tl.load(BlockSum + pid_bh * num_kblocks * HEAD_DIM + offs_d) / tl.minimum(L, KEY_BLOCK).to(tl.float32)
    pk = sums / length[:, None] - centre[None, :]
    score = tl.dot(pq, tl.trans(pk), input_precision="tf32x3")
    tl.store(Score + (pid_bh * num_qblocks + rows[:, None]).to(tl.int64) * num_kblocks + cols[None, :], score,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_kblocks", "kept"])
def _select_topk_kernel(Score, Lut, num_kblocks, kept, NK_PAD: tl.constexpr):
    """Top ``kept`` columns of one score row, written as ascending int32 column indices.

    Radix select on the order-preserving int32 image of the fp32 scores: up to 32 count passes
    find a threshold with exactly ``kept`` keys at or above it (or, with ties, the kept-th largest
    key; ties go to the lowest columns), and a prefix sum over the selection gives every chosen
    column its slot, so the row comes out sorted.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, NK_PAD)
    valid = cols < num_kblocks
    score = tl.load(Score + row * num_kblocks + cols, mask=valid, other=0.0)
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of key == float order
    key = tl.where(valid, key, -2147483648)  # padding sorts below every real score
    # Largest threshold t with count(key >= t) >= kept, built from the top bit down; once exactly
    # `kept` keys are >= t, the lower bits cannot change the selection and the loop stops
    # (typically after ~20 of the 32 bits; ties at the threshold run all of them).
    count = tl.sum((key >= 0).to(tl.int32), 0)
    take = count >= kept
    t = tl.where(take, 0, -2147483648)
    count = tl.where(take, count, num_kblocks)
    bit = 30
    while (bit >= 0) & (count > kept):
        cand = t | (1 << bit)
        cand_count = tl.sum((key >= cand).to(tl.int32), 0)
        take = cand_count >= kept
        t = tl.where(take, cand, t)
        count = tl.where(take, cand_count, count)
        bit -= 1
    above = key > t
    tie = (key == t) & valid
    need = kept - tl.sum(above.to(tl.int32), 0)
    chosen = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(Lut + row * kept + slot, cols, mask=chosen)


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
    block_sum: torch.Tensor
    """(B, H, key blocks, D) fp32 sums of K per block."""
    block: int
    tokens: int
    """L: the sequence length the sums cover."""
    mean: torch.Tensor | None = None
    """(B, H, D) fp32 token mean of K (Sage's smoothing vector), when asked for."""
    kv_state: torch.Tensor | None = None
    """(B, H, D, D) mean over tokens of phi(k)^T v, in v's dtype (SLA's linear branch); times W^T
    when `folded`."""
    folded: bool = False
    """pool_keys got fold_weight W: kv_state is S W^T / L."""
    k_state: torch.Tensor | None = None
    """(B, H, D) fp32 mean over tokens of phi(k)."""
    phi_k: torch.Tensor | None = None
    """(B, H, L, D) phi(K) in v's dtype (only for SLA's paper variant)."""
    v_scale: torch.Tensor | None = None
    """(B, H, D) fp32 per-channel FP8 scale of V: max |v| / 448."""

    @property
    def pooled(self) -> torch.Tensor:
        """(B, H, key blocks, D) fp32 means of K - mean(K), SLA's pooled keys (torch ops: for the
        reference selection and tests; the Triton selection reads block_sum directly)."""
        sums, L = self.block_sum, self.tokens
        mean = sums.sum(2) / L
        return sums / _block_lengths(L, self.block, sums.device)[:, None] - mean[:, :, None, :]


def _block_lengths(length: int, block: int, device: torch.device) -> torch.Tensor:
    """Tokens in each block; the last one is ragged."""
    starts = torch.arange(0, length, block, device=device)
    return (length - starts).clamp(max=block).float()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class KeyPassLaunch:
    """How `_pool_keys_kernel` is launched (benchmarks sweep it: bench/passes.py).

    Programs of one warp on 8-row tiles keep a program's reductions inside its warp: the column
    sums of a tile (block sums, sum phi) add in registers and one shuffle, phi's row softmax over
    head_dim in shuffles, with no shared memory or barrier. Whole key pass (kernel, S GEMM, reduce
    launch) on the H200, bench/results/passes_h200.json, against the previous 4-warp programs on
    64-row tiles at 16 programs per SM: 14B 720p mask-only 0.21 against 0.28 ms (reading K alone, a
    torch sum over L, took 0.20 ms), sla's 64-token pass with phi 0.81 against 1.08 ms, Sage's
    128-token pass with phi and the V range 0.97 against 1.44 ms; 1.3B 480p 0.034 / 0.20 / 0.19
    against 0.050 / 0.19 / 0.24 ms. At 720p 16-row tiles were 2-4% faster for the mask-only and
    Sage's passes and up to 10% slower for sla's; 32-row tiles, 2 and 4 warps were slower. Left open:
    at 480p sla's pass took 0.15 ms at 16 programs per SM (its reduce launch then sums a quarter of
    the partials) and Sage's 0.17 ms, but Sage's took 1.08 ms at 720p; per-shape splits are not
    measured in the whole ops yet."""

    num_warps: int = 1
    rows: int = 8
    """Tokens per load; the key block must be a multiple of it."""
    programs_per_sm: int = 64
    """Programs per SM the split of each head's key blocks aims for: short runs keep every SM
    streaming to the end."""


INTERPRETER_KEY_PASS = KeyPassLaunch(num_warps=4, rows=64, programs_per_sm=16)
"""The key pass's launch on the CPU when none is given. Triton's interpreter pays per loop
iteration: with the GPU's 8-row tiles the CPU test suite took 33 minutes against 20, and the
replica-kill test's retried 100-step sagesla job (tiny DiT) did not finish in 300 s, against 169 s
with this launch. Kernel tests pass `KeyPassLaunch()` to check the GPU's launch itself."""


def _programs_per_head(batch_heads: int, num_blocks: int, device: torch.device, launch: KeyPassLaunch) -> int:
    """Split each head's key blocks so the key pass runs launch.programs_per_sm programs per SM."""
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    return max(1, min(num_blocks, triton.cdiv(launch.programs_per_sm * sms, batch_heads)))


def pool_queries(q: torch.Tensor, block: int, quant_scale: float | None = None, *,
                 num_warps: int | None = None) -> QueryPass:
    """Triton pass over Q: block means, and with ``quant_scale`` Sage's int8 Q (scale folded in);
    on `pool_queries_warps` warps unless ``num_warps`` says otherwise (benchmarks sweep it)."""
    B, L, H, D = q.shape
    nb = triton.cdiv(L, block)
    pooled = torch.empty(B, H, nb, D, device=q.device, dtype=torch.float32)
    quantize = quant_scale is not None
    q_int8 = torch.empty(B, H, L, D, device=q.device, dtype=torch.int8) if quantize else None
    q_scale = torch.empty(B, H, nb, device=q.device, dtype=torch.float32) if quantize else None
    _pool_queries_kernel[(nb, B * H)](
        q, pooled, q_int8 if quantize else pooled, q_scale if quantize else pooled,  #
        q.stride(0), q.stride(1), q.stride(2), H, L, quant_scale or 1.0,  #
        BLOCK=block, HEAD_DIM=D, QUANTIZE=quantize, num_warps=num_warps or pool_queries_warps(block, D, quantize),
    )
    return QueryPass(pooled, q_int8, q_scale)


def pool_queries_warps(block: int, head_dim: int, quantize: bool) -> int:
    """Warps of a `_pool_queries_kernel` program. The block mean alone streams through one warp
    (its loads feed running sums, no tile stays live); Sage's int8 Q keeps the whole block live
    for its max: 128 values per thread. H200 (bench/results/passes_h200.json): the 128-token mean
    took 0.19 ms on one warp against 0.27 ms on 8 at 14B 720p (0.032 against 0.049 ms at 1.3B
    480p), the 64-token int8 pass 0.35 ms on 2 warps against 0.41 ms on 4 (0.053 against 0.059)."""
    return max(1, block * head_dim // (128 * 32)) if quantize else 1


def pool_keys(
    k: torch.Tensor,
    block: int,
    v: torch.Tensor | None = None,
    *,
    linear: bool = False,
    phi_out: bool = False,
    v_amax: bool = False,
    k_mean: bool = False,
    fold_weight: torch.Tensor | None = None,
    launch: KeyPassLaunch | None = None,
) -> KeyPass:
    """Triton pass over K (and V for its FP8 range): per-block sums, plus on request K's token mean,
    the SLA linear state, phi(K) and the FP8 V scale (one small reduce launch for these).

    The linear state S = phi(K)^T V is one cuBLAS GEMM per batch entry over the phi(K) the pass
    writes (it runs at about the H200's bandwidth, 0.4 ms at 14B 720p). A (D x D) += (D x 64) @
    (64 x D) product per tile inside the pass, so phi(K) never leaves the chip, never won there:
    1.9 ms against 1.2 ms for the pass plus the GEMM at first; the best later try (V^T phi
    pipelined two stages deep, (D, D) partials per program that the reduce launch sums) did not
    beat it either: 1.17-1.27 ms against 1.17-1.20 ms, and 1.66-1.69 against 1.52-1.54 ms on
    Sage's 128-token pass, all in one H200 run.
    fold_weight: a (D, D) Linear weight W (SLA's proj_l) the reduce launch folds into the state,
    kv_state = S W^T / L, so the attention epilogue multiplies once (no host-side ops for it).
    launch: the key pass's launch; None: `KeyPassLaunch()` on a GPU, INTERPRETER_KEY_PASS on the CPU.
    """
    B, L, H, D = k.shape
    launch = launch or (KeyPassLaunch() if k.is_cuda else INTERPRETER_KEY_PASS)
    if block % launch.rows:
        raise ValueError(f"the key block ({block}) must be a multiple of the key pass's rows ({launch.rows})")
    if (linear or v_amax) and v is None:
        raise ValueError("pool_keys needs v for the linear state or the V range")
    fold = fold_weight is not None
    if fold and (not linear or not fold_weight.is_contiguous() or tuple(fold_weight.shape) != (D, D)):
        raise ValueError(f"fold_weight must be a contiguous ({D}, {D}) weight, with linear=True")
    v = k if v is None else v
    nb = triton.cdiv(L, block)
    splits = _programs_per_head(B * H, nb, k.device, launch)
    per_program = triton.cdiv(nb, splits)
    splits = triton.cdiv(nb, per_program)
    dev = k.device
    block_sum = torch.empty(B, H, nb, D, device=dev, dtype=torch.float32)
    k_part = torch.empty(B * H, splits, D, device=dev, dtype=torch.float32)
    z_part = torch.empty(B * H, splits, D, device=dev, dtype=torch.float32) if linear else block_sum
    amax_part = torch.empty(B * H, splits, D, device=dev, dtype=torch.float32) if v_amax else block_sum
    phi_k = torch.empty(B, H, L, D, device=dev, dtype=v.dtype) if linear else None
    _pool_keys_kernel[(splits, B * H)](
        k, v, block_sum, k_part, z_part, amax_part, phi_k if linear else block_sum,  #
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),  #
        H, L, nb, per_program,  #
        BLOCK=block, ROWS=launch.rows, HEAD_DIM=D, LINEAR=linear, V_AMAX=v_amax, num_warps=launch.num_warps,
        num_stages=1,  # no dot to stage: the kernel double-buffers its loads itself
    )
    result = KeyPass(block_sum, block, L, phi_k=phi_k if phi_out else None, folded=fold)
    if not (linear or v_amax or k_mean):
        return result
    result.mean = torch.empty(B, H, D, device=dev, dtype=torch.float32)
    if linear:
        result.kv_state = torch.empty(B, H, D, D, device=dev, dtype=v.dtype)
        result.k_state = torch.empty(B, H, D, device=dev, dtype=torch.float32)
        for b in range(B):
            # (H, D, L) @ (H, L, D) with V read in place (row stride H * D), mean over the L tokens.
            result.kv_state[b].baddbmm_(phi_k[b].transpose(1, 2), v[b].transpose(0, 1), beta=0.0, alpha=1.0 / L)
    if v_amax:
        result.v_scale = torch.empty(B, H, D, device=dev, dtype=torch.float32)
    placeholder = result.mean
    _finalize_keys_kernel[(B * H,)](
        k_part, z_part, amax_part, result.mean, result.k_state if linear else placeholder,  #
        result.v_scale if v_amax else placeholder, result.kv_state if linear else placeholder,  #
        fold_weight if fold else placeholder, splits, 1.0 / L,  #
        HEAD_DIM=D, LINEAR=linear, V_AMAX=v_amax, FOLD=fold, num_warps=8 if fold else 4,
    )
    return result


def kept_blocks(topk: float, num_key_blocks: int) -> int:
    """Key blocks each query block keeps: max(1, int(topk * num_key_blocks))."""
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk must be in (0, 1], got {topk}")
    return min(num_key_blocks, max(1, int(topk * num_key_blocks)))


def select_blocks(pooled_q: torch.Tensor, pooled_k: torch.Tensor, topk: float) -> torch.Tensor:
    """Top key blocks per query block from pooled (B, H, blocks, D) tensors: int32 LUT, ascending
    (torch: the reference, and method "torch" of `select_blocks_from_passes`)."""
    score = pooled_q @ pooled_k.transpose(-1, -2)
    return select_topk_ref(score, kept_blocks(topk, pooled_k.shape[-2]))


def select_topk_ref(score: torch.Tensor, kept: int) -> torch.Tensor:
    """`select_topk` in torch: each row's ``kept`` largest columns, ascending int32."""
    idx = torch.topk(score, kept, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values.to(torch.int32).contiguous()


SCORE_TILE = 64
"""Query x key block tile of `_block_scores_kernel`."""


def block_scores(pooled_q: torch.Tensor, keys: KeyPass) -> torch.Tensor:
    """(B, H, query blocks, key blocks) fp32 block scores (`_block_scores_kernel`)."""
    B, H, nq, D = pooled_q.shape
    nk = keys.block_sum.shape[2]
    score = torch.empty(B, H, nq, nk, device=pooled_q.device, dtype=torch.float32)
    _block_scores_kernel[(triton.cdiv(nk, SCORE_TILE), triton.cdiv(nq, SCORE_TILE), B * H)](
        pooled_q, keys.block_sum, score, keys.tokens, nq, nk,  #
        KEY_BLOCK=keys.block, HEAD_DIM=D, BLOCK_M=SCORE_TILE, BLOCK_N=SCORE_TILE, num_warps=4,
    )
    return score


SELECT_WARPS = 2
"""`_select_topk_kernel` runs one score row per program, on 2 warps: each row stops its count
passes as soon as its own threshold is found, and a pass reduces over 64 threads. bench/attention.py
sweeps the warp count on real scores (select_launch in bench/results/attention_h200.json): 2 warps
was the fastest or within 3% of it at 14B 720p and at 1.3B 480p 64x128, 0.01 ms behind 8 warps at
480p 128x64. Against the previous launch (several rows per program on 4 warps, capped at 96
registers) the mask's select stage (score + select) went from 0.68 to 0.51-0.54 ms at 720p and
from 0.13 to 0.09 ms at 480p."""


def select_topk(score: torch.Tensor, kept: int, num_warps: int | None = None) -> torch.Tensor:
    """int32 (..., kept) ascending indices of each row's ``kept`` largest scores (`_select_topk_kernel`,
    on SELECT_WARPS warps unless ``num_warps`` says otherwise: benchmarks sweep it)."""
    *lead, nk = score.shape
    if not 1 <= kept <= nk:
        raise ValueError(f"kept must be in 1..{nk}, got {kept}")
    lut = torch.empty(*lead, kept, device=score.device, dtype=torch.int32)
    _select_topk_kernel[(score.numel() // nk,)](score, lut, nk, kept, NK_PAD=triton.next_power_of_2(nk),
                                                num_warps=num_warps or SELECT_WARPS)
    return lut


SELECT_METHODS = ("triton", "torch")
"""triton: score + radix-select kernels (two launches); torch: matmul, topk, sort, cast (the
first implementation, kept selectable)."""


def select_blocks_from_passes(queries: QueryPass, keys: KeyPass, topk: float, method: str = "triton") -> torch.Tensor:
    """The LUT from the two pooling passes, by ``method`` (see SELECT_METHODS)."""
    if method not in SELECT_METHODS:
        raise ValueError(f"select method must be one of {SELECT_METHODS}, got {method!r}")
    kept = kept_blocks(topk, keys.block_sum.shape[2])
    if method == "torch":
        return select_blocks(queries.pooled, keys.pooled, topk)
    return select_topk(block_scores(queries.pooled, keys), kept)


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


def build_block_mask(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = 128, blkk: int = 64,
                     *, method: str = "triton") -> torch.Tensor:
    """int32 LUT (B, H, ceil(L / blkq), max(1, int(topk * ceil(L / blkk)))), sorted ascending.

    Four launches on the default path: pool Q, pool K, score, select (no host sync)."""
    if (blkq, blkk) not in GEOMETRIES:
        raise ValueError(f"block geometry {(blkq, blkk)} not supported; valid: {GEOMETRIES}")
    if not use_triton(q, k):
        return build_block_mask_ref(q, k, topk, blkq, blkk)
    return select_blocks_from_passes(pool_queries(q, blkq), pool_keys(k, blkk), topk, method)
