"""What every sampler shares: the velocity-function contract, seeded noise, cooperative stopping."""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, float, float], torch.Tensor]
"""fn(x, network_timestep, rf_time) -> velocity shaped like x. `network_timestep` is the value the
DiT receives (0..1000), `rf_time` the exact flow time s in [0, 1] used by the update."""

StepCallback = Callable[[int, int], None]
"""on_step(steps_done, total_steps), called after each step."""


class Cancelled(Exception):
    """Raised between steps when the caller asked the sampler to stop."""


class SeededNoise:
    """Standard normal draws from one seeded CPU generator, in call order.

    Drawing on the CPU makes a seed give the same noise on every device; the draws are moved to the
    sampling device as float64, the precision the sampler state is kept in.
    """

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device | str) -> None:
        self._generator = torch.Generator("cpu").manual_seed(seed)
        self._shape = shape
        self._device = device

    def __call__(self) -> torch.Tensor:
        draw = torch.randn(self._shape, generator=self._generator, dtype=torch.float32)
        return draw.to(self._device, torch.float64)


def check_stop(should_stop: Callable[[], bool] | None, step: int, total: int) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled(f"cancelled before step {step + 1} of {total}")
