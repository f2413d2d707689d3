"""Several processes per Denoiser: Ulysses sequence parallelism and CFG parallelism for the Wan DiT.

Plain torch.distributed (NCCL on GPUs, gloo on the CPU) and forward hooks on the unchanged model:
no Ray here. Whoever starts the ranks (Ray actors in turbo_serve.serving, torch.multiprocessing in
tests and benchmarks) passes each one its number and the rendezvous address.
"""

from turbo_serve.parallel.distributed import (
    NVLINK_MULTICAST_OFF,
    ParallelConfig,
    ParallelGroups,
    check_sequence_parallel,
    init_parallel,
    shutdown_parallel,
)

__all__ = [
    "NVLINK_MULTICAST_OFF",
    "ParallelConfig",
    "ParallelGroups",
    "check_sequence_parallel",
    "init_parallel",
    "shutdown_parallel",
]
