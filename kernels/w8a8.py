"""W8A8 linear: int8 weights with one fp32 scale per 128x128 tile, activations quantized per
128x128 tile at run time, int32 accumulation, dequantized per K tile.

This is the storage format of TurboDiffusion's `-quant` checkpoints (`int8_weight`, `scale`).
The Triton path is two kernels: `_quantize_tiles_kernel` (int8 + one scale per tile;
bit-identical to `quantize_tiles`) and `_w8a8_matmul_kernel`, which takes each 128-wide K step as
a fresh int8 x int8 -> int32 dot and adds it into an fp32 accumulator scaled by
act_scale[m_tile, k_tile] * w_scale[n_tile, k_tile] (the scales change from one K tile to the
next, so the int32 sums cannot run across tiles), then adds the bias and casts to x's dtype.
That per-tile int32 -> fp32 step is what holds int8 near bf16 speed on Hopper: done with I2F
it costs more SM cycles than the MMA it follows, so it is done with exact integer/float adds.

Fusion points for kernels that produce activations (a norm, an activation function): the
`tile_scale` / `quantize_values` device functions quantise a 128x128 tile in-register exactly as
`quantize_tiles` does, and `w8a8_matmul` takes the int8 activations and their tile scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from turbo_kernels.autotune import close_to_reference, pick_config
from turbo_kernels.convert import int32_to_float_exact, int8_scale, quantize_values
from turbo_kernels.dispatch import use_triton
from turbo_kernels.tma import ensure_tma_allocator, tma_candidates_allowed, tma_ready

TILE = 128


def _tile_amax(x: torch.Tensor) -> torch.Tensor:
    """Max |x| over each TILE x TILE tile of a 2-D tensor (ragged edges included)."""
    rows, cols = x.shape
    pr, pc = -rows % TILE, -cols % TILE
    padded = torch.nn.functional.pad(x.abs().float(), (0, pc, 0, pr))
    tiles = padded.view((rows + pr) // TILE, TILE, (cols + pc) // TILE, TILE)
    return tiles.amax(dim=(1, 3))


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per 128x128 tile: returns (int8 values, fp32 scales of shape tiles).

    q = round_half_even(x * (1 / scale)) with 1 / scale rounded once per tile: a multiply per
    element (what the Triton quantiser does at memory speed), not a division."""
    scale = (_tile_amax(x) / 127.0).clamp_min(1e-12)
    expanded = scale.repeat_interleave(TILE, 0)[: x.shape[0]].repeat_interleave(TILE, 1)[:, : x.shape[1]]
    q = torch.round(x.float() * (1.0 / expanded)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_tiles` (float32)."""
    rows, cols = q.shape
    expanded = scale.repeat_interleave(TILE, 0)[:rows].repeat_interleave(TILE, 1)[:, :cols]
    return q.float() * expanded


def int8_linear_ref(
    x: torch.Tensor, int8_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Reference W8A8 linear: quantize x per tile, multiply the dequantized operands in fp32."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_tiles(x2)
    out = dequantize_tiles(xq, xs) @ dequantize_tiles(int8_weight, scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], int8_weight.shape[0])


@triton.jit
def tile_scale(amax):
    """Dequantisation scale of a tile whose max |x| is ``amax`` (fp32): amax / 127, at least 1e-12.

    Fusion point: a kernel that produces a 128x128 activation tile (a norm, a GELU) can quantise
    it on the fly with `tile_scale` and `quantize_values` and hand the result to `w8a8_matmul`;
    the two give exactly `quantize_tiles`."""
    return int8_scale(amax, 1e-12)


@triton.jit
def _quantize_tile(x_base, q_base, stride_xm, stride_qm, cols, row_end, col_end,  #
                   TILE_SIZE: tl.constexpr, MASKED: tl.constexpr):
    """Quantise one tile held in registers; returns its scale."""
    rows = tl.arange(0, TILE_SIZE)
    x_ptrs = x_base + rows[:, None] * stride_xm + cols[None, :]
    q_ptrs = q_base + rows[:, None] * stride_qm + cols[None, :]
    if MASKED:
        mask = (rows[:, None] < row_end) & (cols[None, :] < col_end)
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        scale = tile_scale(tl.max(tl.abs(x)))
        tl.store(q_ptrs, quantize_values(x, scale), mask=mask)
    else:
        x = tl.load(x_ptrs).to(tl.float32)
        scale = tile_scale(tl.max(tl.abs(x)))
        tl.store(q_ptrs, quantize_values(x, scale))
    return scale


@triton.jit(do_not_specialize=["M"])
def _quantize_tiles_kernel(X, XQ, Scale, M, K, stride_xm, stride_qm, TILE_SIZE: tl.constexpr):
    """One 128x128 tile per program; interior tiles take the unmasked path (no per-element
    bounds checks), the ragged last row / column of tiles the masked one. Launched with a 64
    register cap (`QUANT_LAUNCH`) so four tiles are in flight per SM: the version this replaces
    ran an IEEE division per element in 194 registers, one CTA per SM, its loads and math never
    overlapping (4x the memory time on the H200)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_k * TILE_SIZE + tl.arange(0, TILE_SIZE)
    x_base = X + (pid_m * TILE_SIZE).to(tl.int64) * stride_xm
    q_base = XQ + (pid_m * TILE_SIZE).to(tl.int64) * stride_qm
    row_end = M - pid_m * TILE_SIZE
    if (row_end >= TILE_SIZE) & ((pid_k + 1) * TILE_SIZE <= K):
        scale = _quantize_tile(x_base, q_base, stride_xm, stride_qm, cols, row_end, K, TILE_SIZE, False)
    else:
        scale = _quantize_tile(x_base, q_base, stride_xm, stride_qm, cols, row_end, K, TILE_SIZE, True)
    tl.store(Scale + pid_m * tl.num_programs(1) + pid_k, scale)


@triton.jit
def _int32_to_float(x, FAST: tl.constexpr):
    """int32 -> fp32 of one K tile's dot: FAST uses `int32_to_float_exact` (|x| <= 128 * 128 * 128
    < 2**22), which takes integer and float adds instead of I2F (16 per clock per SM on Hopper,
    more SM time than the int8 MMA it follows)."""
    if FAST:
        return int32_to_float_exact(x)
    else:
        return x.to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _w8a8_matmul_kernel(A, W, C, AScale, WScale, Bias,  #
                        M, N, K, stride_am, stride_wn, stride_cm,  #
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,  #
                        TILE_SIZE: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,  #
                        FAST_CONVERT: tl.constexpr, K_UNROLL: tl.constexpr, USE_TMA: tl.constexpr):
    # A block inside one 128x128 scale tile needs one scale per K step (a single FMA per element
    # to dequantise); larger blocks take per-row / per-column scale vectors.
    SCALAR_SCALES: tl.constexpr = BLOCK_M <= TILE_SIZE and BLOCK_N <= TILE_SIZE
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share each weight column block while it is in L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, TILE_SIZE)
    # Out-of-range rows/columns re-read valid memory (wrapped) and are dropped at the store.
    a_rows = rows % M
    w_rows = cols % N
    a_ptrs = A + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = W + w_rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    k_tiles = tl.cdiv(K, TILE_SIZE)
    if SCALAR_SCALES:
        a_scale_ptrs = AScale + (pid_m * BLOCK_M // TILE_SIZE) * k_tiles
        w_scale_ptrs = WScale + (pid_n * BLOCK_N // TILE_SIZE) * k_tiles
    else:
        a_scale_ptrs = AScale + (a_rows // TILE_SIZE) * k_tiles
        w_scale_ptrs = WScale + (w_rows // TILE_SIZE) * k_tiles
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # USE_TMA: operands through tensor descriptors (async copies on mbarriers instead of cp.async
    # with a CTA barrier per K step; out-of-range rows and K columns read as zeros).
    if USE_TMA:
        a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, TILE_SIZE])
        w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, TILE_SIZE])
        for kt in tl.range(0, k_tiles):
            part = tl.dot(a_desc.load([pid_m * BLOCK_M, kt * TILE_SIZE]),
                          tl.trans(w_desc.load([pid_n * BLOCK_N, kt * TILE_SIZE])))
            acc = _scale_add(acc, _int32_to_float(part, FAST_CONVERT), a_scale_ptrs, w_scale_ptrs, kt, SCALAR_SCALES)
    else:
        # K_UNROLL fresh dots per iteration: the second MMA can run while the first one's int32
        # result is converted and scaled (each K tile has its own scales, so int32 sums cannot chain).
        k_main = 0
        if EVEN_K:
            k_main = k_tiles - k_tiles % K_UNROLL
        for kt in tl.range(0, k_main, K_UNROLL):
            for u in tl.static_range(K_UNROLL):
                part = tl.dot(tl.load(a_ptrs + u * TILE_SIZE), tl.trans(tl.load(w_ptrs + u * TILE_SIZE)))
                acc = _scale_add(acc, _int32_to_float(part, FAST_CONVERT), a_scale_ptrs, w_scale_ptrs, kt + u,
                                 SCALAR_SCALES)
            a_ptrs += K_UNROLL * TILE_SIZE
            w_ptrs += K_UNROLL * TILE_SIZE
        for kt in tl.range(k_main, k_tiles):
            k_left = K - kt * TILE_SIZE
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            w = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0)
            part = tl.dot(a, tl.trans(w))
            acc = _scale_add(acc, _int32_to_float(part, FAST_CONVERT), a_scale_ptrs, w_scale_ptrs, kt, SCALAR_SCALES)
            a_ptrs += TILE_SIZE
            w_ptrs += TILE_SIZE
    if HAS_BIAS:
        acc += tl.load(Bias + w_rows).to(tl.float32)[None, :]
    tl.store(C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :], acc.to(C.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _scale_add(acc, part, a_scale_ptrs, w_scale_ptrs, kt, SCALAR_SCALES: tl.constexpr):
    """acc + part * act_scale * w_scale of K tile kt."""
    if SCALAR_SCALES:
        return acc + part * (tl.load(a_scale_ptrs + kt) * tl.load(w_scale_ptrs + kt))
    else:
        return acc + part * tl.load(a_scale_ptrs + kt)[:, None] * tl.load(w_scale_ptrs + kt)[None, :]


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of `_w8a8_matmul_kernel` (the K step is always one 128-wide tile)."""

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    fast_convert: bool = True
    """int32 -> fp32 by exact adds instead of I2F (`turbo_kernels.convert.int32_to_float_exact`)."""
    k_unroll: int = 1
    """K tiles per loop iteration (fresh dots issued back to back; pointer loads only)."""
    use_tma: bool = False

    def describe(self) -> str:
        extra = ("" if self.fast_convert else "/i2f") + (f"/u{self.k_unroll}" if self.k_unroll > 1 else "")
        extra += "+tma" if self.use_tma else ""
        return f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}/g{self.group_m}{extra}"


GEMM_CONFIGS = [
    GemmConfig(128, 128, 8, 4, fast_convert=False),
    GemmConfig(128, 128, 8, 4),
    GemmConfig(128, 128, 8, 5),
    GemmConfig(128, 128, 8, 3, k_unroll=2),
    GemmConfig(128, 128, 8, 4, use_tma=True),
    GemmConfig(128, 128, 8, 5, use_tma=True),
]
"""Autotune candidates. The first is the H200 run's winner (I2F conversion), kept as the
baseline; the others convert with float adds (4 or 5 stages; 3 lost to 4 at 14B on the H200),
one issues two K tiles' MMAs per iteration, and the last two load through TMA descriptors
(Hopper only: `gemm_candidates`). 128x256 and 256x128 hold two 128-register accumulators per
thread (255 registers) and never won on the H200; any block_m / block_n that is a multiple or
divisor of the 128 tile still runs."""


QUANT_LAUNCH = {"num_warps": 8, "maxnreg": 64}
"""`_quantize_tiles_kernel` launch: 64 bf16 values per thread, capped at 64 registers (no spills
on sm90, bench/compile_check.py), four CTAs per SM."""


def quantize_tiles_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_tiles` in one Triton launch over a 2-D x (rows may be strided)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_tiles_triton needs a 2-D tensor with unit column stride, got {tuple(x.shape)}")
    rows, cols = x.shape
    q = torch.empty(rows, cols, device=x.device, dtype=torch.int8)
    scale = torch.empty(triton.cdiv(rows, TILE), triton.cdiv(cols, TILE), device=x.device, dtype=torch.float32)
    launch = QUANT_LAUNCH if x.is_cuda else {"num_warps": QUANT_LAUNCH["num_warps"]}
    _quantize_tiles_kernel[scale.shape](x, q, scale, rows, cols, x.stride(0), q.stride(0), TILE_SIZE=TILE, **launch)
    return q, scale


def gemm_candidates(*operands: torch.Tensor) -> list[GemmConfig]:
    """GEMM_CONFIGS, without the TMA ones where TMA is unavailable (not Hopper, unaligned, off)."""
    tma = tma_candidates_allowed(*operands)
    return [c for c in GEMM_CONFIGS if tma or not c.use_tma]


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8_weight [out, in], fp32 scale per 128x128 tile) of a float weight, TurboDiffusion's format."""
    if use_triton(w):
        return quantize_tiles_triton(w.contiguous())
    return quantize_tiles(w)


