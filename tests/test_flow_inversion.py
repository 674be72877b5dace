"""smpo.renoise.flow_inversion against a velocity field known exactly: Gaussian data (method notes, section 8).

For x0 ~ N(mu, sd^2) per coordinate and x_s = (1 - s) x0 + s eps, the marginal at s is
N((1 - s) mu, var_s) with var_s = (1 - s)^2 sd^2 + s^2, the ideal velocity E[eps - x0 | x_s] is linear
in x_s, and the ODE's flow map keeps the standardised coordinate: x_s = (1 - s) mu + sqrt(var_s) (x0 - mu) / sd.
"""

import torch

from smpo.renoise import flow_inversion

MU, SD = 0.7, 0.4


def exact_velocity(z, s, index=None):
    s = s.view(-1, *[1] * (z.dim() - 1)).double()
    var = (1 - s) ** 2 * SD ** 2 + s ** 2
    centred = z.double() - (1 - s) * MU
    x0_mean = MU + (1 - s) * SD ** 2 / var * centred
    eps_mean = s / var * centred
    return (eps_mean - x0_mean).float()


def exact_flow_map(x0, s):
    s = s.view(-1, *[1] * (x0.dim() - 1)).double()
    var = (1 - s) ** 2 * SD ** 2 + s ** 2
    return ((1 - s) * MU + var.sqrt() * (x0.double() - MU) / SD).float()


def euler_sample(v_fn, x_s, sigmas, num_steps):
    """The Euler sampler from each sigma down to 0 on the grid the inversion climbed."""
    z = x_s.clone()
    step = (sigmas / num_steps).view(-1, *[1] * (z.dim() - 1))
    for j in reversed(range(num_steps)):
        z = z - step * v_fn(z, sigmas * (j + 1) / num_steps)
    return z


def gaussian_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + SD * torch.randn(n, 4, 8, 8, generator=g)
    sigmas = torch.rand(n, generator=g) * 0.9 + 0.1
    return x0, sigmas


def test_flow_inversion_follows_the_ode_as_the_steps_grow():
    x0, sigmas = gaussian_batch()
    exact = exact_flow_map(x0, sigmas)
    errors = [(flow_inversion(exact_velocity, x0, sigmas, k, num_renoise_steps=0) - exact).pow(2).mean().sqrt().item()
              for k in (1, 2, 4, 8, 32)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0], errors  # first order: 32x the steps, far below a tenth of the error
    refined = [(flow_inversion(exact_velocity, x0, sigmas, k, num_renoise_steps=1) - exact).pow(2).mean().sqrt().item()
               for k in (1, 32)]
    assert refined[1] < 0.1 * refined[0], refined  # with the authors' R = 1 too


def test_renoise_iterations_make_the_inversion_consistent_with_the_euler_sampler():
    x0, sigmas = gaussian_batch(seed=1)
    k = 3  # few steps: plain Euler inversion does not retrace the sampler
    errors = []
    for r in (0, 2, 4, 8):
        inverted = flow_inversion(exact_velocity, x0, sigmas, k, num_renoise_steps=r)
        errors.append((euler_sample(exact_velocity, inverted, sigmas, k) - x0).pow(2).mean().sqrt().item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0], errors  # the mean of v_1..v_R nears the fixed point as 1/R


def test_each_sample_is_inverted_on_its_own():
    x0, sigmas = gaussian_batch(n=6, seed=2)
    seen = []

    def v_fn(z, s, index):
        seen.append((len(z), s.shape, index.tolist()))
        return exact_velocity(z, s) + 0.1 * torch.tanh(z.flatten(1).mean(1)).view(-1, 1, 1, 1)  # nonlinear

    batch = flow_inversion(v_fn, x0, sigmas, 4, 2)
    alone = torch.cat([flow_inversion(v_fn, x0[i:i + 1], sigmas[i:i + 1], 4, 2) for i in range(6)])
    torch.testing.assert_close(batch, alone)
    assert batch.dtype == torch.float32 and not batch.is_inference()
    assert seen[0] == (6, torch.Size([6]), list(range(6)))


def test_sigmas_outside_the_unit_interval_are_refused():
    x0, _ = gaussian_batch(n=2)
    for bad in (torch.tensor([0.0, 0.5]), torch.tensor([0.5, 1.5])):
        try:
            flow_inversion(exact_velocity, x0, bad, 2, 1)
        except ValueError as err:
            assert "(0, 1]" in str(err)
        else:
            raise AssertionError(f"sigmas {bad} accepted")
