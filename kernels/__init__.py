"""turbo_kernels: attention and linear kernels for the Wan DiT (Triton, with PyTorch references).

Pure torch + Triton: nothing here imports model, pipeline or Ray code. Attention backends register
themselves in `turbo_kernels.registry`; the DiT selects one per forward by `attention_type`.
"""

from turbo_kernels.registry import (
    AttentionMetadata,
    attention_types,
    get_attention_backend,
    register_attention_backend,
)

__all__ = [
    "AttentionMetadata",
    "attention_types",
    "get_attention_backend",
    "register_attention_backend",
]
