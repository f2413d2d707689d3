"""Triton attention kernels (interpreter, CPU) against exact references.

Gates from issue 8: block-sparse and sla vs the exact masked reference cosine >= 0.9999 and
relative L1 <= 1e-3; sage vs dense cosine >= 0.999; topk = 1.0 block-sparse equals dense.
"""

import math

import pytest
import torch

from turbo_kernels.accuracy import cosine_similarity, relative_l1
from turbo_kernels.block_mask import build_block_mask
from turbo_kernels.block_sparse import block_sparse_attention, block_sparse_attention_ref
from turbo_kernels.dense import attention_ref, dense_attention
from turbo_kernels.flash import FlashConfig
from turbo_kernels.sage import sage_attention, sage_attention_ref, sagesla_attention
from turbo_kernels.sla import linear_attention_ref, sla_attention, sparse_linear_attention, sparse_linear_ref


def _qkv(length, heads, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, length, heads, dim, generator=gen).to(dtype) for _ in range(3)]


def _token_mask(lut, length, blkq, blkk):
    """(B, H, L, L) bool: token (i, j) allowed iff key block of j is in query block of i's LUT row."""
    B, H, mq, _ = lut.shape
    nk = math.ceil(length / blkk)
    allowed = torch.zeros(B, H, mq, nk, dtype=torch.bool)
    allowed.scatter_(-1, lut.long(), True)
    return allowed.repeat_interleave(blkq, 2)[:, :, :length].repeat_interleave(blkk, 3)[..., :length]


def _masked_attention(q, k, v, mask):
    """Exact softmax attention in fp32 with a (B, H, L, L) token mask, (B, L, H, D) out."""
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhlm,bmhd->blhd", probs, v.float())


def _assert_exact_gate(out, ref):
    assert cosine_similarity(out, ref) >= 0.9999
    assert relative_l1(out, ref) <= 1e-3


def _proj(dim, seed=0):
    torch.manual_seed(seed)
    proj = torch.nn.Linear(dim, dim)
    torch.nn.init.normal_(proj.weight, std=dim**-0.5)
    return proj


@pytest.mark.parametrize(
    "dim,dtype,config",
    [
        (64, torch.float16, FlashConfig(128, 64)),
        (128, torch.float16, FlashConfig(64, 128, num_warps=4)),
        (64, torch.float32, FlashConfig(128, 128)),
        (128, torch.float32, FlashConfig(128, 64, use_tma=True)),
    ],
)
def test_dense_matches_exact_attention(dim, dtype, config):
    q, k, v = _qkv(230, 2, dim, dtype)
    out = dense_attention(q, k, v, config=config)
    assert out.shape == q.shape and out.dtype == dtype
    _assert_exact_gate(out, attention_ref(q.float(), k.float(), v.float()))


def test_dense_reads_strided_views_of_a_fused_qkv():
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 150, 3, 2, 64, generator=gen).half()
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _assert_exact_gate(dense_attention(q, k, v, config=FlashConfig(128, 64)), attention_ref(q.float(), k.float(), v.float()))


@pytest.mark.parametrize("blkq,blkk", [(128, 64), (64, 128)])
@pytest.mark.parametrize("topk", [0.01, 0.4, 1.0])
@pytest.mark.parametrize("dim,dtype", [(64, torch.float16), (128, torch.float32)])
def test_block_sparse_matches_masked_reference(blkq, blkk, topk, dim, dtype):
    q, k, v = _qkv(300, 2, dim, dtype, seed=2)
    lut = build_block_mask(q, k, topk, blkq, blkk)
    out = block_sparse_attention(q, k, v, lut, blkq=blkq, blkk=blkk)
    ref = _masked_attention(q, k, v, _token_mask(lut, 300, blkq, blkk))
    _assert_exact_gate(out, ref)
    _assert_exact_gate(block_sparse_attention_ref(q, k, v, lut, blkq, blkk), ref)


