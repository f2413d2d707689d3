"""Teacher samplers for stock (non-distilled) Wan weights: flow-matching Euler and UniPC.

Wan's schedule: sigmas = linspace(1 - 1/1000, 0, steps + 1)[:-1], shifted by s' = k s / (1 + (k-1) s),
then a final sigma of 0; the network sees int(sigma * 1000). UniPC is the multistep predictor-corrector
of Zhao et al. (2023) in data-prediction form with B(h) = e^h - 1 ("bh2"), order 2, lowering the
order on the last step, as Wan's FlowUniPCMultistepScheduler runs it. Classifier-free guidance is the
velocity function's business (the denoise stage batches both branches in one forward).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from turbo_serve.sampling.base import SeededNoise, StepCallback, VelocityFn, check_stop

NUM_TRAIN_TIMESTEPS = 1000


def flow_sigmas(num_steps: int, shift: float) -> list[float]:
    """num_steps shifted sigmas from ~1 downwards, plus the final 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    top = 1.0 - 1.0 / NUM_TRAIN_TIMESTEPS
    base = [top * (1.0 - i / num_steps) for i in range(num_steps)]
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in base] + [0.0]


def _network_timestep(sigma: float) -> float:
    return float(int(sigma * NUM_TRAIN_TIMESTEPS))


def _lam(sigma: float) -> float:
    """Half log-SNR log(alpha / sigma) with alpha = 1 - sigma; +inf at sigma = 0."""
    return math.inf if sigma == 0.0 else math.log(1.0 - sigma) - math.log(sigma)


def sample_euler(
    velocity: VelocityFn,
    shape: tuple[int, ...],
    *,
    seed: int,
    num_steps: int = 50,
    shift: float = 5.0,
    device: torch.device | str = "cpu",
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    sigmas = flow_sigmas(num_steps, shift)
    x = SeededNoise(seed, shape, device)()
    for step in range(num_steps):
        check_stop(should_stop, step, num_steps)
        v = velocity(x, _network_timestep(sigmas[step]), sigmas[step]).to(torch.float64)
        x = x + (sigmas[step + 1] - sigmas[step]) * v
        if on_step is not None:
            on_step(step + 1, num_steps)
    return x.to(torch.float32)


def _unipc_coefficients(rks: list[float], hh: float, order: int) -> tuple[list[list[float]], list[float], float, float]:
    """UniPC's linear system (R, b) for the given order, plus phi_1(h) * h and B(h)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)
    rows, rhs, factorial = [], [], 1
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return rows, rhs, h_phi_1, b_h


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)).tolist()


def _differences(x0s: list[torch.Tensor], lams: list[float], order: int, h: float) -> tuple[list[float], list[torch.Tensor]]:
    """Scaled differences D_k = (m_{-k} - m_0) / r_k of earlier x0 predictions (newest last)."""
    m0, lam0 = x0s[-1], lams[-1]
    rks, diffs = [], []
    for k in range(1, order):
        rk = (lams[-(k + 1)] - lam0) / h
        rks.append(rk)
        diffs.append((x0s[-(k + 1)] - m0) / rk)
    return rks + [1.0], diffs


def sample_unipc(
    velocity: VelocityFn,
    shape: tuple[int, ...],
    *,
    seed: int,
    num_steps: int = 50,
    shift: float = 5.0,
    order: int = 2,
    device: torch.device | str = "cpu",
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """UniPC-bh2 multistep sampler in flow-matching form (x0 = x - sigma * v)."""
    sigmas = flow_sigmas(num_steps, shift)
    lams = [_lam(s) for s in sigmas]
    x = SeededNoise(seed, shape, device)()
    x0s: list[torch.Tensor] = []
    previous_x: torch.Tensor | None = None
    previous_order = 1
    for step in range(num_steps):
        check_stop(should_stop, step, num_steps)
        sigma = sigmas[step]
        x0 = x - sigma * velocity(x, _network_timestep(sigma), sigma).to(torch.float64)
        if previous_x is not None:  # UniC: correct x with the model output just computed at it
            x = _correct(previous_x, x0, x0s, sigmas, lams, step, previous_order)
        x0s = (x0s + [x0])[-order:]
        this_order = min(order, num_steps - step, len(x0s))
        previous_x, previous_order = x, this_order
        x = _predict(x, x0s, sigmas, lams, step, this_order)
        if on_step is not None:
            on_step(step + 1, num_steps)
    return x.to(torch.float32)


def _predict(x, x0s, sigmas, lams, step, order):
    """UniP step from sigmas[step] to sigmas[step + 1]."""
    s0, t = step, step + 1
    h = lams[t] - lams[s0]
    rks, diffs = _differences(x0s, lams[: s0 + 1], order, h)
    rows, rhs, h_phi_1, b_h = _unipc_coefficients(rks, -h, order)
    alpha_t, sigma_t = 1.0 - sigmas[t], sigmas[t]
    out = (sigma_t / sigmas[s0]) * x - alpha_t * h_phi_1 * x0s[-1]
    if diffs:
        rhos = [0.5] if order == 2 else _solve([row[:-1] for row in rows[:-1]], rhs[:-1])
        out = out - alpha_t * b_h * sum(r * d for r, d in zip(rhos, diffs))
    return out


def _correct(previous_x, x0_new, x0s, sigmas, lams, step, order):
    """UniC correction of the sample at sigmas[step], predicted from sigmas[step - 1]."""
    s0, t = step - 1, step
    h = lams[t] - lams[s0]
    rks, diffs = _differences(x0s, lams[: s0 + 1], order, h)
    rows, rhs, h_phi_1, b_h = _unipc_coefficients(rks, -h, order)
    rhos = [0.5] if order == 1 else _solve(rows, rhs)
    alpha_t, sigma_t = 1.0 - sigmas[t], sigmas[t]
    out = (sigma_t / sigmas[s0]) * previous_x - alpha_t * h_phi_1 * x0s[-1]
    correction = sum((r * d for r, d in zip(rhos[:-1], diffs)), torch.zeros_like(out))
    return out - alpha_t * b_h * (correction + rhos[-1] * (x0_new - x0s[-1]))
