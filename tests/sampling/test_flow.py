import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from turbo_serve.sampling import flow


def _velocity(x, t, s):
    return torch.tanh(x) * (1.0 + s) - 0.3


@pytest.mark.parametrize("steps, shift", [(6, 5.0), (10, 3.0), (2, 8.0)])
def test_unipc_matches_diffusers_flow_unipc(steps, shift):
    shape = (1, 4, 3, 5)
    ours = flow.sample_unipc(_velocity, shape, seed=3, num_steps=steps, shift=shift)

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, num_train_timesteps=1000, solver_order=2
    )
    # Wan's (unshifted) base schedule, which diffusers shifts the same way.
    scheduler.set_timesteps(sigmas=np.array([0.999 * (1 - i / steps) for i in range(steps)]))
    assert scheduler.sigmas[:-1].double().tolist() == pytest.approx(flow.flow_sigmas(steps, shift)[:-1], rel=1e-6)
    assert scheduler.timesteps.tolist() == [int(s * 1000) for s in flow.flow_sigmas(steps, shift)[:-1]]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).double()
    for i, t in enumerate(scheduler.timesteps):
        v = _velocity(x, float(t), float(scheduler.sigmas[i]))
        x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(ours.double(), x, rtol=1e-4, atol=1e-4)


def test_euler_integrates_a_constant_velocity_exactly():
    out = flow.sample_euler(lambda x, t, s: torch.full_like(x, 2.0), (3,), seed=0, num_steps=7, shift=3.0)
    start = torch.randn((3,), generator=torch.Generator().manual_seed(0))
    sigma0 = flow.flow_sigmas(7, 3.0)[0]
    torch.testing.assert_close(out, start - 2.0 * sigma0)


def test_shift_pushes_sigmas_towards_noise():
    plain, shifted = flow.flow_sigmas(10, 1.0), flow.flow_sigmas(10, 5.0)
    assert all(b >= a for a, b in zip(plain, shifted)) and shifted[-1] == 0.0
