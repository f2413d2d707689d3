"""The flash-attention forward kernel that every Triton attention backend here launches.

One kernel, specialised at compile time, so dense, block-sparse, SLA and Sage attention share one
inner loop (and one place to tune it):

- ``DENSE``: walk every key block; otherwise walk the block LUT (B*H, query blocks, topk), int32,
  sorted ascending, so K/V reads move forward through memory and the ragged last key block, when
  selected, is always the LUT's last entry: the loop runs unmasked and only that block is masked.
- ``QK_INT8`` (Sage): Q and K arrive as int8 with one fp32 scale per block; Q already carries
  sm_scale*log2(e), so the int32 dot times q_scale*k_scale is the log2-domain logit. The int32
  tile becomes fp32 by an exact integer add, not I2F (`turbo_kernels.convert`): I2F runs at the
  MUFU rate on Hopper and would cost as much as the softmax's exp2.
- ``PV_FP8``: V arrives as float8 e4m3, pre-transposed to (B, H, D, L_pad) with one scale per
  channel (the Hopper FP8 MMA wants V K-major). Every block's P@V is a fresh ``tl.dot`` scaled
  into the fp32 accumulator (two-level accumulation: the FP8 MMA accumulator has only ~22 bits).
- ``LINEAR`` (SLA): the epilogue adds proj_l(phi(q) S / (phi(q) z)), with S = phi(K)^T V and
  z = sum phi(k) precomputed per head, phi = softmax over head_dim. ``LINEAR_UNSELECTED`` is the
  paper's variant: the loop also accumulates phi(q) phi(K_j)^T V_j of the selected blocks, which
  the epilogue subtracts, so the linear branch covers only the blocks the sparse branch skipped.
- ``USE_TMA``: Q/K/V/O (and SLA's state S) through Hopper TMA descriptors the host builds
  (`_tma_descriptors`), passed as kernel parameters, instead of pointers. Q is a 2-D (rows, columns)
  view so its tile stays in shared memory as the QK MMA's A operand (a 4-D Q tile is reshaped in
  registers, and the MMA reading Q from registers ran 1.8x slower at 720p under the 128-register
  cap); K, V and O are 4-D in their own layouts, so a ragged tile reads zeros and stores clip at L
  (2-D K/V views timed the same). Against descriptors built on the device by every program
  (`tl.make_tensor_descriptor`: ~400 SASS instructions and a tensormap fence per program), the
  whole ops under CUDA-graph replay ran 3.3-3.8% faster at 1.3B 480p and 0.6-1.9% at 14B 720p
  (bench/results/ab_tma_descriptors_h200.json, one call); eager sagesla at 480p, where launches
  are host-bound, ran 10% slower, and dense 128x128 at 720p 0.7% slower.
- ``PAIR``: BLOCK_N is two LUT key blocks: each step gathers the rows of two (not necessarily
  adjacent) LUT entries into one BLOCK_N-row tile, so a 64-key LUT runs 128-wide MMAs and half the
  softmax bookkeeping. An odd count or the ragged block makes one masked step at the end.

Inputs are (B, L, H, D) views with unit stride on D (Wan's native layout; no transposing copies).
Softmax runs in exp2 with fp32 statistics and accumulator; the grid is (query blocks, B*H), so
neighbouring programs share a head and its K/V stays in L2.

Tried on the H200 at 14B 720p and dropped (one probe run each): the loop is not limited by
MUFU.EX2, since computing a quarter, half or all of the exp2 by a polynomial on the FMA pipe ran
the block-sparse kernel at 0.96x, 0.92x and 0.85x; and fewer accumulator rescales did not pay,
neither rescaling only when a row max grows by more than 2**8 (a branch over the whole tile: 1.01x,
sla 0.98x, slower at 480p) nor one softmax step over two TMA-loaded LUT blocks (QK and PV one MMA
per block: 0.91x; it spills under the 128-register cap that puts two CTAs on an SM).
FlashAttention-3's in-warpgroup overlap (issue the next block's QK before this block's softmax) does
not survive compilation: Triton 3.6's wgmma pipeliner puts a full wait right after every dot whose
result a non-dot op reads inside the loop, so in the sm90 PTX of that loop each QK and PV MMA is
waited on at once and the softmax never runs under an MMA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from turbo_kernels.convert import MAGIC_BITS, MAGIC_F32
from turbo_kernels.tma import tma_mode, tma_ready

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class FlashConfig:
    """Launch parameters of `_flash_fwd`; sparse kernels take block_n from the LUT geometry."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    use_tma: bool = False
    pv_fp8: bool = False
    """Sage only: P@V in FP8 e4m3 (the op then also prepares V^T in FP8)."""
    maxnreg: int | None = None
    """CUDA register cap per thread: what puts two 8-warp (or three 4-warp) CTAs on an SM when
    ptxas would otherwise take more registers than the loop needs (no spills at these caps on
    sm90: bench/compile_check.py)."""

    def describe(self) -> str:
        tma = "+tma" if self.use_tma else ""
        fp8 = "+fp8pv" if self.pv_fp8 else ""
        regs = f"+r{self.maxnreg}" if self.maxnreg else ""
        return f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}{tma}{fp8}{regs}"


