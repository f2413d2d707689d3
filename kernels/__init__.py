"""turbo_kernels: attention and linear kernels for the Wan DiT (Triton, with PyTorch references).

Pure torch + Triton: nothing here imports model, pipeline or Ray code. Attention backends register
themselves in `turbo_kernels.registry`; the DiT selects one per forward by `attention_type`.

- `flash`: the one flash-attention forward kernel (dense, LUT-sparse, INT8 QK, FP8 PV, SLA epilogue)
- `dense`, `block_sparse`, `sla`, `sage`: the entry points, their references and backends
- `block_mask`: SLA's pooled top-k block mask (and the passes that also quantise Q / reduce K, V)
- `quant`: Sage's K/V quantisation; `w8a8`: the int8 linear; `dispatch`: Triton vs reference
- `convert`: exact int32 <-> float tricks that keep Hopper's quarter-rate I2F/F2I out of the loops
- `autotune`: per-shape choice among candidate configs, each gated on the first one's output

After one call per shape (which compiles and autotunes) every attention backend launches only
Triton kernels, with no host sync, so the DiT's forward can be captured in a CUDA graph.
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
