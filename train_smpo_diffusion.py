#!/usr/bin/env python
"""SmPO fine-tuning of Stable Diffusion 1.x / 2.x (epsilon or v-prediction), LoRA or full.

    accelerate launch train_smpo_diffusion.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --dataset_name SCORED_PAIRS --output_dir smpo-sd15-lora --mixed_precision fp16 --use_8bit_adam

SmPO = Diffusion-DPO with reward-smoothed per-pair weights (--loss_type smpo) and training noise
from ReNoise inversion (--noise_source renoise, smpo's default). --loss_type dpo (or sigmoid) is
Diffusion-DPO, with forward noise by default. The step is smpo.step.training_step; this file holds
what is specific to SD (one CLIP text encoder whose last hidden state conditions the UNet) and the
composition: which flag defaults, objectives and noise sources the run uses. To try your own
objective or noise, copy this file and add it to OBJECTIVES / NOISE_SOURCES below
(examples/custom_objective.py does).
"""

import torch

from smpo import flags, training
from smpo.conditioning import Conditioning
from smpo.noise_sources import NOISE_SOURCES
from smpo.objectives import OBJECTIVES


class SDConditioning(Conditioning):
    """Captions -> ``encoder_hidden_states`` with SD's single CLIP text encoder (frozen)."""

    # diffusers and transformers are imported where they are used, so that --help and the up-front checks
    # answer in a second instead of after ten seconds of imports.
    @property
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def __init__(self, args, device, dtype):
        from transformers import CLIPTokenizer

        base = args.pretrained_model_name_or_path
        self.tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=args.revision)
        self.text_encoders = self.load_text_encoders(args)
        self.text_encoders[0].requires_grad_(False).to(device, dtype=dtype)
        self.device = device
        self.text_cache = None  # set by --cache_text_embeddings

    @torch.no_grad()
    def encode_prompts(self, captions):
        """The text encoder's last hidden state for each caption."""
        ids = self.tokenizer(captions, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids
        encoder = self.text_encoders[0]
        return encoder(ids.to(encoder.device))[0]

    def __call__(self, batch, num_images_per_caption):
        """UNet kwargs for the batch: each caption once, repeated for the winners then the losers."""
        captions = batch["captions"]
        hidden = self.text_cache(captions) if self.text_cache else self.encode_prompts(captions)
        return {"encoder_hidden_states": hidden.to(self.device).repeat(num_images_per_caption, 1, 1)}

    @staticmethod
    def load_text_encoders(args):
        from transformers import CLIPTextModel

        return [CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                             revision=args.revision, variant=args.variant)]


def parse_args(argv=None):
    parser = flags.build_parser(__doc__, resolution=512, beta_dpo=2000.0, num_inversion_steps=10,
                                inversion_schedule="exact", inversion_model="policy",
                                objectives=OBJECTIVES, noise_sources=NOISE_SOURCES)
    return flags.finish_args(parser.parse_args(argv), OBJECTIVES)


def main(args):
    training.train(args, SDConditioning, objective=OBJECTIVES[args.loss_type],
                   noise_source=NOISE_SOURCES[args.noise_source])


if __name__ == "__main__":
    main(parse_args())
