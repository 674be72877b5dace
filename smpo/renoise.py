"""Where the training noise comes from (method notes, section 4).

Diffusion-DPO noises each clean latent with random Gaussian noise (:func:`forward_noise`).
SmPO instead inverts each clean latent with DDIM inversion refined by ReNoise up to exactly
the sampled timestep t (:func:`renoise_inversion`) and derives the noise that lands there, so the
model is trained on the trajectory it would itself take to generate the image.
"""

import torch


def _abar(alphas_cumprod, timesteps):
    """alphas_cumprod at per-sample timesteps, in fp32, shaped to broadcast over (N, C, H, W)."""
    return alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)


def add_noise(latents, noise, timesteps, alphas_cumprod):
    """q(x_t | x_0): sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, computed in fp32."""
    abar = _abar(alphas_cumprod.to(latents.device), timesteps)
    return abar.sqrt() * latents.float() + (1.0 - abar).sqrt() * noise.float()


def forward_noise(latents, noise, timesteps, alphas_cumprod):
    """Diffusion-DPO's noising: returns (noisy_latents, noise) for the given Gaussian noise."""
    return add_noise(latents, noise, timesteps, alphas_cumprod), noise.float()


def epsilon_from_prediction(prediction, noisy_latents, timesteps, alphas_cumprod, prediction_type):
    """The epsilon a UNet predicts: its output, or sqrt(abar) * v + sqrt(1 - abar) * z_t for v-prediction."""
    if prediction_type == "epsilon":
        return prediction.float()
    if prediction_type != "v_prediction":
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    abar = _abar(alphas_cumprod.to(prediction.device), timesteps)
    return abar.sqrt() * prediction.float() + (1.0 - abar).sqrt() * noisy_latents.float()


def ddim_up(z, eps, abar_from, abar_to):
    """One deterministic DDIM step from noise level abar_from up to abar_to with prediction eps."""
    x0_pred = (z - (1.0 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0_pred + (1.0 - abar_to).sqrt() * eps


def inversion_num_steps(timesteps, num_train_timesteps, num_inversion_steps):
    """Steps used for a batch: ceil(K * (t + 1) / T) for its largest t (at least 1, at most K).

    A sample with small t gets the same number of (finer) steps as the largest t in its batch,
    so the whole batch moves through the model together.
    """
    t_max = int(timesteps.max())
    return max(1, min(num_inversion_steps, -(-num_inversion_steps * (t_max + 1) // num_train_timesteps)))


def inversion_grid(timesteps, num_steps):
    """(num_steps, N) integer timesteps: row j is round((j + 1) * t / num_steps); the last row is t."""
    j = torch.arange(1, num_steps + 1, device=timesteps.device).view(-1, 1)
    return (j * timesteps.view(1, -1) + num_steps // 2) // num_steps


def renoise_inversion(eps_fn, latents, timesteps, alphas_cumprod, num_inversion_steps, num_renoise_steps=1):
    """Invert clean latents to exactly their timestep t with DDIM inversion + ReNoise.

    Each inversion step s -> s' predicts the noise at the current latent (e0 = eps_fn(z_s, s')),
    then refines it ``num_renoise_steps`` (R) times by re-predicting at the latent that estimate
    reaches (e_k = eps_fn(ddim_up(z_s, e_{k-1}), s')) and steps with the mean prediction: of
    e_0 and e_1 for R = 1 (the authors' choice), of the later estimates e_1..e_R for R > 1 (as
    ReNoise does), e_0 alone for R = 0 (plain DDIM inversion). The first step starts from the
    clean latent (abar = 1); the last ends exactly at t.

    Args:
        eps_fn: ``eps_fn(z, t) -> epsilon`` for latents z (N, C, H, W) and timesteps t (N,).
            The caller closes over the (conditional) text embeddings and converts v-prediction
            output to epsilon. The whole batch goes through it together, at most
            ``num_inversion_steps * (num_renoise_steps + 1)`` times.
        latents: clean latents x0, (N, C, H, W).
        timesteps: (N,) integer training timesteps, one per sample.
        alphas_cumprod: the training scheduler's cumulative alphas (T,).
    Returns:
        (noisy_latents, noise) in fp32 with ``add_noise(latents, noise, timesteps) == noisy_latents``.
        Runs under ``torch.inference_mode()``; no gradients flow.
    """
    # The step count comes from the timesteps where they are (pass them on the CPU to avoid a sync).
    num_steps = inversion_num_steps(timesteps, alphas_cumprod.shape[0], num_inversion_steps)
    with torch.inference_mode():
        noisy, noise = _invert(eps_fn, latents, timesteps, alphas_cumprod, num_steps, num_renoise_steps)
    return noisy.clone(), noise.clone()  # ordinary tensors again, usable in the training graph


def _invert(eps_fn, latents, timesteps, alphas_cumprod, num_steps, num_renoise_steps):
    x0 = latents.float()
    alphas_cumprod = alphas_cumprod.to(device=x0.device, dtype=torch.float32)
    timesteps = timesteps.to(x0.device).long()
    z = x0
    abar_from = torch.ones_like(_abar(alphas_cumprod, timesteps))
    for step_t in inversion_grid(timesteps, num_steps):
        abar_to = _abar(alphas_cumprod, step_t)
        estimates = [eps_fn(z, step_t).float()]
        for _ in range(num_renoise_steps):
            estimates.append(eps_fn(ddim_up(z, estimates[-1], abar_from, abar_to), step_t).float())
        averaged = estimates if num_renoise_steps <= 1 else estimates[1:]
        z = ddim_up(z, torch.stack(averaged).mean(0), abar_from, abar_to)
        abar_from = abar_to

    abar_t = _abar(alphas_cumprod, timesteps)
    noise = (z - abar_t.sqrt() * x0) / (1.0 - abar_t).sqrt()
    return z, noise
