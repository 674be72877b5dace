"""smpo.renoise: forward noise, DDIM inversion + ReNoise to exactly t, v-prediction (method notes, section 4)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from smpo.renoise import (SCHEDULES, add_noise, epsilon_from_prediction, forward_noise, inversion_plan,
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


def smooth_eps(z, t, index=None):
    """A smooth, nonlinear, timestep-dependent stand-in for a UNet's epsilon prediction."""
    s = (t.float() / T).view(-1, 1, 1, 1)
    return torch.tanh(0.7 * z) * (0.5 + s) + 0.3 * torch.sin(z.flip(-1)) - 0.2 * s


class Recorder:
    """Wraps an eps_fn and records what every call received."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, z, t, index):
        self.calls.append((z.clone(), t.clone(), index.clone()))
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


# ---------------------------------------------------------------------- the inversion plans
@pytest.mark.parametrize("k", [1, 5, 10])
def test_exact_plan_takes_k_steps_to_t_from_the_clean_latent(k):
    t = torch.tensor([0, 1, 3, 7, 199, 200, 500, 999])
    unet_t, level_from, level_to, counts = inversion_plan(t, T, k, "exact")
    assert counts.tolist() == [max(1, min(k, ti)) for ti in t.tolist()]  # K steps, fewer only below t = K
    for i, ti in enumerate(t.tolist()):
        n = counts[i].item()
        expected = [math.floor((j + 1) * ti / n + 0.5) for j in range(n)]  # round((j + 1) t / n)
        assert level_to[:n, i].tolist() == expected
        assert expected[-1] == ti  # ends exactly at t
        assert level_from[0, i] == T and level_from[1:n, i].tolist() == expected[:-1]  # from the clean latent
        assert torch.equal(unet_t[:n, i], level_to[:n, i])  # the UNet is told where the step goes
        assert len(set(expected)) == n  # no step stays on its level


def rolled_grid_diffusers_0_20(k, steps_offset):
    """diffusers 0.20.0 DDIMInverseScheduler.set_timesteps (leading spacing), transcribed: the grid
    k * T // K + steps_offset, rolled by one, its first entry replaced by the second minus T // K."""
    ratio = T // k
    grid = [j * ratio + steps_offset for j in range(k)]
    grid = grid[-1:] + grid[:-1]
    grid[0] = grid[1] - ratio
    return grid


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("k", [5, 10])
def test_grid_plans_follow_both_diffusers_versions_for_every_t(k, steps_offset):
    t = torch.arange(T)
    ratio = T // k
    above = inversion_plan(t, T, k, "grid_above", steps_offset)
    below = inversion_plan(t, T, k, "grid_below", steps_offset)
    rolled = rolled_grid_diffusers_0_20(k, steps_offset)
    if (k, steps_offset) == (5, 1):
        assert rolled == [-199, 1, 201, 401, 601]  # what diffusers 0.20.0 prints
    plain = [j * ratio + steps_offset for j in range(k)]
    for t0 in range(T):
        steps = [g for g in rolled if g < t0]  # the authors' loop: timesteps[timesteps < t0]
        n = above[3][t0].item()
        assert above[0][:n, t0].tolist() == steps  # the UNet is told g, negative first
        assert above[1][:n, t0].tolist() == steps  # from level g (negative: alphas_cumprod[0]) ...
        assert above[2][:n, t0].tolist() == [g + ratio for g in steps]  # ... up to g + T // K
        assert steps[-1] + ratio >= min(t0, rolled[-1] + ratio)  # ends at or above t (up to the grid's top)
        steps = [g for g in plain if g < t0]
        n = below[3][t0].item()
        assert below[0][:n, t0].tolist() == steps == below[2][:n, t0].tolist()  # told g, ending at g
        assert below[1][:n, t0].tolist() == [g - ratio for g in steps]
        assert all(g < t0 for g in steps)  # ends below t; no step at all for t <= the first level


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="grid_middle"):
        inversion_plan(torch.tensor([5]), T, 5, "grid_middle")


