#!/usr/bin/env python
"""SmPO fine-tuning of Stable Diffusion XL, LoRA or full.

    accelerate launch train_smpo_diffusion_sdxl.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
      --dataset_name SCORED_PAIRS --output_dir smpo-sdxl-lora \\
      --mixed_precision fp16 --use_8bit_adam --gradient_checkpointing

Same flags, outputs and checkpoints as train_smpo_diffusion.py, plus --pretrained_vae_model_name_or_path
and --is_turbo; the step is smpo.step.training_step. What is specific to SDXL lives here: two text
encoders (penultimate hidden states concatenated, pooled output of the second), micro-conditioning
time ids computed per image from its own original size and crop (used for training and inside the
ReNoise inversion alike), SDXL-Turbo's four timesteps, and the VAE in fp32 unless an fp16-safe VAE
is given.
"""

import torch

from smpo import flags, training
from smpo.conditioning import Conditioning
from smpo.noise_sources import NOISE_SOURCES
from smpo.objectives import OBJECTIVES


class SDXLConditioning(Conditioning):
    """Captions, original sizes and crops -> SDXL UNet kwargs (text embeddings and time ids)."""

    # diffusers and transformers are imported where they are used, so that --help and the up-front checks
    # answer in a second instead of after ten seconds of imports.
    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def __init__(self, args, device, dtype):
        from transformers import CLIPTokenizer

        base, rev = args.pretrained_model_name_or_path, args.revision
        self.tokenizers = [CLIPTokenizer.from_pretrained(base, subfolder=sub, revision=rev)
                           for sub in ("tokenizer", "tokenizer_2")]
        self.text_encoders = self.load_text_encoders(args)
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).to(device, dtype=dtype)
        self.resolution, self.device, self.is_turbo = args.resolution, device, args.is_turbo
        self.text_cache = None  # set by --cache_text_embeddings

    @torch.no_grad()
    def encode_prompts(self, captions):
        """(penultimate hidden states of both encoders concatenated, pooled output of the second)."""
        hidden_states = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
        return torch.cat(hidden_states, dim=-1), output[0]

    def time_ids(self, original_sizes, crop_top_lefts):
        """(N, 6): each image's own original (height, width), crop (top, left) and target size."""
        target = torch.tensor([self.resolution, self.resolution]).expand(len(original_sizes), 2)
        return torch.cat([original_sizes, crop_top_lefts, target], dim=1).to(self.device)

    def __call__(self, batch, num_images_per_caption):
        """UNet kwargs for the winners then the losers (each caption encoded once)."""
        captions = batch["captions"]
        prompt_embeds, pooled = self.text_cache(captions) if self.text_cache else self.encode_prompts(captions)
        n = len(batch["captions"]) * num_images_per_caption
        time_ids = self.time_ids(batch["original_sizes"][:n], batch["crop_top_lefts"][:n])
        return {
            "encoder_hidden_states": prompt_embeds.repeat(num_images_per_caption, 1, 1),
            "added_cond_kwargs": {"text_embeds": pooled.repeat(num_images_per_caption, 1),
                                  "time_ids": time_ids.to(prompt_embeds.dtype)},
        }

    def sample_timesteps(self, num_pairs, num_train_timesteps, generator):
        """Uniform over the schedule; SDXL-Turbo: its four timesteps 249, 499, 749, 999 (as the diffusers DPO script)."""
        t = torch.randint(0, num_train_timesteps, (num_pairs,), generator=generator, device=generator.device)
        return 250 * (t % 4) + 249 if self.is_turbo else t

    @staticmethod
    def load_text_encoders(args):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        base, rev = args.pretrained_model_name_or_path, args.revision
        return [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=rev, variant=args.variant),
                CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", revision=rev,
                                                            variant=args.variant)]

    @staticmethod
    def load_vae(args):
        from diffusers import AutoencoderKL

        if args.pretrained_vae_model_name_or_path:
            return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
        return AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae",
                                             revision=args.revision, variant=args.variant)

    @staticmethod
    def vae_dtype(args, weight_dtype):
        """SDXL's original VAE overflows in fp16: fp32 unless an fp16-safe VAE was given."""
        return weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32

    def pipeline_from_pretrained(self, args, unet, torch_dtype=None):
        extra = {"vae": self.load_vae(args)} if args.pretrained_vae_model_name_or_path else {}
        return self.pipeline_class.from_pretrained(args.pretrained_model_name_or_path, unet=unet,
                                                   revision=args.revision, variant=args.variant,
                                                   torch_dtype=torch_dtype, **extra)


def parse_args(argv=None):
    parser = flags.build_parser(__doc__, resolution=1024, beta_dpo=5000.0, num_inversion_steps=10,
                                inversion_schedule="exact", inversion_model="policy",
                                objectives=OBJECTIVES, noise_sources=NOISE_SOURCES)
    parser.add_argument("--pretrained_vae_model_name_or_path", default=None,
                        help="An fp16-safe VAE such as madebyollin/sdxl-vae-fp16-fix (then it runs in the "
                             "mixed-precision dtype; otherwise the VAE runs in fp32).")
    parser.add_argument("--is_turbo", action="store_true",
                        help="SDXL-Turbo: train on its 4 timesteps (249, 499, 749, 999), as the diffusers DPO script.")
    return flags.finish_args(parser.parse_args(argv), OBJECTIVES)


def main(args):
    training.train(args, SDXLConditioning, objective=OBJECTIVES[args.loss_type],
                   noise_source=NOISE_SOURCES[args.noise_source])


if __name__ == "__main__":
    main(parse_args())
