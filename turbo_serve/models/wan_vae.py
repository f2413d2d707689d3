"""Wan2.1 causal 3-D VAE (wan/modules/vae.py), inference only, streamed one chunk at a time.

Module and parameter names follow diffusers' AutoencoderKLWan, so a diffusers state dict loads without
renames; `loading_vae_text.py` maps Wan's original `.pth` names onto them.

Streaming: every causal layer remembers the trailing input frames it has seen in an explicit
`WanCausalCache` made fresh for each encode/decode call (Wan keeps the same state in a module-level
list it clears by hand). Video goes through the encoder in chunks of 1, 4, 4, ... frames and latents
through the decoder one latent frame at a time, so activation memory depends on H*W, never on the
number of frames; the output is written into one preallocated tensor instead of Wan's growing
`torch.cat`.

Speed-related departures from the reference code, all numerically equivalent:
- spatial padding is the convolution's own (Wan pads the whole tensor with F.pad before every conv);
- the RMS norm runs as one fused `F.rms_norm` over the channel axis when activations are channels-last
  (`WanVAE.to_channels_last()`), in float32 inside the kernel, and SiLU runs in place;
- nearest upsampling stays in the activation dtype (Wan casts to float32 for old bf16 kernels; nearest
  is a copy, so the result is bit-identical).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from turbo_serve.models.configs import WanVAEConfig

NORM_EPS = 1e-12
"""Floor on the channel L2 norm (F.normalize's default, which Wan's RMS_norm uses)."""


class WanCausalCache:
    """Streaming state of one encode or decode call.

    `frames[slot]` holds the last input frames a causal layer has seen (None before its first chunk);
    `first_chunk` is True while the first chunk runs, when Wan skips the temporal resampling convs.
    """

    def __init__(self, num_slots: int) -> None:
        self.frames: list[torch.Tensor | None] = [None] * num_slots
        self.first_chunk = True

    def extend(self, slot: int, x: torch.Tensor, num_past: int) -> torch.Tensor:
        """Prepend the remembered frames (zeros at the start of the video) and remember x's tail."""
        past = self.frames[slot]
        if past is None:
            x = F.pad(x, (0, 0, 0, 0, num_past, 0))
        else:
            x = torch.cat([past, x], dim=2)
        self.frames[slot] = x[:, :, -num_past:].clone()
        return x


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) if x is laid out channels-innermost, else the default layout."""
    channels_last = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    if not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _frames_to_images(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]; a view (channels_last) for channels-last video."""
    return x.transpose(1, 2).flatten(0, 1)


def _images_to_frames(y: torch.Tensor, batch: int, memory_format: torch.memory_format) -> torch.Tensor:
    return y.unflatten(0, (batch, -1)).transpose(1, 2).contiguous(memory_format=memory_format)


