"""Load a Wan DiT from any checkpoint layout users have (or build one with random weights).

Layouts, told apart by their keys (see `inspect_dit_checkpoint`):
- original Wan: `.pth`, `.safetensors`, sharded `diffusion_pytorch_model-0000x-of-0000y.safetensors`
  with its index json, or a folder whose config.json says `_class_name: WanModel`;
- diffusers `WanTransformer3DModel` (folder from save_pretrained, or its state dict);
- TurboDiffusion `.pth`: Wan names plus the `_checkpoint_wrapped_module.` infix, a 2-D patch
  embedding, per-block SLA `proj_l`, and in `-quant` files `int8_weight` + `scale` per block Linear.

Every layout is first renamed to the original Wan names ("Wan keys"), checked strictly against the
model (missing and unexpected keys both fail, only the proj_l family is optional), then fused into
this model's q/k/v and k/v Linears. Weights go straight into a meta-device model (assign), one
tensor at a time, so a 14B model is never initialised or held in host memory twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch

from turbo_kernels.w8a8 import TILE
from turbo_serve.models.checkpoint import (
    CheckpointKeyError,
    LazyStateDict,
    check_keys,
    check_shapes,
    format_keys,
    resolve_checkpoint,
)
from turbo_serve.models.configs import PRESETS, WanDiTConfig
from turbo_serve.models.quant import quantize_linears
from turbo_serve.models.wan_dit import WanDiT, init_random_weights

WRAPPER_INFIX = "_checkpoint_wrapped_module."
"""Infix of torch's activation-checkpoint wrapper, present in TurboDiffusion's released state dicts."""
ANCHOR_KEY = "patch_embedding.weight"
"""Every DiT layout has this key; whatever precedes it (e.g. `model.diffusion_model.`) is a prefix."""
PROJ_L_KEY = "self_attn.attn_op.local_attn.proj_l"
"""Where TurboDiffusion stores SLA's projection (per block); optional: absent means zero."""
DEFAULT_HEAD_DIM = 128
"""Head width of every released Wan model, used when neither a config nor a preset says otherwise."""

