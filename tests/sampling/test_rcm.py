import math

import pytest
import torch

from turbo_serve.sampling import rcm
from turbo_serve.sampling.base import Cancelled


def test_network_timesteps_match_turbodiffusion_for_sigma_max_80():
    times = rcm.rf_times(4, 80.0)
    assert [rcm.network_timestep(s) for s in times[:-1]] == [988.0, 932.0, 852.0, 608.0]
    assert times[-1] == 0.0
    assert times[0] == pytest.approx(80.0 / 81.0)


@pytest.mark.parametrize("sigma_max, first", [(120.0, 992.0), (200.0, 996.0), (1600.0, 1000.0)])
def test_first_timestep_follows_sigma_max(sigma_max, first):
    assert rcm.network_timestep(rcm.rf_times(4, sigma_max)[0]) == first


def test_fewer_steps_use_a_prefix_of_the_schedule_then_jump_to_zero():
    assert rcm.rf_times(2, 80.0) == pytest.approx([80 / 81, rcm.rf_times(4, 80.0)[1], 0.0])


@pytest.mark.parametrize("steps", [0, 5])
def test_step_count_is_bounded(steps):
    with pytest.raises(ValueError, match="num_steps"):
        rcm.rf_times(steps, 80.0)


def _recording_velocity(calls):
    def velocity(x, t, s):
        calls.append((t, s))
        return 0.1 * x + 1.0

    return velocity


def test_sampler_follows_the_rcm_update_with_the_stated_draw_order():
    shape = (2, 3, 4)
    calls = []
    out = rcm.sample(_recording_velocity(calls), shape, seed=7, num_steps=3, sigma_max=80.0)
    # Recompute by hand: one generator, initial draw then one draw per step.
    g = torch.Generator().manual_seed(7)
    times = rcm.rf_times(3, 80.0)
    x = torch.randn(shape, generator=g).double() * times[0]
    for s_cur, s_next in zip(times[:-1], times[1:]):
        v = 0.1 * x + 1.0
        x = (1 - s_next) * (x - s_cur * v) + s_next * torch.randn(shape, generator=g).double()
    torch.testing.assert_close(out, x.float(), rtol=0, atol=0)
    assert [t for t, _ in calls] == [988.0, 932.0, 852.0]


def test_seed_reproduces_bit_for_bit_and_differs_across_seeds():
    velocity = lambda x, t, s: torch.sin(x)  # noqa: E731
    a = rcm.sample(velocity, (4, 5), seed=1)
    b = rcm.sample(velocity, (4, 5), seed=1)
    c = rcm.sample(velocity, (4, 5), seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ode_takes_euler_steps_without_fresh_noise():
    out = rcm.sample(lambda x, t, s: torch.ones_like(x), (3,), seed=0, num_steps=2, ode=True)
    x0 = torch.randn((3,), generator=torch.Generator().manual_seed(0)).double() * rcm.rf_times(2, 80.0)[0]
    torch.testing.assert_close(out, (x0 - rcm.rf_times(2, 80.0)[0]).float())


def test_progress_and_cancellation_between_steps():
    seen = []
    with pytest.raises(Cancelled, match="step 3 of 4"):
        rcm.sample(
            lambda x, t, s: x,
            (2,),
            seed=0,
            on_step=lambda done, total: seen.append((done, total)),
            should_stop=lambda: len(seen) == 2,
        )
    assert seen == [(1, 4), (2, 4)]


def test_i2v_boundary_splits_steps_between_experts_as_turbodiffusion_does():
    # 4 steps at sigma_max 200: s = 0.995, 0.934 -> high-noise expert; 0.853, 0.609 -> low-noise.
    times = rcm.rf_times(4, 200.0)[:-1]
    assert [s >= 0.9 for s in times] == [True, True, False, False]
    assert math.isclose(times[0], 200 / 201)
