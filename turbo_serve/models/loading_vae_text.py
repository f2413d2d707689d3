"""Loading the Wan VAE and the UMT5 text encoder from every checkpoint format users have.

VAE: Wan's `Wan2.1_VAE.pth` (original names), a diffusers `AutoencoderKLWan` folder (config.json +
diffusion_pytorch_model*.safetensors) or a state dict file in either naming.
UMT5: an HF folder (config.json + model*.safetensors / pytorch_model*.bin, encoder-only or full
seq2seq) or Wan's `models_t5_umt5-xxl-enc-bf16.pth`.
`None` gives seeded random weights (tiny presets, benchmarks). Every path checks keys and shapes
strictly and names what is missing and unexpected.

Files are found and read by `turbo_serve.models.checkpoint`, shared with the DiT loader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from turbo_serve.models.checkpoint import check_keys, check_shapes, open_state_dict, resolve_checkpoint
from turbo_serve.models.configs import UMT5Config, WanVAEConfig
from turbo_serve.models.umt5 import UMT5TextEncoder, build_umt5_encoder, load_umt5_tokenizer
from turbo_serve.models.wan_vae import WanVAE

StateDict = dict[str, torch.Tensor]
Source = str | os.PathLike | Mapping[str, torch.Tensor] | None


def read_state_dict(source: str | os.PathLike) -> tuple[StateDict, dict | None]:
    """Every tensor of a file or folder source (on the CPU) and the folder's config.json, if any."""
    resolved = resolve_checkpoint(source)
    state = open_state_dict(resolved)
    return {key: state[key] for key in state}, resolved.config


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointKeyError unless `state` has exactly the model's keys, with the same shapes."""
    expected = model.state_dict()
    check_keys(expected, state, what=what)
    check_shapes({k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in state.items()},
                 what=what)  # fmt: skip


def init_random_weights_(model: nn.Module, seed: int) -> None:
    """Seeded random weights: conv/linear N(0, 1/fan_in) with zero bias, embeddings N(0, 1), every
    other parameter (norm gains) 1. Deterministic per device type. Fan-in scaling (rather than the
    DiT's fixed 0.02) keeps activations of these deep conv and T5 stacks at unit scale."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=generator)
            else:
                for param in module.parameters(recurse=False):
                    param.fill_(1.0)


def _materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Allocate a meta-device model's (uninitialised) tensors on `device` in `dtype`."""
    return model.to(dtype=dtype).to_empty(device=device)


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True)


# -- Wan VAE -------------------------------------------------------------------------------------

_VAE_CONFIG_FIELDS = {
    "base_dim": "base_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "temperal_downsample": "temporal_downsample",
}
_WAN_RESIDUAL_LEAVES = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)


def _wan_vae_prefixes(config: WanVAEConfig) -> list[tuple[str, str]]:
    """(Wan prefix, diffusers prefix) pairs, as diffusers' scripts/convert_wan_to_diffusers.py maps them.

    Both keep their blocks in one flat list, per stage num_res_blocks residual blocks (decoder: one
    more), then a resample except after the last stage; diffusers keeps the encoder's list flat too.
    """
    stages = len(config.dim_mult)
    pairs = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
    for index in range(stages * config.num_res_blocks + stages - 1):
        pairs.append((f"encoder.downsamples.{index}.", f"encoder.down_blocks.{index}."))
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv1.", f"{part}.conv_in."),
            (f"{part}.middle.0.", f"{part}.mid_block.resnets.0."),
            (f"{part}.middle.1.", f"{part}.mid_block.attentions.0."),
            (f"{part}.middle.2.", f"{part}.mid_block.resnets.1."),
            (f"{part}.head.0.", f"{part}.norm_out."),
            (f"{part}.head.2.", f"{part}.conv_out."),
        ]
    flat = 0
    last_stage = stages - 1
    for stage in range(stages):
        for resnet in range(config.num_res_blocks + 1):
            pairs.append((f"decoder.upsamples.{flat}.", f"decoder.up_blocks.{stage}.resnets.{resnet}."))
            flat += 1
        if stage != last_stage:
            pairs.append((f"decoder.upsamples.{flat}.", f"decoder.up_blocks.{stage}.upsamplers.0."))
            flat += 1
    return pairs


