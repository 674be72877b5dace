"""One training step, following the method notes top to bottom.

encode -> one timestep per pair -> noise (ReNoise inversion or forward noise) -> policy and
reference errors -> the objective's loss. What changes between methods comes in as an
:class:`~smpo.objectives.Objective` and a :class:`~smpo.noise_sources.NoiseSource`; what changes
between SD, SDXL and SD3 comes in as the conditioning (:class:`smpo.conditioning.Conditioning`) and
the process (:mod:`smpo.processes`: how a latent is noised, the target, the time the network is told).
"""

from dataclasses import dataclass
from typing import Any, Callable

import torch
from accelerate.utils import extract_model_from_parallel

from .losses import denoising_error


@dataclass
class Models:
    """What a step runs: the policy network (UNet or transformer; the field keeps the name ``unet``),
    ``reference(noisy, model_t, cond)``, the VAE, the conditioning, the process (:mod:`smpo.processes`)."""

    unet: Any
    reference: Callable
    vae: Any
    conditioning: Any
    process: Any


def predict(model, noisy, model_t, cond, conditioning=None):
    """The network's raw output: ``model(noisy, timestep=model_t, **cond)`` (a UNet and an SD3 transformer take it
    so), or the conditioning's own ``predict(model, noisy, model_t, cond)`` where it has one (FLUX packs latents)."""
    family_predict = getattr(conditioning, "predict", None)
    if family_predict is not None:
        return family_predict(model, noisy, model_t, cond)
    return model(noisy, timestep=model_t, **cond).sample


def training_step(args, batch, models, generator, objective, noise_source):
    """The loss of one batch and its metrics.

    ``batch["pixel_values"]`` (or the cached latents) holds the B winners then the B losers;
    ``generator`` (on the CPU) draws the VAE samples, the timesteps and forward noise, in that order.
    """
    pairs = not objective.winners_only
    num_pairs = len(batch["captions"])
    copies = 2 if pairs else 1  # winners and losers, or the winners alone
    # 1. encode: latents of all images, conditioning for each (a pair shares its caption)
    latents = encode_batch(batch, models.vae, copies * num_pairs, args.vae_encode_batch_size, generator)
    cond = models.conditioning(batch, num_images_per_caption=copies)
    # 2. one timestep per pair, shared by winner and loser (drawn on the CPU: no device sync later)
    process = models.process
    t_cpu = process.draw_timesteps(num_pairs, generator, models.conditioning).repeat(copies)
    t = t_cpu.to(latents.device, non_blocking=True)
    # 3. noise: the model's own trajectory (ReNoise inversion), random forward noise, or each image's own (prior)
    extra = {key: batch[key] for key in noise_source.batch_keys}  # e.g. prior: each image's recorded noise seed
    noisy, noise = noise_source.make(args, models, latents, t_cpu, cond, generator, num_pairs, **extra)
    target = process.target(latents, noise, t)
    noisy = noisy.to(latents.dtype)
    model_t = process.model_time(t)
    # 4. denoising errors of the policy (with gradients) and the reference (without)
    model_err = denoising_error(predict(models.unet, noisy, model_t, cond, models.conditioning), target)
    if not pairs:
        loss = objective.loss(model_err)
        return loss, {"loss": loss.detach(), "model_err_w": model_err.detach().mean()}
    with torch.no_grad():
        ref_err = denoising_error(models.reference(noisy, model_t, cond), target)
    # 5. the objective on the per-pair errors
    model_err_w, model_err_l = model_err.chunk(2)
    ref_err_w, ref_err_l = ref_err.chunk(2)
    weight = batch["weight"].to(latents.device)
    loss, implicit_acc = objective.loss(model_err_w, model_err_l, ref_err_w, ref_err_l, weight, args.beta_dpo)
    return loss, pair_metrics(loss, implicit_acc, model_err_w.detach(), model_err_l.detach(), ref_err_w, ref_err_l,
                              weight, noise, args.beta_dpo)


def pair_metrics(loss, implicit_acc, model_err_w, model_err_l, ref_err_w, ref_err_l, weight, noise, beta):
    """The per-step metrics of a pair objective (named as in trl and the diffusers DPO scripts)."""
    margin = -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))
    noise_std_w, noise_std_l = noise.detach().flatten(1).std(dim=1).chunk(2)  # forward noise: ~1
    return {
        "loss": loss.detach(), "implicit_acc": implicit_acc,
        "model_err_w": model_err_w.mean(), "model_err_l": model_err_l.mean(),
        "ref_err_w": ref_err_w.mean(), "ref_err_l": ref_err_l.mean(),
        "model_minus_ref_w": (model_err_w - ref_err_w).mean(),  # m_w - r_w: < 0 is what DPO rewards
        "model_minus_ref_l": (model_err_l - ref_err_l).mean(),  # m_l - r_l: > 0 is what DPO rewards
        "noise_std_w": noise_std_w.mean(), "noise_std_l": noise_std_l.mean(),
        "reward_margin": margin.mean(), "weight": weight.mean(),
    }


def encode_batch(batch, vae, num_images, vae_batch_size, generator):
    """Latents of the first ``num_images`` images: from the cached posterior (--cache_latents) or the VAE."""
    if "latent_mean" in batch:
        return sample_latents(batch["latent_mean"][:num_images], batch["latent_std"][:num_images], vae, generator)
    return encode_images(vae, batch["pixel_values"][:num_images], vae_batch_size, generator)


def encode_images(vae, pixels, batch_size, generator):
    """VAE latents (sampled from the posterior with ``generator``), scaled, in chunks."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        dists = [vae.encode(chunk).latent_dist for chunk in pixels.split(batch_size)]
        return sample_latents(torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]), vae, generator)


def sample_latents(mean, std, vae, generator):
    """(mean + std * noise - shift_factor) * scaling_factor (noise drawn with ``generator``; shift 0 for SD).

    Hand-written instead of ``DiagonalGaussianDistribution.sample``: that draws on the latents' device,
    this draws on the host generator so that the draws (and a resume) do not depend on the accelerator.
    """
    mean, std = mean.to(vae.device, vae.dtype), std.to(vae.device, vae.dtype)
    noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device, mean.dtype)
    latents = mean + std * noise
    shift = getattr(vae.config, "shift_factor", None)  # SD3 / FLUX VAEs; SD's has none (or None)
    if shift:
        latents = latents - shift
    return latents * vae.config.scaling_factor


def make_reference(unet, ref_unet, conditioning=None):
    """reference(noisy, model_t, cond) -> prediction: a frozen copy, or the LoRA network with adapters off
    (called through :func:`predict` with ``conditioning``)."""
    if ref_unet is not None:
        return lambda noisy, t, cond: predict(ref_unet, noisy.to(ref_unet.dtype), t, cond, conditioning)

    def lora_reference(noisy, t, cond):
        adapters = extract_model_from_parallel(unet)  # disable_adapters is not reachable through DDP/FSDP
        adapters.disable_adapters()
        try:
            return predict(unet, noisy, t, cond, conditioning)  # through the wrapper, so sharded (FSDP) weights work
        finally:
            adapters.enable_adapters()

    return lora_reference
