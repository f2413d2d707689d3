"""Fused norm, modulation, RoPE and residual kernels of the Wan DiT block.

Between its GEMMs a Wan block does nothing but row-wise elementwise work: LayerNorm + adaptive
modulation (twice), RMSNorm of q and k across all heads + 3-D RoPE, the gated residuals and the
affine norm3. Written as PyTorch ops each of them upcasts to float32, makes several float32
temporaries and casts back, about 10 activation-sized passes where one read and one write would
do. The kernels here do each step in one pass: one program normalises BLOCK_M whole rows (the row
width, padded to a power of two, lives in registers), all math in float32, one rounding to the
output dtype at the end.

- `layernorm_modulate`: LayerNorm (no affine) then ``* (1 + scale) + shift``; optionally first
  adds a residual into x in place (the block's cross-attention residual).
- `gated_residual`: ``x + y * gate``, in place or into a new tensor; `gated_residual_layernorm`
  also gives the affine LayerNorm of the (rounded) sum, i.e. the block's norm3, from the same read.
- `rmsnorm_rope`: q and k straight from the fused qkv GEMM output (strided views) -> RMSNorm over
  the whole width -> interleaved-pair RoPE per head -> contiguous (B, L, H, D), both in one launch
  so the cos/sin row of a token is read once.

Numerics: every entry point computes in float32 and rounds once; the `*_ref` references do the
same in PyTorch. Wan's own code (turbo_serve.models.wan_dit) rounds q and k to the model dtype
between RMSNorm and RoPE, so for bfloat16/float16 the fused path is the more exact of the two.

Launch shapes are plain functions of the row width (`row_config`), not autotuned: `gated_residual`
works in place, and a config timed at first call would also be a host sync inside CUDA-graph
capture. Nothing here syncs or allocates anything whose size depends on data, so every entry point
can be captured. `bench/fused_norm.py` times every op against the PyTorch code it replaces, with
`traffic_bytes` as its byte count, and sweeps `ROW_CONFIGS` on the GPU.

Not done: emitting the W8A8 input (int8 per 128x128 tile, `turbo_kernels.w8a8`) from
`layernorm_modulate`. A tile's scale needs the max over 128 rows of the *modulated* values, which a
row kernel only has after normalising 128 whole rows; that is a second, tile-shaped kernel (stats
pass, then normalise + quantise per column tile), worth one activation write + read per Int8Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from turbo_kernels.dispatch import use_triton

# ---------------------------------------------------------------------------------------------
# Launch shapes

VEC = tl.constexpr(4)
"""Contiguous values per thread along a row. Triton lays each load out for 16-byte accesses, which
is 8 bfloat16 values of x but 4 float32 values of shift/scale/gate/cos/sin; mixing the two layouts
makes it shuffle the float32 vectors through shared memory on every program. Capping x at 4 (still
fully coalesced 8-byte accesses) gives every tensor the same register layout."""


@dataclass(frozen=True)
class RowConfig:
    """Launch shape of the row kernels: BLOCK_M rows per program, the whole (padded) row wide."""

    block_m: int
    num_warps: int

    def describe(self) -> str:
        return f"m{self.block_m}/w{self.num_warps}"


ROW_CONFIGS = [RowConfig(m, w) for m in (1, 2, 4, 8, 16) for w in (4, 8, 16)]
"""Sweep candidates for bench/fused_norm.py (those with 4..64 elements per thread are tried)."""


def row_config(dim: int, values_per_thread: int) -> RowConfig:
    """Rows per program and warps for rows of width `dim`, about `values_per_thread` per tensor.

    At least 4 warps, and several short rows per program rather than fewer threads, so each program
    has a few KB of loads in flight; the per-batch vectors (shift, scale, gate, norm weights) are
    then read once per BLOCK_M rows.
    """
    block_n = triton.next_power_of_2(dim)
    num_warps = max(4, min(16, block_n // (32 * values_per_thread)))
    block_m = max(1, 32 * num_warps * values_per_thread // block_n)
    return RowConfig(block_m, num_warps)


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be (B, L, dim) with unit stride in dim, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


def _check_per_batch(name: str, v: torch.Tensor, x: torch.Tensor) -> None:
    if v.dim() != 3 or v.shape[0] != x.shape[0] or v.shape[1] != 1 or v.shape[2] != x.shape[2] or v.stride(-1) != 1:
        raise ValueError(f"{name} must be (B={x.shape[0]}, 1, dim={x.shape[2]}) with unit stride in dim, got "
                         f"shape {tuple(v.shape)} strides {v.stride()}")


def traffic_bytes(op: str, rows: int, dim: int, itemsize: int, head_dim: int = 128) -> int:
    """Least HBM bytes an op must move (the benchmarks' GB/s): activations in and out once each.

    Per-batch vectors and norm weights are negligible (they stay in cache). The RoPE tables are
    float32 (L, head_dim) cos and sin, read once per token for q and k together.
    """
    row = rows * dim * itemsize
    per_op = {
        "layernorm_modulate": 2 * row,
        "residual_layernorm_modulate": 4 * row,  # read x, residual; write x, out
        "gated_residual": 3 * row,  # read x, y; write x
        "gated_residual_layernorm": 4 * row,  # read x, y; write sum, normed
        "rmsnorm_rope": 4 * row + rows * head_dim * 4 * 2,  # q, k in and out + cos, sin
    }
    if op not in per_op:
        raise ValueError(f"unknown op {op!r}; valid ops: {', '.join(per_op)}")
    return per_op[op]


# ---------------------------------------------------------------------------------------------
# LayerNorm + modulation


@triton.jit
def _row_block(pid_l, L, DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row indices (int64), column indices and the in-bounds mask of one program's tile."""
    rows = pid_l * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.max_contiguous(tl.arange(0, BLOCK_N), VEC)
    mask = (rows[:, None] < L) & (cols[None, :] < DIM)
    return rows.to(tl.int64), cols, mask


@triton.jit
def _layernorm_rows(x, mask, DIM: tl.constexpr, eps):
    """(x - mean) / sqrt(var + eps) over axis 1 in float32 (biased variance, like F.layer_norm)."""
    mean = tl.sum(x, axis=1) / DIM
    diff = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / DIM
    return diff * (1.0 / tl.sqrt(var + eps))[:, None]


@triton.jit(do_not_specialize=["L"])
def _layernorm_modulate_kernel(X, Res, Shift, Scale, Out,  #
                               L, eps,  #
                               stride_xb, stride_xl, stride_rb, stride_rl,  #
                               stride_sb, stride_cb, stride_ob, stride_ol,  #
                               DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
                               HAS_RESIDUAL: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, cols, mask = _row_block(pid_l, L, DIM, BLOCK_M, BLOCK_N)
    x_ptrs = X + b * stride_xb + rows[:, None] * stride_xl + cols[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # x + residual rounded to x's dtype (what a PyTorch add gives), stored back, then normalised.
        r = tl.load(Res + b * stride_rb + rows[:, None] * stride_rl + cols[None, :], mask=mask, other=0.0)
        x_sum = (x + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(x_ptrs, x_sum, mask=mask)
        x = x_sum.to(tl.float32)
    col_mask = cols < DIM
    shift = tl.load(Shift + b * stride_sb + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = tl.load(Scale + b * stride_cb + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = _layernorm_rows(x, mask, DIM, eps) * (1.0 + scale)[None, :] + shift[None, :]
    tl.store(Out + b * stride_ob + rows[:, None] * stride_ol + cols[None, :], out.to(Out.dtype.element_ty),
             mask=mask)


def layernorm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: [x += residual], LayerNorm(x) (no affine) * (1 + scale) + shift in float32 -> x's dtype."""
    if residual is not None:
        x.add_(residual)
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return torch.addcmul(shift.float(), normed, 1 + scale.float()).to(x.dtype)


def layernorm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> torch.Tensor:
    """LayerNorm without affine over the last dim, then ``* (1 + scale) + shift``, in x's dtype.

    x (B, L, dim); shift and scale (B, 1, dim), usually float32 views of the block's modulation.
    With `residual` (B, L, dim), x is first updated in place to ``x + residual`` (rounded to x's
    dtype) and that sum is normalised: one pass instead of an add and a norm.
    """
    _check_rows("x", x)
    _check_per_batch("shift", shift, x)
    _check_per_batch("scale", scale, x)
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not use_triton(x, shift, scale):
        return layernorm_modulate_ref(x, shift, scale, eps, residual)
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    batch, length, dim = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    cfg = config or row_config(dim, 32)
    res = x if residual is None else residual
    _layernorm_modulate_kernel[(triton.cdiv(length, cfg.block_m), batch)](
        x, res, shift, scale, out,  #
        length, eps,  #
        x.stride(0), x.stride(1), res.stride(0), res.stride(1),  #
        shift.stride(0), scale.stride(0), out.stride(0), out.stride(1),  #
        DIM=dim, BLOCK_M=cfg.block_m, BLOCK_N=triton.next_power_of_2(dim), HAS_RESIDUAL=residual is not None,  #
        num_warps=cfg.num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Gated residual (+ the affine LayerNorm of the sum)


@triton.jit(do_not_specialize=["L"])
def _gated_residual_kernel(X, Y, Gate, Out, W, Bias, Normed,  #
                           L, eps,  #
                           stride_xb, stride_xl, stride_yb, stride_yl, stride_gb,  #
                           stride_ob, stride_ol, stride_nb, stride_nl,  #
                           DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_NORM: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, cols, mask = _row_block(pid_l, L, DIM, BLOCK_M, BLOCK_N)
    col_mask = cols < DIM
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xl + cols[None, :], mask=mask, other=0.0)
    y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yl + cols[None, :], mask=mask, other=0.0)
    gate = tl.load(Gate + b * stride_gb + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Out may be X itself: each program reads its rows before it writes them.
    total = (x.to(tl.float32) + y.to(tl.float32) * gate[None, :]).to(Out.dtype.element_ty)
    tl.store(Out + b * stride_ob + rows[:, None] * stride_ol + cols[None, :], total, mask=mask)
    if HAS_NORM:
        # The norm sees the rounded sum, exactly what a separate LayerNorm would read back.
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        bias = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)
        normed = _layernorm_rows(total.to(tl.float32), mask, DIM, eps) * w[None, :] + bias[None, :]
        tl.store(Normed + b * stride_nb + rows[:, None] * stride_nl + cols[None, :],
                 normed.to(Normed.dtype.element_ty), mask=mask)


def gated_residual_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Reference: x + y * gate in float32 -> x's dtype (written into x when `inplace`)."""
    total = torch.addcmul(x.float(), y.float(), gate.float()).to(x.dtype)
    return x.copy_(total) if inplace else total


def _launch_gated_residual(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    out: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None,
    config: RowConfig | None,
) -> None:
    """out = x + y * gate; with norm = (weight, bias, normed, eps) also normed = LayerNorm(out)."""
    _check_rows("y", y)
    if y.shape != x.shape:
        raise ValueError(f"y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    batch, length, dim = x.shape
    cfg = config or row_config(dim, 32 if norm is None else 16)
    weight, bias, normed, eps = norm if norm is not None else (gate, gate, out, 0.0)
    _gated_residual_kernel[(triton.cdiv(length, cfg.block_m), batch)](
        x, y, gate, out, weight, bias, normed,  #
        length, eps,  #
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0),  #
        out.stride(0), out.stride(1), normed.stride(0), normed.stride(1),  #
        DIM=dim, BLOCK_M=cfg.block_m, BLOCK_N=triton.next_power_of_2(dim), HAS_NORM=norm is not None,  #
        num_warps=cfg.num_warps,
    )


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, inplace: bool = False, config: RowConfig | None = None
) -> torch.Tensor:
    """``x + y * gate`` in float32, returned in x's dtype; `inplace` writes it into x (and returns x).

    x, y (B, L, dim); gate (B, 1, dim) float32.
    """
    _check_rows("x", x)
    _check_per_batch("gate", gate, x)
    if not use_triton(x, y, gate):
        return gated_residual_ref(x, y, gate, inplace)
    out = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch_gated_residual(x, y, gate, out, None, config)
    return out


def gated_residual_layernorm_ref(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (x + y * gate, affine LayerNorm of that sum), both in x's dtype."""
    total = gated_residual_ref(x, y, gate)
    normed = F.layer_norm(total.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return total, normed.to(x.dtype)


def gated_residual_layernorm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_residual` into a new tensor, plus the affine LayerNorm (weight, bias [dim]) of that sum.

    Returns (x + y * gate, LayerNorm(x + y * gate)), both in x's dtype; x is left unchanged.
    """
    _check_rows("x", x)
    _check_per_batch("gate", gate, x)
    dim = x.shape[-1]
    if weight.shape != (dim,) or bias.shape != (dim,):
        raise ValueError(f"norm weight and bias must be ({dim},), got {tuple(weight.shape)}, {tuple(bias.shape)}")
    if not use_triton(x, y, gate, weight):
        return gated_residual_layernorm_ref(x, y, gate, weight, bias, eps)
    total = torch.empty_like(x, memory_format=torch.contiguous_format)
    normed = torch.empty_like(total)
    _launch_gated_residual(x, y, gate, total, (weight.contiguous(), bias.contiguous(), normed, eps), config)
    return total, normed


# ---------------------------------------------------------------------------------------------
# RMSNorm across heads + RoPE


@triton.jit
def _rmsnorm_rope_rows(X, W, Out, b, rows, cols, mask, cos, sin,  #
                       stride_xb, stride_xl, stride_ob, stride_ol,  #
                       DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, eps):
    """RMSNorm over the row, times W, then x * cos + swap_pairs(x) * sin; one tensor's tile."""
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xl + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(W + cols, mask=cols < DIM, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / DIM + eps)
    normed = x * w[None, :]
    # Swap each (2i, 2i+1) pair in registers: the pairs sit inside one thread's contiguous values.
    even, odd = tl.split(tl.reshape(normed, [BLOCK_M, BLOCK_N // 2, 2]))
    swapped = tl.reshape(tl.join(odd, even), [BLOCK_M, BLOCK_N])
    out = (normed * cos + swapped * sin) * rstd[:, None]
    tl.store(Out + b * stride_ob + rows[:, None] * stride_ol + cols[None, :], out.to(Out.dtype.element_ty),
             mask=mask)


@triton.jit(do_not_specialize=["L"])
def _rmsnorm_rope_kernel(Q, K, WQ, WK, Cos, Sin, QOut, KOut,  #
                         L, eps,  #
                         stride_qb, stride_ql, stride_kb, stride_kl, stride_tl,  #
                         stride_ob, stride_ol,  #
                         DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, cols, mask = _row_block(pid_l, L, DIM, BLOCK_M, BLOCK_N)
    # One token's table row serves every head, and q and k alike.
    head_cols = tl.max_contiguous(tl.multiple_of(cols % HEAD_DIM, VEC), VEC)
    table = rows[:, None] * stride_tl + head_cols[None, :]
    cos = tl.load(Cos + table, mask=mask, other=0.0)
    sin = tl.load(Sin + table, mask=mask, other=0.0)
    _rmsnorm_rope_rows(Q, WQ, QOut, b, rows, cols, mask, cos, sin, stride_qb, stride_ql, stride_ob, stride_ol,  #
                       DIM, BLOCK_M, BLOCK_N, eps)
    _rmsnorm_rope_rows(K, WK, KOut, b, rows, cols, mask, cos, sin, stride_kb, stride_kl, stride_ob, stride_ol,  #
                       DIM, BLOCK_M, BLOCK_N, eps)


def rmsnorm_rope_ref(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, num_heads: int
) -> torch.Tensor:
    """Reference for one of q/k: RMSNorm over dim (times weight), RoPE per head, all in float32.

    x (B, L, dim) -> (B, L, num_heads, dim // num_heads) contiguous in x's dtype; cos and sin
    (L, 1, head_dim) float32 with the pair sign carried by sin (out = x * cos + swap_pairs(x) * sin).
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    heads = normed.unflatten(-1, (num_heads, -1))
    swapped = heads.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(heads * cos, swapped, sin).to(x.dtype)


def rmsnorm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    num_heads: int,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k (B, L, dim), e.g. strided views of the fused qkv output -> normed, rotated (B, L, H, D).

    Each is RMS-normalised over its whole width (Wan's q/k norm across heads) with its own weight
    [dim], then every head's interleaved pairs are rotated by the (L, 1, head_dim) float32 tables
    of `turbo_serve.models.wan_dit.rope_tables`. One launch does both; outputs are contiguous in
    q's dtype.
    """
    _check_rows("q", q)
    _check_rows("k", k)
    batch, length, dim = q.shape
    if k.shape != q.shape or dim % num_heads or (dim // num_heads) % VEC.value:
        raise ValueError(f"q and k must share shape (B, L, dim) with dim = num_heads * head_dim, head_dim a "
                         f"multiple of {VEC.value} (the kernel's vector width), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, num_heads={num_heads}")
    head_dim = dim // num_heads
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (length, 1, head_dim):
            raise ValueError(f"{name} must be (L={length}, 1, head_dim={head_dim}), got {tuple(table.shape)}")
    if q_weight.shape != (dim,) or k_weight.shape != (dim,):
        raise ValueError(f"q/k norm weights must be ({dim},), got {tuple(q_weight.shape)}, {tuple(k_weight.shape)}")
    if not use_triton(q, k, cos):
        return (rmsnorm_rope_ref(q, q_weight, cos, sin, eps, num_heads),
                rmsnorm_rope_ref(k, k_weight, cos, sin, eps, num_heads))
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    q_out = torch.empty(batch, length, num_heads, head_dim, device=q.device, dtype=q.dtype)
    k_out = torch.empty_like(q_out)
    cfg = config or row_config(dim, 16)
    _rmsnorm_rope_kernel[(triton.cdiv(length, cfg.block_m), batch)](
        q, k, q_weight, k_weight, cos, sin, q_out, k_out,  #
        length, eps,  #
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),  #
        q_out.stride(0), q_out.stride(1),  #
        DIM=dim, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=triton.next_power_of_2(dim),  #
        num_warps=cfg.num_warps,
    )
    return q_out, k_out
