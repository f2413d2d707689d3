"""rCM few-step sampling (NVlabs/rcm, as TurboDiffusion's inference scripts run it).

The student is the unchanged Wan velocity predictor. Sampling happens in rectified-flow time s in
[0, 1]: a TrigFlow angle theta maps to s = sin(theta) / (sin(theta) + cos(theta)). Each step predicts
x0 = x - s * v and re-noises to the next time with fresh noise (or takes a deterministic Euler step
with `ode`). The state stays in float64; the network sees the timestep s * 1000 rounded through
bfloat16, exactly as the reference scripts feed it. Draw order: the initial noise, then one draw per
step, the last one included although its weight is zero.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from turbo_serve.sampling.base import SeededNoise, StepCallback, VelocityFn, check_stop

# TrigFlow angles after the first (which is atan(sigma_max)); rCM's "better visual quality" schedule.
MID_ANGLES = (1.5, 1.4, 1.0)
MAX_STEPS = len(MID_ANGLES) + 1


def rf_times(num_steps: int, sigma_max: float) -> list[float]:
    """The num_steps + 1 rectified-flow times, from s(atan(sigma_max)) down to 0."""
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps must be in 1..{MAX_STEPS} for rCM, got {num_steps}")
    if sigma_max <= 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max}")
    angles = [math.atan(sigma_max), *MID_ANGLES[: num_steps - 1], 0.0]
    return [math.sin(a) / (math.sin(a) + math.cos(a)) for a in angles]


def network_timestep(s: float) -> float:
    """s * 1000 rounded through bfloat16, the value TurboDiffusion actually feeds the DiT."""
    return torch.tensor(s * 1000.0, dtype=torch.float64).to(torch.bfloat16).item()


def sample(
    velocity: VelocityFn,
    shape: tuple[int, ...],
    *,
    seed: int,
    num_steps: int = 4,
    sigma_max: float = 80.0,
    ode: bool = False,
    device: torch.device | str = "cpu",
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run the rCM sampler; returns the final latent (float32, on `device`)."""
    times = rf_times(num_steps, sigma_max)
    noise = SeededNoise(seed, shape, device)
    x = noise() * times[0]
    for step, (s_cur, s_next) in enumerate(zip(times[:-1], times[1:])):
        check_stop(should_stop, step, num_steps)
        v = velocity(x, network_timestep(s_cur), s_cur).to(torch.float64)
        if ode:
            x = x + (s_next - s_cur) * v
        else:
            x = (1.0 - s_next) * (x - s_cur * v) + s_next * noise()
        if on_step is not None:
            on_step(step + 1, num_steps)
    return x.to(torch.float32)
