"""One rank of a multi-process Denoiser: the plain DenoiseStage with its experts made parallel.

Every rank runs the same `DenoiseStage.__call__` with the same spec and text, so every rank draws
the same seeded noise and steps the same sampler; the hooks split each DiT forward between them.
Only the leader (rank 0) reports progress and decides cancellation; its decision is broadcast
before every step, so all ranks stop at the same step instead of one of them hanging in a
collective.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist

from turbo_serve.parallel.cfg import CfgParallel
from turbo_serve.parallel.distributed import ParallelConfig, ParallelGroups, check_sequence_parallel
from turbo_serve.parallel.ulysses import CollectiveTimer, SequenceParallel
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.pipeline.stages import DenoiseStage, PipelineConfig


def check_parallel_config(parallel: ParallelConfig, model: str) -> None:
    """Raise ValueError where the model's head count does not allow `parallel` (before any process starts)."""
    from turbo_serve.models.configs import get_preset

    check_sequence_parallel(parallel.sequence_parallel, get_preset(model).dit.num_heads)


def synchronized_stop(should_stop: Callable[[], bool] | None, device: torch.device) -> Callable[[], bool]:
    """A should_stop every rank polls at the same points: rank 0's answer, broadcast to all."""

    def poll() -> bool:
        stop = dist.get_rank() == 0 and should_stop is not None and should_stop()
        flag = torch.tensor([int(stop)], device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    return poll


class ParallelDenoiseStage:
    """DenoiseStage of one rank; call it on all ranks at once with the same arguments."""

    def __init__(
        self, config: PipelineConfig, groups: ParallelGroups, timer: CollectiveTimer | None = None
    ) -> None:
        check_parallel_config(groups.config, config.model)
        self.groups = groups
        self.stage = DenoiseStage(config)
        self.timer = timer
        self._hooks: list[SequenceParallel | CfgParallel] = []
        for expert in self.stage.experts:
            if groups.cfg is not None:
                self._hooks.append(CfgParallel(expert, groups.cfg))
            if groups.sequence is not None:
                self._hooks.append(SequenceParallel(expert, groups.sequence, timer))

    @property
    def config(self) -> PipelineConfig:
        return self.stage.config

    def __call__(
        self,
        spec: GenerationSpec,
        text: torch.Tensor,
        *,
        negative_text: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Final latents [16, T, h, w] (the same on every rank); on_step runs on the leader only."""
        leader = self.groups.is_leader
        return self.stage(
            spec,
            text,
            negative_text=negative_text,
            condition=condition,
            on_step=on_step if leader else None,
            should_stop=synchronized_stop(should_stop, self.config.torch_device),
        )

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def rank_config(config: PipelineConfig, local_rank: int) -> PipelineConfig:
    """The config of a rank started next to its peers on one host (torch.multiprocessing): GPU
    `local_rank` of the visible ones. A Ray actor sees only its own GPU and keeps `config`."""
    if config.torch_device.type != "cuda":
        return config
    return replace(config, device=f"cuda:{local_rank}")
