import math

import pytest
import torch
import triton

from turbo_kernels.block_mask import (
    GEOMETRIES,
    KeyPassLaunch,
    block_scores,
    build_block_mask,
    build_block_mask_ref,
    kept_blocks,
    pool_keys,
    pool_queries,
    select_topk,
    select_topk_ref,
)
from turbo_kernels.flash import LOG2E
from turbo_kernels.quant import quantize_keys, quantize_qk_ref


def _qkv(length=250, heads=2, dim=64, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, length, heads, dim, generator=gen).to(dtype) for _ in range(3)]


def _block_means(x, block):
    """Loop-per-block means in (B, H, blocks, D): the obvious definition of pooling."""
    B, L, H, D = x.shape
    return torch.stack([x[:, s : s + block].float().mean(1) for s in range(0, L, block)], dim=2)


@pytest.mark.parametrize("blkq,blkk", GEOMETRIES)
def test_pooling_divides_the_ragged_block_by_its_length(blkq, blkk):
    q, k, _ = _qkv(length=250)
    torch.testing.assert_close(pool_queries(q, blkq).pooled, _block_means(q, blkq))
    keys = pool_keys(k, blkk, k_mean=True)
    torch.testing.assert_close(keys.mean, k.mean(1))
    torch.testing.assert_close(keys.pooled, _block_means(k - k.mean(1, keepdim=True), blkk), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blkq,blkk", GEOMETRIES)
@pytest.mark.parametrize("topk", [0.01, 0.3, 1.0])
def test_lut_matches_reference_and_is_sorted_int32(blkq, blkk, topk):
    q, k, _ = _qkv(length=300, heads=3, dtype=torch.float16)
    lut = build_block_mask(q, k, topk, blkq, blkk)
    nk = math.ceil(300 / blkk)
    assert lut.dtype == torch.int32
    assert tuple(lut.shape) == (1, 3, math.ceil(300 / blkq), kept_blocks(topk, nk))
    assert lut.shape[-1] >= 1
    assert bool((lut[..., 1:] > lut[..., :-1]).all()), "LUT entries must be distinct and ascending"
    assert int(lut.min()) >= 0 and int(lut.max()) < nk
    assert torch.equal(lut, build_block_mask_ref(q, k, topk, blkq, blkk))
    if topk == 1.0:
        assert torch.equal(lut, torch.arange(nk, dtype=torch.int32).expand_as(lut))


def test_key_pass_reduces_the_linear_state_and_mean():
    q, k, v = _qkv(length=330, heads=2)
    keys = pool_keys(k, 64, v, linear=True, v_amax=True)
    phi = torch.softmax(k, dim=-1)
    torch.testing.assert_close(keys.kv_state, torch.einsum("blhd,blhe->bhde", phi, v) / 330, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(keys.k_state, phi.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys.mean, k.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys.v_scale, v.abs().amax(1) / 448.0)
    assert pool_keys(k, 64).mean is None  # the mask alone needs no reduction launch


@pytest.mark.parametrize("programs_per_sm", [1, 16])
@pytest.mark.parametrize("block", [64, 128])
def test_key_pass_walks_runs_of_blocks_tile_by_tile(programs_per_sm, block):
    """One program per head (a run of every block, each block in several tiles) or many: the
    prefetching walk gives the same sums, state and ranges."""
    launch = KeyPassLaunch(programs_per_sm=programs_per_sm)
    _, k, v = _qkv(length=650, heads=2, dim=128)
    assert block % launch.rows == 0 and block > launch.rows
    keys = pool_keys(k, block, v, linear=True, v_amax=True, k_mean=True, launch=launch)
    phi = torch.softmax(k, dim=-1)
    torch.testing.assert_close(keys.pooled, _block_means(k - k.mean(1, keepdim=True), block), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys.mean, k.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys.kv_state, torch.einsum("blhd,blhe->bhde", phi, v) / 650, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(keys.k_state, phi.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys.v_scale, v.abs().amax(1) / 448.0)


def test_key_pass_launch_shapes_agree():
    """Every launch shape the benchmark sweeps (warps, rows per tile, programs per SM) computes the
    same pass; the key block must be a whole number of tiles."""
    _, k, v = _qkv(length=200, heads=2)
    runs = [pool_keys(k, 64, v, linear=True, v_amax=True, k_mean=True, launch=launch)
            for launch in (KeyPassLaunch(), KeyPassLaunch(4, 64, 16), KeyPassLaunch(2, 32, 1))]
    for other in runs[1:]:
        for name in ("block_sum", "mean", "kv_state", "k_state", "v_scale"):
            torch.testing.assert_close(getattr(other, name), getattr(runs[0], name), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        pool_keys(k, 64, launch=KeyPassLaunch(rows=48))


def test_key_pass_folds_proj_l_into_the_linear_state():
    _, k, v = _qkv(length=200, heads=2)
    weight = torch.randn(k.shape[-1], k.shape[-1]) / 8
    plain = pool_keys(k, 64, v, linear=True)
    folded = pool_keys(k, 64, v, linear=True, fold_weight=weight)
    torch.testing.assert_close(folded.kv_state, plain.kv_state @ weight.t(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="fold_weight"):
        pool_keys(k, 64, v, fold_weight=weight)


@pytest.mark.parametrize("nk,kept", [(5, 1), (5, 5), (100, 10), (600, 59), (1182, 118)])
def test_radix_select_equals_torch_topk(nk, kept):
    gen = torch.Generator().manual_seed(nk)
    score = torch.randn(2, 3, 7, nk, generator=gen) * torch.logspace(-3, 3, nk)[torch.randperm(nk, generator=gen)]
    lut = select_topk(score, kept)
    assert lut.dtype == torch.int32 and tuple(lut.shape) == (2, 3, 7, kept)
    expected = select_topk_ref(score, kept)
    assert torch.equal(lut, expected)


def test_radix_select_breaks_ties_towards_low_columns():
    score = torch.tensor([[1.0, -0.0, 0.0, 2.0, 1.0, 1.0, -3.0, 1.0], [-1.0, -1.0, -2.0, -1.0, -5.0, -1.0, -1.0, -1.0]])
    # Row 0: 2.0 then three of the four 1.0s (the lowest columns); row 1: four of the six -1.0s.
    assert select_topk(score, 4).tolist() == [[0, 3, 4, 5], [0, 1, 3, 5]]
    assert select_topk(score, 8).tolist() == [list(range(8))] * 2
    assert select_topk(score[:, :3], 2).tolist() == [[0, 2], [0, 1]]  # +0.0 ranks above -0.0


def test_block_scores_rank_like_mean_smoothed_keys():
    """Centring by block 0 instead of K's mean shifts every score row by a constant."""
    q, k, _ = _qkv(length=330, heads=2)
    queries, keys = pool_queries(q, 64), pool_keys(k, 64)
    score = block_scores(queries.pooled, keys)
    smoothed = queries.pooled @ keys.pooled.transpose(-1, -2)
    shift = score - smoothed
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), atol=1e-4, rtol=0)


@pytest.mark.parametrize("blkq,blkk", GEOMETRIES)
def test_torch_selection_stays_selectable(blkq, blkk):
    q, k, _ = _qkv(length=300, heads=2, dtype=torch.float16)
    lut = build_block_mask(q, k, 0.3, blkq, blkk, method="torch")
    assert torch.equal(lut, build_block_mask(q, k, 0.3, blkq, blkk))
    with pytest.raises(ValueError, match="triton"):
        build_block_mask(q, k, 0.3, blkq, blkk, method="numpy")


def test_lut_keeps_the_best_scoring_blocks():
    q, k, _ = _qkv(length=256, heads=1)
    lut = build_block_mask(q, k, 0.25, 128, 64)
    pooled_q = _block_means(q, 128)
    pooled_k = _block_means(k - k.mean(1, keepdim=True), 64)
    score = pooled_q @ pooled_k.transpose(-1, -2)
    expected = score.argmax(-1, keepdim=True).to(torch.int32)  # 0.25 * 4 blocks = 1 block
    assert torch.equal(lut, expected)


def test_kept_blocks_rule():
    assert kept_blocks(0.1, 512) == 51
    assert kept_blocks(0.001, 5) == 1
    assert kept_blocks(1.0, 5) == 5
    with pytest.raises(ValueError, match="topk"):
        kept_blocks(0.0, 5)


def test_unknown_geometry_is_rejected():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match="128, 64"):
        build_block_mask(q, k, 0.5, 32, 32)


@pytest.mark.parametrize("blkq,blkk", GEOMETRIES)
def test_sage_quantisation_matches_reference(blkq, blkk):
    q, k, _ = _qkv(length=200, dim=128)
    sm_scale = 1 / math.sqrt(128)
    ref = quantize_qk_ref(q, k, blkq, blkk, sm_scale)
    queries = pool_queries(q, blkq, sm_scale * LOG2E)
    assert torch.equal(queries.q_int8, ref.q)
    torch.testing.assert_close(queries.q_scale, ref.q_scale)
    keys = pool_keys(k, blkk, k_mean=True)
    k_int8, k_scale, v_t, v_scale = quantize_keys(k, keys.mean, blkk)
    assert v_t is None and v_scale is None
    # K's mean comes from block sums in a different order than torch's mean: allow rare +-1 ties.
    diff = (k_int8.int() - ref.k.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    torch.testing.assert_close(k_scale, ref.k_scale, rtol=1e-5, atol=1e-7)


def test_fp8_v_is_transposed_padded_and_scaled_per_channel():
    _, k, v = _qkv(length=200, dim=64)
    keys = pool_keys(k, 64, v, v_amax=True)
    torch.testing.assert_close(keys.v_scale, v.abs().amax(1) / 448.0)
    _, _, v_t, v_scale = quantize_keys(k, keys.mean, 64, v, keys.v_scale)
    assert v_t.dtype == torch.float8_e4m3fn and tuple(v_t.shape) == (1, 2, 64, triton.cdiv(200, 64) * 64)
    assert float(v_t[..., 200:].float().abs().max()) == 0.0
    restored = (v_t[..., :200].float() * v_scale[..., None]).permute(0, 3, 1, 2)
    # e4m3 keeps 3 mantissa bits; the interpreter's float->fp8 cast also truncates some roundings.
    assert float(((restored - v).abs() / v.abs().amax(1, keepdim=True)).max()) < 0.15
    assert float((restored - v).abs().mean() / v.abs().mean()) < 0.06