class WanCausalConv3d(nn.Conv3d):
    """Conv3d whose time padding lies entirely in the past (2 * pad frames), fed from the cache."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.time_padding = 2 * pad_t
        self.cache_slot = -1
        """Index into WanCausalCache.frames, assigned by the encoder/decoder (only if time_padding)."""

    def forward(self, x: torch.Tensor, cache: WanCausalCache | None = None) -> torch.Tensor:
        """`cache` is required when the conv has time padding (kernel 3 in time)."""
        if self.time_padding:
            x = cache.extend(self.cache_slot, x, self.time_padding)
        return super().forward(x)


class WanRMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels (dim 1), times sqrt(C) and a per-channel gamma."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        gamma = self.gamma.view(channels)
        if x.stride(1) == 1 and channels > 1:
            # Channels innermost: one fused kernel. x / max(|x|, e) * sqrt(C) == x * rsqrt(mean(x^2) + e^2/C)
            # up to the floor, which only matters for all-zero vectors (both give 0 there).
            moved = x.movedim(1, -1)
            return F.rms_norm(moved, (channels,), gamma, NORM_EPS**2 / channels).movedim(-1, 1)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        scale = norm.clamp_min_(NORM_EPS).reciprocal_().mul_(math.sqrt(channels))
        out = torch.empty_like(x)
        torch.mul(x, scale, out=out)  # float32 math, one rounding to x's dtype
        shape = (channels,) + (1,) * (x.dim() - 2)
        return out.mul_(gamma.view(shape))


def _norm_silu(norm: WanRMSNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(norm(x), inplace=True)


class WanResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv when widths differ) shortcut."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = WanRMSNorm(in_dim)
        self.conv1 = WanCausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = WanRMSNorm(out_dim)
        self.conv2 = WanCausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = WanCausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: WanCausalCache) -> torch.Tensor:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(_norm_silu(self.norm1, x), cache)
        x = self.conv2(_norm_silu(self.norm2, x), cache)
        return x.add_(shortcut)


class WanAttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = WanRMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, _, height, width = x.shape
        images = _frames_to_images(x)
        qkv = self.to_qkv(self.norm(images))  # [B*T, 3C, H, W]
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [B*T, 1, H*W, C] each
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B*T, H*W, C]
        attended = attended.transpose(1, 2).unflatten(2, (height, width))
        out = self.proj(attended.contiguous(memory_format=_memory_format(images)))
        return _images_to_frames(out, batch, _memory_format(x)).add_(x)


class WanResample(nn.Module):
    """Spatial x2 up/down-sampling, optionally with Wan's causal temporal x2 (the *3d modes).

    upsample3d: a causal (3,1,1) conv makes 2C channels that interleave into 2x frames; skipped on the
    first chunk, so latent frame 0 decodes to one frame. downsample3d: a stride-2 (3,1,1) conv over
    [last frame of the previous chunk, this chunk]; skipped on the first chunk (1 frame -> 1 latent).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"resample mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode = mode
        self.cache_slot = -1
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = WanCausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = WanCausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            self.time_conv = None

    def forward(self, x: torch.Tensor, cache: WanCausalCache) -> torch.Tensor:
        memory_format = _memory_format(x)
        if self.mode == "upsample3d" and not cache.first_chunk:
            x = _interleave_time(self.time_conv(x, cache), memory_format)
        x = _images_to_frames(self.resample(_frames_to_images(x)), x.shape[0], memory_format)
        if self.mode == "downsample3d":
            past = cache.frames[self.cache_slot]
            cache.frames[self.cache_slot] = x[:, :, -1:].clone()
            if past is not None:
                x = self.time_conv(torch.cat([past, x], dim=2))
        return x


