"""W8A8 linear: int8 weights with one fp32 scale per 128x128 tile, activations quantized per
128x128 tile at run time, int32 accumulation, dequantized per K tile.

This is the storage format of TurboDiffusion's `-quant` checkpoints (`int8_weight`, `scale`).
"""

from __future__ import annotations

import torch

TILE = 128


def _tile_amax(x: torch.Tensor) -> torch.Tensor:
    """Max |x| over each TILE x TILE tile of a 2-D tensor (ragged edges included)."""
    rows, cols = x.shape
    pr, pc = -rows % TILE, -cols % TILE
    padded = torch.nn.functional.pad(x.abs().float(), (0, pc, 0, pr))
    tiles = padded.view((rows + pr) // TILE, TILE, (cols + pc) // TILE, TILE)
    return tiles.amax(dim=(1, 3))


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per 128x128 tile: returns (int8 values, fp32 scales of shape tiles)."""
    scale = (_tile_amax(x) / 127.0).clamp_min(1e-12)
    expanded = scale.repeat_interleave(TILE, 0)[: x.shape[0]].repeat_interleave(TILE, 1)[:, : x.shape[1]]
    q = torch.round(x.float() / expanded).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_tiles` (float32)."""
    rows, cols = q.shape
    expanded = scale.repeat_interleave(TILE, 0)[:rows].repeat_interleave(TILE, 1)[:, :cols]
    return q.float() * expanded


def int8_linear_ref(
    x: torch.Tensor, int8_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Reference W8A8 linear: quantize x per tile, multiply the dequantized operands in fp32."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_tiles(x2)
    out = dequantize_tiles(xq, xs) @ dequantize_tiles(int8_weight, scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], int8_weight.shape[0])


def int8_linear(
    x: torch.Tensor, int8_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """W8A8 linear, (..., in) -> (..., out) in x's dtype; the entry point model code calls."""
    return int8_linear_ref(x, int8_weight, scale, bias)
