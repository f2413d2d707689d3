"""Run a function on N local processes joined by a loopback rendezvous (tests, benchmarks).

The Ray Denoiser starts its ranks as actors instead; both hand each rank the same two things, its
number and the rendezvous address, and the rank calls `init_parallel` itself.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from turbo_serve.parallel.distributed import NVLINK_MULTICAST_OFF, free_port, rendezvous_address


def _rank_main(rank: int, fn: Callable[..., Any], init_method: str, out_dir: str, args: tuple) -> None:
    # A file per rank, not a queue: a child blocked on a full pipe would never exit.
    torch.save(fn(rank, init_method, *args), Path(out_dir) / f"{rank}.pt")


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """fn(rank, init_method, *args) on `world_size` spawned processes; their return values by rank.

    `fn` must be importable (module level). A rank that raises makes this raise with its
    traceback; ranks still running after `timeout_s` are terminated and TimeoutError is raised.
    """
    os.environ.update(NVLINK_MULTICAST_OFF)  # inherited by the spawned children
    init_method = rendezvous_address("127.0.0.1", free_port())
    with tempfile.TemporaryDirectory(prefix="turbo-serve-ranks-") as out_dir:
        processes = mp.start_processes(
            _rank_main, args=(fn, init_method, out_dir, args), nprocs=world_size, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        while not processes.join(timeout=max(0.0, deadline - time.monotonic())):  # True once all exited
            if time.monotonic() >= deadline:
                for process in processes.processes:
                    if process.is_alive():
                        process.terminate()
                raise TimeoutError(f"ranks still running after {timeout_s} s were terminated")
        return [torch.load(Path(out_dir) / f"{rank}.pt", weights_only=False) for rank in range(world_size)]

