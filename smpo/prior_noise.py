"""``--noise_source prior``: train each image on the line between it and the noise it was generated from.

Pairs written by generate_pairs.py record each image's initial noise (method notes, section 9):
``noise_seed_0`` / ``noise_seed_1`` and ``noise_shape``, redrawn exactly by
:func:`smpo.sampling.initial_noise`. The training latent of an image is the pair's t point

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_prior,    eps = eps_prior,
    (a flow model: x_s = (1 - s) x0 + s eps_prior, the process's own noising)

the winner's and the loser's each from their own noise. This is exact at both ends of the DDIM
trajectory and an approximation in between (the path is curved); and x0 is the VAE encoding of the
saved image, not exactly the latent the sampler ended at (decode, 8-bit PNG, encode and the
posterior sample all move it a little).

The noise matches the training image only if the image is trained as generated: at the
generation's resolution, center crop (the identity on a square image of that size), no flips.
:func:`check_prior_data` refuses every other combination before any model loads.
"""

import logging

import torch

from .conditioning import pipeline_family
from .data import NOISE_SEED_COLUMNS
from .loading import PreferenceDataError
from .sampling import initial_noise

PRIOR_COLUMNS = (*NOISE_SEED_COLUMNS, "noise_shape", "height", "width")
PRIOR_ON_DDPM = ("--noise_source prior on a DDPM (epsilon / v) model: on our SD toy it trained the model against the "
                 "labels, with DPO's loss and SmPO's (docs/prior_noise.md); forward or renoise are the measured choices.")
logger = logging.getLogger("smpo")


def check_prior_data(args, pairs):
    """Refuse data without recorded noise and flags that move the image off its noise; turn flips off; warn on a
    DDPM model, where prior noise trained against the labels (docs/prior_noise.md).

    ``pairs``: a :class:`smpo.inputs.TrainingPairs`. Raises SystemExit (flags) or PreferenceDataError (data).
    """
    if args.random_crop:
        raise SystemExit("--noise_source prior trains each image as it was generated, from its own initial noise: "
                         "a random crop moves the image off that noise. Drop --random_crop.")
    args.no_hflip = True  # a flipped image was not generated from its (unflipped) noise
    found = pairs.dataset.column_names
    missing = [c for c in PRIOR_COLUMNS if c not in found]
    if missing:
        raise PreferenceDataError(
            f"--noise_source prior needs each image's recorded initial noise, columns {missing} are missing "
            f"(the dataset has {sorted(found)}). generate_pairs.py writes such pairs (noise_seed_0, noise_seed_1, "
            "noise_shape, height, width) from the model's own samples; for other data use --noise_source "
            "forward or renoise.")
    sizes = pairs.dataset.select_columns(["height", "width"]).select(pairs.rows)
    wrong = [(row, h, w) for row, h, w in zip(pairs.rows, sizes["height"], sizes["width"])
             if (h, w) != (args.resolution, args.resolution)]
    if wrong:
        row, h, w = wrong[0]
        raise SystemExit(f"--noise_source prior: {len(wrong)} pairs were generated at another size than "
                         f"--resolution {args.resolution} (row {row}: {h}x{w}); resizing moves the image off its "
                         f"initial noise. Train at the generation's resolution (--resolution {h}).")
    family = pipeline_family(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    if family is not None and not family[1]:  # a DDPM (SD, SDXL), not a rectified flow
        logger.warning(PRIOR_ON_DDPM)


def prior_noise(noise_seeds, noise_shapes, latent_shape):
    """The recorded initial noise of each image, (N, C, h, w) fp32 on the CPU; its shape must be the latents'."""
    shapes = {tuple(s) for s in torch.as_tensor(noise_shapes).tolist()}
    if shapes != {tuple(latent_shape)}:
        raise ValueError(f"--noise_source prior: the recorded noise shapes {sorted(shapes)} are not the training "
                         f"latents' shape {tuple(latent_shape)}: the images were generated with another VAE or "
                         "latent size than this model's.")
    return torch.stack([initial_noise(seed, latent_shape) for seed in torch.as_tensor(noise_seeds).tolist()])


def prior(args, models, latents, timesteps, cond, generator, num_pairs, noise_seeds, noise_shapes):
    """The winners then the losers, each noised to t with its own generation noise (no random draw)."""
    n = len(latents)  # the winners and the losers, or the winners alone
    noise = prior_noise(noise_seeds[:n], noise_shapes[:n], latents.shape[1:]).to(latents.device)
    return models.process.add_noise(latents, noise, timesteps.to(latents.device)), noise.float()