# --------------------------------------------------------------------------- inversion calls
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("timesteps, k, r", [
    ([999], 5, 1), ([0], 5, 1), ([0, 999], 5, 1), ([150, 3], 5, 1), ([200, 0, 17], 5, 1),
    ([999, 999], 10, 0), ([999, 400], 10, 3), ([1, 0], 10, 2), ([300, 40, 999, 700], 10, 1),
])
def test_eps_fn_sees_only_the_samples_still_inverting(schedule, timesteps, k, r):
    """Each step calls eps_fn R + 1 times on the samples that still have steps; the image-forwards
    add up to the sum of the samples' own step counts (not batch size x the largest)."""
    n = len(timesteps)
    x0, _ = latents_and_noise(n)
    t = torch.tensor(timesteps)
    rec = Recorder(smooth_eps)
    renoise_inversion(rec, x0, t, ALPHAS_CUMPROD, k, r, schedule=schedule)
    unet_t, _, _, counts = inversion_plan(t, T, k, schedule)
    assert sum(len(index) for _, _, index in rec.calls) == counts.sum().item() * (r + 1)
    for j in range(int(counts.max())):
        for z, step_t, index in rec.calls[j * (r + 1):(j + 1) * (r + 1)]:  # ReNoise: same samples, same t
            assert index.tolist() == [i for i in range(n) if counts[i] > j]
            assert z.shape == (len(index), *x0.shape[1:])
            assert not step_t.is_floating_point()
            assert step_t.tolist() == unet_t[j, index].tolist()
    for i in range(n):
        if counts[i] > 0:  # the first step starts at the clean latent
            first = next(c for c in rec.calls if i in c[2].tolist())
            assert torch.equal(first[0][first[2].tolist().index(i)], x0[i])