@pytest.mark.parametrize("rows", [[[0, 1]], [[4]], [[1, 4]]], ids=["no-tail", "tail-only", "tail-last"])
def test_block_sparse_masks_only_the_ragged_tail(rows):
    q, k, v = _qkv(260, 1, 64, torch.float16, seed=3)  # 5 key blocks of 64, the last holds 4 tokens
    lut = torch.tensor(rows, dtype=torch.int32).expand(3, -1).reshape(1, 1, 3, -1).contiguous()
    out = block_sparse_attention(q, k, v, lut, blkq=128, blkk=64)
    _assert_exact_gate(out, _masked_attention(q, k, v, _token_mask(lut, 260, 128, 64)))


@pytest.mark.parametrize(
    "length,rows",
    [(300, [[0, 1]]), (300, [[0, 4]]), (300, [[1]]), (300, [[4]]), (300, [[0, 2, 4]]), (300, [[0, 1, 3]]),
     (256, [[0, 1, 3]]), (256, [[2]])],
    ids=["even", "even-tail", "odd", "odd-tail-only", "odd-tail", "odd-no-tail", "aligned-odd", "aligned-one"],
)
def test_two_block_walk_matches_masked_reference(length, rows):
    """block_n = 2 x the LUT's key block: pairs of LUT entries per step, the leftover entry and the
    ragged block in one masked step."""
    q, k, v = _qkv(length, 2, 64, torch.float16, seed=13)
    mq = math.ceil(length / 128)
    lut = torch.tensor(rows, dtype=torch.int32).expand(mq, -1).reshape(1, 1, mq, -1).expand(1, 2, -1, -1).contiguous()
    out = block_sparse_attention(q, k, v, lut, blkq=128, blkk=64, config=FlashConfig(128, 128))
    _assert_exact_gate(out, _masked_attention(q, k, v, _token_mask(lut, length, 128, 64)))


def test_two_block_walk_in_sla_and_sagesla():
    q, k, v = _qkv(330, 2, 64, torch.float16, seed=14)
    proj = _proj(64)
    pair = FlashConfig(128, 128)
    for topk in (0.34, 0.5):  # 2 and 3 of 6 key blocks: an even and an odd LUT row
        out, lut = sparse_linear_attention(q, k, v, topk, proj, config=pair, return_lut=True)
        _assert_exact_gate(out, sparse_linear_ref(q.float(), k.float(), v.float(), lut, proj, blkq=128, blkk=64))
        out = sparse_linear_attention(q, k, v, topk, proj, config=pair, linear="unselected")
        ref = sparse_linear_ref(q.float(), k.float(), v.float(), lut, proj, blkq=128, blkk=64, linear="unselected")
        _assert_exact_gate(out, ref)
        out = sagesla_attention(q, k, v, topk, proj, geometry=(128, 64), pv_fp8=False, config=pair)
        exact = sparse_linear_ref(q.float(), k.float(), v.float(), lut, proj, blkq=128, blkk=64, qk_int8=True)
        _assert_exact_gate(out, exact)
        fp8 = sagesla_attention(q, k, v, topk, proj, geometry=(128, 64), pv_fp8=True, config=pair)
        assert cosine_similarity(fp8, exact) >= 0.99  # interpreter fp8 rounding, see test_sage_fp8_pv_path


def test_two_block_walk_rejects_tma_and_other_widths():
    q, k, v = _qkv(200, 1, 64, torch.float16)
    lut = build_block_mask(q, k, 0.5, 128, 64)
    with pytest.raises(ValueError, match="plain pointers"):
        block_sparse_attention(q, k, v, lut, config=FlashConfig(128, 128, use_tma=True))
    with pytest.raises(ValueError, match="twice"):
        block_sparse_attention(q, k, v, lut, config=FlashConfig(128, 32))


@pytest.mark.parametrize("blkq,blkk", [(128, 64), (64, 128)])
def test_block_sparse_with_every_block_equals_dense(blkq, blkk):
    q, k, v = _qkv(270, 2, 64, torch.float16, seed=4)
    config = FlashConfig(blkq, blkk, num_warps=4)
    lut = build_block_mask(q, k, 1.0, blkq, blkk)
    sparse = block_sparse_attention(q, k, v, lut, blkq=blkq, blkk=blkk, config=config)
    assert torch.equal(sparse, dense_attention(q, k, v, config=config))


