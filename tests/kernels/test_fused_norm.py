"""The fused norm kernels (Triton, run by the CPU interpreter) against their float32 references.

Every kernel computes in float32 and rounds once, so float32 results must match the reference to
float32 noise and float16 results must sit within one rounding (2**-11 relative, checked with 2x
slack) of the float32 reference computed from the same float16 inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from turbo_kernels.fused_norm import (
    RowConfig,
    gated_residual,
    gated_residual_layernorm,
    gated_residual_layernorm_ref,
    gated_residual_ref,
    layernorm_modulate,
    layernorm_modulate_ref,
    rmsnorm_rope,
    rmsnorm_rope_ref,
    row_config,
)

EPS = 1e-6
# (dim, num_heads, batch, tokens): the tiny model's width with a ragged token count, and the
# 1.3B width (12 heads of 128) with a few tokens (the interpreter runs every program in Python).
SHAPES = [(128, 2, 2, 37), (1536, 12, 2, 5)]
DTYPES = [torch.float32, torch.float16]


def _rand(*shape, seed, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _modulation(batch, dim, seed=5):
    """(B, 6, dim) float32 like the block's modulation; its chunks are strided (B, 1, dim) views."""
    return _rand(batch, 6, dim, seed=seed, scale=0.5)


def _reference_inputs(*tensors):
    """Float32 copies (exact for float16 values) for the float32 reference."""
    return [t.float() for t in tensors]


