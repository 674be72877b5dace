"""Where the training noise comes from: each ``--noise_source`` defined once, with its model-card words.

A :class:`NoiseSource` turns the clean latents of a batch into the noisy latents the UNets are
scored on, and the noise that lands there (``add_noise(x0, noise, t) == noisy``). The method itself
(the fp32 DDIM / ReNoise formulas) is in :mod:`smpo.renoise`; this module wires it to the models.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .prior_noise import check_prior_data, prior
from .renoise import epsilon_from_prediction, forward_noise, renoise_inversion


@dataclass(frozen=True)
class NoiseSource:
    """make(args, models, latents, timesteps, cond, generator, num_pairs) -> (noisy, noise), both fp32.

    ``models`` is a :class:`smpo.step.Models`; ``timesteps`` (N,) lie on the CPU; ``latents`` hold the
    winners then the losers (or the winners only); ``cond`` is the UNet conditioning of those rows.
    card(args) -> how the model card describes the noise.
    ``batch_keys``: entries of the training batch that ``make`` also takes, as keyword arguments.
    ``check(args, pairs)``: run on the training pairs before any model loads, to refuse data or flags it cannot use.
    """

    make: Callable
    card: Callable
    help: str = ""
    batch_keys: tuple = ()
    check: Optional[Callable] = None


def select_rows(cond, index, num_rows):
    """The UNet conditioning (a dict of tensors, nested for SDXL) of the batch rows in ``index``."""
    if len(index) == num_rows:  # every sample is still inverting: nothing to select
        return cond
    if isinstance(cond, dict):
        return {k: select_rows(v, index, num_rows) for k, v in cond.items()}
    return cond.index_select(0, index) if torch.is_tensor(cond) and cond.shape[0] == num_rows else cond


def renoise(args, models, latents, timesteps, cond, generator, num_pairs):
    """SmPO: ReNoise inversion of each clean latent to its timestep, by the policy or the reference."""
    unet, schedule = models.unet, models.schedule
    inverter = models.reference if args.inversion_model == "reference" else (
        lambda z, step_t, c: unet(z, step_t, **c).sample)  # no_grad: no DDP sync is set up

    def eps_fn(z, step_t, index):  # only the samples still inverting, with their own conditioning
        pred = inverter(z.to(latents.dtype), step_t, select_rows(cond, index, len(timesteps)))
        return epsilon_from_prediction(pred, z, step_t, schedule.alphas_cumprod, schedule.prediction_type)

    return renoise_inversion(eps_fn, latents, timesteps, schedule.alphas_cumprod, args.num_inversion_steps,
                             args.num_renoise_steps, args.inversion_schedule, schedule.steps_offset)


def forward(args, models, latents, timesteps, cond, generator, num_pairs):
    """Diffusion-DPO: random Gaussian noise (drawn on the host generator), shared by the two images of a pair."""
    noise = torch.randn(latents[:num_pairs].shape, generator=generator, device=generator.device)
    noise = noise.to(latents.device).repeat(len(latents) // num_pairs, 1, 1, 1)
    return forward_noise(latents, noise, timesteps.to(latents.device), models.schedule.alphas_cumprod)


NOISE_SOURCES = {
    "renoise": NoiseSource(
        renoise, help="ReNoise inversion of each image to t (SmPO)",
        card=lambda args: (f"ReNoise inversion (schedule `{args.inversion_schedule}`, {args.num_inversion_steps} "
                           f"inversion steps, {args.num_renoise_steps} renoise iterations, inverted by the "
                           f"{args.inversion_model})")),
    "forward": NoiseSource(forward, help="random forward noise (Diffusion-DPO)",
                           card=lambda args: "random forward noise"),
    "prior": NoiseSource(
        prior, help="each image's own initial noise, recorded by generate_pairs.py (no inversion; method notes 9)",
        card=lambda args: ("the initial noise each image was generated from (prior: sqrt(abar_t) x0 + "
                           "sqrt(1 - abar_t) eps_prior, eps_prior redrawn from noise_seed_0/1 with "
                           "smpo.sampling.initial_noise)"),
        batch_keys=("noise_seeds", "noise_shapes"), check=check_prior_data),
}