def is_wan_vae_naming(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.")) for k in state)


def wan_vae_to_diffusers(state: Mapping[str, torch.Tensor], config: WanVAEConfig) -> StateDict:
    """Rename a Wan2.1_VAE.pth state dict to diffusers' (= our) names; unknown keys pass unchanged
    so the strict check reports them."""
    prefixes = sorted(_wan_vae_prefixes(config), key=lambda pair: -len(pair[0]))
    renamed = {}
    for key, value in state.items():
        new_key = key
        for wan, ours in prefixes:
            if key.startswith(wan):
                rest = key[len(wan) :]
                for wan_leaf, our_leaf in _WAN_RESIDUAL_LEAVES:
                    if rest.startswith(wan_leaf):
                        rest = our_leaf + rest[len(wan_leaf) :]
                        break
                new_key = ours + rest
                break
        renamed[new_key] = value
    return renamed


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _check_diffusers_vae_config(folder_config: dict, config: WanVAEConfig, folder: str) -> None:
    if folder_config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"{folder!r} holds a {folder_config['_class_name']}, not an AutoencoderKLWan")
    if folder_config.get("is_residual") or folder_config.get("patch_size"):
        raise ValueError(f"{folder!r} is a Wan2.2 (z_dim 48, residual) VAE; only the Wan2.1 VAE is supported")
    if folder_config.get("decoder_base_dim") not in (None, folder_config.get("base_dim")):
        raise ValueError(f"{folder!r}: decoder_base_dim {folder_config['decoder_base_dim']} != base_dim is unsupported")
    wrong = []
    for theirs, ours in _VAE_CONFIG_FIELDS.items():
        want, got = getattr(config, ours), folder_config.get(theirs)
        if got is not None and _as_list(got) != _as_list(want):
            wrong.append(f"{theirs}={got} (preset {ours}={want})")
    for field in ("latents_mean", "latents_std"):
        got = folder_config.get(field)
        want = getattr(config, field)
        if got is not None and (len(got) != len(want) or any(abs(a - b) > 1e-6 for a, b in zip(got, want))):
            wrong.append(f"{field} differs from the preset's")
    if folder_config.get("attn_scales"):
        wrong.append(f"attn_scales={folder_config['attn_scales']} (Wan2.1 has none)")
    if wrong:
        raise ValueError(f"{folder!r} config.json does not match the model config: " + "; ".join(wrong))