# diffusers -> Wan module paths (diffusers' convert_wan_to_diffusers table, read backwards).
_DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
}
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn1.attn_op.local_attn.proj_l": PROJ_L_KEY,
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "norm2": "norm3",  # diffusers' norm2 is the affine cross-attention norm, Wan's norm3
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
# This model's module paths (inside a block) -> the Wan paths stored for them, concatenated along rows.
_FUSED = {
    "self_attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "cross_attn.kv": ("cross_attn.k", "cross_attn.v"),
    "self_attn.proj_l": (PROJ_L_KEY,),
}
_DIFFUSERS_MARKERS = ("condition_embedder.", "proj_out.", "scale_shift_table")
_CLIP_MARKERS = ("img_emb.", ".k_img.", ".v_img.", "image_embedder.", ".add_k_proj.", ".add_v_proj.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_CONFIG_FIELDS = {f.name for f in fields(WanDiTConfig)}


@dataclass(frozen=True)
class DiTCheckpointFormat:
    """What `load_dit` found in a checkpoint's keys."""

    naming: Literal["wan", "diffusers"]
    turbodiffusion: bool
    """TurboDiffusion's variant of Wan names: wrapper infix, 2-D patch embedding or proj_l keys."""
    quantized: bool
    """Block Linears stored as int8_weight + scale (load with quant_linear=True)."""
    prefix: str = ""
    """Leading prefix stripped from every key (e.g. `model.diffusion_model.`)."""

    def __str__(self) -> str:
        name = "turbodiffusion" if self.turbodiffusion and self.naming == "wan" else self.naming
        return name + ("-quant" if self.quantized else "")


def _split_block(key: str) -> tuple[str, str]:
    """('blocks.3.', 'self_attn.q.weight') for a block key, ('', key) otherwise."""
    match = _BLOCK_KEY.match(key)
    return (f"blocks.{match.group(1)}.", match.group(2)) if match else ("", key)


def _rename(path: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    return path


def _diffusers_to_wan(key: str) -> str:
    block, rest = _split_block(key)
    return block + _rename(rest, _DIFFUSERS_BLOCK if block else _DIFFUSERS_TOP)


def _wan_to_diffusers(key: str) -> str:
    block, rest = _split_block(key)
    table = _DIFFUSERS_BLOCK if block else _DIFFUSERS_TOP
    return block + _rename(rest, {new: old for old, new in table.items()})


def _common_prefix(keys: list[str]) -> str:
    """What precedes ANCHOR_KEY, checked to lead every key ('' for most files)."""
    anchors = [k for k in keys if k == ANCHOR_KEY or k.endswith("." + ANCHOR_KEY)]
    if not anchors:
        raise ValueError(
            f"not a Wan DiT checkpoint: no '{ANCHOR_KEY}' key among {len(keys)} keys ({format_keys(keys)})"
        )
    if len(anchors) > 1:
        raise ValueError(f"the checkpoint holds several DiTs ({format_keys(anchors)}); extract one state dict")
    prefix = anchors[0][: -len(ANCHOR_KEY)]
    if prefix and not all(k.startswith(prefix) for k in keys):
        stray = [k for k in keys if not k.startswith(prefix)]
        raise ValueError(f"keys outside the DiT prefix {prefix!r}: {format_keys(stray)}")
    return prefix


class _CheckpointView:
    """A lazy state dict seen through Wan keys: knows the format and how to read each Wan key."""

    def __init__(self, state: LazyStateDict, where: str):
        self.state = state
        raw_keys = list(state)
        unwrapped = [k.replace(WRAPPER_INFIX, "") for k in raw_keys]
        prefix = _common_prefix(unwrapped)
        clean: dict[str, str] = {}  # key without wrapper infix and prefix -> key in the file
        for raw, key in zip(raw_keys, unwrapped, strict=True):
            key = key[len(prefix) :]
            if key in clean:
                raise ValueError(f"{where}: keys {clean[key]!r} and {raw!r} both mean {key!r}")
            clean[key] = raw
        clip = [k for k in clean if any(m in "." + k for m in _CLIP_MARKERS)]
        if clip:
            raise ValueError(
                f"{where} is a Wan2.1 I2V checkpoint with the CLIP image branch ({format_keys(clip)}); "
                "only Wan2.1 T2V and Wan2.2 I2V (no CLIP) DiTs are supported"
            )
        naming = "diffusers" if any(k.startswith(_DIFFUSERS_MARKERS) for k in clean) else "wan"
        rename = _diffusers_to_wan if naming == "diffusers" else (lambda k: k)
        self.raw_of: dict[str, str] = {}  # Wan key -> key in the file
        for key, raw in clean.items():
            wan_key = rename(key)
            if wan_key in self.raw_of:
                raise ValueError(f"{where}: keys {self.raw_of[wan_key]!r} and {raw!r} both mean {wan_key!r}")
            self.raw_of[wan_key] = raw
        self._clean = list(clean)
        self.format = DiTCheckpointFormat(
            naming=naming,
            turbodiffusion=(
                any(WRAPPER_INFIX in k for k in raw_keys)
                or len(state.shape(self.raw_of[ANCHOR_KEY])) == 2
                or any(PROJ_L_KEY in k for k in self.raw_of)
            ),
            quantized=any(k.endswith(".int8_weight") for k in self.raw_of),
            prefix=prefix,
        )

    def source_name(self, wan_key: str) -> str:
        """A Wan key as this checkpoint's naming would spell it (for error messages)."""
        return _wan_to_diffusers(wan_key) if self.format.naming == "diffusers" else wan_key

    def clean_keys(self) -> list[str]:
        """The file's keys without prefix and wrapper infix, in its own naming."""
        return self._clean

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.state.shape(raw) for k, raw in self.raw_of.items()}

    def __getitem__(self, wan_key: str) -> torch.Tensor:
        return self.state[self.raw_of[wan_key]]


def inspect_dit_checkpoint(source: str | Path) -> DiTCheckpointFormat:
    """The layout of a DiT checkpoint, from its keys alone (no tensor data is read)."""
    return _CheckpointView(LazyStateDict(resolve_checkpoint(source).files), str(source)).format


def config_from_json(config: dict[str, Any]) -> WanDiTConfig | None:
    """WanDiTConfig from a Wan (`WanModel`) or diffusers (`WanTransformer3DModel`) config.json."""
    class_name = config.get("_class_name")
    if class_name == "WanModel":
        _require(config, {"qk_norm": True, "cross_attn_norm": True}, "WanModel")
        if tuple(config.get("window_size", (-1, -1))) != (-1, -1):
            raise ValueError(f"window_size {config['window_size']} is not supported; Wan attends globally (-1, -1)")
        values = {k: v for k, v in config.items() if k in _CONFIG_FIELDS}
    elif class_name == "WanTransformer3DModel":
        _require(
            config,
            {"qk_norm": "rms_norm_across_heads", "cross_attn_norm": True, "image_dim": None,
             "added_kv_proj_dim": None, "pos_embed_seq_len": None},
            "WanTransformer3DModel",
        )  # fmt: skip
        heads, head_dim = config.get("num_attention_heads", 40), config.get("attention_head_dim", 128)
        renamed = {"in_channels": "in_dim", "out_channels": "out_dim", "rope_max_seq_len": "rope_max_positions"}
        values = {renamed.get(k, k): v for k, v in config.items() if renamed.get(k, k) in _CONFIG_FIELDS}
        values.update(dim=heads * head_dim, num_heads=heads)
        if values.get("out_dim") is None:  # diffusers: out_channels None means in_channels
            values["out_dim"] = values.get("in_dim", WanDiTConfig.in_dim)
    elif class_name is None:
        return None
    else:
        raise ValueError(f"config.json describes a {class_name}, not a Wan DiT (WanModel or WanTransformer3DModel)")
    if "patch_size" in values:
        values["patch_size"] = tuple(values["patch_size"])
    return WanDiTConfig(**values)



def _require(config: dict[str, Any], required: dict[str, Any], what: str) -> None:
    for key, value in required.items():
        if key in config and config[key] != value:
            raise ValueError(f"{what} config has {key}={config[key]!r}; only {value!r} is supported")


def infer_config(shapes: dict[str, tuple[int, ...]]) -> WanDiTConfig:
    """WanDiTConfig from the shapes of a Wan-key state dict (a bare .pth has no config.json).

    Shapes fix every size but the head count: a preset with the same sizes gives it, else heads
    are DEFAULT_HEAD_DIM wide (true of every released Wan model).
    """
    dim, *patch_in = shapes[ANCHOR_KEY]
    if len(patch_in) == 1:  # TurboDiffusion's 2-D patch embedding: (c, kt, kh, kw) flattened
        patch_size = WanDiTConfig.patch_size
        in_dim = patch_in[0] // (patch_size[0] * patch_size[1] * patch_size[2])
    else:
        in_dim, patch_size = patch_in[0], tuple(patch_in[1:])
    ffn = shapes.get("blocks.0.ffn.0.weight") or shapes.get("blocks.0.ffn.0.int8_weight")
    if ffn is None:
        raise ValueError("cannot infer ffn_dim: no blocks.0.ffn.0 weights in the checkpoint")
    sizes = dict(
        dim=dim,
        ffn_dim=ffn[0],
        num_layers=len({_BLOCK_KEY.match(k).group(1) for k in shapes if _BLOCK_KEY.match(k)}),
        in_dim=in_dim,
        out_dim=shapes["head.head.weight"][0] // (patch_size[0] * patch_size[1] * patch_size[2]),
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
        patch_size=patch_size,
    )
    for preset in PRESETS.values():
        if all(getattr(preset.dit, name) == value for name, value in sizes.items()):
            return replace(preset.dit, **sizes)
    if dim % DEFAULT_HEAD_DIM:
        raise ValueError(f"cannot infer num_heads for dim={dim}; pass config=WanDiTConfig(...)")
    return WanDiTConfig(num_heads=dim // DEFAULT_HEAD_DIM, **sizes)


def _wan_parts(module_key: str) -> tuple[str, ...]:
    """The Wan keys stored for one of this model's state-dict keys (several for a fused Linear)."""
    block, rest = _split_block(module_key)
    if block:
        for path, sources in _FUSED.items():
            if rest.startswith(path + "."):
                leaf = rest[len(path) :]
                return tuple(block + source + leaf for source in sources)
    return (module_key,)


def _build_meta(config: WanDiTConfig, dtype: torch.dtype, quant_linear: bool) -> WanDiT:
    with torch.device("meta"):
        dit = WanDiT(config)
    dit.cast_(dtype)
    if quant_linear:
        if config.dim % TILE or config.ffn_dim % TILE:
            raise ValueError(
                f"W8A8 needs dim and ffn_dim multiples of {TILE} (got {config.dim}, {config.ffn_dim}) "
                "so the fused q/k/v scale tiles line up"
            )
        quantize_linears(dit)
    return dit


def _finish(dit: WanDiT) -> WanDiT:
    return dit.eval().requires_grad_(False)


def _random_dit(
    config: WanDiTConfig, device: torch.device | str, dtype: torch.dtype, quant_linear: bool, seed: int
) -> WanDiT:
    dit = _build_meta(config, dtype, quant_linear=False).to_empty(device=device)
    init_random_weights(dit, seed)
    if quant_linear:
        quantize_linears(dit)
    return _finish(dit)


def load_dit(
    source: str | Path | None,
    config: WanDiTConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quant_linear: bool = False,
    seed: int = 0,
) -> WanDiT:
    """Load a WanDiT from a file or folder in any supported layout.

    Args:
        source: weights file or folder; None builds random weights (seeded) for tiny models and benchmarks.
        config: architecture; default: the folder's config.json, else inferred from tensor shapes.
        device: where the weights go (read one tensor at a time, straight to it).
        dtype: model dtype; proj_l, modulation tables and int8 scales stay float32.
        quant_linear: the checkpoint is TurboDiffusion W8A8 (`-quant`); must match the file.
        seed: seed of the random weights when source is None.
    """
    if source is None:
        if config is None:
            raise ValueError("source=None builds random weights and needs a config (e.g. get_preset(...).dit)")
        return _random_dit(config, device, dtype, quant_linear, seed)

    resolved = resolve_checkpoint(source)
    view = _CheckpointView(LazyStateDict(resolved.files), str(source))
    if view.format.quantized and not quant_linear:
        raise ValueError(
            f"{source} is a W8A8-quantised checkpoint (int8_weight/scale keys): load it with quant_linear=True "
            "(--quant_linear)"
        )
    if quant_linear and not view.format.quantized:
        raise ValueError(
            f"{source} holds unquantised weights: load it with quant_linear=False (without --quant_linear); "
            "to quantise in memory, call quantize_linears() on the loaded model"
        )
    shapes = view.shapes()
    if config is None:
        config = (config_from_json(resolved.config) if resolved.config else None) or infer_config(shapes)

    dit = _build_meta(config, dtype, quant_linear)
    targets = dit.state_dict(keep_vars=True)
    parts = {key: _wan_parts(key) for key in targets}
    expected = {p for ps in parts.values() for p in ps}
    proj_l = {p for p in expected if PROJ_L_KEY in p}
    what = f"DiT checkpoint {source} ({view.format})"
    check_keys(  # in the file's own naming, so every listed key can be found in it
        map(view.source_name, expected),
        view.clean_keys(),
        what=what,
        optional=map(view.source_name, proj_l),
    )
    present = proj_l & view.raw_of.keys()
    if present and present != proj_l:
        raise CheckpointKeyError(f"{what} has proj_l for some blocks only; missing: {format_keys(proj_l - present)}")
    check_shapes(_part_shapes(targets, parts), _as_conv_shapes(shapes, config), what=what)

    state = {}
    for key, target in targets.items():
        if not set(parts[key]) <= view.raw_of.keys():  # an absent proj_l: zero, so SLA == sparse attention
            state[key] = torch.zeros(target.shape, dtype=target.dtype, device=device)
            continue
        tensors = [view[p].to(device=device, dtype=target.dtype) for p in parts[key]]
        state[key] = (torch.cat(tensors) if len(tensors) > 1 else tensors[0]).reshape(target.shape)
    dit.load_state_dict(state, strict=True, assign=True)
    return _finish(dit)


def _part_shapes(targets: dict[str, torch.Tensor], parts: dict[str, tuple[str, ...]]) -> dict[str, tuple[int, ...]]:
    """Expected shape of every Wan key: a fused tensor splits evenly along its rows."""
    shapes = {}
    for key, target in targets.items():
        rows, *rest = target.shape
        for part in parts[key]:
            shapes[part] = (rows // len(parts[key]), *rest)
    return shapes


def _as_conv_shapes(shapes: dict[str, tuple[int, ...]], config: WanDiTConfig) -> dict[str, tuple[int, ...]]:
    """Found shapes with a 2-D (TurboDiffusion) patch embedding read as the Conv3d weight it flattens."""
    patch = shapes.get(ANCHOR_KEY)
    if patch is None or len(patch) != 2:
        return shapes
    volume = config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    conv = (patch[0], patch[1] // volume, *config.patch_size) if patch[1] % volume == 0 else patch
    return {**shapes, ANCHOR_KEY: conv}
