"""torch.distributed setup of one multi-process Denoiser: the layout of its ranks and their groups.

A Denoiser spanning several processes runs `cfg` x `sequence` ranks. Rank r sits at CFG index
r // sequence_parallel and sequence index r % sequence_parallel: the ranks of one CFG branch form a
sequence-parallel group (Ulysses all-to-alls), the ranks at one sequence index form a CFG group
(one guidance branch each). Whoever starts the processes (Ray actors, torch.multiprocessing) only
hands every rank its number and the rendezvous address; everything else happens here.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

NVLINK_MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
"""Environment of every Denoiser process: NVLink multicast (NVLS) must stay off, since multicast
objects can take a shared host's GPUs out of service. NCCL reads these when it creates a communicator."""


def disable_nvlink_multicast() -> None:
    """Set NVLINK_MULTICAST_OFF in this process's environment (before any NCCL communicator exists)."""
    os.environ.update(NVLINK_MULTICAST_OFF)


def head_divisors(num_heads: int) -> list[int]:
    """Sequence-parallel degrees a model with `num_heads` heads allows (Ulysses splits whole heads)."""
    return [n for n in range(1, num_heads + 1) if num_heads % n == 0]


def check_sequence_parallel(degree: int, num_heads: int) -> None:
    """Raise ValueError unless `degree` ranks can split `num_heads` heads evenly."""
    if degree < 1 or num_heads % degree:
        valid = ", ".join(map(str, head_divisors(num_heads)))
        raise ValueError(
            f"sequence_parallel={degree} must divide the model's num_heads={num_heads} "
            f"(Ulysses gives each rank whole heads); valid: {valid}"
        )


@dataclass(frozen=True)
class ParallelConfig:
    """How many processes one Denoiser spans and how they split the work."""

    sequence_parallel: int = 1
    """Ranks sharing each DiT forward's tokens (Ulysses); must divide the model's head count."""
    cfg_parallel: bool = False
    """Two ranks (per sequence shard) run the guided sampler's conditional and unconditional
    branches side by side; plain rCM sampling has one branch and gains nothing."""

    def __post_init__(self) -> None:
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel must be >= 1, got {self.sequence_parallel}")

    @property
    def cfg_degree(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def world_size(self) -> int:
        return self.sequence_parallel * self.cfg_degree

    def sequence_ranks(self, cfg_index: int) -> list[int]:
        """Global ranks of the sequence-parallel group of one CFG branch."""
        return [cfg_index * self.sequence_parallel + i for i in range(self.sequence_parallel)]

    def cfg_ranks(self, sequence_index: int) -> list[int]:
        """Global ranks of the CFG group at one sequence index."""
        return [c * self.sequence_parallel + sequence_index for c in range(self.cfg_degree)]


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the layout; a group is None where its degree is 1."""

    config: ParallelConfig
    rank: int
    sequence: dist.ProcessGroup | None
    cfg: dist.ProcessGroup | None

    @property
    def is_leader(self) -> bool:
        """Rank 0 reports progress, decides cancellation and returns the result."""
        return self.rank == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a rendezvous on this host)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rendezvous_address(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


def backend_for(device: torch.device | str) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_parallel(
    config: ParallelConfig,
    rank: int,
    init_method: str,
    device: torch.device | str,
    timeout_s: float = 600.0,
) -> ParallelGroups:
    """Join the Denoiser's process group as `rank` and build the sequence and CFG groups.

    Every rank calls this at the same time (it blocks until all have joined). `timeout_s` bounds
    how long a collective waits for a dead peer before raising instead of hanging the replica.
    """
    if not 0 <= rank < config.world_size:
        raise ValueError(f"rank must be in 0..{config.world_size - 1} for {config}, got {rank}")
    disable_nvlink_multicast()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device),
        init_method=init_method,
        rank=rank,
        world_size=config.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    # new_group is collective: every rank creates every group, in the same order.
    sequence = cfg = None
    if config.sequence_parallel > 1:
        for c in range(config.cfg_degree):
            group = dist.new_group(config.sequence_ranks(c))
            if rank in config.sequence_ranks(c):
                sequence = group
    if config.cfg_parallel:
        for i in range(config.sequence_parallel):
            group = dist.new_group(config.cfg_ranks(i))
            if rank in config.cfg_ranks(i):
                cfg = group
    return ParallelGroups(config, rank, sequence, cfg)


def shutdown_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
