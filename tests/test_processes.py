"""smpo.processes: the rectified-flow process (noising, target, derived noise, timesteps, shift, beta conversion)
and the diffusion process giving what the SD formulas give."""

import argparse

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from smpo.losses import denoising_target
from smpo.processes import (WEIGHTING_SCHEMES, Diffusion, RectifiedFlow, add_flow_flags, check_flow_args,
                            converted_beta, flow_sigmas)
from smpo.renoise import add_noise, flow_inversion


def flow(shift=1.0, scheme="logit_normal", **kwargs):
    return RectifiedFlow(FlowMatchEulerDiscreteScheduler(shift=shift).sigmas.float(), scheme, shift=shift, **kwargs)


def test_noising_target_and_derived_noise_follow_the_straight_path():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    s = torch.tensor([0.05, 0.5, 1.0])
    process = flow()
    noisy = process.add_noise(x0.half(), eps.half(), s)
    assert noisy.dtype == torch.float32
    for i in range(3):
        assert torch.allclose(noisy[i], (1 - s[i]) * x0.half()[i].float() + s[i] * eps.half()[i].float())
    assert torch.equal(noisy[2], eps.half()[2].float())  # s = 1: pure noise
    assert torch.equal(process.target(x0, eps, s), eps - x0)
    # the derived noise lands x0 at the noisy latent again, and is the noise itself for a forward-noised one
    x0h = x0.half().float()
    assert torch.allclose(process.noise_from(x0h, noisy, s), eps.half().float(), atol=1e-4)
    assert torch.allclose(process.add_noise(x0h, process.noise_from(x0h, noisy, s), s), noisy, atol=1e-5)
    # x0 and eps recovered from the target: x0 = x_s - s v, eps = x_s + (1 - s) v
    v = process.target(x0, eps, s)
    x_s = process.add_noise(x0, eps, s)
    assert torch.allclose(x_s - s.view(-1, 1, 1, 1) * v, x0, atol=1e-5)


def test_inversion_gives_noise_consistent_with_the_noising():
    """invert -> (noisy, noise) with add_noise(x0, noise, s) == noisy, through flow_inversion with the model time."""
    process = flow(time_scale=1000.0)
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.3, 0.9])
    told = []

    def predict(z, model_t, index):
        told.append(model_t.clone())
        return -0.5 * z  # any smooth field

    args = argparse.Namespace(num_inversion_steps=3, num_renoise_steps=1)
    noisy, noise = process.invert(predict, x0, s, args)
    assert torch.allclose(process.add_noise(x0, noise, s), noisy, atol=1e-5)
    assert torch.allclose(noisy, flow_inversion(lambda z, sig, i: -0.5 * z, x0, s, 3, 1))
    assert torch.allclose(told[-1], s * 1000)  # the last step is told the pair's sigma, in SD3's timestep units


@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_timesteps_are_the_schedulers_sigmas_at_diffusers_indices(scheme, shift):
    process = flow(shift, scheme)
    s = process.draw_timesteps(5000, torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and s.shape == (5000,)
    assert bool(((s > 0) & (s <= 1)).all())
    assert set(s.tolist()) <= set(process.sigmas.tolist())  # on the scheduler's grid, shift applied
    # the same draw as diffusers' train_dreambooth_sd3.py: u -> indices -> scheduler.sigmas[indices]
    u = compute_density_for_timestep_sampling(scheme, 5000, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, process.sigmas[(u * 1000).long()])
    assert torch.equal(process.model_time(s), s * 1000)


def test_shift_moves_sigmas_up_and_matches_the_scheduler():
    assert torch.allclose(flow_sigmas(3.0), FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain, shifted = flow(1.0).draw_timesteps(4000, g()), flow(3.0).draw_timesteps(4000, g())
    assert bool((shifted >= plain).all()) and shifted.mean() > plain.mean() + 0.1
    assert 0.45 < float(plain.mean()) < 0.55  # logit-normal(0, 1) is symmetric about 1/2


def test_beta_conversion_factor():
    """E[(1 - s)^2]: 1/3 for uniform s without shift (by hand), about 0.11 for logit-normal with shift 3 (notes 8)."""
    assert flow(1.0, "uniform").mean_squared_one_minus_sigma() == pytest.approx(1 / 3, abs=3e-3)
    factor = flow(3.0).mean_squared_one_minus_sigma()
    assert 0.10 < factor < 0.125
    assert converted_beta(2000.0, flow(3.0)) == pytest.approx(2000.0 * factor)
    import train_smpo_diffusion_sd3

    assert train_smpo_diffusion_sd3.BETA_DPO == round(converted_beta(2000.0, flow(3.0)))  # the --help default


def test_diffusion_process_gives_the_sd_formulas():
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([10, 900])
    for kind in ("epsilon", "v_prediction"):
        process = Diffusion(alphas, kind)
        assert torch.equal(process.add_noise(x0, eps, t), add_noise(x0, eps, t, alphas))
        assert torch.equal(process.target(x0, eps, t), denoising_target(eps, x0, t, alphas, kind))
        assert torch.equal(process.model_time(t), t)


def test_flow_flags_and_sd_only_schedules():
    parser = argparse.ArgumentParser()
    add_flow_flags(parser)
    args = parser.parse_args([])
    assert (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale) == ("logit_normal", 0.0, 1.0, 1.29)
    for schedule in ("grid_above", "grid_below"):
        with pytest.raises(SystemExit, match="--inversion_schedule exact"):
            check_flow_args(argparse.Namespace(inversion_schedule=schedule))
    check_flow_args(argparse.Namespace(inversion_schedule="exact"))


def test_a_dynamically_shifting_scheduler_trains_on_unshifted_sigmas():
    """FLUX's scheduler (use_dynamic_shifting, shift 3 in its config) shifts at inference only."""
    args = argparse.Namespace(weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    config = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config
    process = RectifiedFlow.from_scheduler_config(config, args, time_scale=1.0)
    assert torch.allclose(process.sigmas, flow_sigmas(1.0)) and process.shift == 1.0
    sd3 = RectifiedFlow.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, args, 1000.0)
    assert torch.allclose(sd3.sigmas, flow_sigmas(3.0)) and sd3.shift == 3.0
