"""The interface between a training script's model family and the shared training code.

A script (SD, SDXL, or your copy) defines one class that follows :class:`Conditioning`; the shared
code never asks which family it runs. Subclassing :class:`Conditioning` is optional (it is a
``typing.Protocol``), but it gives the defaults of a UNet diffusion family (``denoiser``,
``lora_target_modules``, ``load_process``, ``load_denoiser``, ``load_vae``, ``sample_timesteps``, ``vae_dtype``,
``pipeline_from_pretrained``); a flow family (SD3, FLUX) overrides the first four.
"""

from typing import ClassVar, Protocol

import torch

# model_index.json's _class_name prefix -> (a rectified flow?, the script that trains it); the first match counts
PIPELINE_FAMILIES = {"StableDiffusion3": (True, "train_smpo_diffusion_sd3.py"),
                     "Flux": (True, "train_smpo_diffusion_flux.py"),
                     "StableDiffusionXL": (False, "train_smpo_diffusion_sdxl.py"),
                     "StableDiffusion": (False, "train_smpo_diffusion.py")}


class Conditioning(Protocol):
    """Captions (and image sizes, crops) of a batch -> UNet keyword arguments, plus the family's model loading.

    Attributes: ``pipeline_class`` (saves and loads the LoRA, builds validation pipelines; a class attribute,
    or a property that imports it when first used, as the SD and SDXL scripts do),
    ``text_encoders`` (moved to the CPU after ``--cache_text_embeddings``) and ``text_cache`` (set to a
    :class:`smpo.cache.TextCache` then; ``encode_prompts`` is bypassed while it is set). Optional:
    ``predict(model, noisy, model_t, cond)`` -> the network's raw output, for a family whose network is not called
    as ``model(noisy, timestep=model_t, **cond).sample`` (FLUX packs the latents into tokens around the call).
    Optional: a static ``check_model(args)`` that stops the run (SystemExit, one sentence naming the fix) before
    anything loads when the model cannot be trained by this family (FLUX: no T5, a resolution it cannot pack).
    """

    pipeline_class: type
    text_encoders: list
    text_cache: object
    denoiser: ClassVar[str] = "unet"  # the trained component: its subfolder, LoRA prefix, save_lora_weights keyword
    lora_target_modules: ClassVar[tuple] = ("to_k", "to_q", "to_v", "to_out.0")
    flow: ClassVar[bool] = False  # a rectified-flow family (its load_process returns a RectifiedFlow)

    def __init__(self, args, device, dtype):
        """Load the tokenizers and frozen text encoders onto ``device`` in ``dtype``."""

    def encode_prompts(self, captions):
        """A tensor (or a tuple of tensors) of text embeddings, one row per caption."""

    def __call__(self, batch, num_images_per_caption):
        """UNet kwargs for the winners then the losers (``num_images_per_caption`` 2) or the winners (1)."""

    @staticmethod
    def load_text_encoders(args):
        """The family's text encoders, in the order ``encode_prompts`` uses them (frozen by ``__init__``)."""

    @staticmethod
    def load_vae(args):
        """The family's VAE (frozen by the caller): the pipeline's ``vae/``."""
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                             revision=args.revision, variant=args.variant)

    @staticmethod
    def load_process(args):
        """The noising process (:mod:`smpo.processes`): the pipeline scheduler's DDPM schedule."""
        from .setup import load_noise_schedule

        return load_noise_schedule(args)

    @staticmethod
    def load_denoiser(args):
        """The policy network before LoRA: the pipeline's UNet, or --unet_init's."""
        from .setup import load_unet

        return load_unet(args)

    def sample_timesteps(self, num_pairs, num_train_timesteps, generator):
        """One training timestep per pair, drawn on the CPU with ``generator``: uniform over the schedule."""
        return torch.randint(0, num_train_timesteps, (num_pairs,), generator=generator, device=generator.device)

    @staticmethod
    def vae_dtype(args, weight_dtype):
        """The dtype the VAE runs in (the SD 1.x/2.x VAE is fp16-safe)."""
        return weight_dtype

    def pipeline_from_pretrained(self, args, unet, torch_dtype=None):
        """The base pipeline with the trained network ``unet`` in place of its ``denoiser`` (validation, full
        fine-tuning's output)."""
        return self.pipeline_class.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                   variant=args.variant, torch_dtype=torch_dtype,
                                                   **{self.denoiser: unet})


def pipeline_family(name_or_path, revision=None, cache_dir=None):
    """(model_index.json's _class_name, a rectified flow?, the script that trains it) of a pipeline, or None when
    it has no model_index.json or names a class this list does not know."""
    from diffusers import DiffusionPipeline

    try:
        found = DiffusionPipeline.load_config(name_or_path, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError):
        return None  # no model_index.json (e.g. a bare folder): the loaders name what is missing
    name = found.get("_class_name", "")
    family = family_of(name)
    return None if family is None else (name, *family)


def family_of(class_name):
    """(a rectified flow?, the script that trains it) of a pipeline class name, or None if unknown."""
    prefix = next((p for p in PIPELINE_FAMILIES if class_name.startswith(p)), None)
    return None if prefix is None else PIPELINE_FAMILIES[prefix]


def check_pipeline_family(args, conditioning_class, script):
    """Stop before training when model_index.json names a pipeline of the other kind (flow vs diffusion).

    Unknown pipeline classes pass: a copied script may train a family this list does not know.
    """
    family = pipeline_family(args.pretrained_model_name_or_path, args.revision)
    if family is None:
        return
    name, flow, right_script = family
    if flow != conditioning_class.flow:
        kind = lambda is_flow: "a rectified-flow" if is_flow else "a DDPM (epsilon / v)"  # noqa: E731
        raise SystemExit(f"{args.pretrained_model_name_or_path} is a {name}, {kind(flow)} model, and {script} trains "
                         f"{kind(conditioning_class.flow)[2:]} models: use {right_script} instead.")
