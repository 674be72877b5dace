"""smpo.renoise: forward noise, DDIM inversion + ReNoise to exactly t, v-prediction (method notes, section 4)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from smpo.renoise import (add_noise, epsilon_from_prediction, forward_noise, inversion_grid, inversion_num_steps,
                          renoise_inversion)

T = 1000


def sd_scheduler(**kwargs):
    """Stable Diffusion's training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=T, **kwargs)


ALPHAS_CUMPROD = sd_scheduler().alphas_cumprod.float()


def latents_and_noise(n, seed=0, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)


def smooth_eps(z, t):
    """A smooth, nonlinear, timestep-dependent stand-in for a UNet's epsilon prediction."""
    s = (t.float() / T).view(-1, 1, 1, 1)
    return torch.tanh(0.7 * z) * (0.5 + s) + 0.3 * torch.sin(z.flip(-1)) - 0.2 * s


class Recorder:
    """Wraps an eps_fn and records what every call received."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, z, t):
        self.calls.append((z.clone(), t.clone()))
        return self.fn(z, t)


def sqrt(x):
    return math.sqrt(float(x))


# ------------------------------------------------------------------------------- forward noise
TIMESTEP_CASES = [[0, 0, 0, 0], [1, 1, 1, 1], [999, 999, 999, 999], [0, 1, 999, 437]]


@pytest.mark.parametrize("timesteps", TIMESTEP_CASES)
def test_add_noise_matches_diffusers_and_the_formula(timesteps):
    x0, noise = latents_and_noise(4)
    t = torch.tensor(timesteps)
    noisy = add_noise(x0, noise, t, ALPHAS_CUMPROD)
    assert noisy.dtype == torch.float32
    assert torch.allclose(noisy, sd_scheduler().add_noise(x0, noise, t), atol=1e-5)
    for i, ti in enumerate(timesteps):
        abar = ALPHAS_CUMPROD[ti].item()
        assert torch.allclose(noisy[i], sqrt(abar) * x0[i] + sqrt(1 - abar) * noise[i], atol=1e-5)


def test_forward_noise_returns_add_noise_and_the_given_noise():
    x0, noise = latents_and_noise(3)
    t = torch.tensor([5, 500, 999])
    noisy, out_noise = forward_noise(x0.half(), noise.half(), t, ALPHAS_CUMPROD)
    assert noisy.dtype == out_noise.dtype == torch.float32
    assert torch.equal(out_noise, noise.half().float())
    assert torch.allclose(noisy, add_noise(x0.half(), noise.half(), t, ALPHAS_CUMPROD))


# ------------------------------------------------------------------------ grid and step counts
@pytest.mark.parametrize("t_max, k, expected", [
    (999, 5, 5), (0, 5, 1), (1, 5, 1), (199, 5, 1), (200, 5, 2), (599, 5, 3), (600, 5, 4),
    (999, 10, 10), (99, 10, 1), (100, 10, 2), (999, 1, 1), (500, 1, 1),
])
def test_inversion_num_steps_is_ceil_k_t_plus_1_over_T_clipped(t_max, k, expected):
    assert expected == max(1, min(k, math.ceil(k * (t_max + 1) / T)))
    assert inversion_num_steps(torch.tensor([0, t_max, t_max // 2]), T, k) == expected


@pytest.mark.parametrize("num_steps", [1, 2, 5, 10])
def test_inversion_grid_is_increasing_integer_and_ends_at_t(num_steps):
    t = torch.tensor([0, 1, 7, 199, 200, 500, 999])
    grid = inversion_grid(t, num_steps)
    assert grid.shape == (num_steps, 7)
    assert not grid.is_floating_point()
    assert torch.equal(grid[-1], t)
    assert torch.all(grid >= 0) and torch.all(grid <= t)
    assert torch.all(grid[1:] >= grid[:-1])
    for j in range(num_steps):  # row j is round((j + 1) * t / num_steps)
        expected = [math.floor((j + 1) * ti / num_steps + 0.5) for ti in t.tolist()]
        assert grid[j].tolist() == expected


# --------------------------------------------------------------------------- inversion calls
@pytest.mark.parametrize("timesteps, k, r, expected_calls", [
    ([999], 5, 1, 10),
    ([0], 5, 1, 2),
    ([0, 999], 5, 1, 10),
    ([150, 3], 5, 1, 2),
    ([200, 0, 17], 5, 1, 4),
    ([999, 999], 10, 0, 10),
    ([999, 400], 10, 3, 40),
    ([1, 0], 10, 2, 3),
])
def test_inversion_calls_eps_fn_num_steps_times_r_plus_1_on_the_whole_batch(timesteps, k, r, expected_calls):
    n = len(timesteps)
    x0, _ = latents_and_noise(n)
    t = torch.tensor(timesteps)
    rec = Recorder(smooth_eps)
    renoise_inversion(rec, x0, t, ALPHAS_CUMPROD, num_inversion_steps=k, num_renoise_steps=r)

    num_steps = max(1, min(k, math.ceil(k * (max(timesteps) + 1) / T)))
    assert len(rec.calls) == num_steps * (r + 1) == expected_calls
    assert len(rec.calls) <= k * (r + 1)
    previous = torch.zeros(n, dtype=torch.long)
    for j, (z, step_t) in enumerate(rec.calls):
        assert z.shape == x0.shape  # the whole batch every time
        assert step_t.shape == (n,)
        assert not step_t.is_floating_point()
        assert torch.all(step_t >= 0) and torch.all(step_t < T)  # never negative, never past T - 1
        assert torch.all(step_t <= t)
        assert torch.all(step_t >= previous)  # the grid only goes up
        previous = step_t
        if j % (r + 1):  # ReNoise refinements re-predict at the same timestep
            assert torch.equal(step_t, rec.calls[j - 1][1])
    assert torch.equal(rec.calls[-1][1], t)  # the last step ends exactly at t
    assert torch.equal(rec.calls[0][0], x0)  # the first step starts at the clean latent


@pytest.mark.parametrize("r", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_constant_eps_inverts_exactly_and_returns_that_eps_as_noise(k, r):
    """With eps independent of z, DDIM inversion is exact: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_c."""
    t = torch.tensor([0, 1, 2, 137, 500, 998, 999])
    x0, eps_c = latents_and_noise(len(t), seed=1)
    noisy, noise = renoise_inversion(lambda z, s: eps_c, x0, t, ALPHAS_CUMPROD, k, r)
    assert torch.allclose(noise, eps_c, atol=1e-3)
    assert torch.allclose(noisy, add_noise(x0, eps_c, t, ALPHAS_CUMPROD), atol=1e-5)


@pytest.mark.parametrize("timesteps", TIMESTEP_CASES + [[0, 999, 1, 2]])
@pytest.mark.parametrize("k, r", [(1, 0), (5, 1), (10, 2)])
def test_add_noise_of_returned_noise_reproduces_the_inverted_latent(timesteps, k, r):
    t = torch.tensor(timesteps)
    x0, _ = latents_and_noise(len(t), seed=2)
    noisy, noise = renoise_inversion(smooth_eps, x0, t, ALPHAS_CUMPROD, k, r)
    assert torch.all(torch.isfinite(noise))
    assert torch.allclose(add_noise(x0, noise, t, ALPHAS_CUMPROD), noisy, atol=1e-4)


def test_single_step_formulas_by_hand():
    """K = 1 from the clean latent (abar = 1): z = sqrt(a) x0 + sqrt(1 - a) * e for the averaged e.

    R = 0: e = e0 = eps(x0, t); R = 1: e = (e0 + e1) / 2 with e1 = eps(sqrt(a) x0 + sqrt(1 - a) e0, t);
    R = 2: e = (e1 + e2) / 2 (ReNoise averages the later estimates, not e0).
    """
    t = torch.tensor([3, 250, 999])
    x0, _ = latents_and_noise(3, seed=3)
    a = ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)

    def up(e):
        return a.sqrt() * x0 + (1 - a).sqrt() * e

    e0 = smooth_eps(x0, t)
    e1 = smooth_eps(up(e0), t)
    e2 = smooth_eps(up(e1), t)
    for r, e in [(0, e0), (1, (e0 + e1) / 2), (2, (e1 + e2) / 2)]:
        noisy, noise = renoise_inversion(smooth_eps, x0, t, ALPHAS_CUMPROD, 1, r)
        assert torch.allclose(noisy, up(e), atol=1e-5), r
        assert torch.allclose(noise, e, atol=1e-3), r
    assert not torch.allclose(e0, e1, atol=1e-2)  # so the three cases really differ


def test_multi_step_inversion_follows_the_ddim_update_on_its_grid():
    """Replay the recorded grid with the DDIM update written out by hand (R = 1: mean of e0, e1)."""
    t = torch.tensor([999, 620, 5])
    x0, _ = latents_and_noise(3, seed=4)
    rec = Recorder(smooth_eps)
    noisy, noise = renoise_inversion(rec, x0, t, ALPHAS_CUMPROD, num_inversion_steps=5, num_renoise_steps=1)
    grid = [rec.calls[j][1] for j in range(0, len(rec.calls), 2)]
    assert len(grid) == 5

    def up(z, e, a_from, a_to):
        return a_to.sqrt() * (z - (1 - a_from).sqrt() * e) / a_from.sqrt() + (1 - a_to).sqrt() * e

    z, a_from = x0.double(), torch.ones(3, 1, 1, 1, dtype=torch.float64)
    for step_t in grid:
        a_to = ALPHAS_CUMPROD[step_t].double().view(-1, 1, 1, 1)
        e0 = smooth_eps(z.float(), step_t).double()
        e1 = smooth_eps(up(z, e0, a_from, a_to).float(), step_t).double()
        z, a_from = up(z, (e0 + e1) / 2, a_from, a_to), a_to
    assert torch.allclose(noisy.double(), z, atol=1e-4)
    a_t = ALPHAS_CUMPROD[t].double().view(-1, 1, 1, 1)
    assert torch.allclose(noise.double(), (z - a_t.sqrt() * x0) / (1 - a_t).sqrt(), atol=1e-3)


def test_inversion_of_a_sample_does_not_depend_on_its_position_in_the_batch():
    t = torch.tensor([999, 300, 40, 700])
    x0, _ = latents_and_noise(4, seed=5)
    noisy, noise = renoise_inversion(smooth_eps, x0, t, ALPHAS_CUMPROD, 5, 1)
    perm = torch.tensor([2, 0, 3, 1])
    noisy_p, noise_p = renoise_inversion(smooth_eps, x0[perm], t[perm], ALPHAS_CUMPROD, 5, 1)
    assert torch.allclose(noisy_p, noisy[perm], atol=1e-5)
    assert torch.allclose(noise_p, noise[perm], atol=1e-4)


# ------------------------------------------------------------------- ReNoise beats plain DDIM
@pytest.fixture(scope="module")
def tiny_unet_eps(tiny_assets):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_assets / "tiny-sd"), subfolder="unet").eval()
    encoder_hidden_states = torch.randn(6, 77, 32, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def eps_fn(z, t):
        return unet(z, t, encoder_hidden_states=encoder_hidden_states[: z.shape[0]]).sample

    return eps_fn


def test_renoise_lowers_the_residual_of_the_implicit_inversion_equation(tiny_unet_eps):
    """Exact inversion of one DDIM step from x0 solves z_t = sqrt(a) x0 + sqrt(1 - a) eps(z_t, t).

    Plain DDIM inversion (R = 0) uses eps(x0, t) instead; ReNoise re-predicts at its estimate of
    z_t. The residual ||z_t - ddim_up(x0, eps(z_t, t), 1 -> a)|| must be smaller with ReNoise.
    """
    t = torch.tensor([50, 200, 350, 500, 650, 800])
    x0, _ = latents_and_noise(6, seed=6, shape=(4, 16, 16))
    a = ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)

    def residual(r):
        z, _ = renoise_inversion(tiny_unet_eps, x0, t, ALPHAS_CUMPROD, num_inversion_steps=1, num_renoise_steps=r)
        implied = a.sqrt() * x0 + (1 - a).sqrt() * tiny_unet_eps(z, t).float()
        return (z - implied).flatten(1).norm(dim=1).mean().item()

    plain = residual(0)
    renoised = {r: residual(r) for r in (1, 2, 3)}
    assert plain > 0.1  # the model is nonlinear enough for the comparison to mean something
    for r, value in renoised.items():
        assert value < plain, (r, value, plain)
    assert renoised[3] < 0.8 * plain, renoised


# ------------------------------------------------------------------------------ v-prediction
@pytest.mark.parametrize("timesteps", TIMESTEP_CASES)
def test_epsilon_from_prediction_inverts_diffusers_get_velocity(timesteps):
    scheduler = sd_scheduler(prediction_type="v_prediction")
    x0, noise = latents_and_noise(4, seed=7)
    t = torch.tensor(timesteps)
    z = scheduler.add_noise(x0, noise, t)
    v = scheduler.get_velocity(x0, noise, t)
    eps = epsilon_from_prediction(v, z, t, scheduler.alphas_cumprod, "v_prediction")
    assert eps.dtype == torch.float32
    assert torch.allclose(eps, noise, atol=1e-4)
    # epsilon prediction passes through unchanged (as fp32)
    assert torch.equal(epsilon_from_prediction(noise.half(), z, t, scheduler.alphas_cumprod, "epsilon"),
                       noise.half().float())


# ----------------------------------------------------------------------------------- dtypes
def test_outputs_are_fp32_with_fp16_latents_and_an_fp16_eps_fn():
    t = torch.tensor([0, 250, 999])
    x0, eps_c = latents_and_noise(3, seed=8)
    seen = []

    def eps_fn(z, s):  # an fp16 model: fp16 output, here independent of z so the answer is known
        seen.append(z.dtype)
        return eps_c.half()

    noisy, noise = renoise_inversion(eps_fn, x0.half(), t, ALPHAS_CUMPROD, 5, 1)
    assert noisy.dtype == torch.float32 and noise.dtype == torch.float32
    assert all(d == torch.float32 for d in seen)
    # constant (fp16-rounded) eps: the inversion is still exact in fp32
    assert torch.allclose(noise, eps_c.half().float(), atol=2e-2)
    assert torch.allclose(add_noise(x0.half(), noise, t, ALPHAS_CUMPROD), noisy, atol=1e-3)
