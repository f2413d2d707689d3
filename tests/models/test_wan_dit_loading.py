"""load_dit against diffusers (numerical parity) and every checkpoint layout of the same tiny weights."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from turbo_kernels.w8a8 import dequantize_tiles, quantize_tiles
from turbo_serve.models import wan_dit
from turbo_serve.models.checkpoint import CheckpointKeyError
from turbo_serve.models.configs import get_preset
from turbo_serve.models.loading import inspect_dit_checkpoint, load_dit
from turbo_serve.models.quant import Int8Linear

diffusers = pytest.importorskip("diffusers")

TINY = get_preset("tiny-t2v").dit  # dim 128, 2 heads of 64, 2 layers, text_dim 64
WRAP = "_checkpoint_wrapped_module."


def tiny_diffusers(in_channels: int, seed: int = 0):
    """A tiny diffusers WanTransformer3DModel, every parameter random (norm weights near 1)."""
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=TINY.num_heads,
        attention_head_dim=TINY.head_dim,
        in_channels=in_channels,
        out_channels=16,
        text_dim=TINY.text_dim,
        freq_dim=256,
        ffn_dim=TINY.ffn_dim,
        num_layers=TINY.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    return model.eval()


# The original Wan names of diffusers' keys, written out from the conversion table (notes 2.9).
_TO_WAN = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn1\.norm_", ".self_attn.norm_"),
    (r"\.attn2\.norm_", ".cross_attn.norm_"),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def wan_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in _TO_WAN:
            key = re.sub(pattern, replacement, key)
        out[key] = value.clone().contiguous()
    return out


def turbo_state_dict(wan: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """TurboDiffusion naming: wrapped blocks and head, 2-D patch embedding, random per-block proj_l."""
    out = {}
    for key, value in wan.items():
        key = re.sub(r"^(blocks\.\d+\.|head\.)", lambda m: m.group(1) + WRAP, key)
        out[key] = value.flatten(1) if key == "patch_embedding.weight" else value
    generator = torch.Generator().manual_seed(seed)
    for i in range(TINY.num_layers):
        prefix = f"blocks.{i}.{WRAP}self_attn.attn_op.local_attn.proj_l."
        out[prefix + "weight"] = torch.randn(TINY.head_dim, TINY.head_dim, generator=generator)
        out[prefix + "bias"] = torch.randn(TINY.head_dim, generator=generator)
    return out


BLOCK_LINEAR = re.compile(r"^blocks\.\d+\..*((self_attn|cross_attn)\.[qkvo]|ffn\.[02])\.weight$")


def quantized_state_dict(turbo: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(TurboDiffusion -quant state dict, the same weights dequantised back to float)."""
    quant, dequant = {}, {}
    for key, value in turbo.items():
        if BLOCK_LINEAR.match(key):
            q, s = quantize_tiles(value)
            quant[key.replace(".weight", ".int8_weight")], quant[key.replace(".weight", ".scale")] = q, s
            dequant[key] = dequantize_tiles(q, s)
        else:
            quant[key] = dequant[key] = value
    return quant, dequant


def inputs(in_channels: int, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, in_channels, 3, 8, 12, generator=generator)
    context = torch.randn(2, TINY.text_len, TINY.text_dim, generator=generator)
    context[0, 40:] = 0  # zero padding after the prompt, attended like every position
    return x, torch.tensor([999.0, 250.0]), context


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    model = tiny_diffusers(16)
    folder = tmp_path_factory.mktemp("diffusers_t2v")
    model.save_pretrained(folder)
    return model, folder


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch-norms", "fused-norms"])
@pytest.mark.parametrize("in_channels", [16, 36])
def test_diffusers_folder_matches_diffusers_forward(in_channels, fused, t2v, tmp_path, monkeypatch):
    monkeypatch.setattr(wan_dit, "FUSED_NORMS", fused)  # fused: the Triton kernels, interpreted
    if in_channels == 16:
        reference, folder = t2v
    else:
        reference, folder = tiny_diffusers(36, seed=1), tmp_path
        reference.save_pretrained(folder)
    ours = load_dit(folder, dtype=torch.float32)
    assert ours.config.in_dim == in_channels and ours.config.head_dim == TINY.head_dim
    x, t, context = inputs(in_channels)
    with torch.no_grad():
        expected = reference(x, t, context, return_dict=False)[0]
        got = ours(x, t, context)
    assert got.shape == expected.shape == (2, 16, 3, 8, 12)
    assert (got - expected).abs().max() < 1e-4 * expected.std()