def read_vae_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], config: WanVAEConfig) -> StateDict:
    """A VAE state dict in our (diffusers) names from a folder, a file or an in-memory dict."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state, folder_config = read_state_dict(source)
        if folder_config is not None:
            _check_diffusers_vae_config(folder_config, config, os.fspath(source))
    return wan_vae_to_diffusers(state, config) if is_wan_vae_naming(state) else state


def load_vae(
    source: Source,
    config: WanVAEConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> WanVAE:
    """WanVAE in eval mode on `device`; source None = seeded random weights."""
    with torch.device("meta"):
        model = WanVAE(config)
    model = _materialize(model, device, dtype)
    if source is None:
        init_random_weights_(model, seed)
    else:
        _load_into(model, read_vae_state_dict(source, config), "Wan VAE")
    return model.eval().requires_grad_(False)


# -- UMT5 ----------------------------------------------------------------------------------------

_UMT5_CONFIG_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
)
_TIED_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
_WAN_T5_LEAVES = (
    ("norm1.", "layer.0.layer_norm."),
    ("attn.", "layer.0.SelfAttention."),
    ("pos_embedding.embedding.", "layer.0.SelfAttention.relative_attention_bias."),
    ("norm2.", "layer.1.layer_norm."),
    ("ffn.gate.0.", "layer.1.DenseReluDense.wi_0."),
    ("ffn.fc1.", "layer.1.DenseReluDense.wi_1."),
    ("ffn.fc2.", "layer.1.DenseReluDense.wo."),
)


def wan_t5_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename Wan's T5Encoder state dict (wan/modules/t5.py) to UMT5EncoderModel's names.

    Wan computes fc1(x) * gelu(gate(x)); HF computes gelu(wi_0 x) * wi_1 x, so gate -> wi_0 and
    fc1 -> wi_1. The token embedding feeds both of HF's tied embedding entries.
    """
    renamed = {}
    for key, value in state.items():
        new_key = key
        if key == "token_embedding.weight":
            for tied in _TIED_EMBEDDINGS:
                renamed[tied] = value
            continue
        if key.startswith("norm."):
            new_key = "encoder.final_layer_norm." + key[len("norm.") :]
        elif key.startswith("blocks."):
            index, _, rest = key[len("blocks.") :].partition(".")
            for wan, hf in _WAN_T5_LEAVES:
                if rest.startswith(wan):
                    new_key = f"encoder.block.{index}.{hf}{rest[len(wan):]}"
                    break
        renamed[new_key] = value
    return renamed


def is_wan_t5_naming(state: Mapping[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in state or any(k.startswith("blocks.") for k in state)


def _check_hf_umt5_config(folder_config: dict, config: UMT5Config, folder: str) -> None:
    wrong = [
        f"{field}={folder_config[field]} (preset {getattr(config, field)})"
        for field in _UMT5_CONFIG_FIELDS
        if field in folder_config and folder_config[field] != getattr(config, field)
    ]
    if folder_config.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        wrong.append(f"feed_forward_proj={folder_config['feed_forward_proj']!r} (UMT5 uses 'gated-gelu')")
    if wrong:
        raise ValueError(f"{folder!r} config.json does not match the text encoder config: " + "; ".join(wrong))


def read_umt5_state_dict(source: str | os.PathLike | Mapping[str, torch.Tensor], config: UMT5Config) -> StateDict:
    """A UMT5EncoderModel state dict from an HF folder, a Wan .pth or an in-memory dict.

    A full UMT5 (encoder-decoder) folder also carries decoder.* and lm_head.*, which the encoder does
    not use and which are dropped; a tied embedding saved once fills both of its names.
    """
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state, folder_config = read_state_dict(source)
        if folder_config is not None:
            _check_hf_umt5_config(folder_config, config, os.fspath(source))
        state = {k: v for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}
    if is_wan_t5_naming(state):
        state = wan_t5_to_hf(state)
    present = [k for k in _TIED_EMBEDDINGS if k in state]
    if len(present) == 1:
        for tied in _TIED_EMBEDDINGS:
            state[tied] = state[present[0]]
    return state


def load_text_encoder(
    source: Source,
    config: UMT5Config,
    *,
    tokenizer: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> UMT5TextEncoder:
    """UMT5TextEncoder on `device`. The tokenizer folder defaults to `source` when that is an HF
    folder holding the tokenizer files (google/umt5-xxl's layout); diffusers repos keep it in a
    separate `tokenizer/` folder, so pass it. source None = seeded random weights."""
    if tokenizer is None:
        if source is None or isinstance(source, Mapping) or not Path(source).is_dir():
            raise ValueError("tokenizer folder is required unless source is an HF folder that holds the tokenizer")
        tokenizer = source
    model = _materialize(build_umt5_encoder(config), device, dtype)
    model.tie_weights()  # to_empty gives tied tensors separate storage
    if source is None:
        init_random_weights_(model, seed)
    else:
        _load_into(model, read_umt5_state_dict(source, config), "UMT5 text encoder")
    return UMT5TextEncoder(model, load_umt5_tokenizer(tokenizer), text_len=config.text_len)
