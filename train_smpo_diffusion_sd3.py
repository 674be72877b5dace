#!/usr/bin/env python
"""SmPO fine-tuning of Stable Diffusion 3 / 3.5 (medium, large), LoRA on the transformer or full.

    accelerate launch train_smpo_diffusion_sd3.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
      --dataset_name SCORED_PAIRS --output_dir smpo-sd35-lora --resolution 1024 \\
      --mixed_precision bf16 --use_8bit_adam --gradient_checkpointing --cache_text_embeddings

Same flags, outputs and checkpoints as train_smpo_diffusion.py, plus the timestep density of diffusers'
SD3 training scripts (--weighting_scheme, --logit_mean, --logit_std, --mode_scale), --max_sequence_length
and --lora_layers. SD3 is a rectified flow (smpo.processes.RectifiedFlow, docs/flow.md): x_s = (1 - s) x0
+ s eps, the transformer predicts the velocity eps - x0 and is told s * 1000; the preference objectives
compare velocity errors; --noise_source renoise inverts each image with Euler + ReNoise steps from s = 0
to the pair's s (smpo.renoise.flow_inversion). What is specific to SD3 lives here: two CLIP encoders
(penultimate states joined, padded to T5's width, pooled outputs joined) and T5 (zeros when the pipeline
has none, as StableDiffusion3Pipeline does), the VAE's shift and scaling factors (smpo.step.sample_latents).
"""

import torch

from smpo import flags, training
from smpo.conditioning import Conditioning
from smpo.noise_sources import NOISE_SOURCES
from smpo.objectives import OBJECTIVES
from smpo.processes import add_flow_flags, check_flow_args

# No flow measurement yet: the SD script's epsilon beta 2000 times E[(1 - s)^2] = 0.1126 under the default density
# (logit-normal(0, 1) through SD3.5's shift 3; smpo.processes.converted_beta, docs/flow.md), pending the flow
# experiment of issue 18. tests/test_processes.py recomputes it.
BETA_DPO = 225


def has_t5(args):
    """Whether the pipeline has a T5 encoder (model_index.json's text_encoder_3 not null)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    return (index.get("text_encoder_3") or [None])[0] is not None


class SD3Conditioning(Conditioning):
    """Captions -> SD3 transformer kwargs (``encoder_hidden_states``: CLIP + T5 tokens; ``pooled_projections``)."""

    denoiser = "transformer"
    flow = True
    # diffusers' train_dreambooth_lora_sd3.py default targets
    lora_target_modules = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")

    # diffusers and transformers are imported where they are used (--help and the up-front checks stay fast)
    @property
    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def __init__(self, args, device, dtype):
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTokenizer, T5TokenizerFast

        base, rev = args.pretrained_model_name_or_path, args.revision
        self.tokenizers = [CLIPTokenizer.from_pretrained(base, subfolder=sub, revision=rev)
                           for sub in ("tokenizer", "tokenizer_2")]
        if has_t5(args):
            self.tokenizers.append(T5TokenizerFast.from_pretrained(base, subfolder="tokenizer_3", revision=rev))
        self.text_encoders = self.load_text_encoders(args)
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).to(device, dtype=dtype)
        config = SD3Transformer2DModel.load_config(base, subfolder="transformer", revision=rev)
        self.joint_attention_dim = config["joint_attention_dim"]
        self.max_sequence_length, self.device = args.max_sequence_length, device
        self.text_cache = None  # set by --cache_text_embeddings
        # a pipeline saved without T5 loads only with these (and the model card says so)
        self.base_kwargs = {} if len(self.text_encoders) == 3 else {"text_encoder_3": None, "tokenizer_3": None}
        self.load_kwargs = "".join(f", {k}=None" for k in self.base_kwargs)

    @torch.no_grad()
    def encode_prompts(self, captions):
        """(CLIP penultimate states joined and padded to T5's width, then the T5 tokens; pooled outputs joined)."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output[0])
        t5 = self.t5_embeddings(captions)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip.to(t5.dtype), t5], dim=-2), torch.cat(pooled, dim=-1)

    def t5_embeddings(self, captions):
        """T5's last hidden state; zeros of the transformer's joint_attention_dim without T5 (as the SD3 pipeline)."""
        if len(self.text_encoders) < 3:
            return torch.zeros(len(captions), self.max_sequence_length, self.joint_attention_dim,
                               device=self.text_encoders[0].device, dtype=self.text_encoders[0].dtype)
        encoder = self.text_encoders[2]
        ids = self.tokenizers[2](captions, max_length=self.max_sequence_length, padding="max_length", truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0]

    def __call__(self, batch, num_images_per_caption):
        """Transformer kwargs for the winners then the losers (each caption encoded once)."""
        captions = batch["captions"]
        prompt_embeds, pooled = self.text_cache(captions) if self.text_cache else self.encode_prompts(captions)
        return {"encoder_hidden_states": prompt_embeds.to(self.device).repeat(num_images_per_caption, 1, 1),
                "pooled_projections": pooled.to(self.device).repeat(num_images_per_caption, 1)}

    @staticmethod
    def load_process(args):
        """The rectified flow of the pipeline's FlowMatchEulerDiscreteScheduler (its shift), told s * 1000."""
        from smpo.processes import RectifiedFlow

        return RectifiedFlow.from_pipeline(args, time_scale=1000.0)

    @staticmethod
    def load_denoiser(args):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer",
                                                     revision=args.revision, variant=args.variant)

    @staticmethod
    def load_text_encoders(args):
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        base, rev, variant = args.pretrained_model_name_or_path, args.revision, args.variant
        encoders = [CLIPTextModelWithProjection.from_pretrained(base, subfolder=sub, revision=rev, variant=variant)
                    for sub in ("text_encoder", "text_encoder_2")]
        if has_t5(args):
            encoders.append(T5EncoderModel.from_pretrained(base, subfolder="text_encoder_3", revision=rev,
                                                           variant=variant))
        return encoders

    @staticmethod
    def vae_dtype(args, weight_dtype):
        """fp32, as diffusers' SD3 training scripts run it (cache the latents to take it off the GPU's work)."""
        return torch.float32

    def pipeline_from_pretrained(self, args, unet, torch_dtype=None):
        return self.pipeline_class.from_pretrained(args.pretrained_model_name_or_path, transformer=unet,
                                                   revision=args.revision, variant=args.variant,
                                                   torch_dtype=torch_dtype, **self.base_kwargs)


def parse_args(argv=None):
    parser = flags.build_parser(
        __doc__, resolution=1024, beta_dpo=float(BETA_DPO), num_inversion_steps=10, inversion_schedule="exact",
        inversion_model="policy", objectives=OBJECTIVES, noise_sources=NOISE_SOURCES,
        beta_note=f" Default {BETA_DPO}: computed, not measured: the SD script's epsilon beta 2000 x E[(1 - s)^2] "
                  "under the default timestep density with shift 3 (docs/flow.md), pending the flow experiment.")
    add_flow_flags(parser, SD3Conditioning.lora_target_modules)
    parser.add_argument("--max_sequence_length", type=int, default=77,
                        help="T5 tokens per caption (diffusers' SD3 training scripts: 77; the pipeline: 256).")
    args = flags.finish_args(parser.parse_args(argv), OBJECTIVES)
    check_flow_args(args, "SD3")
    return args


def main(args):
    training.train(args, SD3Conditioning, objective=OBJECTIVES[args.loss_type],
                   noise_source=NOISE_SOURCES[args.noise_source])


if __name__ == "__main__":
    main(parse_args())
