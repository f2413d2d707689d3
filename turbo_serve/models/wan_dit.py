"""The Wan2.1/2.2 diffusion transformer (wan/modules/model.py), inference only.

Module and parameter names follow the original Wan checkpoints, with three changes made for speed
and for SLA: self-attention q/k/v live in one fused `self_attn.qkv` Linear(dim, 3*dim),
cross-attention k/v in one `cross_attn.kv` Linear(dim, 2*dim), and each layer owns TurboDiffusion's
SLA projection as `self_attn.proj_l` (stored as `self_attn.attn_op.local_attn.proj_l` in their
files). `turbo_serve.models.loading` maps every checkpoint layout onto these names.

Numerics: LayerNorm, the adaptive modulation, the gates, the time embedding and the head run in
float32 as in Wan; RoPE is applied in float32; the residual stream stays in the model dtype between
updates (as TurboDiffusion and diffusers keep it).
Norms, modulation, q/k RMSNorm + RoPE and the residual updates of a block run either as the PyTorch
ops below or (on CUDA, `FUSED_NORMS`) as the one-pass kernels of `turbo_kernels.fused_norm`: the
same function, except that the fused q/k path rounds to the model dtype once (after RoPE) where
the PyTorch one also rounds after RMSNorm.
Self-attention goes through the attention registry, picked per forward by
`AttentionMetadata.attention_type`, so one loaded model serves every backend. Blocks contain no
data-dependent Python control flow, so `torch.compile(block, fullgraph=True)` traces them whole
(the fused path on CUDA, where its kernels are Triton kernels), and nothing in a block syncs with
the host, so a whole forward can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from turbo_kernels.fused_norm import gated_residual, gated_residual_layernorm, layernorm_modulate, rmsnorm_rope
from turbo_kernels.registry import AttentionBackend, AttentionMetadata, get_attention_backend
from turbo_serve.models.configs import WanDiTConfig

ROPE_THETA = 10000.0
# Tensors that stay float32 whatever the model dtype: SLA's proj_l (trained in fp32), the small
# modulation tables, and the per-tile scales of Int8Linear.
_FP32_SUFFIXES = ("modulation", ".scale")
_FP32_INFIX = "proj_l."
DEFAULT_ATTENTION = AttentionMetadata()
"""Dense SDPA ("original"): what a forward without attention settings uses."""
# Grids whose RoPE tables a model keeps (one per resolution in use).
_ROPE_CACHE_SIZE = 8
FUSED_NORMS: bool | None = None
"""Blocks use turbo_kernels.fused_norm (True) or the PyTorch ops (False); None: the kernels on CUDA.
On the CPU the entry points run their Triton kernels only under Triton's interpreter, as Python,
several times slower per step than the PyTorch ops (too slow for the serving tests' jobs), and their
PyTorch references otherwise, so a CPU model keeps the PyTorch ops unless this is set to True."""


def fused_norms(x: torch.Tensor) -> bool:
    """Whether a block given activations `x` takes the fused kernels (see `FUSED_NORMS`)."""
    return x.is_cuda if FUSED_NORMS is None else FUSED_NORMS


GELU_EPILOGUE = True
"""On CUDA the FFN's first bias + GELU run in its GEMM's epilogue (cuBLASLt's tanh GELU); False:
as separate ops. Elsewhere always separate: the CPU's fused op computes the erf GELU, not Wan's."""


class FeedForward(nn.Sequential):
    """Wan's FFN, Linear -> GELU(tanh) -> Linear, with the checkpoints' keys (ffn.0, ffn.2). With
    `GELU_EPILOGUE` the up projection's bias and GELU are applied to the GEMM's fp32 accumulators
    (cuBLASLt's GELU_BIAS epilogue): one pass over the [tokens, ffn_dim] activations fewer, and one
    bf16 rounding fewer. A quantized up projection (Int8Linear) keeps the separate ops."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _, down = self
        if not (GELU_EPILOGUE and x.is_cuda) or type(up) is not nn.Linear:
            return super().forward(x)
        hidden = torch._addmm_activation(up.bias, x.reshape(-1, x.shape[-1]), up.weight.t(), use_gelu=True)
        return down(hidden.view(*x.shape[:-1], hidden.shape[-1]))


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Head dims given to the t, h and w rotary axes: Wan's d - 4*(d//6), 2*(d//6), 2*(d//6)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_tables(
    grid: tuple[int, int, int], head_dim: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (T*H*W, 1, head_dim), float32, for tokens ordered t, h, w.

    Each value is repeated for both elements of its (even, odd) pair and sin carries the minus sign
    of the pair's first element, so rotating is ``x * cos + swap_pairs(x) * sin``. Angles are
    computed in float64 like Wan's complex tables.
    """
    angles = []
    for size, dim, shape in zip(grid, rope_axis_dims(head_dim), ((-1, 1, 1), (1, -1, 1), (1, 1, -1)), strict=True):
        freqs = ROPE_THETA ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        axis = torch.outer(torch.arange(size, dtype=torch.float64, device=device), freqs)
        angles.append(axis.view(*shape, dim // 2).expand(*grid, dim // 2))
    angle = torch.cat(angles, dim=-1).reshape(-1, 1, head_dim // 2).repeat_interleave(2, dim=-1)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float64, device=device).repeat(head_dim // 2)
    return angle.cos().float(), (angle.sin() * sign).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, L, H, D) by the `rope_tables`; math in float32, result in x's dtype."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin).to(x.dtype)


def sinusoidal_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep features [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/(dim/2)); float64 -> float32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    angles = torch.outer(timestep.to(torch.float64), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def keeps_fp32(name: str) -> bool:
    """Whether the parameter or buffer `name` stays float32 in a model of lower precision."""
    return _FP32_INFIX in name or name.endswith(_FP32_SUFFIXES)


def _fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer in float32 whatever its dtype (Wan runs these under float32 autocast)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (no affine) in float32, then x * (1 + scale) + shift, returned in x's dtype."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return torch.addcmul(shift, normed, 1 + scale).to(x.dtype)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate computed in float32, kept in x's dtype."""
    return torch.addcmul(x.float(), y, gate).to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (affine parameters upcast); returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class WanSelfAttention(nn.Module):
    """q/k/v in one GEMM, q/k RMSNorm over the whole width, 3-D RoPE, attention from the registry."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        self.proj_l = nn.Linear(self.head_dim, self.head_dim)
        """SLA's per-layer projection of the linear-attention branch (float32; zero = pure sparse)."""

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if fused_norms(x):
            q, k = rmsnorm_rope(q, k, self.norm_q.weight, self.norm_k.weight, *rope, self.norm_q.eps, self.num_heads)
        else:
            q = apply_rope(self.norm_q(q).unflatten(-1, heads), *rope)
            k = apply_rope(self.norm_k(k).unflatten(-1, heads), *rope)
        out = attend(q, k, v.unflatten(-1, heads), meta, self.proj_l)
        return self.o(out.flatten(2))


class WanCrossAttention(nn.Module):
    """Dense attention from the video tokens to all text positions (padding included, as Wan does)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = self.norm_q(self.q(x)).unflatten(-1, heads)
        k, v = self.kv(context).chunk(2, dim=-1)
        k = self.norm_k(k).unflatten(-1, heads)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.unflatten(-1, heads).transpose(1, 2)
        )
        return self.o(out.transpose(1, 2).flatten(2))


class WanBlock(nn.Module):
    """Modulated self-attention, cross-attention (affine norm3, no gate), modulated gated FFN."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.self_attn = WanSelfAttention(dim, config.num_heads, config.eps)
        self.norm3 = WanLayerNorm(dim, eps=config.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, config.num_heads, config.eps)
        self.ffn = FeedForward(dim, config.ffn_dim)
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        """Per-block learned offsets added to the shared time projection (kept in float32)."""

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attend: AttentionBackend,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x (B, L, dim) model dtype, left unchanged; e0 (B, 6, dim) float32; context (B, text_len, dim)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        if not fused_norms(x):
            x = _gated_residual(x, self.self_attn(_modulate(x, shift1, scale1, self.eps), rope, attend, meta), gate1)
            x = x + self.cross_attn(self.norm3(x).to(x.dtype), context)
            return _gated_residual(x, self.ffn(_modulate(x, shift2, scale2, self.eps)), gate2)
        # The same steps in one pass each: norm3 shares its pass with the first residual, the second
        # modulation with the cross-attention residual; the residual stream after the first update
        # belongs to this call, so it is updated in place.
        y = self.self_attn(layernorm_modulate(x, shift1, scale1, self.eps), rope, attend, meta)
        x, normed = gated_residual_layernorm(x, y, gate1, self.norm3.weight, self.norm3.bias, self.eps)
        y = layernorm_modulate(x, shift2, scale2, self.eps, residual=self.cross_attn(normed, context))
        return gated_residual(x, self.ffn(y), gate2, inplace=True)


class WanHead(nn.Module):
    """Output projection, modulated by the time embedding e (not the 6-way projection e0)."""

    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return _fp32_linear(self.head, torch.addcmul(shift, normed, 1 + scale))


class WanDiT(nn.Module):
    """Wan2.1/2.2 DiT: velocity prediction for a latent video given a timestep and text states."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(dim, config.out_dim * math.prod(config.patch_size), config.eps)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cast_(self, dtype: torch.dtype) -> WanDiT:
        """Cast floating tensors to `dtype` in place, keeping the float32 ones; use this, not `.to(dtype)`."""
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if tensor.is_floating_point():
                target = torch.float32 if keeps_fp32(name) else dtype
                if tensor.dtype != target:
                    tensor.data = tensor.data.to(target)
        return self

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of a token grid, computed once per grid and device."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            if max(grid) > self.config.rope_max_positions:
                raise ValueError(
                    f"token grid {grid} exceeds rope_max_positions={self.config.rope_max_positions} on some axis"
                )
            if len(self._rope_cache) >= _ROPE_CACHE_SIZE:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_tables(grid, self.config.head_dim, device)
        return self._rope_cache[key]

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        attention: AttentionMetadata = DEFAULT_ATTENTION,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            x: (B, in_dim, T, H, W) latent; for I2V the 20 condition channels already concatenated.
            timestep: (B,) float in [0, 1000].
            context: (B, text_len, text_dim) text-encoder states, zero-padded (shorter is padded here).
            attention: self-attention backend and its settings for this forward.

        Returns:
            (B, out_dim, T, H, W) float32.
        """
        config = self.config
        batch, channels, frames, height, width = x.shape
        kt, kh, kw = config.patch_size
        if channels != config.in_dim:
            raise ValueError(f"x has {channels} channels, the model takes in_dim={config.in_dim}")
        if frames % kt or height % kh or width % kw:
            raise ValueError(f"latent size {(frames, height, width)} is not divisible by patch {config.patch_size}")
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must have shape ({batch},), got {tuple(timestep.shape)}")
        if context.shape[0] != batch or context.shape[2] != config.text_dim or context.shape[1] > config.text_len:
            raise ValueError(
                f"context must be (B={batch}, <= text_len={config.text_len}, text_dim={config.text_dim}), "
                f"got {tuple(context.shape)}"
            )
        attend = get_attention_backend(attention.attention_type)
        dtype = self.patch_embedding.weight.dtype
        grid = (frames // kt, height // kh, width // kw)

        # 1. Patchify: tokens ordered t, h, w.
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).contiguous()
        rope = self.rope(grid, x.device)

        # 2. Time embedding (float32) and the 6-way modulation shared by the blocks.
        features = sinusoidal_embedding(timestep, config.freq_dim)
        e = _fp32_linear(self.time_embedding[2], F.silu(_fp32_linear(self.time_embedding[0], features)))
        e0 = _fp32_linear(self.time_projection[1], F.silu(e)).unflatten(1, (6, config.dim))

        # 3. Text embedding of the zero-padded states; every position is attended.
        context = F.pad(context.to(dtype), (0, 0, 0, config.text_len - context.shape[1]))
        context = self.text_embedding(context)

        # 4. Blocks.
        for block in self.blocks:
            tokens = block(tokens, e0, context, rope, attend, attention)

        # 5. Head and unpatchify: each token's outputs are ordered (kt, kh, kw, c).
        out = self.head(tokens, e)
        out = out.view(batch, *grid, kt, kh, kw, config.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(batch, config.out_dim, frames, height, width)


def init_random_weights(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter in place with weights that give sane activations (for tiny models and benchmarks).

    Matrices and modulation tables ~ N(0, 0.02), biases 0, norm weights 1, SLA `proj_l` 0. Works on
    any module already on its device (e.g. meta -> `to_empty` -> this), diffusers' Wan model included.
    """
    first = next(module.parameters())
    generator = torch.Generator(device=first.device).manual_seed(seed)
    with torch.no_grad():
        for name, sub in module.named_modules():
            for param_name, param in sub.named_parameters(recurse=False):
                if isinstance(sub, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
                    param.fill_(1.0 if param_name == "weight" else 0.0)
                elif name.endswith("proj_l") or param.dim() < 2:
                    param.zero_()
                else:
                    param.normal_(0.0, 0.02, generator=generator)
    return module