@pytest.mark.parametrize("r", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_constant_eps_inverts_exactly_and_returns_that_eps_as_noise(k, r):
    """With eps independent of z, DDIM inversion is exact: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_c."""
    t = torch.tensor([0, 1, 2, 137, 500, 998, 999])
    x0, eps_c = latents_and_noise(len(t), seed=1)
    noisy, noise = renoise_inversion(lambda z, s, i: eps_c[i], x0, t, ALPHAS_CUMPROD, k, r)
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
    assert len(grid) == 5 and all(len(step_t) == 3 for step_t in grid)  # K steps for every t

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


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("k", [5, 10])
def test_a_sample_inverts_the_same_in_any_batch_as_alone(schedule, k):
    t = torch.tensor([999, 300, 40, 700, 0, 1, 2, 150])
    x0, _ = latents_and_noise(len(t), seed=5)
    noisy, noise = renoise_inversion(smooth_eps, x0, t, ALPHAS_CUMPROD, k, 1, schedule=schedule)
    for i in range(len(t)):
        alone = renoise_inversion(smooth_eps, x0[i:i + 1], t[i:i + 1], ALPHAS_CUMPROD, k, 1, schedule=schedule)
        assert torch.allclose(alone[0][0], noisy[i], atol=1e-6, rtol=1e-6), (schedule, t[i])
        assert torch.allclose(alone[1][0], noise[i], atol=1e-5, rtol=1e-5), (schedule, t[i])
    perm = torch.tensor([2, 0, 3, 1, 7, 5, 6, 4])
    noisy_p, _ = renoise_inversion(smooth_eps, x0[perm], t[perm], ALPHAS_CUMPROD, k, 1, schedule=schedule)
    assert torch.allclose(noisy_p, noisy[perm], atol=1e-6)


# ------------------------------------------------------- the authors' loop, both diffusers versions
def authors_loop(step, grid, eps, x0, t0):
    """The inversion of the authors' train.py for one sample (R = 1), with a scheduler's ``step``."""
    z = x0
    for g in [g for g in grid if g < t0]:
        e0 = eps(z, g)
        e1 = eps(step(e0, g, z), g)
        z = step((e0 + e1) / 2, g, z)
    abar = ALPHAS_CUMPROD[t0]
    return z, (z - abar.sqrt() * x0) / (1 - abar).sqrt()


def scalar_eps(z, g):
    return smooth_eps(z, torch.tensor([g]))


def step_diffusers_0_20(k):
    """diffusers 0.20.0 DDIMInverseScheduler.step (epsilon), transcribed: from level g (alphas_cumprod[0]
    for g < 0, set_alpha_to_one=False) to g + T // K."""
    def step(eps, g, z):
        a = ALPHAS_CUMPROD[g] if g >= 0 else ALPHAS_CUMPROD[0]
        a_next = ALPHAS_CUMPROD[g + T // k]
        return a_next.sqrt() * (z - (1 - a).sqrt() * eps) / a.sqrt() + (1 - a_next).sqrt() * eps
    return step


def ddim_inverse_scheduler(k, steps_offset):
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     num_train_timesteps=T, set_alpha_to_one=False, steps_offset=steps_offset,
                                     clip_sample=False, timestep_spacing="leading")
    scheduler.set_timesteps(k)
    return scheduler


TIMESTEPS_0_999 = list(range(0, 12)) + list(range(12, T, 7)) + [199, 200, 201, 202, 600, 601, 602, 801, 802, 998, 999]


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("k", [5, 10])
def test_grid_below_is_the_authors_loop_under_todays_diffusers(k, steps_offset):
    """diffusers >= 0.22's own DDIMInverseScheduler, run literally as the authors' loop."""
    scheduler = ddim_inverse_scheduler(k, steps_offset)
    grid = scheduler.timesteps.tolist()
    assert grid == [j * (T // k) + steps_offset for j in range(k)]
    t = torch.tensor(TIMESTEPS_0_999)
    x0, _ = latents_and_noise(len(t), seed=9, shape=(4, 4, 4))
    noisy, noise = renoise_inversion(smooth_eps, x0, t, ALPHAS_CUMPROD, k, 1, "grid_below", steps_offset)
    for i, t0 in enumerate(TIMESTEPS_0_999):
        z, n = authors_loop(lambda e, g, z: scheduler.step(e, g, z).prev_sample, grid, scalar_eps, x0[i:i + 1], t0)
        assert torch.allclose(noisy[i], z[0], atol=1e-5), t0
        assert torch.allclose(noise[i], n[0], atol=1e-4, rtol=1e-4), t0


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("k", [5, 10])
def test_grid_above_is_the_authors_loop_under_diffusers_0_20(k, steps_offset):
    grid = rolled_grid_diffusers_0_20(k, steps_offset)
    t = torch.tensor(TIMESTEPS_0_999)
    x0, _ = latents_and_noise(len(t), seed=10, shape=(4, 4, 4))
    noisy, noise = renoise_inversion(smooth_eps, x0, t, ALPHAS_CUMPROD, k, 1, "grid_above", steps_offset)
    for i, t0 in enumerate(TIMESTEPS_0_999):
        z, n = authors_loop(step_diffusers_0_20(k), grid, scalar_eps, x0[i:i + 1], t0)
        assert torch.allclose(noisy[i], z[0], atol=1e-5), t0
        assert torch.allclose(noise[i], n[0], atol=1e-4, rtol=1e-4), t0


@pytest.mark.parametrize("key", ["offset1_K5", "offset1_K10", "offset0_K5", "offset0_K10"])
def test_grid_above_reproduces_a_literal_run_of_diffusers_0_20(key):
    """tests/data/authors_loop_diffusers020.pt: the authors' loop run with diffusers 0.20.0's own
    DDIMInverseScheduler for every t in [0, 999] (tests/data/make_authors_loop_reference.py)."""
    import os

    ref = torch.load(os.path.join(os.path.dirname(__file__), "data", "authors_loop_diffusers020.pt"), weights_only=True)
    assert ref["diffusers_version"] == "0.20.0"
    steps_offset, k = int(key[6]), int(key.split("_K")[1])
    run = ref[key]
    assert run["timesteps"] == rolled_grid_diffusers_0_20(k, steps_offset)

    def eps(z, t, index):  # the eps_formula of the reference file
        g = t.float().view(-1, 1, 1, 1)
        return torch.tanh(0.8 * z + 0.3) * (1.0 + g / 2000.0) + 0.05 * torch.sin(g / 100.0)

    assert "tanh(0.8 * z + 0.3) * (1.0 + g / 2000.0) + 0.05 * math.sin(g / 100.0)" in ref["eps_formula"]
    calls = []
    recorded = lambda z, t, index: calls.append((t, index)) or eps(z, t, index)  # noqa: E731
    noisy, noise = renoise_inversion(recorded, ref["x0"], ref["t0"], ref["alphas_cumprod"], k, 1, "grid_above",
                                     steps_offset)
    told = [[] for _ in range(T)]
    for t, index in calls[::2]:  # R = 1: two calls per step, both told g
        for i, g in zip(index.tolist(), t.tolist()):
            told[i].append(g)
    assert told == run["g"]  # the same timesteps, negative first one included, for every t
    assert torch.allclose(noisy, run["z"], atol=1e-5, rtol=1e-5)
    assert torch.allclose(noise, run["noise"], atol=1e-3, rtol=1e-4)


# ------------------------------------------------------------------- ReNoise beats plain DDIM
@pytest.fixture(scope="module")
def tiny_unet_eps(tiny_assets):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_assets / "tiny-sd"), subfolder="unet").eval()
    encoder_hidden_states = torch.randn(6, 77, 32, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def eps_fn(z, t, index=None):
        states = encoder_hidden_states[: z.shape[0]] if index is None else encoder_hidden_states[index]
        return unet(z, t, encoder_hidden_states=states).sample

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

    def eps_fn(z, s, i):  # an fp16 model: fp16 output, here independent of z so the answer is known
        seen.append(z.dtype)
        return eps_c[i].half()

    noisy, noise = renoise_inversion(eps_fn, x0.half(), t, ALPHAS_CUMPROD, 5, 1)
    assert noisy.dtype == torch.float32 and noise.dtype == torch.float32
    assert all(d == torch.float32 for d in seen)
    # constant (fp16-rounded) eps: the inversion is still exact in fp32
    assert torch.allclose(noise, eps_c.half().float(), atol=2e-2)
    assert torch.allclose(add_noise(x0.half(), noise, t, ALPHAS_CUMPROD), noisy, atol=1e-3)
