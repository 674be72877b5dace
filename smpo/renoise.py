"""Where the training noise comes from (method notes, section 4).

Diffusion-DPO noises each clean latent with random Gaussian noise (:func:`forward_noise`).
SmPO instead inverts each clean latent with DDIM inversion refined by ReNoise
(:func:`renoise_inversion`) and derives the noise from the inverted latent, so the model is
trained on (an estimate of) the trajectory it would itself take to generate the image.

Three inversion schedules (method notes, section 4a):

- ``exact``: ends exactly at the training timestep t, as the paper's text describes.
- ``grid_above``: the authors' released loop as it ran under the diffusers 0.20.0 they pin (its
  ``DDIMInverseScheduler`` rolls its grid): it ends at the smallest grid level above t (capped at
  the grid's top) and the latent is then used as if it were at t. This produced the paper's numbers.
- ``grid_below``: the same loop under diffusers >= 0.22: it ends at the largest grid level below t.

Each sample is inverted on its own plan; samples that are done leave the batch, so a sample's
noise never depends on its batch-mates and the cost is the sum of the samples' step counts.
"""

import torch

SCHEDULES = ("exact", "grid_above", "grid_below")


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
    """The epsilon a UNet predicts: its output, or sqrt(abar) * v + sqrt(1 - abar) * z_t for v-prediction.

    A negative timestep (the first call of the ``grid_above`` inversion) converts at alphas_cumprod[0],
    the level diffusers' inverse scheduler starts from.
    """
    if prediction_type == "epsilon":
        return prediction.float()
    if prediction_type != "v_prediction":
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    abar = _abar(alphas_cumprod.to(prediction.device), timesteps.clamp(min=0))
    return abar.sqrt() * prediction.float() + (1.0 - abar).sqrt() * noisy_latents.float()


def ddim_up(z, eps, abar_from, abar_to):
    """One deterministic DDIM step from noise level abar_from up to abar_to with prediction eps."""
    x0_pred = (z - (1.0 - abar_from).sqrt() * eps) / abar_from.sqrt()
    return abar_to.sqrt() * x0_pred + (1.0 - abar_to).sqrt() * eps


