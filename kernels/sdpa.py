"""`original`: dense attention through PyTorch SDPA (cuDNN / flash on Hopper), the reference bar."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from turbo_kernels.registry import AttentionMetadata, register_attention_backend


@register_attention_backend("original")
def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    proj_l: torch.nn.Linear | None = None,
) -> torch.Tensor:
    """Dense softmax attention; (B, L, H, D) in and out, transposes are views."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