def test_wan_naming_safetensors_pth_and_shards_load_identical(t2v, tmp_path):
    model, folder = t2v
    reference = load_dit(folder, dtype=torch.float32)
    wan = wan_state_dict(model)
    save_file(wan, tmp_path / "dit.safetensors")
    torch.save(wan, tmp_path / "dit.pth")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(wan)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}  # fmt: skip
    for name, shard_keys in shards.items():
        save_file({k: wan[k] for k in shard_keys}, sharded / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    wan_config = {"_class_name": "WanModel", "dim": TINY.dim, "ffn_dim": TINY.ffn_dim, "freq_dim": 256,
                  "in_dim": 16, "model_type": "t2v", "num_heads": TINY.num_heads, "num_layers": TINY.num_layers,
                  "out_dim": 16, "text_len": 512, "text_dim": TINY.text_dim, "eps": 1e-6}  # fmt: skip
    (sharded / "config.json").write_text(json.dumps(wan_config))

    for source in (tmp_path / "dit.safetensors", tmp_path / "dit.pth", sharded):
        assert str(inspect_dit_checkpoint(source)) == "wan"
        assert_same_weights(load_dit(source, TINY if source.is_file() else None, dtype=torch.float32), reference)
    assert str(inspect_dit_checkpoint(folder)) == "diffusers"


def test_bare_file_config_comes_from_shapes_and_presets(t2v, tmp_path):
    torch.save(wan_state_dict(t2v[0]), tmp_path / "dit.pth")
    # The sizes match the tiny-t2v preset, which supplies the head count (64-wide heads, not 128).
    assert load_dit(tmp_path / "dit.pth", dtype=torch.float32).config == TINY


def test_training_checkpoint_container_and_prefix_are_unwrapped(t2v, tmp_path):
    wan = wan_state_dict(t2v[0])
    torch.save({"state_dict": {"net." + k: v for k, v in wan.items()}}, tmp_path / "train.pth")
    assert inspect_dit_checkpoint(tmp_path / "train.pth").prefix == "net."
    loaded = load_dit(tmp_path / "train.pth", TINY, dtype=torch.float32)
    assert torch.equal(loaded.blocks[1].ffn[2].weight, wan["blocks.1.ffn.2.weight"])
    with_ema = {"net." + k: v for k, v in wan.items()}
    with_ema["net_ema.patch_embedding.weight"] = wan["patch_embedding.weight"]
    torch.save(with_ema, tmp_path / "two.pth")
    with pytest.raises(ValueError, match="several DiTs"):
        load_dit(tmp_path / "two.pth", TINY)


def test_turbodiffusion_naming_loads_same_weights_plus_proj_l(t2v, tmp_path):
    model, folder = t2v
    reference = load_dit(folder, dtype=torch.float32)
    turbo = turbo_state_dict(wan_state_dict(model))
    torch.save({"model.diffusion_model." + k: v for k, v in turbo.items()}, tmp_path / "turbo.pth")
    assert str(inspect_dit_checkpoint(tmp_path / "turbo.pth")) == "turbodiffusion"

    loaded = load_dit(tmp_path / "turbo.pth", TINY, dtype=torch.bfloat16)
    block = loaded.blocks[1].self_attn
    assert block.proj_l.weight.dtype == torch.float32 and block.qkv.weight.dtype == torch.bfloat16
    assert torch.equal(block.proj_l.weight, turbo[f"blocks.1.{WRAP}self_attn.attn_op.local_attn.proj_l.weight"])
    loaded = load_dit(tmp_path / "turbo.pth", TINY, dtype=torch.float32)
    ours, theirs = loaded.state_dict(), reference.state_dict()
    for key in ours:
        if "proj_l" in key:
            assert not theirs[key].any()  # stock weights have no proj_l: zero
        else:
            assert torch.equal(ours[key], theirs[key]), key


def test_turbodiffusion_quantized_needs_quant_linear_and_matches_dequantized(t2v, tmp_path):
    quant, dequant = quantized_state_dict(turbo_state_dict(wan_state_dict(t2v[0])))
    torch.save(quant, tmp_path / "quant.pth")
    torch.save(dequant, tmp_path / "dequant.pth")
    assert str(inspect_dit_checkpoint(tmp_path / "quant.pth")) == "turbodiffusion-quant"
    with pytest.raises(ValueError, match="quant_linear=True"):
        load_dit(tmp_path / "quant.pth", TINY)
    with pytest.raises(ValueError, match="quant_linear=False"):
        load_dit(tmp_path / "dequant.pth", TINY, quant_linear=True)

    quantized = load_dit(tmp_path / "quant.pth", TINY, dtype=torch.float32, quant_linear=True)
    qkv = quantized.blocks[0].self_attn.qkv
    assert isinstance(qkv, Int8Linear) and qkv.int8_weight.shape == (3 * TINY.dim, TINY.dim)
    assert not isinstance(quantized.blocks[0].self_attn.proj_l, Int8Linear)
    reference = load_dit(tmp_path / "dequant.pth", TINY, dtype=torch.float32)
    x, t, context = inputs(16)
    with torch.no_grad():
        expected, got = reference(x, t, context), quantized(x, t, context)
    relative = (got - expected).norm() / expected.norm()
    assert 0 < relative < 0.01  # activation quantisation only: the weights are the same numbers


def test_missing_and_unexpected_keys_are_listed(t2v, tmp_path):
    wan = wan_state_dict(t2v[0])
    del wan["blocks.1.cross_attn.k.weight"]
    wan["blocks.0.self_attn.extra.weight"] = torch.zeros(1)
    torch.save(wan, tmp_path / "bad.pth")
    with pytest.raises(CheckpointKeyError) as error:
        load_dit(tmp_path / "bad.pth", TINY)
    message = str(error.value)
    assert "1 missing keys: blocks.1.cross_attn.k.weight" in message
    assert "1 unexpected keys: blocks.0.self_attn.extra.weight" in message


def test_missing_keys_in_diffusers_naming_are_truncated(t2v, tmp_path):
    state = {k: v for k, v in t2v[0].state_dict().items() if not k.startswith("blocks.1.")}
    save_file(state, tmp_path / "diffusers_partial.safetensors")
    with pytest.raises(CheckpointKeyError) as error:
        load_dit(tmp_path / "diffusers_partial.safetensors", TINY)
    message = str(error.value)
    assert re.search(r"(\d+) missing keys: blocks\.1\.attn1\.", message)
    assert "... and" in message and "more" in message and "unexpected" not in message


def test_partial_proj_l_and_wrong_shapes_and_clip_are_errors(t2v, tmp_path):
    turbo = turbo_state_dict(wan_state_dict(t2v[0]))
    del turbo[f"blocks.0.{WRAP}self_attn.attn_op.local_attn.proj_l.weight"]
    torch.save(turbo, tmp_path / "partial.pth")
    with pytest.raises(CheckpointKeyError, match="proj_l"):
        load_dit(tmp_path / "partial.pth", TINY)

    torch.save(wan_state_dict(t2v[0]), tmp_path / "dit.pth")
    with pytest.raises(CheckpointKeyError, match="wrong shape"):
        load_dit(tmp_path / "dit.pth", get_preset("tiny-i2v").dit)  # in_dim 36 vs 16

    clip = {**wan_state_dict(t2v[0]), "img_emb.proj.0.weight": torch.ones(4)}
    torch.save(clip, tmp_path / "clip.pth")
    with pytest.raises(ValueError, match="CLIP"):
        load_dit(tmp_path / "clip.pth", TINY)