def assert_one_rounding(got: torch.Tensor, want32: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want32, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want32, rtol=2**-10, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads, batch, tokens", SHAPES)
def test_layernorm_modulate_matches_reference(dim, heads, batch, tokens, dtype):
    x = _rand(batch, tokens, dim, seed=1, scale=3.0, dtype=dtype) + 1.0
    e = _modulation(batch, dim)
    got = layernorm_modulate(x, e[:, 0:1], e[:, 1:2], EPS)
    assert got.shape == x.shape and got.is_contiguous()
    assert_one_rounding(got, layernorm_modulate_ref(*_reference_inputs(x), e[:, 0:1], e[:, 1:2], EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads, batch, tokens", SHAPES)
def test_layernorm_modulate_adds_the_residual_into_x_first(dim, heads, batch, tokens, dtype):
    x = _rand(batch, tokens, dim, seed=1, dtype=dtype)
    residual = _rand(batch, tokens, dim, seed=2, dtype=dtype)
    e = _modulation(batch, dim)
    expected_sum = x + residual  # PyTorch's own rounding of the sum to x's dtype
    got = layernorm_modulate(x, e[:, 3:4], e[:, 4:5], EPS, residual=residual)
    assert torch.equal(x, expected_sum)
    assert_one_rounding(got, layernorm_modulate_ref(x.float(), e[:, 3:4], e[:, 4:5], EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads, batch, tokens", SHAPES)
def test_gated_residual_matches_reference_in_place_and_out_of_place(dim, heads, batch, tokens, dtype):
    x = _rand(batch, tokens, dim, seed=1, dtype=dtype)
    y = _rand(batch, tokens, dim, seed=2, dtype=dtype)
    gate = _modulation(batch, dim)[:, 2:3]
    want = gated_residual_ref(*_reference_inputs(x, y), gate)
    before = x.clone()
    out = gated_residual(x, y, gate)
    assert torch.equal(x, before)
    assert_one_rounding(out, want, dtype)
    same = gated_residual(x, y, gate, inplace=True)
    assert same is x and torch.equal(x, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads, batch, tokens", SHAPES)
def test_gated_residual_layernorm_normalises_the_rounded_sum(dim, heads, batch, tokens, dtype):
    x = _rand(batch, tokens, dim, seed=1, dtype=dtype)
    y = _rand(batch, tokens, dim, seed=2, scale=2.0, dtype=dtype)
    gate = _modulation(batch, dim)[:, 2:3]
    weight = _rand(dim, seed=3, scale=0.2, dtype=dtype) + 1
    bias = _rand(dim, seed=4, scale=0.2, dtype=dtype)
    before = x.clone()
    total, normed = gated_residual_layernorm(x, y, gate, weight, bias, EPS)
    assert torch.equal(x, before)
    assert torch.equal(total, gated_residual(x, y, gate))
    want = gated_residual_layernorm_ref(total.float(), torch.zeros_like(total, dtype=torch.float32), gate,
                                        weight.float(), bias.float(), EPS)[1]
    assert_one_rounding(normed, want, dtype)


def _rope_tables(tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables shaped like wan_dit.rope_tables: pair values repeated, the pair sign carried by sin."""
    angle = torch.outer(torch.arange(tokens, dtype=torch.float64), 0.7 ** torch.arange(head_dim // 2))
    angle = angle.repeat_interleave(2, dim=-1).unsqueeze(1)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64).repeat(head_dim // 2)
    return angle.cos().float(), (angle.sin() * sign).float()


def _complex_rope(x: torch.Tensor, angle_source: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotation of interleaved pairs as complex multiplication (independent of the swap trick)."""
    cos, sin = angle_source
    rot = torch.complex(cos[..., 0::2].double(), sin[..., 1::2].double())
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rot).flatten(-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim, heads, batch, tokens", SHAPES)
def test_rmsnorm_rope_reads_the_qkv_views_and_matches_reference(dim, heads, batch, tokens, dtype):
    qkv = _rand(batch, tokens, 3 * dim, seed=1, scale=2.0, dtype=dtype)
    q, k, _ = qkv.chunk(3, dim=-1)  # strided views: row stride 3 * dim
    q_weight = _rand(dim, seed=2, scale=0.2, dtype=dtype) + 1
    k_weight = _rand(dim, seed=3, scale=0.2, dtype=dtype) + 1
    cos, sin = _rope_tables(tokens, dim // heads)
    got_q, got_k = rmsnorm_rope(q, k, q_weight, k_weight, cos, sin, EPS, heads)
    for got, x, w in ((got_q, q, q_weight), (got_k, k, k_weight)):
        assert got.shape == (batch, tokens, heads, dim // heads) and got.is_contiguous()
        assert_one_rounding(got, rmsnorm_rope_ref(*_reference_inputs(x, w), cos, sin, EPS, heads), dtype)


def test_rmsnorm_rope_reference_is_rmsnorm_then_complex_rotation():
    dim, heads, tokens = 128, 2, 9
    x = _rand(1, tokens, dim, seed=1)
    weight = _rand(dim, seed=2) + 1
    tables = _rope_tables(tokens, dim // heads)
    normed = torch.nn.functional.rms_norm(x, (dim,), weight, EPS).unflatten(-1, (heads, -1))
    torch.testing.assert_close(rmsnorm_rope_ref(x, weight, *tables, EPS, heads).double(),
                               _complex_rope(normed, tables), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [RowConfig(1, 4), RowConfig(8, 4), RowConfig(16, 8)])
def test_every_row_block_shape_gives_the_same_result(config):
    """Tails: 37 tokens split into blocks of 1, 8 and 16 rows (the last block mostly masked)."""
    dim, heads, batch, tokens = 128, 2, 2, 37
    x = _rand(batch, tokens, dim, seed=1, dtype=torch.float16)
    y = _rand(batch, tokens, dim, seed=2, dtype=torch.float16)
    e = _modulation(batch, dim)
    w = torch.ones(dim, dtype=torch.float16)
    cos, sin = _rope_tables(tokens, dim // heads)

    def run(cfg):
        return [layernorm_modulate(x, e[:, 0:1], e[:, 1:2], EPS, config=cfg),
                *gated_residual_layernorm(x, y, e[:, 2:3], w, w, EPS, config=cfg),
                *rmsnorm_rope(x, y, w, w, cos, sin, EPS, heads, config=cfg)]

    for default, tuned in zip(run(None), run(config), strict=True):
        assert torch.equal(default, tuned)


def test_bfloat16_on_the_cpu_takes_the_reference():
    x = _rand(1, 7, 128, seed=1, dtype=torch.bfloat16)
    e = _modulation(1, 128)
    reference = layernorm_modulate_ref(x, e[:, 0:1], e[:, 1:2], EPS)
    assert torch.equal(layernorm_modulate(x, e[:, 0:1], e[:, 1:2], EPS), reference)


@pytest.mark.parametrize("dim", [128, 1536, 5120])
def test_row_config_fills_each_thread_with_the_requested_values(dim):
    for values in (16, 32):
        cfg = row_config(dim, values)
        per_thread = cfg.block_m * 2 ** math.ceil(math.log2(dim)) / (32 * cfg.num_warps)
        assert per_thread == values and 4 <= cfg.num_warps <= 16


def test_bad_shapes_name_the_rule():
    x = torch.zeros(2, 5, 128)
    e = torch.zeros(2, 6, 128)
    with pytest.raises(ValueError, match=r"shift must be \(B=2, 1, dim=128\)"):
        layernorm_modulate(x, e[:1, 0:1], e[:, 1:2], EPS)
    with pytest.raises(ValueError, match="unit stride"):
        gated_residual(x.transpose(1, 2), x.transpose(1, 2), e[:, 2:3])
    with pytest.raises(ValueError, match="multiple of 4"):
        rmsnorm_rope(x, x, torch.ones(128), torch.ones(128), *_rope_tables(5, 2), EPS, 64)
    with pytest.raises(ValueError, match=r"cos must be \(L=5, 1, head_dim=64\)"):
        rmsnorm_rope(x, x, torch.ones(128), torch.ones(128), *_rope_tables(4, 64), EPS, 2)
