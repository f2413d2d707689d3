"""Hopper TMA (tensor memory accelerator) plumbing shared by the kernels that can use it.

The attention kernel gets descriptors built on the host (`turbo_kernels.flash`); the W8A8 GEMM
builds its own on the device (`tl.make_tensor_descriptor`). These helpers decide whether operands
qualify, whether the autotuners should try TMA at all, and install the scratch allocator that
on-device descriptors need.
"""

from __future__ import annotations

import os

import torch
import triton

from turbo_kernels.dispatch import interpreting


def tma_ready(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases, unit inner stride and 16-byte multiple outer strides."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((s * size) % 16 for s in t.stride()[:-1]):
            return False
    return True


_ALLOCATOR_SET = False


def ensure_tma_allocator() -> None:
    """On-device tensor descriptors need a scratch allocator (set once, CUDA only). Under CUDA-graph
    capture the scratch comes from the graph's pool, so replays reuse it."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET and not interpreting():
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def tma_mode() -> str | None:
    """TURBO_KERNELS_TMA=1 forces TMA descriptors on every launch, =0 forces plain pointers (and
    keeps TMA out of the autotuners' candidates); unset, each config's use_tma decides."""
    value = os.environ.get("TURBO_KERNELS_TMA", "")
    return {"1": "on", "0": "off"}.get(value)


def tma_candidates_allowed(*tensors: torch.Tensor) -> bool:
    """Whether the autotuners should try TMA configs: Hopper or newer, aligned operands, not forced off."""
    if tma_mode() == "off" or interpreting() or not all(t.is_cuda for t in tensors):
        return False
    return torch.cuda.get_device_capability(tensors[0].device)[0] >= 9 and tma_ready(*tensors)
