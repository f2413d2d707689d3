"""Ulysses sequence parallelism for the Wan DiT's self-attention, as hooks on an unchanged WanDiT.

Each of N ranks holds the full weights and 1/N of the tokens. Everything in a block but
self-attention is token-local (projections, q/k RMSNorm over the width, RoPE, cross-attention to
the replicated text, FFN, norms), so only self-attention communicates: an all-to-all turns
(B, L/N, H, D) into (B, L, H/N, D), the registry backend attends all tokens on the rank's heads,
and a second all-to-all turns the result back. The head runs on the shard and one all-gather
rebuilds the full output on every rank, so all ranks step the sampler identically.

Padding: L is padded up to a multiple of N (zero tokens at the end, which stay finite through the
norms). Before the backend runs, the gathered sequence is cut back to the real L, so the padded
tokens are never attended and the sparse backends build their block mask and linear-attention sums
over exactly the real sequence: every rank's heads see what the single-process model sees.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from turbo_kernels.registry import AttentionBackend, AttentionMetadata
from turbo_serve.models.wan_dit import WanDiT
from turbo_serve.parallel.distributed import check_sequence_parallel


class CollectiveTimer:
    """Time spent in the all-to-alls: CUDA events on GPUs (read once, after one sync), wall time on the CPU."""

    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._cpu_seconds = 0.0
        self.calls = 0

    @contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        self.calls += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self._cpu_seconds += time.perf_counter() - began

    def seconds(self) -> float:
        """Total so far (synchronizes the devices whose events are pending)."""
        for _, end in self._events[-1:]:
            end.synchronize()
        return self._cpu_seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1000.0

    def reset(self) -> None:
        self._events.clear()
        self._cpu_seconds = 0.0
        self.calls = 0


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Exchange chunks along dim 0 (chunk j goes to group rank j); x must be contiguous."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def tokens_to_heads(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(..., L/N, H, D) token shard -> (..., L, H/N, D) head shard, tokens in rank order."""
    n = dist.get_world_size(group)
    chunks = x.unflatten(-2, (n, -1)).movedim(-3, 0).contiguous()  # (N, ..., L/N, H/N, D)
    return _all_to_all(chunks, group).movedim(0, -4).flatten(-4, -3)


def heads_to_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(..., L, H/N, D) head shard -> (..., L/N, H, D) token shard; inverse of tokens_to_heads."""
    n = dist.get_world_size(group)
    chunks = x.unflatten(-3, (n, -1)).movedim(-4, 0).contiguous()  # (N, ..., L/N, H/N, D)
    return _all_to_all(chunks, group).movedim(0, -3).flatten(-3, -2)


def padded_length(length: int, ranks: int) -> int:
    return -(-length // ranks) * ranks


def shard_tokens(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous 1/N of `x` along `dim`, zero-padded at the end to a multiple of N."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    length = x.shape[dim]
    extra = padded_length(length, n) - length
    if extra:
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra])
    return x.chunk(n, dim=dim)[rank]


def gather_tokens(x: torch.Tensor, group: dist.ProcessGroup, length: int, dim: int = 1) -> torch.Tensor:
    """All ranks' shards along `dim`, concatenated in rank order and cut to the real `length`."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, length)


class UlyssesAttention:
    """A registry backend lifted to token shards: all-to-all, attend the real tokens, all-to-all back."""

    def __init__(
        self, inner: AttentionBackend, group: dist.ProcessGroup, length: int, timer: CollectiveTimer | None = None
    ) -> None:
        self.inner = inner
        self.group = group
        self.length = length
        """Real sequence length; the gathered sequence is longer by the padding."""
        self.timer = timer

    def _exchange(self, fn, x: torch.Tensor) -> torch.Tensor:
        if self.timer is None:
            return fn(x, self.group)
        with self.timer.measure(x.device):
            return fn(x, self.group)

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        proj_l: torch.nn.Linear | None,
    ) -> torch.Tensor:
        """q, k, v (B, L/N, H, D) token shards -> (B, L/N, H, D)."""
        qkv = self._exchange(tokens_to_heads, torch.stack([q, k, v]))  # one collective for all three
        q, k, v = qkv[:, :, : self.length].unbind(0)
        out = self.inner(q, k, v, meta, proj_l)
        out = F.pad(out, (0, 0, 0, 0, 0, qkv.shape[2] - self.length))
        return self._exchange(heads_to_tokens, out)


class SequenceParallel:
    """Hooks that make an unchanged WanDiT run sequence parallel over `group`.

    WanDiT.forward patchifies, embeds time and text and builds the RoPE table for the whole
    sequence on every rank (all cheap), then calls each block as
    ``block(tokens, e0, context, rope, attend, attention)`` and the head as ``head(tokens, e)``.
    The pre-hook of block 0 shards the tokens; every block's pre-hook swaps in this rank's slice of
    the RoPE table and the Ulysses wrapper of the forward's backend; the head's hook gathers.
    Every rank must call the model with the same inputs at the same time.
    """

    BLOCK_ARGS = ("tokens", "e0", "context", "rope", "attend", "attention")

    def __init__(self, dit: WanDiT, group: dist.ProcessGroup, timer: CollectiveTimer | None = None) -> None:
        check_sequence_parallel(dist.get_world_size(group), dit.config.num_heads)
        self.group = group
        self.timer = timer
        self._length = 0
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._attend: UlyssesAttention | None = None
        self._handles = [
            block.register_forward_pre_hook(partial(self._enter_block, index), with_kwargs=True)
            for index, block in enumerate(dit.blocks)
        ]
        self._handles.append(dit.head.register_forward_hook(self._leave_head))

    def _enter_block(self, index: int, module: torch.nn.Module, args: tuple, kwargs: dict):
        if len(args) != len(self.BLOCK_ARGS) or kwargs:
            raise RuntimeError(
                f"SequenceParallel expects blocks called positionally as {self.BLOCK_ARGS}; "
                f"got {len(args)} positional and {sorted(kwargs)} keyword arguments"
            )
        tokens, e0, context, rope, attend, attention = args
        if index == 0:  # a new forward: shard its tokens and RoPE table once for all blocks
            self._length = tokens.shape[1]
            tokens = shard_tokens(tokens, self.group)
            self._rope = tuple(shard_tokens(table, self.group, dim=0) for table in rope)
            self._attend = UlyssesAttention(attend, self.group, self._length, self.timer)
        return (tokens, e0, context, self._rope, self._attend, attention), {}

    def _leave_head(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return gather_tokens(out, self.group, self._length)

    def remove(self) -> None:
        """Take the hooks off: the model runs single-process again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