def w8a8_matmul(
    x_int8: torch.Tensor,
    x_scale: torch.Tensor,
    int8_weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """(M, K) int8 activations x (N, K) int8 weight -> (M, N) out_dtype, both dequantised per tile.

    The entry for activations quantised elsewhere (see the module docstring's fusion points):
    x_scale is (ceil(M / 128), ceil(K / 128)) fp32, one scale per activation tile."""
    M, K = x_int8.shape
    N = int8_weight.shape[0]
    if int8_weight.shape[1] != K or int8_weight.stride(1) != 1 or x_int8.stride(1) != 1:
        raise ValueError(f"int8 operands must be row-major (M, K) x (N, K), got {tuple(x_int8.shape)} x "
                         f"{tuple(int8_weight.shape)}")
    tiles_k = triton.cdiv(K, TILE)
    if tuple(scale.shape) != (triton.cdiv(N, TILE), tiles_k) or tuple(x_scale.shape) != (triton.cdiv(M, TILE), tiles_k):
        raise ValueError(f"scales must have one entry per 128x128 tile, got {tuple(x_scale.shape)}, {tuple(scale.shape)}")
    scale = scale.float().contiguous()

    def run(cfg: GemmConfig) -> torch.Tensor:
        out = torch.empty(M, N, device=x_int8.device, dtype=out_dtype)
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        use_tma = cfg.use_tma and tma_ready(x_int8, int8_weight)
        if use_tma:
            ensure_tma_allocator()
        _w8a8_matmul_kernel[grid](
            x_int8, int8_weight, out, x_scale, scale, bias if bias is not None else scale,  #
            M, N, K, x_int8.stride(0), int8_weight.stride(0), out.stride(0),  #
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, TILE_SIZE=TILE,  #
            EVEN_K=K % TILE == 0, HAS_BIAS=bias is not None,  #
            FAST_CONVERT=cfg.fast_convert, K_UNROLL=1 if use_tma else cfg.k_unroll, USE_TMA=use_tma,  #
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out

    if config is None:
        key = ("w8a8", 1 << max(0, (M - 1).bit_length()), N, K, out_dtype, x_int8.device.type)
        config = pick_config(key, lambda: gemm_candidates(x_int8, int8_weight), run, accept=close_to_reference())
    return run(config)


def int8_linear(
    x: torch.Tensor,
    int8_weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """W8A8 linear, (..., in) -> (..., out) in x's dtype; the entry point model code calls.

    Triton (quantise x per tile, then the int8 GEMM) for CUDA tensors or under the interpreter,
    `int8_linear_ref` otherwise.
    """
    if not use_triton(x, int8_weight):
        return int8_linear_ref(x, int8_weight, scale, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    xq, xs = quantize_tiles_triton(x2)
    out = w8a8_matmul(xq, xs, int8_weight, scale, bias, x.dtype, config)
    return out.reshape(*shape[:-1], int8_weight.shape[0])
