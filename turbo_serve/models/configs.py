"""Model configs as frozen dataclasses with named presets (the diffusers habit: defaults = released model).

Every preset of the real models has a tiny twin of the same architecture so the whole stack runs on a
CPU in tests and in `make serve`. Tiny heads are 64 wide because the sparse-attention kernels take
head_dim 64 or 128 only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal


@dataclass(frozen=True)
class WanDiTConfig:
    """Wan2.1/2.2 diffusion transformer (wan/modules/model.py)."""

    dim: int = 5120
    """Hidden width."""
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    """Input channels: 16 latent, or 36 for I2V (16 noisy + 4 mask + 16 image latent)."""
    out_dim: int = 16
    text_dim: int = 4096
    """Width of the text-encoder states fed to the text embedding MLP."""
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_max_positions: int = 1024
    """Length of the per-axis RoPE tables (latent frames, H/2 and W/2 must stay below it)."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")


@dataclass(frozen=True)
class WanVAEConfig:
    """Wan2.1 causal 3-D VAE (wan/modules/vae.py; diffusers AutoencoderKLWan)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latents_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True)
class UMT5Config:
    """UMT5 encoder (transformers UMT5EncoderModel); defaults are google/umt5-xxl."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    text_len: int = 512


@dataclass(frozen=True)
class ModelPreset:
    """Everything the pipeline needs to know about one servable model."""

    name: str
    task: Literal["t2v", "i2v"]
    dit: WanDiTConfig
    vae: WanVAEConfig = field(default_factory=WanVAEConfig)
    text_encoder: UMT5Config = field(default_factory=UMT5Config)
    num_experts: int = 1
    """2 for Wan2.2 A14B: a high-noise and a low-noise expert, switched at `boundary`."""
    default_resolution: Literal["480p", "720p"] = "480p"
    default_sigma_max: float = 80.0
    default_boundary: float = 0.9
    max_num_frames: int = 161
    tiny: bool = False
    """Random-weight CPU model of the same architecture, for tests and `make serve`."""


_WAN_1_3B = WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_WAN_14B = WanDiTConfig()
_TINY_TEXT = UMT5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
_TINY_DIT = WanDiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64)
_TINY_VAE = WanVAEConfig(base_dim=8)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("wan2.1-t2v-1.3b", "t2v", _WAN_1_3B),
        ModelPreset("wan2.1-t2v-14b", "t2v", _WAN_14B, default_resolution="720p"),
        ModelPreset(
            "wan2.2-i2v-a14b",
            "i2v",
            replace(_WAN_14B, in_dim=36),
            num_experts=2,
            default_resolution="720p",
            default_sigma_max=200.0,
        ),
        ModelPreset("tiny-t2v", "t2v", _TINY_DIT, _TINY_VAE, _TINY_TEXT, tiny=True),
        ModelPreset(
            "tiny-i2v",
            "i2v",
            replace(_TINY_DIT, in_dim=36),
            _TINY_VAE,
            _TINY_TEXT,
            num_experts=2,
            default_sigma_max=200.0,
            tiny=True,
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """Look a preset up by name; the error lists every valid name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(PRESETS)}") from None
