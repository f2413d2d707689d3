import pytest
import torch

from turbo_kernels import AttentionMetadata, attention_types, get_attention_backend
from turbo_kernels.accuracy import cosine_similarity
from turbo_kernels.block_mask import build_block_mask
from turbo_kernels.block_sparse import block_sparse_attention
from turbo_kernels.dense import attention_ref
from turbo_kernels.dispatch import use_triton
from turbo_kernels.sla import sparse_linear_ref


def _qkv(dtype=torch.float32, length=200, heads=2, dim=64):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, length, heads, dim, generator=gen).to(dtype) for _ in range(3)]


def test_registry_lists_the_built_in_backends():
    assert {"original", "sla", "sagesla", "sage"} <= set(attention_types())


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="original.*sagesla.*sla"):
        get_attention_backend("flash9")


def test_dispatch_rule():
    x = torch.zeros(2)
    assert use_triton(x)  # interpreter on (tests/conftest.py)
    assert not use_triton(x.bfloat16())  # the interpreter's tl.dot gets bfloat16 wrong
    assert not use_triton(x, x.bfloat16())


def test_sla_backend_runs_the_kernels_with_the_layer_projection():
    q, k, v = _qkv()
    proj = torch.nn.Linear(64, 64)
    out = get_attention_backend("sla")(q, k, v, AttentionMetadata("sla", 0.5), proj)
    lut = build_block_mask(q, k, 0.5, 128, 64)
    ref = sparse_linear_ref(q, k, v, lut, proj, blkq=128, blkk=64)
    assert cosine_similarity(out, ref) >= 0.9999


def test_sla_backend_with_zero_init_projection_is_top_k_sparse():
    q, k, v = _qkv(torch.float16)
    proj = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    out = get_attention_backend("sla")(q, k, v, AttentionMetadata("sla", 0.3), proj)
    lut = build_block_mask(q, k, 0.3, 128, 64)
    assert cosine_similarity(out, block_sparse_attention(q, k, v, lut)) >= 0.99999


@pytest.mark.parametrize("name", ["sage", "sagesla"])
def test_sage_backends_stay_close_to_dense_at_full_density(name):
    q, k, v = _qkv()
    proj = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    out = get_attention_backend(name)(q, k, v, AttentionMetadata(name, 1.0), proj)
    assert cosine_similarity(out, attention_ref(q, k, v)) >= 0.999


@pytest.mark.parametrize("name", ["sla", "sagesla", "sage"])
def test_bfloat16_on_cpu_takes_the_reference_path(name):
    q, k, v = _qkv(torch.bfloat16)
    proj = torch.nn.Linear(64, 64)
    out = get_attention_backend(name)(q, k, v, AttentionMetadata(name, 0.5), proj)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    fp32 = get_attention_backend(name)(q.float(), k.float(), v.float(), AttentionMetadata(name, 0.5), proj)
    assert cosine_similarity(out, fp32) >= 0.999


@pytest.mark.parametrize("length", [1, 24, 129])
@pytest.mark.parametrize("name", ["sla", "sagesla"])
def test_sequences_shorter_than_a_block_or_one_past_it(name, length):
    q, k, v = _qkv(length=length)
    proj = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    out = get_attention_backend(name)(q, k, v, AttentionMetadata(name, 1.0), proj)
    assert cosine_similarity(out, attention_ref(q, k, v)) >= 0.999


def test_sage_pv_mode_is_pinned_by_the_environment(monkeypatch):
    from turbo_kernels.sage import sage_pv_mode

    monkeypatch.delenv("TURBO_KERNELS_SAGE_PV", raising=False)
    assert sage_pv_mode() is None  # auto: the autotuner's gated choice
    monkeypatch.setenv("TURBO_KERNELS_SAGE_PV", "bf16")
    assert sage_pv_mode() is False
    monkeypatch.setenv("TURBO_KERNELS_SAGE_PV", "fp8")
    assert sage_pv_mode() is True
    monkeypatch.setenv("TURBO_KERNELS_SAGE_PV", "fp4")
    with pytest.raises(ValueError, match="bf16"):
        sage_pv_mode()
