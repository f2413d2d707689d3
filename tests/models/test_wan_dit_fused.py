"""The DiT's fused norm path (turbo_kernels.fused_norm, Triton under the CPU interpreter) computes
the same function as its PyTorch path (test_wan_dit_loading checks both against diffusers)."""

from __future__ import annotations

import pytest
import torch

from turbo_kernels.registry import AttentionMetadata, get_attention_backend
from turbo_serve.models import wan_dit
from turbo_serve.models.configs import get_preset
from turbo_serve.models.loading import load_dit

TINY = get_preset("tiny-t2v").dit


def _inputs(batch=2):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(batch, TINY.in_dim, 2, 6, 8, generator=generator)
    context = torch.randn(batch, 20, TINY.text_dim, generator=generator)
    return x, torch.tensor([800.0, 250.0][:batch]), context


def _forward(dit, fused: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(wan_dit, "FUSED_NORMS", fused)
    with torch.no_grad():
        return dit(*_inputs())


@pytest.fixture(scope="module")
def dits():
    return {dtype: load_dit(None, TINY, dtype=dtype, seed=7) for dtype in (torch.float32, torch.float16)}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fused_float32_forward_matches_the_pytorch_forward(dits, monkeypatch):
    reference = _forward(dits[torch.float32], False, monkeypatch)
    fused = _forward(dits[torch.float32], True, monkeypatch)
    assert _relative(fused, reference) < 1e-5


def test_fused_float16_forward_is_as_close_to_float32_as_the_pytorch_one(dits, monkeypatch):
    exact = _forward(dits[torch.float32], False, monkeypatch)
    pytorch16 = _forward(dits[torch.float16], False, monkeypatch)
    fused16 = _forward(dits[torch.float16], True, monkeypatch)
    assert _relative(fused16, pytorch16) < 2e-3
    assert _relative(fused16, exact) <= 1.1 * _relative(pytorch16, exact) + 1e-4


def test_fused_block_calls_each_kernel_and_leaves_its_input_alone(dits, monkeypatch):
    block = dits[torch.float32].blocks[0]
    calls = []
    for name in ("layernorm_modulate", "gated_residual", "gated_residual_layernorm", "rmsnorm_rope"):
        original = getattr(wan_dit, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(wan_dit, name, counted)
    tokens = 2 * 3 * 4
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, tokens, TINY.dim, generator=generator)
    e0 = torch.randn(2, 6, TINY.dim, generator=generator)
    context = torch.randn(2, TINY.text_len, TINY.dim, generator=generator)
    args = (e0, context, dits[torch.float32].rope((2, 3, 4), x.device), get_attention_backend("original"),
            AttentionMetadata())
    before = x.clone()
    outputs = {}
    for fused in (False, True):
        monkeypatch.setattr(wan_dit, "FUSED_NORMS", fused)
        with torch.no_grad():
            outputs[fused] = block(x, *args)
        assert torch.equal(x, before)
    assert sorted(calls) == sorted(
        ["layernorm_modulate", "rmsnorm_rope", "gated_residual_layernorm", "layernorm_modulate", "gated_residual"]
    )
    assert _relative(outputs[True], outputs[False]) < 1e-5


def test_default_takes_the_kernels_on_cuda_only(monkeypatch):
    monkeypatch.setattr(wan_dit, "FUSED_NORMS", None)
    assert not wan_dit.fused_norms(torch.zeros(1))
    monkeypatch.setattr(wan_dit, "FUSED_NORMS", True)
    assert wan_dit.fused_norms(torch.zeros(1))
