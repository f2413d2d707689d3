"""Exact numeric conversions that stay off Hopper's quarter-rate conversion instructions.

I2F and F2I run at 16 per clock per SM on sm90, a quarter of the FP32 rate and as slow as the
MUFU.EX2 of the softmax. Where the value range is known, an integer add plus a float add does
the same job exactly: for |v| < 2**22, the fp32 number 1.5 * 2**23 + v has exactly v in its low
mantissa bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC_F32 = tl.constexpr(12582912.0)
"""1.5 * 2**23: fp32 numbers in [2**23, 2**24) are the integers, one per bit pattern."""
MAGIC_BITS = tl.constexpr(0x4B400000)
"""The fp32 bit pattern of MAGIC_F32."""


@triton.jit
def int32_to_float_exact(x):
    """int32 -> fp32 for |x| < 2**22 (an int8 x int8 dot over up to 256 terms): integer add and
    float subtract instead of I2F."""
    return (x + MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_F32


@triton.jit
def round_to_int8(y):
    """int8 of fp32 y in [-127, 127], rounded half to even (torch.round's rule): adding
    1.5 * 2**23 rounds y to an integer in the FPU's round-to-nearest-even mode and leaves it in
    the low bits, so no F2I is needed."""
    return ((y + MAGIC_F32).to(tl.int32, bitcast=True) - MAGIC_BITS).to(tl.int8)


@triton.jit
def int8_scale(amax, min_scale):
    """Symmetric int8 scale of a block whose max |x| is ``amax`` (fp32): amax / 127 rounded as
    torch divides (IEEE), at least ``min_scale`` (an all-zero block quantises to zeros, not NaN)."""
    return tl.maximum(tl.math.div_rn(amax, 127.0), min_scale)


@triton.jit
def quantize_values(x, scale):
    """int8 of round-half-even(x * (1 / scale)) clamped to [-127, 127] (W8A8's `quantize_tiles`
    and Sage's `quantize_qk_ref` in torch): one IEEE reciprocal per call (scale is a tile's
    scalar), then per element a multiply, the clamp (which also keeps the multiply from being
    fused into the rounding add) and `round_to_int8`, so no division and no F2I per element."""
    inv = tl.math.div_rn(1.0, scale)
    return round_to_int8(tl.clamp(x * inv, -127.0, 127.0))
