"""WanDiT building blocks and behaviour: RoPE, time features, per-call attention dispatch, W8A8, compile."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from turbo_kernels.registry import AttentionMetadata, attention_types, register_attention_backend
from turbo_serve.models.configs import get_preset
from turbo_serve.models.loading import load_dit
from turbo_serve.models.quant import Int8Linear, quantize_linears
from turbo_serve.models.wan_dit import apply_rope, rope_axis_dims, rope_tables, sinusoidal_embedding

TINY = get_preset("tiny-t2v").dit


def wan_rope_reference(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Wan's rope_apply: complex float64 tables of 1024 positions, split c - 2(c//3), c//3, c//3 pairs."""
    d = x.shape[-1]
    c = d // 2

    def params(dim):
        freqs = 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim)
        angles = torch.outer(torch.arange(1024.0, dtype=torch.float64), freqs)
        return torch.polar(torch.ones_like(angles), angles)

    freqs = torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1)
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    t, h, w = grid
    table = torch.cat(
        [ft[:t].view(t, 1, 1, -1).expand(t, h, w, -1),
         fh[:h].view(1, h, 1, -1).expand(t, h, w, -1),
         fw[:w].view(1, 1, w, -1).expand(t, h, w, -1)],
        dim=-1,
    ).reshape(t * h * w, 1, -1)  # fmt: skip
    rotated = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2)) * table
    return torch.view_as_real(rotated).flatten(-2)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_matches_wan_complex_rotation(head_dim):
    grid = (3, 4, 5)
    x = torch.randn(2, math.prod(grid), 3, head_dim)
    got = apply_rope(x, *rope_tables(grid, head_dim, "cpu"))
    assert torch.allclose(got.double(), wan_rope_reference(x, grid), atol=1e-5)
    assert apply_rope(x.bfloat16(), *rope_tables(grid, head_dim, "cpu")).dtype == torch.bfloat16


def test_rope_axis_split_follows_wan():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(64) == (24, 20, 20)


