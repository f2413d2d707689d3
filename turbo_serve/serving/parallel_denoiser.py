"""A Denoiser replica spanning several GPUs: rank 0 in the replica, ranks 1..N-1 in worker actors.

Serve reserves the replica's placement group (one bundle per rank, STRICT_PACK: one node, so the
ranks talk over NVLink) and runs the replica in bundle 0. The replica starts one `DenoiserRank`
actor in each other bundle, hands every rank its number and a rendezvous address, and all ranks
join one torch.distributed group (turbo_serve.parallel does the rest, without Ray). For each job
the replica sends the inputs to the workers and runs rank 0 itself; all ranks step the sampler in
lockstep and only rank 0 returns latents and reports progress.

The workers are owned by the replica: when Serve replaces the replica (its health check fails once
a worker is gone), they go with it and the new replica starts a fresh group.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from turbo_serve.parallel.distributed import (
    NVLINK_MULTICAST_OFF,
    ParallelConfig,
    free_port,
    init_parallel,
    rendezvous_address,
)
from turbo_serve.parallel.stage import ParallelDenoiseStage, check_parallel_config
from turbo_serve.pipeline.spec import GenerationSpec
from turbo_serve.pipeline.stages import GenerationCancelled, PipelineConfig

COLLECTIVE_TIMEOUT_S = 600.0
"""How long a rank waits in a collective (or the rendezvous) for a peer before it raises; covers
a peer's first-request kernel autotuning and graph capture, far beyond one step's skew."""


class DenoiserRank:
    """Ranks 1..N-1 of a multi-GPU Denoiser (a Ray actor; threaded, so `ping` answers mid-job)."""

    def __init__(self, config: PipelineConfig, parallel: ParallelConfig) -> None:
        self._config = config
        self._parallel = parallel
        self._stage: ParallelDenoiseStage | None = None

    def setup(self, rank: int, init_method: str) -> None:
        groups = init_parallel(self._parallel, rank, init_method, self._config.torch_device, COLLECTIVE_TIMEOUT_S)
        self._stage = ParallelDenoiseStage(self._config, groups)

    def denoise(self, spec: GenerationSpec, text, negative_text, condition) -> None:
        """Run this rank's share of a job; the latents stay with rank 0."""
        try:
            self._stage(spec, text, negative_text=negative_text, condition=condition)
        except GenerationCancelled:  # rank 0 decided it; it reports the cancellation
            pass

    def ping(self) -> bool:
        return self._stage is not None


class ParallelDenoiser:
    """Rank 0 and the worker actors; called like DenoiseStage (from the Denoiser replica)."""

    def __init__(self, config: PipelineConfig, parallel: ParallelConfig, rank_resources: dict[str, float]) -> None:
        check_parallel_config(parallel, config.model)
        placement_group = get_current_placement_group()
        if placement_group is None:
            raise RuntimeError(
                f"a Denoiser of {parallel.world_size} ranks runs inside its placement group; deploy it with "
                "placement_group_bundles (Settings.deployment_options sets them from sequence_parallel/cfg_parallel)"
            )
        worker = ray.remote(DenoiserRank)
        self.workers = [
            worker.options(
                num_cpus=rank_resources.get("CPU", 0),
                num_gpus=rank_resources.get("GPU", 0),
                max_concurrency=2,
                runtime_env={"env_vars": NVLINK_MULTICAST_OFF},
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=rank),
            ).remote(config, parallel)
            for rank in range(1, parallel.world_size)
        ]
        host = ray.util.get_node_ip_address()
        init_method = rendezvous_address(host, free_port(host))
        joined = [w.setup.remote(rank, init_method) for rank, w in enumerate(self.workers, start=1)]
        # Rank 0 joins (and loads its model) on a thread, so a worker that fails to start fails
        # this constructor at once instead of after the rendezvous timeout.
        setup = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank0-setup")
        rank0 = setup.submit(lambda: ParallelDenoiseStage(
            config, init_parallel(parallel, 0, init_method, config.torch_device, COLLECTIVE_TIMEOUT_S)))  # fmt: skip
        ray.get(joined)
        self.stage = rank0.result()
        setup.shutdown()
        self._broken: str | None = None

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
        # Put each input once; every worker reads the same object.
        inputs = [None if t is None else ray.put(t) for t in (text, negative_text, condition)]
        running = [w.denoise.remote(spec, *inputs) for w in self.workers]
        try:
            latents = self.stage(spec, text, negative_text=negative_text, condition=condition,
                                 on_step=on_step, should_stop=should_stop)  # fmt: skip
            ray.get(running)
        except (GenerationCancelled, ValueError):
            # Every rank decides these at the same point (a refused spec before the first step, a
            # cancellation broadcast by rank 0), so the group is intact: let the workers finish.
            ray.wait(running, num_returns=len(running), timeout=COLLECTIVE_TIMEOUT_S)
            raise
        except BaseException as error:
            # Anything else may have left a peer inside a collective: the group cannot be trusted.
            self._broken = f"{type(error).__name__}: {error}"
            raise
        return latents

    def check_health(self, timeout_s: float) -> None:
        """Raise if a job failed mid-collective or a worker actor is gone (Serve then replaces the
        replica, and with it the workers and the group)."""
        if self._broken is not None:
            raise RuntimeError(f"the Denoiser's process group failed during a job ({self._broken})")
        ray.get([w.ping.remote() for w in self.workers], timeout=timeout_s)