def test_block_sparse_subdivided_query_tiles_and_tma():
    q, k, v = _qkv(250, 2, 64, torch.float16, seed=5)
    lut = build_block_mask(q, k, 0.5, 128, 64)
    ref = _masked_attention(q, k, v, _token_mask(lut, 250, 128, 64))
    for config in (FlashConfig(64, 64, num_warps=4), FlashConfig(128, 64, use_tma=True)):
        _assert_exact_gate(block_sparse_attention(q, k, v, lut, blkq=128, blkk=64, config=config), ref)


def test_tma_descriptors_equal_pointer_loads_in_every_mode():
    """The USE_TMA path (host-built descriptors: Q as 2-D rows, K/V/O 4-D) reads and writes the same
    elements as plain pointers: batch 2, a ragged length and Q/K/V as views of one fused QKV tensor,
    so the 2-D Q view's rows past L fall into the next batch entry (and must never be stored)."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = torch.randn(2, 200, 3, 2, 64, generator=gen).half().unbind(2)
    proj = _proj(64)
    cases = {
        "dense": lambda cfg: dense_attention(q, k, v, config=cfg),
        "block_sparse": lambda cfg: block_sparse_attention(q, k, v, build_block_mask(q, k, 0.5, 128, 64),
                                                           blkq=128, blkk=64, config=cfg),
        "sla": lambda cfg: sla_attention(q, k, v, 0.5, proj, config=cfg),
        "sla_unselected": lambda cfg: sla_attention(q, k, v, 0.5, proj, linear="unselected", config=cfg),
        "sage": lambda cfg: sage_attention(q, k, v, pv_fp8=False, config=cfg),
        "sagesla_fp8_pv": lambda cfg: sagesla_attention(q, k, v, 0.5, proj, geometry=(128, 64), pv_fp8=True,
                                                        config=cfg),
    }
    for name, run in cases.items():
        plain = run(FlashConfig(128, 64))
        assert torch.equal(run(FlashConfig(128, 64, use_tma=True)), plain), name


def test_linear_reference_definitions():
    q, k, v = _qkv(200, 2, 64, torch.float32, seed=6)
    phi_q, phi_k = torch.softmax(q, -1), torch.softmax(k, -1)
    a = torch.einsum("blhd,bmhd->bhlm", phi_q, phi_k)
    full = torch.einsum("bhlm,bmhd->blhd", a, v) / (a.sum(-1).transpose(1, 2)[..., None] + 1e-5)
    torch.testing.assert_close(linear_attention_ref(q, k, v), full, rtol=1e-4, atol=1e-5)
    lut = build_block_mask(q, k, 0.5, 128, 64)
    a = a.masked_fill(_token_mask(lut, 200, 128, 64), 0.0)
    unselected = torch.einsum("bhlm,bmhd->blhd", a, v) / (a.sum(-1).transpose(1, 2)[..., None] + 1e-5)
    torch.testing.assert_close(linear_attention_ref(q, k, v, lut, 128, 64), unselected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("blkq,blkk", [(128, 64), (64, 128)])
@pytest.mark.parametrize("linear", ["all", "unselected"])
@pytest.mark.parametrize("dim,dtype", [(64, torch.float16), (128, torch.float32)])
def test_sla_matches_exact_reference(blkq, blkk, linear, dim, dtype):
    q, k, v = _qkv(280, 2, dim, dtype, seed=7)
    proj = _proj(dim)
    out, lut = sparse_linear_attention(q, k, v, 0.4, proj, blkq=blkq, blkk=blkk, linear=linear, return_lut=True)
    torch.testing.assert_close(lut, build_block_mask(q, k, 0.4, blkq, blkk))
    ref = sparse_linear_ref(q.float(), k.float(), v.float(), lut, proj, blkq=blkq, blkk=blkk, linear=linear)
    _assert_exact_gate(out, ref)
    # The linear branch really contributes: without it the output moves well outside the gate.
    sparse_only = _masked_attention(q, k, v, _token_mask(lut, 280, blkq, blkk))
    assert relative_l1(sparse_only, ref) > 1e-2


def test_sla_without_proj_l_or_with_zero_proj_l_is_block_sparse():
    q, k, v = _qkv(200, 2, 64, torch.float16, seed=8)
    lut = build_block_mask(q, k, 0.5, 128, 64)
    sparse = block_sparse_attention(q, k, v, lut)
    assert torch.equal(sla_attention(q, k, v, 0.5, None), sparse)
    zero = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(zero.weight)
    torch.nn.init.zeros_(zero.bias)
    _assert_exact_gate(sla_attention(q, k, v, 0.5, zero), sparse.float())


def test_sla_paper_variant_with_every_block_keeps_only_the_bias():
    q, k, v = _qkv(200, 1, 64, torch.float32, seed=9)
    proj = _proj(64)
    out = sla_attention(q, k, v, 1.0, proj, linear="unselected")
    _assert_exact_gate(out, dense_attention(q, k, v) + proj.bias.detach())


def test_sla_rejects_unknown_linear_mode():
    q, k, v = _qkv(100, 1, 64, torch.float32)
    with pytest.raises(ValueError, match="unselected"):
        sla_attention(q, k, v, 0.5, _proj(64), linear="some")


@pytest.mark.parametrize(
    "dim,dtype,config",
    [
        (64, torch.float16, FlashConfig(128, 64)),
        (128, torch.float32, FlashConfig(64, 128, num_warps=4)),
        (128, torch.float16, FlashConfig(64, 128, num_warps=4, use_tma=True)),
    ],
)
def test_sage_matches_dense(dim, dtype, config):
    q, k, v = _qkv(250, 2, dim, dtype, seed=10)
    out = sage_attention(q, k, v, config=config)
    assert cosine_similarity(out, attention_ref(q.float(), k.float(), v.float())) >= 0.999
    # The int8 path itself is exact up to the PV rounding: it matches the quantised reference.
    sage_ref = sage_attention_ref(q.float(), k.float(), v.float(), blkq=config.block_m, blkk=config.block_n)
    _assert_exact_gate(out, sage_ref)


@pytest.mark.parametrize("geometry", [(128, 64), (64, 128)])
def test_sagesla_matches_sla_and_its_exact_reference(geometry):
    blkq, blkk = geometry
    q, k, v = _qkv(300, 3, 64, torch.float16, seed=11)
    proj = _proj(64)
    out = sagesla_attention(q, k, v, 0.3, proj, geometry=geometry)
    lut = build_block_mask(q, k, 0.3, blkq, blkk)
    sla_ref = sparse_linear_ref(q.float(), k.float(), v.float(), lut, proj, blkq=blkq, blkk=blkk)
    assert cosine_similarity(out, sla_ref) >= 0.999
    exact = sparse_linear_ref(q.float(), k.float(), v.float(), lut, proj, blkq=blkq, blkk=blkk, qk_int8=True)
    _assert_exact_gate(out, exact)


def test_sage_fp8_pv_path():
    """FP8 PV layout and scales; the interpreter's float->fp8 cast mis-rounds (no mantissa carry,
    truncated subnormals), so its accuracy gate is loose here and checked on the GPU benchmark."""
    q, k, v = _qkv(250, 2, 64, torch.float16, seed=12)
    ref = sage_attention_ref(q.float(), k.float(), v.float())
    assert cosine_similarity(sage_attention(q, k, v, pv_fp8=True, config=FlashConfig(128, 64)), ref) >= 0.99
    out = sagesla_attention(q, k, v, 0.5, _proj(64), geometry=(64, 128), pv_fp8=True)
    lut = build_block_mask(q, k, 0.5, 64, 128)
    exact = sparse_linear_ref(q.float(), k.float(), v.float(), lut, _proj(64), blkq=64, blkk=128, qk_int8=True)
    assert cosine_similarity(out, exact) >= 0.99
    with pytest.raises(ValueError, match="FP8"):
        sagesla_attention(q, k, v, 0.5, _proj(64), geometry=(64, 128), pv_fp8=True, linear="unselected")
