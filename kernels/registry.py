"""The one registry of self-attention backends.

The DiT never imports a kernel: it builds an `AttentionMetadata` once per forward and calls
`get_attention_backend(meta.attention_type)`. Kernel modules register their backends with
`@register_attention_backend(name)` when imported; the built-in modules are imported lazily on the
first lookup, so a missing optional dependency only breaks its own backend.

A backend is a callable ``fn(q, k, v, meta, proj_l) -> out`` where q, k, v and out are
(batch, tokens, heads, head_dim) tensors in Wan's native layout (strided views are allowed) and
``proj_l`` is the layer's SLA output projection (``torch.nn.Linear(head_dim, head_dim)``) or None.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

# Modules whose import registers the built-in backends.
_BUILTIN_MODULES = ("turbo_kernels.sdpa", "turbo_kernels.sla", "turbo_kernels.sage")


@dataclass(frozen=True)
class AttentionMetadata:
    """Self-attention settings of one DiT forward, shared by every layer."""

    attention_type: str = "original"
    """Registered backend name: original | sla | sagesla."""
    sla_topk: float = 0.1
    """Fraction of key blocks each query block attends to exactly (sparse backends), in (0, 1]."""

    def __post_init__(self) -> None:
        if not 0.0 < self.sla_topk <= 1.0:
            raise ValueError(f"sla_topk must be in (0, 1], got {self.sla_topk}")


class AttentionBackend(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        proj_l: torch.nn.Linear | None,
    ) -> torch.Tensor: ...


_BACKENDS: dict[str, AttentionBackend] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_builtins_loaded = False


def register_attention_backend(name: str) -> Callable[[AttentionBackend], AttentionBackend]:
    """Decorator: make ``fn`` selectable as ``attention_type=name``."""

    def decorator(fn: AttentionBackend) -> AttentionBackend:
        if name in _BACKENDS and _BACKENDS[name] is not fn:
            raise ValueError(f"attention backend {name!r} is already registered")
        _BACKENDS[name] = fn
        return fn

    return decorator


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            try:
                importlib.import_module(module)
            except ImportError as error:  # only the backends of that module become unavailable
                _IMPORT_ERRORS[module] = str(error)


def attention_types() -> list[str]:
    """Names of every registered backend."""
    _load_builtins()
    return sorted(_BACKENDS)


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend registered as ``name``; the error lists the valid names."""
    _load_builtins()
    try:
        return _BACKENDS[name]
    except KeyError:
        unavailable = "".join(f"; {m} failed to import: {e}" for m, e in _IMPORT_ERRORS.items())
        raise ValueError(
            f"unknown attention_type {name!r}; valid: {', '.join(sorted(_BACKENDS))}{unavailable}"
        ) from None
