import pytest
import torch

from turbo_kernels.w8a8 import (
    GemmConfig,
    dequantize_tiles,
    int8_linear,
    int8_linear_ref,
    quantize_tiles,
    quantize_tiles_triton,
    quantize_weight,
    w8a8_matmul,
)


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 64)])
def test_triton_tile_quantiser_is_bit_identical_to_the_reference(shape):
    x = _rand(*shape)
    x[0, 0] = 0.0
    q, s = quantize_tiles_triton(x)
    q_ref, s_ref = quantize_tiles(x)
    assert q.dtype == torch.int8 and torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)


def test_quantiser_rounds_ties_to_even_like_torch():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 63.5, -127.0]])
    q, s = quantize_tiles_triton(x)
    assert float(s) == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 64, -127]]


def test_quantize_weight_is_turbodiffusion_format():
    w = _rand(300, 256, scale=0.02)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 2)
    assert float((dequantize_tiles(q, s) - w).abs().max()) <= float(s.max()) / 2 + 1e-9


@pytest.mark.parametrize(
    "m,k,n,config",
    [(300, 256, 384, GemmConfig(128, 128, 4, 2)), (130, 200, 100, GemmConfig(256, 128, 4, 2)), (64, 128, 256, None)],
)
def test_triton_linear_matches_reference(m, k, n, config):
    x = _rand(m, k, seed=1)
    w = _rand(n, k, seed=2, scale=0.05)
    bias = _rand(n, seed=3)
    q, s = quantize_tiles(w)
    out = int8_linear(x, q, s, bias, config=config)
    ref = int8_linear_ref(x, q, s, bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    exact = x @ w.t() + bias
    assert float((out - exact).norm() / exact.norm()) < 0.02


@pytest.mark.parametrize("config", [GemmConfig(128, 128, 4, 2, fast_convert=False), GemmConfig(128, 128, 4, 2),
                                    GemmConfig(128, 128, 4, 2, k_unroll=2), GemmConfig(64, 128, 4, 2, k_unroll=2),
                                    GemmConfig(128, 128, 4, 2, use_tma=True)])
def test_gemm_variants_agree_exactly(config):
    """Integer-add conversion and unrolled K steps change no bit, also at the int32 extremes
    (|sum| = 128 * 127 * 128 per K tile), with an odd K-tile count or a ragged K, and through TMA
    descriptors (whose out-of-range rows and columns read as zeros)."""
    gen = torch.Generator().manual_seed(8)
    for k in (384, 320):
        xq = torch.randint(-127, 128, (130, k), generator=gen, dtype=torch.int8)
        wq = torch.randint(-127, 128, (200, k), generator=gen, dtype=torch.int8)
        xq[:64], wq[:64] = 127, -128  # extreme tiles
        xs = torch.rand(2, (k + 127) // 128, generator=gen) + 0.5
        ws = torch.rand(2, (k + 127) // 128, generator=gen) + 0.5
        out = w8a8_matmul(xq, xs, wq, ws, None, torch.float32, config=config)
        ref = dequantize_tiles(xq, xs) @ dequantize_tiles(wq, ws).t()
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-6
        baseline = w8a8_matmul(xq, xs, wq, ws, None, torch.float32, config=GemmConfig(128, 128, 4, 2, fast_convert=False))
        if config.block_m == 128 and config.k_unroll == 1:
            assert torch.equal(out, baseline)


def test_linear_keeps_leading_dims_dtype_and_optional_bias():
    x = _rand(2, 70, 128, seed=4).half()
    w = _rand(256, 128, seed=5, scale=0.05)
    q, s = quantize_weight(w)
    out = int8_linear(x, q, s, None)
    assert out.shape == (2, 70, 256) and out.dtype == torch.float16
    torch.testing.assert_close(out, int8_linear_ref(x, q, s, None), rtol=2e-3, atol=2e-3)


def test_bfloat16_on_cpu_takes_the_reference():
    x = _rand(50, 128, seed=6).bfloat16()
    q, s = quantize_weight(_rand(64, 128, seed=7, scale=0.05))
    assert torch.equal(int8_linear(x, q, s, None), int8_linear_ref(x, q, s, None))


def test_matmul_checks_tile_scales():
    xq, xs = quantize_tiles(_rand(10, 128))
    wq, ws = quantize_tiles(_rand(20, 128))
    with pytest.raises(ValueError, match="tile"):
        w8a8_matmul(xq, xs, wq, ws[:, :0], None, torch.float32)
