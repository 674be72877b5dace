"""The interface between a training script's model family and the shared training code.

A script (SD, SDXL, or your copy) defines one class that follows :class:`Conditioning`; the shared
code never asks which family it runs. Subclassing :class:`Conditioning` is optional (it is a
``typing.Protocol``), but it gives the default ``sample_timesteps``, ``vae_dtype`` and
``pipeline_from_pretrained``.
"""

from typing import Protocol

import torch


class Conditioning(Protocol):
    """Captions (and image sizes, crops) of a batch -> UNet keyword arguments, plus the family's model loading.

    Attributes: ``pipeline_class`` (saves and loads the LoRA, builds validation pipelines; a class attribute,
    or a property that imports it when first used, as the SD and SDXL scripts do),
    ``text_encoders`` (moved to the CPU after ``--cache_text_embeddings``) and ``text_cache`` (set to a
    :class:`smpo.cache.TextCache` then; ``encode_prompts`` is bypassed while it is set).
    """

    pipeline_class: type
    text_encoders: list
    text_cache: object

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
        """The family's VAE (frozen by the caller)."""

    def sample_timesteps(self, num_pairs, num_train_timesteps, generator):
        """One training timestep per pair, drawn on the CPU with ``generator``: uniform over the schedule."""
        return torch.randint(0, num_train_timesteps, (num_pairs,), generator=generator, device=generator.device)

    @staticmethod
    def vae_dtype(args, weight_dtype):
        """The dtype the VAE runs in (the SD 1.x/2.x VAE is fp16-safe)."""
        return weight_dtype

    def pipeline_from_pretrained(self, args, unet, torch_dtype=None):
        """The base pipeline with the trained ``unet`` (validation, full fine-tuning's output)."""
        return self.pipeline_class.from_pretrained(args.pretrained_model_name_or_path, unet=unet,
                                                   revision=args.revision, variant=args.variant,
                                                   torch_dtype=torch_dtype)
