"""SageAttention's operand quantisation: INT8 K smoothed by its token mean, FP8 V^T.

Q is quantised inside the mask's pooling pass (`turbo_kernels.block_mask.pool_queries`), since
that pass reads Q anyway and Q needs nothing global. K needs its token mean first (K - mean(K)
leaves softmax unchanged and removes K's channel outliers), which the pooling pass over K
produces, so K is quantised by this second, light pass, which also writes V as pre-transposed
per-channel FP8 when the FP8 PV path is on.

Both int8 passes quantise with `turbo_kernels.convert.quantize_values`, W8A8's quantiser: one
reciprocal per block, a multiply per element and rounding half to even by an exact float add. The
division and floor/ceil/F2I rounding it replaces took three quarter-rate conversion instructions
per element (192 per thread in either pass's sm90 SASS, bench/compile_check.py). With the flash
epilogue's reciprocals, sagesla's whole op ran 3.2% / 1.2% faster under graph replay at 1.3B 480p
/ 14B 720p in one A/B call (bench/results/ab_sage_quant_h200.json; the reciprocals alone: 0.9% /
-0.3%, ab_reciprocal_h200.json). SageAttention rounds ties away from zero instead; the two differ
only on exact ties.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from turbo_kernels.block_mask import SAGE_MIN_SCALE
from turbo_kernels.convert import int8_scale, quantize_values
from turbo_kernels.flash import LOG2E, QuantizedQK

FP8_MAX = 448.0
"""Largest finite float8 e4m3fn value; V channels are scaled onto [-448, 448]."""
QUANTIZE_KEYS_LAUNCH = {"num_warps": 8, "maxnreg": 96}
"""8 warps capped at 96 registers (no spills on sm90): two 128-row blocks of K and V in flight per
SM and half the instructions per thread of the 4-warp launch (which took 168-255 registers)."""


# l_pad (a multiple of the key block) stays specialised: knowing it divisible by 16 is what lets
# the transposed FP8 V store and the V load move 16-byte vectors (unspecialised, Triton fell back
# to 1-byte stores and 4-byte loads strided by a token).
@triton.jit(do_not_specialize=["H", "L"])
def _quantize_keys_kernel(K, KMean, KInt8, KScale, V, VScale, VT8,  #
                          stride_kb, stride_kl, stride_kh,  #
                          stride_vb, stride_vl, stride_vh,  #
                          H, L, l_pad,  #
                          BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, V_FP8: tl.constexpr):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = rows[:, None] < L
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + rows.to(tl.int64)[:, None] * stride_kl + offs_d[None, :],
                mask=valid, other=0.0)
    k = tl.where(valid, k.to(tl.float32) - tl.load(KMean + pid_bh * HEAD_DIM + offs_d)[None, :], 0.0)
    scale = int8_scale(tl.max(tl.abs(k)), SAGE_MIN_SCALE)
    tl.store(KInt8 + (pid_bh.to(tl.int64) * L + rows[:, None]) * HEAD_DIM + offs_d[None, :],
             quantize_values(k, scale), mask=valid)
    tl.store(KScale + pid_bh * tl.num_programs(0) + pid, scale)
    if V_FP8:
        v = tl.load(V + off_b * stride_vb + off_h * stride_vh + rows.to(tl.int64)[:, None] * stride_vl + offs_d[None, :],
                    mask=valid, other=0.0)
        v = v.to(tl.float32) * (1.0 / tl.load(VScale + pid_bh * HEAD_DIM + offs_d))[None, :]
        v8 = tl.clamp(v, -448.0, 448.0).to(VT8.dtype.element_ty)
        tl.store(VT8 + pid_bh.to(tl.int64) * HEAD_DIM * l_pad + offs_d[None, :] * l_pad + rows[:, None], v8,
                 mask=rows[:, None] < l_pad)


def quantize_keys(
    k: torch.Tensor,
    k_mean: torch.Tensor,
    block: int,
    v: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    launch: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(k_int8 (B,H,L,D), k_scale (B,H,blocks), v_fp8_t (B,H,D,L_pad) or None, v_scale or None).

    v_scale: (B, H, D) per-channel max |v| / FP8_MAX (`pool_keys(..., v_amax=True)`); with it V is
    written as pre-transposed FP8. launch: Triton launch options in place of QUANTIZE_KEYS_LAUNCH
    (benchmarks sweep them)."""
    B, L, H, D = k.shape
    nb = triton.cdiv(L, block)
    k_int8 = torch.empty(B, H, L, D, device=k.device, dtype=torch.int8)
    k_scale = torch.empty(B, H, nb, device=k.device, dtype=torch.float32)
    v_fp8 = v_scale is not None
    if v_fp8:
        if v is None:
            raise ValueError("quantize_keys needs v with v_scale")
        v_t = torch.empty(B, H, D, nb * block, device=k.device, dtype=torch.float8_e4m3fn)
    else:
        v, v_scale, v_t = k, k_scale, k_scale
    launch = launch or QUANTIZE_KEYS_LAUNCH
    if not k.is_cuda:  # the interpreter takes no register cap
        launch = {key: value for key, value in launch.items() if key != "maxnreg"}
    _quantize_keys_kernel[(nb, B * H)](
        k, k_mean, k_int8, k_scale, v, v_scale, v_t,  #
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),  #
        H, L, nb * block,  #
        BLOCK=block, HEAD_DIM=D, V_FP8=v_fp8, **launch,
    )
    return k_int8, k_scale, (v_t if v_fp8 else None), (v_scale if v_fp8 else None)


def quantize_qk_ref(q: torch.Tensor, k: torch.Tensor, blkq: int, blkk: int, sm_scale: float) -> QuantizedQK:
    """PyTorch reference of Sage's Q/K quantisation (what `pool_queries` + `quantize_keys` write)."""

    def per_block(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, H, D = x.shape
        nb = triton.cdiv(L, block)
        xb = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nb * block - L)).view(B, nb, block, H, D)
        scale = (xb.abs().amax(dim=(2, 4)) / 127.0).clamp_min(SAGE_MIN_SCALE.value)  # (B, nb, H)
        y = xb * (1.0 / scale)[:, :, None, :, None]
        xq = torch.round(y).clamp_(-127, 127).to(torch.int8)
        xq = xq.view(B, nb * block, H, D)[:, :L].permute(0, 2, 1, 3).contiguous()
        return xq, scale.permute(0, 2, 1).contiguous()

    q_int8, q_scale = per_block(q.float() * (sm_scale * LOG2E), blkq)
    k_int8, k_scale = per_block(k.float() - k.float().mean(1, keepdim=True), blkk)
    return QuantizedQK(q_int8, q_scale, k_int8, k_scale)


def dequantize_qk(quant: QuantizedQK, blkq: int, blkk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (B, L, H, D) Q and K as the int8 kernel sees them: logits q.k are in log2 units."""

    def expand(x: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
        per_token = scale.repeat_interleave(block, dim=2)[:, :, : x.shape[2]]
        return (x.float() * per_token[..., None]).transpose(1, 2)

    return expand(quant.q, quant.q_scale, blkq), expand(quant.k, quant.k_scale, blkk)


LN2 = math.log(2.0)
"""Softmax scale that turns log2-domain logits back into exp2: softmax(LN2 * s) = exp2(s) / sum."""

