#!/usr/bin/env python
"""A copy of train_smpo_diffusion.py with an objective that is not built in: conservative DPO (cDPO).

    accelerate launch examples/custom_objective.py --loss_type cdpo \\
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
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from smpo import flags, training
from smpo.conditioning import Conditioning
from smpo.noise_sources import NOISE_SOURCES
from smpo.objectives import OBJECTIVES, Objective


class SDConditioning(Conditioning):
    """Captions -> ``encoder_hidden_states`` with SD's single CLIP text encoder (frozen)."""

    pipeline_class = StableDiffusionPipeline

    def __init__(self, args, device, dtype):
        base = args.pretrained_model_name_or_path
        self.tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", revision=args.revision)
        self.text_encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=args.revision,
                                                            variant=args.variant)]
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


LABEL_SMOOTHING = 0.1  # cDPO's epsilon: the chance that a human label is flipped


def cdpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, weight, beta):
    """Conservative DPO (Mitchell 2023): Diffusion-DPO trained as if each label were wrong with chance eps.

        inside = -0.5 * beta * weight * ((m_w - m_l) - (r_w - r_l))
        loss   = -mean((1 - eps) * log sigmoid(inside) + eps * log sigmoid(-inside))
    """
    inside = -0.5 * beta * weight * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))
    loss = -((1 - LABEL_SMOOTHING) * F.logsigmoid(inside) + LABEL_SMOOTHING * F.logsigmoid(-inside)).mean()
    implicit_acc = (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()
    return loss, implicit_acc.detach()


OBJECTIVES = {**OBJECTIVES, "cdpo": Objective(
    cdpo_loss, labels="human", noise_source="forward", help=f"conservative DPO, label smoothing {LABEL_SMOOTHING}",
    card=f"conservative DPO (cDPO, label smoothing {LABEL_SMOOTHING}, binary human labels)")}


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