def inversion_plan(timesteps, num_train_timesteps, num_inversion_steps, schedule="exact", steps_offset=1):
    """Each sample's inversion steps, computed from its own timestep only.

    Returns ``(unet_t, level_from, level_to, counts)``: three (S, N) integer tensors (S = the largest
    count; entries past a sample's count are padding) and the (N,) step counts. Step j of sample i
    moves the latent from noise level ``level_from[j, i]`` to ``level_to[j, i]`` and tells the UNet
    ``unet_t[j, i]``. Level ``num_train_timesteps`` stands for the clean latent (abar = 1); a negative
    level for diffusers' start level alphas_cumprod[0] (``set_alpha_to_one=False``, as in SD and SDXL).

    - ``exact``: n = min(K, t) steps (one for t = 0) to the levels round((j + 1) * t / n), the UNet
      told the level it steps to; the first step starts from the clean latent. Every t gets K steps
      (fewer only where t has fewer levels to step through): a count proportional to t inverts small t too coarsely
      (docs/inversion.md measures both).
    - ``grid_above`` (diffusers 0.20): grid g_k = k * T // K + steps_offset rolled by one,
      [g_0 - T // K, g_0, ..., g_{K-2}]; a step for each grid value g < t, from level g to
      g + T // K, the UNet told g (so the first call gets a negative timestep).
    - ``grid_below`` (diffusers >= 0.22): grid g_k unrolled; a step for each g < t, from level
      g - T // K to g, the UNet told g. No step at all for t <= g_0: the latent stays clean.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown inversion schedule {schedule!r}; choose one of {SCHEDULES}")
    t = timesteps.detach().to("cpu", torch.long)
    k, n_train = num_inversion_steps, num_train_timesteps
    if schedule == "exact":
        counts = torch.clamp(t, min=1, max=k)  # at most t steps: each moves at least one level
        j = torch.arange(1, k + 1).view(-1, 1)
        level_to = (j * t.view(1, -1) + counts // 2) // counts  # round((j + 1) * t / n), integer arithmetic
        level_from = torch.cat([torch.full_like(t, n_train).view(1, -1), level_to[:-1]])
        return level_to, level_from, level_to, counts
    ratio = n_train // k
    grid = torch.arange(k) * ratio + steps_offset
    if schedule == "grid_above":
        grid = torch.cat([grid[:1] - ratio, grid[:-1]])
        level_from, level_to = grid, grid + ratio
    else:
        level_from, level_to = grid - ratio, grid
    counts = (grid.view(-1, 1) < t.view(1, -1)).sum(0)  # the grid increases: its first `count` values
    expand = lambda levels: levels.view(-1, 1).expand(k, len(t))  # noqa: E731
    return expand(grid), expand(level_from), expand(level_to), counts


def renoise_inversion(eps_fn, latents, timesteps, alphas_cumprod, num_inversion_steps, num_renoise_steps=1,
                      schedule="exact", steps_offset=1):
    """Invert clean latents towards their timestep t with DDIM inversion + ReNoise.

    Each inversion step predicts the noise at the current latent (e0 = eps_fn(z, s)), then refines
    it ``num_renoise_steps`` (R) times by re-predicting at the latent that estimate reaches
    (e_k = eps_fn(ddim_up(z, e_{k-1}), s)) and steps with the mean prediction: of e_0 and e_1 for
    R = 1 (the authors' (e0 + e1) / 2), of the later estimates e_1..e_R for R > 1 (as ReNoise does),
    e_0 alone for R = 0 (plain DDIM inversion). ``schedule`` and ``steps_offset`` set the levels
    (:func:`inversion_plan`). The noise is then derived as if the inverted latent were at t.

    Args:
        eps_fn: ``eps_fn(z, t, index) -> epsilon`` for latents z (n, C, H, W), timesteps t (n,) and
            ``index`` (n,), the positions in the batch of the samples in z (to select their
            conditioning). It is called only on the samples that still have steps to take.
        latents: clean latents x0, (N, C, H, W).
        timesteps: (N,) integer training timesteps, one per sample (pass them on the CPU: the plan
            is made there, without a device sync).
        alphas_cumprod: the training scheduler's cumulative alphas (T,).
    Returns:
        (noisy_latents, noise) in fp32 with ``add_noise(latents, noise, timesteps) == noisy_latents``.
        Runs under ``torch.inference_mode()``; no gradients flow.
    """
    unet_t, level_from, level_to, counts = inversion_plan(
        timesteps, alphas_cumprod.shape[0], num_inversion_steps, schedule, steps_offset)
    with torch.inference_mode():
        x0 = latents.float()
        alphas_cumprod = alphas_cumprod.to(device=x0.device, dtype=torch.float32)
        # level T -> the clean latent (abar 1); negative levels -> alphas_cumprod[0]
        levels = torch.cat([alphas_cumprod, alphas_cumprod.new_ones(1)])
        z = x0.clone()
        for j in range(int(counts.max()) if len(counts) else 0):
            active = torch.nonzero(counts > j).view(-1)
            index = active.to(x0.device, non_blocking=True)
            step_t = unet_t[j, active].to(x0.device, non_blocking=True)
            abar_from = _abar(levels, level_from[j, active].clamp(min=0).to(x0.device, non_blocking=True))
            abar_to = _abar(levels, level_to[j, active].to(x0.device, non_blocking=True))
            z_j = z[index]
            estimates = [eps_fn(z_j, step_t, index).float()]
            for _ in range(num_renoise_steps):
                estimates.append(eps_fn(ddim_up(z_j, estimates[-1], abar_from, abar_to), step_t, index).float())
            averaged = estimates if num_renoise_steps <= 1 else estimates[1:]
            z[index] = ddim_up(z_j, torch.stack(averaged).mean(0), abar_from, abar_to)
        abar_t = _abar(alphas_cumprod, timesteps.to(x0.device).long())
        noise = (z - abar_t.sqrt() * x0) / (1.0 - abar_t).sqrt()
    return z.clone(), noise.clone()  # ordinary tensors again, usable in the training graph


def flow_inversion(v_fn, latents, sigmas, num_inversion_steps, num_renoise_steps=1):
    """Invert clean latents of a rectified-flow model up to each sample's sigma (method notes, section 8).

    The Euler sampler steps down as ``x_lo = x_hi + (s_lo - s_hi) * v(x_hi, s_hi)``; inverting a step
    needs the velocity at the unknown upper point, so each step from s_lo to s_hi predicts it at the
    current latent (v_0 = v_fn(x_lo, s_hi)), refines it ``num_renoise_steps`` (R) times at the latent
    the last estimate reaches (v_k = v_fn(x_lo + (s_hi - s_lo) v_{k-1}, s_hi)) and steps with the mean
    estimate: of v_0 and v_1 for R = 1 (the authors' averaging), of v_1..v_R for R > 1 (as ReNoise does),
    v_0 alone for R = 0 (plain Euler inversion). Each sample climbs from s = 0 (the clean latent) to
    exactly its own sigma on the uniform grid s_j = j * sigma / K, j = 0..K, so its result depends on
    nothing else in the batch. The noise the training step derives from the result is
    ``(x_s - (1 - s) x0) / s``; the velocity target ``(x_s - x0) / s``.

    Args:
        v_fn: ``v_fn(z, sigma, index) -> velocity`` for latents z (n, ...), per-sample sigmas (n,) and
            ``index`` (n,), the positions in the batch of the samples in z (to select their conditioning).
        latents: clean latents x0, (N, ...).
        sigmas: (N,) per-sample noise levels in (0, 1].
        num_inversion_steps: K, the Euler steps from 0 to each sigma.
        num_renoise_steps: R, the refinements of each step's velocity.
    Returns:
        The inverted latents x_sigma in fp32 (ordinary tensors; computed under ``torch.inference_mode()``).
    """
    sigmas = sigmas.detach().float().to(latents.device)
    if len(sigmas) and not bool(((sigmas > 0) & (sigmas <= 1)).all()):
        raise ValueError(f"flow_inversion needs sigmas in (0, 1]; got min {sigmas.min():.4g}, max {sigmas.max():.4g}")
    with torch.inference_mode():
        z = latents.float().clone()
        index = torch.arange(len(z), device=z.device)
        step = (sigmas / num_inversion_steps).view(-1, *[1] * (z.dim() - 1))  # s_hi - s_lo, the same every step
        for j in range(num_inversion_steps if len(z) else 0):
            s_hi = sigmas * (j + 1) / num_inversion_steps
            estimates = [v_fn(z, s_hi, index).float()]
            for _ in range(num_renoise_steps):
                estimates.append(v_fn(z + step * estimates[-1], s_hi, index).float())
            averaged = estimates if num_renoise_steps <= 1 else estimates[1:]
            z = z + step * torch.stack(averaged).mean(0)
    return z.clone()