@triton.jit
def _load_rows(base, desc, row0, n_rows, stride_row, offs_r, offs_d, MASK: tl.constexpr, USE_TMA: tl.constexpr,
               batch=0, head=0, HEADS_FIRST: tl.constexpr = False):
    """Tile of rows row0 + offs_r (all columns offs_d); rows at or past n_rows read as zero.
    USE_TMA: ``desc`` is a 4-D (B, L, H, D) descriptor, (B, H, L, D) with HEADS_FIRST."""
    if USE_TMA:
        if HEADS_FIRST:
            tile = desc.load([batch, head, row0, 0])
        else:
            tile = desc.load([batch, row0, head, 0])
        tile = tile.reshape(offs_r.shape[0], offs_d.shape[0])
    else:
        ptrs = base + row0.to(tl.int64) * stride_row + offs_r[:, None] * stride_row + offs_d[None, :]
        if MASK:
            tile = tl.load(ptrs, mask=(row0 + offs_r)[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _gather_pair(base, kb, kb2, first, local, stride_row, offs_d, row_ok,
                 LUT_BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Rows of key blocks kb (where ``first``) and kb2 side by side, ``local`` the row inside its
    block: two 64-bit block bases picked per row, 32-bit offsets inside the block (the 64-bit
    multiply per row cost as many IMADs as the tile has rows per thread). MASK: rows with row_ok
    False read as zero."""
    block_base = tl.where(first, base + (kb * LUT_BLOCK_N).to(tl.int64) * stride_row,
                          base + (kb2 * LUT_BLOCK_N).to(tl.int64) * stride_row)
    ptrs = block_base[:, None] + (local * stride_row)[:, None] + offs_d[None, :]
    if MASK:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _softmax_rows(x):
    """Row softmax in fp32 (the SLA feature map phi, over head_dim)."""
    e = _exp_rows(x)
    return e * (1.0 / tl.sum(e, 1))[:, None]


@triton.jit
def _exp_rows(x):
    """exp(x - row max) in fp32: the unnormalised softmax numerator."""
    x = x.to(tl.float32)
    return tl.math.exp2((x - tl.max(x, 1)[:, None]) * 1.4426950408889634)


@triton.jit
def _attend_block(acc, l_i, m_i, lin_acc, lin_den, q, scale_q, phi_q,  #
                  k_base, desc_k, v_base, desc_v, KScale, phik_base,  #
                  kb, kb2, second_valid, L, stride_kl, stride_vl,  #
                  offs_n, offs_d, batch, head,  #
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, LUT_BLOCK_N: tl.constexpr, MASK: tl.constexpr,  #
                  QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, LINEAR_UNSELECTED: tl.constexpr,  #
                  USE_TMA: tl.constexpr, PAIR: tl.constexpr):
    """One online-softmax step over key block ``kb`` (PAIR: LUT blocks kb and kb2 side by side;
    ``second_valid`` False leaves kb2's half out). MASK: the step holds the ragged last block or
    an absent second half."""
    if PAIR:
        first = offs_n < LUT_BLOCK_N
        local = tl.where(first, offs_n, offs_n - LUT_BLOCK_N)
        rows = tl.where(first, kb * LUT_BLOCK_N, kb2 * LUT_BLOCK_N) + local
        col_ok = (rows < L) & (first | second_valid)
        k = _gather_pair(k_base, kb, kb2, first, local, stride_kl, offs_d, col_ok, LUT_BLOCK_N, MASK)
    else:
        start_n = kb * BLOCK_N
        rows = start_n + offs_n
        col_ok = rows < L
        k = _load_rows(k_base, desc_k, start_n, L, stride_kl, offs_n, offs_d, MASK, USE_TMA, batch, head, QK_INT8)
    qk = tl.dot(q, tl.trans(k))
    if QK_INT8:
        # |q.k| <= 256 * 127 * 127 < 2**22, so the int32 tile plus 1.5 * 2**23 is that float
        # exactly (no I2F, which runs at the EX2s' rate); the logit is (qk - 1.5 * 2**23) * scale,
        # and the constant's share goes into the per-row exponent offset (one FFMA per element).
        qk = (qk + MAGIC_BITS).to(tl.float32, bitcast=True)
        if PAIR:
            scale = scale_q * tl.where(first, tl.load(KScale + kb), tl.load(KScale + kb2))
        else:
            scale = scale_q * tl.load(KScale + kb)
        offset = -MAGIC_F32 * scale
    else:
        scale = scale_q
        offset = 0.0
    if MASK:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    if PAIR and QK_INT8:
        # One scale per column: scale the tile once, then it is the log2-domain logit.
        qk = qk * scale[None, :] + offset[None, :]
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * scale + offset)
        p = tl.math.exp2(qk * scale - (m_ij - offset)[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        # V^T tile (D, BLOCK_N); L_pad is a multiple of the key block and zero-padded, so never masked.
        if USE_TMA:
            vt = desc_v.load([batch, head, 0, kb * BLOCK_N]).reshape(HEAD_DIM, BLOCK_N)
        else:
            vt = tl.load(v_base + offs_d[:, None] * stride_vl + rows[None, :])
        # P (<= 1) times 448 uses e4m3's whole range; scaling the fresh dot back keeps Triton from
        # folding it into the fp32 accumulator (two-level accumulation).
        acc += tl.dot((p * 448.0).to(vt.dtype), tl.trans(vt)) * (1.0 / 448.0)
    else:
        if PAIR:
            v = _gather_pair(v_base, kb, kb2, first, local, stride_vl, offs_d, col_ok, LUT_BLOCK_N, MASK)
        else:
            v = _load_rows(v_base, desc_v, kb * BLOCK_N, L, stride_vl, offs_n, offs_d, MASK, USE_TMA, batch, head)
        acc = tl.dot(p.to(v.dtype), v, acc)
        if LINEAR_UNSELECTED:
            phik = tl.load(phik_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            a = tl.dot(phi_q, tl.trans(phik))
            lin_den += tl.sum(a, 1)
            lin_acc = tl.dot(a.to(v.dtype), v, lin_acc)
    return acc, l_i, m_ij, lin_acc, lin_den


# Shape scalars are not specialised (divisible-by-16 or ==1), so 480p and 720p share binaries.
@triton.jit(do_not_specialize=["topk", "lut_rows", "H", "L", "num_kblocks"])
def _flash_fwd(Q, K, V, Out,  #
               stride_qb, stride_ql, stride_qh,  #
               stride_kb, stride_kl, stride_kh,  #
               stride_vb, stride_vl, stride_vh,  #
               stride_ob, stride_ol, stride_oh,  #
               QScale, KScale, VScale,  #
               Lut, topk, lut_rows,  #
               QRaw, stride_rb, stride_rl, stride_rh,  #
               LinS, LinZ, ProjW, ProjB, PhiK, lin_eps, inv_len,  #
               H, L, num_kblocks, qk_scale,  #
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
               LUT_BLOCK_M: tl.constexpr, LUT_BLOCK_N: tl.constexpr, DENSE: tl.constexpr, EVEN_N: tl.constexpr,  #
               QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,  #
               LINEAR: tl.constexpr, LINEAR_UNSELECTED: tl.constexpr, PROJ_BIAS: tl.constexpr,  #
               USE_TMA: tl.constexpr):
    """num_kblocks counts key blocks of LUT_BLOCK_N tokens; BLOCK_N is LUT_BLOCK_N or twice it (PAIR)."""
    PAIR: tl.constexpr = BLOCK_N == 2 * LUT_BLOCK_N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // H
    head = pid_bh % H
    off_b = batch.to(tl.int64)
    off_h = head.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        # Q, K, V, Out are host-built descriptors; the pointer bases stay unused.
        k_base = QRaw
        v_base = QRaw
        if QK_INT8:  # int8 Q as (B*H*L, D): rows past L belong to the next head and are never stored
            q = Q.load([pid_bh * L + start_m, 0])
        else:  # (B*L, H*D): rows past L belong to the next batch entry and are never stored
            q = Q.load([batch * L + start_m, head * HEAD_DIM])
    else:
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        o_base = Out + off_b * stride_ob + off_h * stride_oh
        q = _load_rows(q_base, Q, start_m, L, stride_ql, offs_m, offs_d, True, False)
    if QK_INT8:
        scale_q = tl.load(QScale + pid_bh * tl.num_programs(0) + pid_m)
    else:
        scale_q = qk_scale
    KScale += pid_bh * num_kblocks
    phik_base = PhiK
    phi_q = q
    if LINEAR:
        raw_base = QRaw + off_b * stride_rb + off_h * stride_rh
        if LINEAR_UNSELECTED:
            phik_base = PhiK + pid_bh.to(tl.int64) * L * HEAD_DIM
            phi_q = _softmax_rows(_load_rows(raw_base, QRaw, start_m, L, stride_rl, offs_m, offs_d, True, False))
            phi_q = phi_q.to(QRaw.dtype.element_ty)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lin_acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lin_den = tl.zeros([BLOCK_M], dtype=tl.float32)

    # n_full steps run unmasked; the ragged last key block (or, PAIR, an odd LUT entry), when
    # visited, runs masked after them.
    if DENSE:
        n_blocks = num_kblocks
        n_full = num_kblocks
        if not EVEN_N:
            n_full -= 1
    else:
        lut_row = Lut + (pid_bh.to(tl.int64) * lut_rows + start_m // LUT_BLOCK_M) * topk
        n_blocks = topk
        n_full = topk
        if not EVEN_N:
            n_full -= (tl.load(lut_row + topk - 1) == num_kblocks - 1).to(tl.int32)
        if PAIR:
            n_full = n_full // 2

    for i in tl.range(0, n_full):
        if DENSE:
            kb = i
            kb2 = i
        elif PAIR:
            kb = tl.load(lut_row + 2 * i)
            kb2 = tl.load(lut_row + 2 * i + 1)
        else:
            kb = tl.load(lut_row + i)
            kb2 = kb
        acc, l_i, m_i, lin_acc, lin_den = _attend_block(
            acc, l_i, m_i, lin_acc, lin_den, q, scale_q, phi_q,  #
            k_base, K, v_base, V, KScale, phik_base,  #
            kb, kb2, True, L, stride_kl, stride_vl, offs_n, offs_d, batch, head,  #
            HEAD_DIM, BLOCK_N, LUT_BLOCK_N, False, QK_INT8, PV_FP8, LINEAR_UNSELECTED, USE_TMA, PAIR)
    if PAIR:
        # 1 or 2 LUT entries left: an odd one (second half absent) and/or the ragged block.
        left = n_blocks - 2 * n_full
        if left > 0:
            kb = tl.load(lut_row + 2 * n_full)
            kb2 = tl.load(lut_row + n_blocks - 1)
            acc, l_i, m_i, lin_acc, lin_den = _attend_block(
                acc, l_i, m_i, lin_acc, lin_den, q, scale_q, phi_q,  #
                k_base, K, v_base, V, KScale, phik_base,  #
                kb, kb2, left > 1, L, stride_kl, stride_vl, offs_n, offs_d, batch, head,  #
                HEAD_DIM, BLOCK_N, LUT_BLOCK_N, True, QK_INT8, PV_FP8, LINEAR_UNSELECTED, USE_TMA, PAIR)
    elif not EVEN_N:
        if n_full < n_blocks:
            acc, l_i, m_i, lin_acc, lin_den = _attend_block(
                acc, l_i, m_i, lin_acc, lin_den, q, scale_q, phi_q,  #
                k_base, K, v_base, V, KScale, phik_base,  #
                num_kblocks - 1, num_kblocks - 1, True, L, stride_kl, stride_vl, offs_n, offs_d, batch, head,  #
                HEAD_DIM, BLOCK_N, LUT_BLOCK_N, True, QK_INT8, PV_FP8, LINEAR_UNSELECTED, USE_TMA, PAIR)

    # One reciprocal per row, not a division per element (div.full.f32 is a reciprocal plus range
    # fix-ups: 184 fewer SASS instructions per thread in the block-sparse kernel, 584 in sla's; the
    # whole ops at 1.3B 480p ran 1.6% / 2.3% faster under graph replay, 720p unchanged within the
    # call's 1% spread: bench/results/ab_reciprocal_h200.json).
    acc = acc * (1.0 / l_i)[:, None]
    if PV_FP8:
        acc = acc * tl.load(VScale + pid_bh * HEAD_DIM + offs_d)[None, :]
    if LINEAR:
        if QK_INT8:
            q_raw = _load_rows(raw_base, QRaw, start_m, L, stride_rl, offs_m, offs_d, True, False)
        else:
            q_raw = q
        if USE_TMA:
            s = LinS.load([pid_bh * HEAD_DIM, 0])
        else:
            s = tl.load(LinS + pid_bh * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
        z = tl.load(LinZ + pid_bh * HEAD_DIM + offs_d)
        if LINEAR_UNSELECTED:
            phi = _softmax_rows(q_raw)
            den = tl.sum(phi * z[None, :], 1)
            num = tl.dot(phi.to(s.dtype), s) - lin_acc * inv_len
            o_lin = num * (1.0 / (den - lin_den * inv_len + lin_eps))[:, None]
            # proj_l's own (out, in) weight, any float dtype, cast here: o_lin @ W^T.
            w = tl.load(ProjW + offs_d[:, None] * HEAD_DIM + offs_d[None, :]).to(s.dtype)
            acc = tl.dot(o_lin.to(s.dtype), tl.trans(w), acc)
        else:
            # s is S W^T (proj_l folded in): one D x D product. With e = exp(q - max q), phi = e / sum e
            # and phi / (phi.z + eps) = e / (e.z + eps * sum e): one reciprocal per row normalises both.
            e = _exp_rows(q_raw)
            row = 1.0 / (tl.sum(e * z[None, :], 1) + lin_eps * tl.sum(e, 1))
            acc = tl.dot((e * row[:, None]).to(s.dtype), s, acc)
        if PROJ_BIAS:
            acc += tl.load(ProjB + offs_d).to(tl.float32)[None, :]

    if USE_TMA:
        Out.store([batch, start_m, head, 0], acc.to(Out.dtype).reshape(1, BLOCK_M, 1, HEAD_DIM))
    else:
        out = acc.to(Out.dtype.element_ty)
        rows = start_m + offs_m
        tl.store(o_base + rows.to(tl.int64)[:, None] * stride_ol + offs_d[None, :], out, mask=rows[:, None] < L)


@dataclass
class LinearBranch:
    """SLA's linear-attention state for the epilogue, one entry per (batch, head).

    S and z are averaged over the L tokens (not summed): the ratio phi(q) S / phi(q) z is the same,
    S stays inside float16 range, and `eps` is divided by L so the result equals TurboDiffusion's
    phi(q) S / (phi(q) z + 1e-5) exactly.
    """

    kv_state: torch.Tensor
    """(B, H, D, D) in the attention dtype: mean over tokens of phi(k)^T v, times proj_l.weight^T
    when proj_weight is None (proj_l folded in: the epilogue then multiplies once, not twice)."""
    k_state: torch.Tensor
    """(B, H, D) fp32: mean over tokens of phi(k)."""
    proj_weight: torch.Tensor | None
    """(D_out, D_in) contiguous proj_l.weight (any float dtype; the kernel casts it), or None when
    kv_state has it folded in. The paper's variant needs it apart (it subtracts unfolded terms)."""
    proj_bias: torch.Tensor | None
    """(D,) proj_l.bias or None."""
    eps: float
    phi_k: torch.Tensor | None = None
    """(B, H, L, D) phi(K) in the attention dtype, only for the paper's variant (linear over the
    blocks the sparse branch did not take)."""


@dataclass
class QuantizedQK:
    """Sage inputs: int8 Q/K in (B, H, L, D), per-block fp32 scales, optional FP8 V^T."""

    q: torch.Tensor
    q_scale: torch.Tensor
    """(B, H, query blocks); Q was multiplied by sm_scale*log2(e) before quantising."""
    k: torch.Tensor
    k_scale: torch.Tensor
    """(B, H, key blocks); K was smoothed by its token mean before quantising."""
    v_fp8_t: torch.Tensor | None = None
    """(B, H, D, L_pad) float8_e4m3fn, L_pad = key blocks * block_n, zero padded."""
    v_scale: torch.Tensor | None = None
    """(B, H, D) fp32 per-channel scale of v_fp8_t."""


def _strides_bld(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, L, H, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def _strides_bhld(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (B, H, L, D) tensor."""
    return t.stride(0), t.stride(2), t.stride(1)


def with_tma_twins(configs: list[FlashConfig], tma: bool, lut_block_n: int | None = None) -> list[FlashConfig]:
    """``configs`` plus, when ``tma``, a TMA copy of each config that loads one key block per step."""
    out = list(configs)
    if tma:
        out += [replace(c, use_tma=True) for c in configs
                if not c.use_tma and (lut_block_n is None or c.block_n == lut_block_n)]
    return out


def _rows_view(q: torch.Tensor, heads_first: bool) -> tuple[list[int], list[int]] | None:
    """(shape, strides) of Q as the 2-D row matrix the kernel's TMA path reads it through, or None
    when Q's strides do not allow it: (B*L, H*D) for (B, L, H, D), (B*H*L, D) for Sage's int8
    (B, H, L, D)."""
    if heads_first:
        return ([q.numel() // q.shape[-1], q.shape[-1]], [q.shape[-1], 1]) if q.is_contiguous() else None
    B, L, H, D = q.shape
    if q.stride(2) != D or (B > 1 and q.stride(0) != L * q.stride(1)):
        return None
    return [B * L, H * D], [q.stride(1), 1]


def _tma_descriptors(q: torch.Tensor, q_rows: tuple[list[int], list[int]], k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, block_m: int, block_n: int, qk_int8: bool,
                     pv_fp8: bool) -> tuple[TensorDescriptor, ...]:
    """Host-side descriptors for `_flash_fwd`'s USE_TMA path: Q as the 2-D rows ``q_rows``
    (`_rows_view`), K, V and Out 4-D in their own layouts, one (batch, head) per tile; Sage's int8 K
    and FP8 V^T are (B, H, L, D) and (B, H, D, L_pad)."""
    D = q.shape[-1]
    descriptors = [TensorDescriptor(q, *q_rows, [block_m, D])]
    k_block = [1, 1, block_n, D] if qk_int8 else [1, block_n, 1, D]
    v_block = [1, 1, D, block_n] if pv_fp8 else [1, block_n, 1, D]
    for t, block in ((k, k_block), (v, v_block), (out, [1, block_m, 1, D])):
        descriptors.append(TensorDescriptor(t, list(t.shape), list(t.stride()), block))
    return tuple(descriptors)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Host-side contract of every attention entry point: (B, L, H, D) with D in {64, 128}."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (B, L, H, D) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128, got {q.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need unit stride on head_dim")


def launch_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: FlashConfig,
    *,
    sm_scale: float,
    lut: torch.Tensor | None = None,
    lut_block_m: int | None = None,
    lut_block_n: int | None = None,
    quant: QuantizedQK | None = None,
    linear: LinearBranch | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run `_flash_fwd`; q, k, v are (B, L, H, D) views, the output is a new (B, L, H, D) tensor.

    lut: (B, H, query blocks of lut_block_m rows, topk) int32, sorted ascending, key blocks of
    lut_block_n tokens (default config.block_n; config.block_n = 2 * lut_block_n walks two LUT
    entries per step); None means dense. quant: Sage's int8 Q/K (and FP8 V) replace q/k(/v) as
    kernel operands. linear: SLA's epilogue.
    """
    B, L, H, D = q.shape
    bm, bn = config.block_m, config.block_n
    out = torch.empty_like(q) if out is None else out
    qk_scale = sm_scale * LOG2E
    dense = lut is None
    lut_block_n = lut_block_n or bn
    if dense:
        lut_t, topk, lut_rows, lut_block_m = q, 1, 1, bm
        if lut_block_n != bn:
            raise ValueError("dense attention walks key blocks of config.block_n; lut_block_n does not apply")
    else:
        lut_block_m = lut_block_m or bm
        if lut_block_m % bm:
            raise ValueError(f"block_m {bm} must divide the LUT's query block {lut_block_m}")
        if bn not in (lut_block_n, 2 * lut_block_n):
            raise ValueError(f"block_n {bn} must be the LUT's key block {lut_block_n} or twice it")
        lut_t, topk, lut_rows = lut, lut.shape[-1], lut.shape[-2]
        if lut.dtype != torch.int32 or not lut.is_contiguous() or lut_rows != triton.cdiv(L, lut_block_m):
            raise ValueError(f"LUT must be contiguous int32 (B, H, {triton.cdiv(L, lut_block_m)}, topk), "
                             f"got {lut.dtype} {tuple(lut.shape)}")

    q_op, k_op, v_op = q, k, v
    q_strides, k_strides, v_strides = _strides_bld(q), _strides_bld(k), _strides_bld(v)
    q_scale = k_scale = v_scale = q
    pv_fp8 = False
    if quant is not None:
        q_op, k_op = quant.q, quant.k
        q_strides, k_strides = _strides_bhld(quant.q), _strides_bhld(quant.k)
        q_scale, k_scale = quant.q_scale, quant.k_scale
        if quant.v_fp8_t is not None:
            pv_fp8 = True
            v_op, v_scale = quant.v_fp8_t, quant.v_scale
            # (B, H, D, L_pad): batch, per-channel row, head strides.
            v_strides = (v_op.stride(0), v_op.stride(2), v_op.stride(1))
    raw_strides = _strides_bld(q)
    proj_bias = False
    if linear is not None:
        weight = linear.proj_weight
        if weight is None and linear.phi_k is not None:
            raise ValueError("the paper's SLA variant needs proj_l's weight apart, not folded into kv_state")
        if weight is not None and (not weight.is_contiguous() or tuple(weight.shape) != (D, D)):
            raise ValueError(f"proj_l weight must be a contiguous ({D}, {D}) tensor, got {tuple(weight.shape)}")
        proj_bias = linear.proj_bias is not None
        lin = (linear.kv_state, linear.k_state, weight if weight is not None else q, linear.proj_bias if proj_bias else q,
               linear.phi_k if linear.phi_k is not None else q, linear.eps, 1.0 / L)
    else:
        lin = (q, q, q, q, q, 0.0, 1.0)
    if linear is not None and linear.phi_k is not None and pv_fp8:
        raise ValueError("the paper's SLA variant (linear over unselected blocks) needs bf16/fp16 PV, not FP8")

    mode = tma_mode()
    q_rows = _rows_view(q_op, quant is not None)
    use_tma = ((config.use_tma or mode == "on") and mode != "off" and tma_ready(q_op, k_op, v_op, out)
               and q_rows is not None)
    if use_tma and bn != lut_block_n:
        raise ValueError("TMA loads one contiguous key block per step; the two-block walk (block_n = 2 x the "
                         "LUT's key block) needs plain pointers")
    operands = (q_op, k_op, v_op, out)
    if use_tma:
        operands = _tma_descriptors(q_op, q_rows, k_op, v_op, out, bm, bn, quant is not None, pv_fp8)
        if linear is not None:
            state = linear.kv_state
            lin = (TensorDescriptor(state, [state.numel() // D, D], [D, 1], [D, D]),) + lin[1:]
    grid = (triton.cdiv(L, bm), B * H)
    _flash_fwd[grid](
        *operands,  #
        *q_strides, *k_strides, *v_strides, *_strides_bld(out),  #
        q_scale, k_scale, v_scale,  #
        lut_t, topk, lut_rows,  #
        q, *raw_strides,  #
        *lin,  #
        H, L, triton.cdiv(L, lut_block_n), qk_scale,  #
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, LUT_BLOCK_M=lut_block_m, LUT_BLOCK_N=lut_block_n,  #
        DENSE=dense, EVEN_N=L % lut_block_n == 0, QK_INT8=quant is not None, PV_FP8=pv_fp8,  #
        LINEAR=linear is not None, LINEAR_UNSELECTED=linear is not None and linear.phi_k is not None,  #
        PROJ_BIAS=proj_bias, USE_TMA=use_tma,  #
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"maxnreg": config.maxnreg} if config.maxnreg and q.is_cuda else {}),
    )
    return out