def test_time_features_are_cos_then_sin():
    features = sinusoidal_embedding(torch.tensor([0.0, 500.0]), 256)
    assert torch.equal(features[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert math.isclose(features[1, 1].item(), math.cos(500 * 10000 ** (-1 / 128)), abs_tol=1e-6)
    assert math.isclose(features[1, 129].item(), math.sin(500 * 10000 ** (-1 / 128)), abs_tol=1e-6)


@pytest.fixture(scope="module")
def tiny_dit():
    return load_dit(None, TINY, dtype=torch.float32, seed=7)


def tiny_inputs(batch=1, in_dim=16, text_rows=TINY.text_len):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(batch, in_dim, 2, 6, 8, generator=generator)
    context = torch.randn(batch, text_rows, TINY.text_dim, generator=generator)
    return x, torch.full((batch,), 800.0), context


def test_random_weights_are_seeded_and_sane(tiny_dit):
    again = load_dit(None, TINY, dtype=torch.float32, seed=7)
    other = load_dit(None, TINY, dtype=torch.float32, seed=8)
    for (name, a), b in zip(tiny_dit.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        if "proj_l" in name:
            assert not a.any()
    assert not torch.equal(tiny_dit.blocks[0].ffn[0].weight, other.blocks[0].ffn[0].weight)
    with torch.no_grad():
        out = tiny_dit(*tiny_inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and 0.01 < out.std() < 10


def test_short_context_is_zero_padded_and_i2v_takes_36_channels(tiny_dit):
    x, t, context = tiny_inputs(text_rows=20)
    padded = F.pad(context, (0, 0, 0, TINY.text_len - 20))
    with torch.no_grad():
        assert torch.equal(tiny_dit(x, t, context), tiny_dit(x, t, padded))
    i2v = load_dit(None, get_preset("tiny-i2v").dit, dtype=torch.float32)
    with torch.no_grad():
        assert i2v(*tiny_inputs(batch=2, in_dim=36)).shape == (2, 16, 2, 6, 8)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, t, c: (x[:, :8], t, c), "channels"),
        (lambda x, t, c: (x[..., :7], t, c), "divisible"),
        (lambda x, t, c: (x, t[None], c), "timestep"),
        (lambda x, t, c: (x, t, torch.cat([c, c], dim=1)), "text_len"),
    ],
)
def test_bad_inputs_name_the_rule(tiny_dit, change, message):
    with pytest.raises(ValueError, match=message):
        tiny_dit(*change(*tiny_inputs()))


_calls: list[tuple] = []


@register_attention_backend("test-recording-sdpa")
def _recording_sdpa(q, k, v, meta, proj_l):
    _calls.append((tuple(q.shape), proj_l, meta.sla_topk))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@register_attention_backend("test-zero")
def _zero_attention(q, k, v, meta, proj_l):
    return torch.zeros_like(q)


def test_attention_type_is_chosen_per_call(tiny_dit):
    x, t, context = tiny_inputs()
    _calls.clear()
    with torch.no_grad():
        original = tiny_dit(x, t, context)
        recorded = tiny_dit(x, t, context, AttentionMetadata("test-recording-sdpa", sla_topk=0.5))
        zeroed = tiny_dit(x, t, context, AttentionMetadata("test-zero"))
        again = tiny_dit(x, t, context)
    tokens = 2 * 3 * 4
    layout = (1, tokens, TINY.num_heads, TINY.head_dim)  # (B, L, H, D)
    assert _calls == [(layout, block.self_attn.proj_l, 0.5) for block in tiny_dit.blocks]
    assert torch.allclose(recorded, original, atol=1e-6)
    assert not torch.allclose(zeroed, original, atol=1e-3)
    assert torch.equal(again, original)
    with pytest.raises(ValueError, match="valid"):
        tiny_dit(x, t, context, AttentionMetadata("no-such-backend"))


@pytest.mark.skipif("sla" not in attention_types(), reason="turbo_kernels.sla is not merged yet")
def test_sla_with_full_topk_and_zero_proj_l_matches_original(tiny_dit):
    x, t, context = tiny_inputs()
    with torch.no_grad():
        original = tiny_dit(x, t, context)
        sla = tiny_dit(x, t, context, AttentionMetadata("sla", sla_topk=1.0))
    assert torch.allclose(sla, original, atol=1e-3 * original.abs().max())


def test_quantize_linears_replaces_block_linears_but_proj_l():
    dit = load_dit(None, TINY, dtype=torch.float32, seed=3)
    x, t, context = tiny_inputs()
    with torch.no_grad():
        reference = dit(x, t, context)
        quantize_linears(dit)
        quantized = dit(x, t, context)
    kinds = {name: type(m) for name, m in dit.blocks.named_modules()}
    assert kinds["0.self_attn.qkv"] is Int8Linear and kinds["1.ffn.2"] is Int8Linear
    assert kinds["0.cross_attn.kv"] is Int8Linear and kinds["0.self_attn.proj_l"] is torch.nn.Linear
    assert type(dit.head.head) is torch.nn.Linear and type(dit.text_embedding[0]) is torch.nn.Linear
    assert (quantized - reference).norm() / reference.norm() < 0.02


def test_block_traces_as_one_graph(tiny_dit):
    block = tiny_dit.blocks[0]
    tokens = 2 * 3 * 4
    x = torch.randn(1, tokens, TINY.dim)
    e0 = torch.randn(1, 6, TINY.dim)
    context = torch.randn(1, TINY.text_len, TINY.dim)
    rope = tiny_dit.rope((2, 3, 4), x.device)
    from turbo_kernels.registry import get_attention_backend

    args = (x, e0, context, rope, get_attention_backend("original"), AttentionMetadata())
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(*args), block(*args))


def test_bf16_model_keeps_fp32_where_wan_does():
    dit = load_dit(None, replace(TINY, num_layers=1), dtype=torch.bfloat16)
    assert dit.blocks[0].modulation.dtype == torch.float32 and dit.head.modulation.dtype == torch.float32
    assert dit.blocks[0].self_attn.proj_l.weight.dtype == torch.float32
    assert dit.blocks[0].self_attn.qkv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = dit(*tiny_inputs())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
