"""Where the training noise comes from: each ``--noise_source`` defined once, with its model-card words.

A :class:`NoiseSource` turns the clean latents of a batch into the noisy latents the UNets are
scored on, and the noise that lands there (``process.add_noise(x0, noise, t) == noisy``). The method
itself (the fp32 DDIM / Euler / ReNoise formulas) is in :mod:`smpo.renoise`, what differs between
diffusion and flow models in :mod:`smpo.processes`; this module wires them to the models.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .prior_noise import check_prior_data, prior
from .step import predict


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
    unet = models.unet
    inverter = models.reference if args.inversion_model == "reference" else (
        lambda z, model_t, c: predict(unet, z, model_t, c, models.conditioning))  # no_grad: no DDP sync is set up

    def predict_rows(z, model_t, index):  # only the samples still inverting, with their own conditioning
        return inverter(z.to(latents.dtype), model_t, select_rows(cond, index, len(timesteps)))

    return models.process.invert(predict_rows, latents, timesteps, args)


def forward(args, models, latents, timesteps, cond, generator, num_pairs):
    """Diffusion-DPO: random Gaussian noise (drawn on the host generator), shared by the two images of a pair."""
    noise = torch.randn(latents[:num_pairs].shape, generator=generator, device=generator.device)
    noise = noise.to(latents.device).repeat(len(latents) // num_pairs, *[1] * (latents.dim() - 1))
    return models.process.add_noise(latents, noise, timesteps.to(latents.device)), noise.float()


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
                           "sqrt(1 - abar_t) eps_prior, or (1 - s) x0 + s eps_prior on a flow model, eps_prior "
                           "redrawn from noise_seed_0/1 with smpo.sampling.initial_noise)"),
        batch_keys=("noise_seeds", "noise_shapes"), check=check_prior_data),
}
