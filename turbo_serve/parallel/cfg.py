"""CFG parallelism: the guided forward's two branches on two ranks, as hooks on an unchanged WanDiT.

The teacher samplers' velocity function (DenoiseStage) calls the DiT once with a batch of two:
(conditional, unconditional). With these hooks each rank of the CFG group runs only its row and an
all-gather hands every rank both outputs, so the guidance combination, and with it the sampler
state, stays identical on all ranks. A batch the group cannot split evenly (rCM's single branch)
runs whole on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from turbo_serve.models.wan_dit import WanDiT

_SPLIT_ARGS = 3
"""WanDiT.forward(x, timestep, context, ...): the leading arguments that carry the batch."""


class CfgParallel:
    def __init__(self, dit: WanDiT, group: dist.ProcessGroup) -> None:
        self.group = group
        self._ranks = dist.get_world_size(group)
        self._split = False
        self._handles = [
            dit.register_forward_pre_hook(self._enter, with_kwargs=True),
            dit.register_forward_hook(self._leave),
        ]

    def _enter(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        if len(args) < _SPLIT_ARGS:
            raise RuntimeError("CfgParallel expects the DiT called as dit(x, timestep, context, ...) positionally")
        batch = args[0].shape[0]
        self._split = batch > 1 and batch % self._ranks == 0
        if not self._split:
            return None
        rows = batch // self._ranks
        start = dist.get_rank(self.group) * rows
        return tuple(a.narrow(0, start, rows) for a in args[:_SPLIT_ARGS]) + args[_SPLIT_ARGS:], kwargs

    def _leave(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if not self._split:
            return None
        parts = [torch.empty_like(out) for _ in range(self._ranks)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        return torch.cat(parts)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
