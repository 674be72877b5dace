#!/usr/bin/env python
"""SmPO fine-tuning of FLUX.1 (dev or schnell), LoRA on the transformer or full.

    accelerate launch train_smpo_diffusion_flux.py \\
      --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \\
      --dataset_name SCORED_PAIRS --output_dir smpo-flux-lora --resolution 512 \\
      --mixed_precision bf16 --use_8bit_adam --gradient_checkpointing --cache_text_embeddings

Same flags, outputs and checkpoints as the other scripts; the step is smpo.step.training_step on a
straight (rectified-flow) path. What is specific to FLUX lives here: a CLIP text encoder (pooled
output) and a T5 encoder (sequence), as FluxPipeline.encode_prompt; latents packed into 2x2 tokens
with position ids by the pipeline's own helpers; the timestep told to the transformer is sigma
itself, in [0, 1]; FLUX.1-dev's guidance value (--guidance_scale), the same for the policy, the
reference and the inversion. Training draws unshifted sigmas, as diffusers' FLUX DreamBooth script
(FLUX's scheduler shifts them dynamically only at inference).
"""

import json
import os

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from smpo.conditioning import Conditioning

# diffusers' train_dreambooth_lora_flux.py: the attention projections and the feed-forward projections
LORA_TARGET_MODULES = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2"]


class FluxConditioning(Conditioning):
    """Captions -> transformer kwargs (T5 sequence, pooled CLIP, text ids, guidance); packing around each call."""

    pipeline_class = FluxPipeline

    def __init__(self, args, device, dtype):
        base, rev = args.pretrained_model_name_or_path, args.revision
        self.text_encoders = self.load_text_encoders(args)
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).to(device, dtype=dtype)
        # the pipeline's own encode_prompt, on a pipeline holding only the text parts
        self.text_pipeline = FluxPipeline(
            scheduler=None, vae=None, transformer=None, text_encoder=self.text_encoders[0],
            text_encoder_2=self.text_encoders[1],
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=rev),
            tokenizer_2=T5TokenizerFast.from_pretrained(base, subfolder="tokenizer_2", revision=rev))
        transformer_config = FluxTransformer2DModel.load_config(base, subfolder="transformer", revision=rev)
        self.guidance = args.guidance_scale if transformer_config.get("guidance_embeds") else None  # dev, not schnell
        self.vae_scale_factor = vae_scale_factor(args)
        self.max_sequence_length, self.device = args.max_sequence_length, device
        self.text_cache = None  # set by --cache_text_embeddings

    @torch.no_grad()
    def encode_prompts(self, captions):
        """(T5 last hidden states, pooled CLIP output), as FluxPipeline.encode_prompt."""
        prompt_embeds, pooled, _ = self.text_pipeline.encode_prompt(
            captions, device=self.text_encoders[1].device, max_sequence_length=self.max_sequence_length)
        return prompt_embeds, pooled

    def __call__(self, batch, num_images_per_caption):
        """Transformer kwargs for the winners then the losers (each caption encoded once)."""
        captions = batch["captions"]
        prompt_embeds, pooled = self.text_cache(captions) if self.text_cache else self.encode_prompts(captions)
        cond = {"encoder_hidden_states": prompt_embeds.to(self.device).repeat(num_images_per_caption, 1, 1),
                "pooled_projections": pooled.to(self.device).repeat(num_images_per_caption, 1)}
        if self.guidance is not None:  # one value per row, so that a row subset keeps its own
            cond["guidance"] = torch.full((len(captions) * num_images_per_caption,), self.guidance,
                                          device=self.device, dtype=torch.float32)
        return cond

    def predict(self, transformer, noisy, sigma, cond):
        """The velocity at ``noisy`` (N, C, h, w) and per-row ``sigma`` (N,): packed into 2x2 tokens, the
        transformer told sigma itself (FluxPipeline passes timestep / 1000), unpacked again."""
        n, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        out = transformer(hidden_states=packed, timestep=sigma.to(noisy.dtype), img_ids=img_ids, txt_ids=txt_ids,
                          return_dict=False, **cond)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)

    @staticmethod
    def load_text_encoders(args):
        base, rev = args.pretrained_model_name_or_path, args.revision
        return [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=rev, variant=args.variant),
                T5EncoderModel.from_pretrained(base, subfolder="text_encoder_2", revision=rev, variant=args.variant)]

    @staticmethod
    def load_vae(args):
        return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                             revision=args.revision, variant=args.variant)

    def pipeline_from_pretrained(self, args, transformer, torch_dtype=None):
        return self.pipeline_class.from_pretrained(args.pretrained_model_name_or_path, transformer=transformer,
                                                   revision=args.revision, variant=args.variant,
                                                   torch_dtype=torch_dtype)


def vae_scale_factor(args):
    """The VAE's downsampling (8 for FLUX.1), as FluxPipeline computes it."""
    config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision)
    return 2 ** (len(config["block_out_channels"]) - 1)


def check_flux_model(args):
    """Stop before training when the model is not a FLUX pipeline with T5, or the resolution cannot be packed."""
    base = args.pretrained_model_name_or_path
    index = FluxPipeline.load_config(base, revision=args.revision)
    if index.get("_class_name") != "FluxPipeline":
        raise SystemExit(f"{base} is a {index.get('_class_name')}, not a FluxPipeline: train it with its own script "
                         "(train_smpo_diffusion.py for SD 1.x/2.x, train_smpo_diffusion_sdxl.py for SDXL, "
                         "train_smpo_diffusion_sd3.py for SD3).")
    if not any(index.get("text_encoder_2") or [None]):
        raise SystemExit(f"{base} has no T5 text encoder (text_encoder_2): FLUX needs one, so pass a FLUX "
                         "pipeline folder or hub id that includes text_encoder_2 and tokenizer_2.")
    packing = 2 * vae_scale_factor(args)
    if args.resolution % packing:
        raise SystemExit(f"--resolution {args.resolution} is not divisible by {packing} (the VAE's downsampling "
                         f"times FLUX's 2x2 packing): use {args.resolution // packing * packing or packing} or "
                         f"{(args.resolution // packing + 1) * packing}.")
