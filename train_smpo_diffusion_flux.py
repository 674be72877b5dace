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

import torch

from smpo import flags, training
from smpo.conditioning import PIPELINE_FAMILIES, Conditioning
from smpo.noise_sources import NOISE_SOURCES
from smpo.objectives import OBJECTIVES
from smpo.processes import add_flow_flags, check_flow_args

# No flow measurement yet: the SD script's epsilon beta 2000 times E[(1 - s)^2] = 0.2922 under the default density
# (logit-normal(0, 1) on FLUX's unshifted training sigmas; smpo.processes.converted_beta, docs/flow.md), pending the
# flow experiment of issue 18. tests/test_train_flux.py recomputes it.
BETA_DPO = 584


class FluxConditioning(Conditioning):
    """Captions -> transformer kwargs (T5 sequence, pooled CLIP, guidance); latents packed around each call."""

    denoiser = "transformer"
    flow = True
    # diffusers' train_dreambooth_lora_flux.py: the attention projections and the feed-forward projections
    lora_target_modules = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                           "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                           "ff_context.net.0.proj", "ff_context.net.2")

    # diffusers and transformers are imported where they are used (--help and the up-front checks stay fast)
    @property
    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def __init__(self, args, device, dtype):
        from diffusers import FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTokenizer, T5TokenizerFast

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
        """(T5 last hidden states, pooled CLIP output), by FluxPipeline.encode_prompt."""
        prompt_embeds, pooled, _ = self.text_pipeline.encode_prompt(
            captions, device=self.text_encoders[1].device, max_sequence_length=self.max_sequence_length)
        return prompt_embeds, pooled

    def __call__(self, batch, num_images_per_caption):
        """Transformer kwargs for the winners then the losers (each caption encoded once)."""
        captions = batch["captions"]
        prompt_embeds, pooled = self.text_cache(captions) if self.text_cache else self.encode_prompts(captions)
        cond = {"encoder_hidden_states": prompt_embeds.to(self.device).repeat(num_images_per_caption, 1, 1),
                "pooled_projections": pooled.to(self.device).repeat(num_images_per_caption, 1)}
        if self.guidance is not None:  # one value per row, as FluxPipeline; the inversion's rows keep theirs
            cond["guidance"] = torch.full((len(captions) * num_images_per_caption,), self.guidance,
                                          device=self.device, dtype=torch.float32)
        return cond

    def predict(self, model, noisy, model_t, cond):
        """The velocity at ``noisy`` (N, C, h, w) and per-row sigma ``model_t`` (N,): packed into 2x2 tokens with
        their position ids, the transformer told sigma itself (FluxPipeline: timestep / 1000), unpacked."""
        pipeline, (n, c, h, w) = self.pipeline_class, noisy.shape
        packed = pipeline._pack_latents(noisy, n, c, h, w)
        img_ids = pipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        out = model(hidden_states=packed, timestep=model_t.to(noisy.dtype), img_ids=img_ids, txt_ids=txt_ids,
                    return_dict=False, **cond)[0]
        scale = self.vae_scale_factor
        return pipeline._unpack_latents(out, h * scale, w * scale, scale)

    @staticmethod
    def check_model(args):
        """Stop before training unless the model is a FLUX pipeline with T5 and --resolution can be packed."""
        from diffusers import DiffusionPipeline

        base = args.pretrained_model_name_or_path
        index = DiffusionPipeline.load_config(base, revision=args.revision)
        name = index.get("_class_name", "")
        if not name.startswith("Flux"):
            script = next((script for prefix, (_, script) in PIPELINE_FAMILIES.items() if name.startswith(prefix)),
                          "the script of its family")
            raise SystemExit(f"{base} is a {name or 'model without a pipeline class'}, not a FluxPipeline: train it "
                             f"with {script} instead.")
        if not any(index.get("text_encoder_2") or [None]):
            raise SystemExit(f"{base} has no T5 text encoder (text_encoder_2), which FLUX needs: pass a FLUX pipeline "
                             "that includes text_encoder_2 and tokenizer_2, such as black-forest-labs/FLUX.1-dev.")
        packing = 2 * vae_scale_factor(args)
        if args.resolution % packing:
            raise SystemExit(f"--resolution {args.resolution} is not divisible by {packing} (the VAE's downsampling "
                             f"times FLUX's 2x2 packing): use {args.resolution // packing * packing or packing} or "
                             f"{(args.resolution // packing + 1) * packing}.")

    @staticmethod
    def load_process(args):
        """Rectified flow on the scheduler's unshifted sigmas (FLUX shifts dynamically only at inference, so
        diffusers' train_dreambooth_lora_flux.py trains on them), the transformer told sigma (time_scale 1)."""
        from smpo.processes import RectifiedFlow

        return RectifiedFlow.from_pipeline(args, time_scale=1.0)

    @staticmethod
    def load_denoiser(args):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer",
                                                      revision=args.revision, variant=args.variant)

    @staticmethod
    def load_text_encoders(args):
        from transformers import CLIPTextModel, T5EncoderModel

        base, rev = args.pretrained_model_name_or_path, args.revision
        return [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", revision=rev, variant=args.variant),
                T5EncoderModel.from_pretrained(base, subfolder="text_encoder_2", revision=rev, variant=args.variant)]


def vae_scale_factor(args):
    """The VAE's downsampling (8 for FLUX.1), as FluxPipeline computes it."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision)
    return 2 ** (len(config["block_out_channels"]) - 1)


def parse_args(argv=None):
    parser = flags.build_parser(
        __doc__, resolution=512, beta_dpo=float(BETA_DPO), num_inversion_steps=10, inversion_schedule="exact",
        inversion_model="policy", objectives=OBJECTIVES, noise_sources=NOISE_SOURCES,
        beta_note=f" Default {BETA_DPO}: computed, not measured: the SD script's epsilon beta 2000 x E[(1 - s)^2] "
                  "under the default timestep density on FLUX's unshifted sigmas (docs/flow.md), pending the flow "
                  "experiment.")
    add_flow_flags(parser, FluxConditioning.lora_target_modules)
    parser.add_argument("--guidance_scale", type=float, default=1.0,
                        help="The guidance value a guidance-distilled model (FLUX.1-dev) is told, as in diffusers' "
                             "FLUX training scripts (whose README examples use 1). The policy, the reference and the "
                             "ReNoise inversion all use this one value. FLUX.1-schnell has no guidance input: ignored.")
    parser.add_argument("--max_sequence_length", type=int, default=512,
                        help="T5 tokens per caption (FluxPipeline's default, 512; schnell was trained with 256).")
    args = flags.finish_args(parser.parse_args(argv), OBJECTIVES)
    check_flow_args(args, "FLUX")
    return args


def main(args):
    training.train(args, FluxConditioning, objective=OBJECTIVES[args.loss_type],
                   noise_source=NOISE_SOURCES[args.noise_source])


if __name__ == "__main__":
    main(parse_args())