def _interleave_time(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: channel half s of frame t becomes frame 2t + s."""
    batch, double, frames, height, width = x.shape
    channels = double // 2
    out = torch.empty(
        (batch, channels, 2 * frames, height, width), dtype=x.dtype, device=x.device, memory_format=memory_format
    )
    out.unflatten(2, (frames, 2)).copy_(x.unflatten(1, (2, channels)).permute(0, 2, 3, 1, 4, 5))
    return out


class WanMidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([WanAttentionBlock(dim)])
        self.resnets = nn.ModuleList([WanResidualBlock(dim, dim), WanResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, cache: WanCausalCache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class WanUpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_resnets: int, upsample_mode: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_resnets - 1)
        self.resnets = nn.ModuleList(WanResidualBlock(i, out_dim) for i in dims)
        self.upsamplers = nn.ModuleList([WanResample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor, cache: WanCausalCache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


def _assign_cache_slots(module: nn.Module) -> int:
    """Give every layer that streams state its own WanCausalCache slot; returns the slot count."""
    slots = 0
    for layer in module.modules():
        streams = (isinstance(layer, WanCausalConv3d) and layer.time_padding) or (
            isinstance(layer, WanResample) and layer.mode == "downsample3d"
        )
        if streams:
            layer.cache_slot = slots
            slots += 1
    return slots


class WanEncoder3d(nn.Module):
    """Video [B, 3, t, H, W] -> [B, 2*z_dim, latent t, H/8, W/8] (mean and log-variance)."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = WanCausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last_stage = len(config.dim_mult) - 1
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(WanResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage != last_stage:
                temporal = config.temporal_downsample[stage]
                blocks.append(WanResample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = WanMidBlock(dims[-1])
        self.norm_out = WanRMSNorm(dims[-1])
        self.conv_out = WanCausalConv3d(dims[-1], config.z_dim * 2, 3, padding=1)
        self.num_cache_slots = _assign_cache_slots(self)

    def forward(self, x: torch.Tensor, cache: WanCausalCache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(_norm_silu(self.norm_out, x), cache)


class WanDecoder3d(nn.Module):
    """Latent [B, z_dim, t, h, w] -> video [B, 3, frames, 8h, 8w]; widths 384 -> 192 -> 96 at base 96."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv_in = WanCausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = WanMidBlock(dims[0])
        blocks = []
        last_stage = len(mult) - 1
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            # Every upsampler halves the width, so later stages start at half the previous width.
            in_dim = in_dim // 2 if stage > 0 else in_dim
            mode = None
            if stage != last_stage:
                mode = "upsample3d" if temporal_upsample[stage] else "upsample2d"
            blocks.append(WanUpBlock(in_dim, out_dim, config.num_res_blocks + 1, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = WanRMSNorm(dims[-1])
        self.conv_out = WanCausalConv3d(dims[-1], 3, 3, padding=1)
        self.num_cache_slots = _assign_cache_slots(self)

    def forward(self, x: torch.Tensor, cache: WanCausalCache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(_norm_silu(self.norm_out, x), cache)


class WanVAE(nn.Module):
    """Wan2.1 VAE: encode video to normalised latents, decode them back, streaming in time.

    Pixels are in [-1, 1]; latents are normalised per channel with the config's mean/std (what the DiT
    sees). Outputs are float32 whatever the weight dtype.
    """

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        if len(config.latents_mean) != config.z_dim or len(config.latents_std) != config.z_dim:
            raise ValueError(
                f"latents_mean and latents_std need z_dim={config.z_dim} values, "
                f"got {len(config.latents_mean)} and {len(config.latents_std)}"
            )
        if len(config.temporal_downsample) != len(config.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(config.dim_mult) - 1} flags (one per downsampling stage), "
                f"got {config.temporal_downsample}"
            )
        self.config = config
        self.encoder = WanEncoder3d(config)
        self.quant_conv = WanCausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.post_quant_conv = WanCausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = WanDecoder3d(config)
        self.activation_format = torch.contiguous_format

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def to_channels_last(self) -> WanVAE:
        """Run with channels innermost (NDHWC), the layout cuDNN's tensor-core convs prefer."""
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        self.activation_format = torch.channels_last_3d
        return self

    def _check_frames(self, num_frames: int) -> None:
        stride = self.config.temporal_stride
        if num_frames < 1 or (num_frames - 1) % stride:
            examples = f"1, {stride + 1}, {2 * stride + 1}, ..."
            raise ValueError(f"num_frames must be {stride}n+1 ({examples}), got {num_frames}")

    def _check_size(self, height: int, width: int) -> None:
        stride = self.config.spatial_stride
        if height % stride or width % stride or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {stride}, got {height}x{width}")

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean and std as float32 [1, z_dim, 1, 1, 1]; kept out of the module's
        tensors so casting the weights to bf16 never rounds them."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, device=self.device).view(shape)
        return mean, torch.tensor(self.config.latents_std, device=self.device).view(shape)

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.config.z_dim or z.shape[2] < 1:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, T>=1, h, w], got shape {tuple(z.shape)}")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=self.activation_format)

    # -- encode ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1], F = 4n+1 -> normalised latent mean [B, z_dim, n+1, H/8, W/8]."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got shape {tuple(video.shape)}")
        num_frames, height, width = video.shape[2:]
        self._check_frames(num_frames)
        self._check_size(height, width)
        stride = self.config.temporal_stride
        latent_frames = (num_frames - 1) // stride + 1
        chunks = (video[:, :, max(0, 1 + (i - 1) * stride) : 1 + i * stride] for i in range(latent_frames))
        return self._encode_chunks(chunks, video.shape[0], latent_frames, height, width)

    def _encode_chunks(
        self, chunks: Iterable[torch.Tensor], batch: int, latent_frames: int, height: int, width: int
    ) -> torch.Tensor:
        """Encode pixel chunks of 1, 4, 4, ... frames; each yields one latent frame."""
        stride = self.config.spatial_stride
        out = torch.empty(
            (batch, self.config.z_dim, latent_frames, height // stride, width // stride),
            dtype=torch.float32,
            device=self.device,
        )
        latents_mean, latents_std = self._latent_stats()
        cache = WanCausalCache(self.encoder.num_cache_slots)
        for index, chunk in enumerate(chunks):
            moments = self.quant_conv(self.encoder(self._prepare(chunk), cache))
            mean = moments[:, : self.config.z_dim].float()
            out[:, :, index : index + 1] = (mean - latents_mean) / latents_std
            cache.first_chunk = False
        return out

    @torch.inference_mode()
    def encode_condition(self, image: torch.Tensor, num_frames: int) -> torch.Tensor:
        """I2V condition [4 + z_dim, T, h, w]: Wan's first-frame mask and the latent of [image, gray frames].

        image [3, H, W] in [-1, 1]. The clip is the image followed by num_frames - 1 zero (mid-gray)
        frames, streamed chunk by chunk so the full gray clip is never allocated.
        """
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be [3, H, W], got shape {tuple(image.shape)}")
        self._check_frames(num_frames)
        height, width = image.shape[1:]
        self._check_size(height, width)
        stride = self.config.temporal_stride
        latent_frames = (num_frames - 1) // stride + 1
        first = image[None, :, None]
        gray = torch.zeros((1, 3, stride, height, width), dtype=image.dtype, device=image.device)
        chunks = [first] + [gray] * (latent_frames - 1)
        latent = self._encode_chunks(chunks, 1, latent_frames, height, width)[0]
        mask = first_frame_mask(num_frames, latent.shape[-2], latent.shape[-1], stride, device=latent.device)
        return torch.cat([mask, latent], dim=0)

    # -- decode ----------------------------------------------------------------------------------

    def num_output_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.config.temporal_stride

    @torch.inference_mode()
    def iter_decode(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yield the pixels [B, 3, n, H, W] (float32, clamped to [-1, 1]) of each latent frame as soon as
        it is decoded: 1 frame for the first latent frame, 4 for every later one."""
        self._check_latents(z)
        latents_mean, latents_std = self._latent_stats()
        latents = z.to(device=self.device, dtype=torch.float32) * latents_std + latents_mean
        x = self.post_quant_conv(self._prepare(latents))
        cache = WanCausalCache(self.decoder.num_cache_slots)
        for index in range(x.shape[2]):
            frames = self.decoder(x[:, :, index : index + 1], cache)
            cache.first_chunk = False
            yield frames.float().clamp_(-1.0, 1.0)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z_dim, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w], float32 in [-1, 1]."""
        self._check_latents(z)
        batch, _, latent_frames, height, width = z.shape
        stride = self.config.spatial_stride
        out = torch.empty(
            (batch, 3, self.num_output_frames(latent_frames), height * stride, width * stride),
            dtype=torch.float32,
            device=self.device,
        )
        start = 0
        for frames in self.iter_decode(z):
            out[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
        return out


def first_frame_mask(
    num_frames: int, height: int, width: int, temporal_stride: int = 4, *, device: torch.device | None = None
) -> torch.Tensor:
    """Wan's I2V mask [temporal_stride, T, h, w]: 1 on latent frame 0, 0 elsewhere.

    Built the way Wan and TurboDiffusion do: a per-pixel-frame mask (1 for frame 0), frame 0 repeated
    to fill a whole latent frame, then folded into `temporal_stride` channels.
    """
    mask = torch.zeros((num_frames, height, width), device=device)
    mask[0] = 1.0
    mask = torch.cat([mask[:1].repeat_interleave(temporal_stride, dim=0), mask[1:]], dim=0)
    return mask.view(-1, temporal_stride, height, width).transpose(0, 1)
