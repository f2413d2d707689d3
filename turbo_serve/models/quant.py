"""W8A8 linears in TurboDiffusion's `-quant` checkpoint format (what their `--quant_linear` swaps in).

Only the Linears inside the DiT blocks are quantised, SLA's `proj_l` excepted; embeddings and the
head stay in the model dtype. On Hopper this mainly saves memory (about half the weights of a 14B
expert); speed depends on the int8 kernel behind `turbo_kernels.w8a8.int8_linear`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from turbo_kernels.w8a8 import TILE, int8_linear, quantize_tiles

SKIPPED_LINEARS = ("proj_l",)
"""Child names inside the blocks that stay floating point."""


class Int8Linear(nn.Module):
    """Linear with int8 weights, one float32 scale per 128x128 weight tile, bias in the model dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        tiles = (math.ceil(out_features / TILE), math.ceil(in_features / TILE))
        self.register_buffer("int8_weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(tiles, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise a Linear's weights per tile; a meta Linear gives an empty meta Int8Linear to load into."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        if not weight.is_meta:
            with torch.no_grad():
                layer.int8_weight, layer.scale = quantize_tiles(weight)
                if linear.bias is not None:
                    layer.bias = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.int8_weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `model.blocks` (except `proj_l`) by an Int8Linear, in place.

    On a model with weights this quantises them (layer by layer, so the float weights are freed as
    it goes); on a meta-device model it builds the structure a `-quant` checkpoint loads into.
    """
    for parent in list(model.blocks.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in SKIPPED_LINEARS:
                setattr(parent, name, Int8Linear.from_linear(child))
    return model
