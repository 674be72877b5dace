"""The command-line flags both training scripts share, and their checks.

Names and meanings follow the diffusers DPO and text-to-image LoRA examples, whose other flags are
accepted too, so that their command lines run with only the script name changed.
"""

import argparse

from .data import add_bad_pair_flag
from .labels import DEFAULT_GAMMA, DEFAULT_TEMPERATURE
from .noise_sources import NOISE_SOURCES
from .objectives import ALIASES, OBJECTIVES
from .renoise import SCHEDULES


def build_parser(description, resolution, num_inversion_steps, beta_dpo, inversion_schedule, inversion_model,
                 objectives=OBJECTIVES, noise_sources=NOISE_SOURCES, beta_note=""):
    """All flags of both scripts; names and meanings follow the diffusers DPO examples.

    The defaults that differ between scripts (and those of the inversion, which measurements may change)
    are parameters, so each script states them in one place; ``objectives`` and ``noise_sources`` are
    the ``--loss_type`` and ``--noise_source`` choices; ``beta_note`` says where the beta default comes from.
    """
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--pretrained_model_name_or_path", required=True, help="Base pipeline: hub id or local folder.")
    a("--revision", default=None)
    a("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")
    a("--unet_init", default=None,
      help="Start policy and reference from this UNet (a folder with a UNet config, or a pipeline with a "
           "unet/ subfolder), e.g. an SFT-tuned UNet as the authors did for SD 1.5.")
    a("--full_finetune", action="store_true",
      help="Train the whole UNet against a frozen copy. Default: LoRA on the attention projections, with "
           "the reference = the same UNet with its adapters disabled (no second copy).")
    a("--rank", type=int, default=8, help="LoRA rank.")
    a("--enable_xformers_memory_efficient_attention", action="store_true")
    # data
    a("--dataset_name", required=True,
      help="Hub id, save_to_disk folder, folder of parquet files, or folder with metadata.jsonl "
           "(caption, image_0, image_1, label_0).")
    a("--dataset_split_name", default="train")
    a("--caption_column", default="caption")
    a("--cache_dir", default=None)
    a("--max_train_samples", type=int, default=None, help="Train on a seeded random subset of this many pairs.")
    a("--resolution", type=int, default=resolution)
    a("--random_crop", action="store_true", help="Random instead of center crops.")
    a("--no_hflip", action="store_true", help="Do not flip pairs horizontally at random.")
    a("--proportion_empty_prompts", type=float, default=0.0,
      help="Fraction of captions replaced by the empty prompt (the authors used 0.2).")
    a("--dataloader_num_workers", type=int, default=0)
    a("--vae_encode_batch_size", type=int, default=8, help="Images per VAE encode call.")
    a("--cache_latents", action="store_true",
      help="Encode every training image with the VAE once, before training, and store the posterior (mean, std) "
           "next to the dataset cache; each step still samples from it. Crops are centered and flips off.")
    a("--cache_text_embeddings", action="store_true",
      help="Encode each unique caption (and the empty prompt) once before training, then move the text "
           "encoders to the CPU.")
    # method
    a("--loss_type", default="smpo", choices=[*objectives, *ALIASES],
      help="; ".join(f"{name}: {o.help}" for name, o in objectives.items()))
    a("--beta_dpo", type=float, default=beta_dpo,
      help="KL strength beta, in the -0.5 * beta convention of the authors and the diffusers SDXL DPO "
           "script (the diffusers SD DPO script's beta B equals 2 * B here)." + beta_note)
    a("--noise_source", default=None, choices=list(noise_sources),
      help="; ".join(f"{name}: {n.help}" for name, n in noise_sources.items())
      + ". Default: the loss type's (renoise for smpo, forward for every other, as in the diffusers DPO scripts).")
    a("--num_inversion_steps", type=int, default=num_inversion_steps,
      help="K: inversion steps (exact: K steps to t; grid_*: the grid of K levels over [0, 1000), stepped up to "
           "t). The paper's ablation chose 9-10 (docs/inversion.md).")
    a("--inversion_schedule", default=inversion_schedule, choices=list(SCHEDULES),
      help="exact: invert to exactly t (the paper's text); grid_above: the authors' released loop under the "
           "diffusers 0.20 they pin (ends at the grid level above t: what produced the paper's numbers); "
           "grid_below: the same loop under diffusers >= 0.22 (ends below t). See docs/inversion.md.")
    a("--num_renoise_steps", type=int, default=1)
    a("--inversion_model", default=inversion_model, choices=["policy", "reference"],
      help="Which UNet inverts the images: the policy being trained (the paper), or the frozen reference "
           "(cacheable, but it degraded the model in the README's alignment experiment).")
    a("--preference_temperature", type=float, default=DEFAULT_TEMPERATURE)
    a("--smoothing_gamma", type=float, default=DEFAULT_GAMMA)
    a("--drop_human_ties", action="store_true",
      help="Leave out pairs whose human label is a tie (label_0 = 0.5) even when reward scores decide the order "
           "(the authors' data selection). dpo and sft always leave them out.")
    # optimisation
    a("--train_batch_size", type=int, default=4, help="Pairs per device per micro-batch.")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--num_train_epochs", type=int, default=1)
    a("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    a("--learning_rate", type=float, default=1e-5)
    a("--scale_lr", action="store_true", help="Multiply lr by accumulation * batch size * processes.")
    a("--lr_scheduler", default="constant",
      help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"')
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_num_cycles", type=int, default=1)
    a("--lr_power", type=float, default=1.0)
    a("--optimizer", default="adamw", choices=["adamw", "adafactor"],
      help="adafactor: transformers' Adafactor with a fixed lr, as the authors used for full SDXL fine-tuning.")
    a("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (with --optimizer adamw).")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--gradient_checkpointing", action="store_true")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    a("--allow_tf32", action="store_true")
    a("--seed", type=int, default=None)
    add_bad_pair_flag(p)
    a("--max_nonfinite_steps", type=int, default=5,
      help="Stop after this many optimizer steps in a row with a non-finite loss (each such update is skipped).")
    # outputs
    a("--output_dir", default="smpo-model")
    a("--logging_dir", default="logs")
    a("--report_to", default="none", help='"tensorboard", "wandb", "all" or "none" (default).')
    a("--tracker_name", default="smpo-diffusion")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest". Default: start fresh.')
    a("--run_validation", action="store_true")
    a("--validation_steps", type=int, default=200)
    a("--validation_prompts", nargs="+", default=None)
    a("--validation_num_inference_steps", type=int, default=25)
    a("--push_to_hub", action="store_true")
    a("--hub_model_id", default=None)
    a("--hub_token", default=None)
    # accepted so that a diffusers train_diffusion_dpo*.py command line runs unchanged; they change nothing here
    a("--local_rank", type=int, default=-1, help="Ignored: Accelerate / torchrun set the rank (diffusers compatibility).")
    a("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
      help="Ignored: nothing is generated as a prior here (diffusers compatibility).")
    return p


def finish_args(args, objectives=OBJECTIVES):
    """Resolve aliases and the loss type's default noise; reject flag combinations that cannot work."""
    args.loss_type = ALIASES.get(args.loss_type, args.loss_type)
    if args.noise_source is None:
        args.noise_source = objectives[args.loss_type].noise_source
    if args.num_inversion_steps < 1 or args.num_renoise_steps < 0:
        raise SystemExit("--num_inversion_steps must be >= 1 and --num_renoise_steps >= 0")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise SystemExit("--proportion_empty_prompts must be in [0, 1]")
    for name in ("checkpoints_total_limit", "max_train_samples", "max_train_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1")
    if args.max_nonfinite_steps < 1 or args.checkpointing_steps < 1 or args.validation_steps < 1:
        raise SystemExit("--max_nonfinite_steps, --checkpointing_steps and --validation_steps must be at least 1")
    if args.run_validation and not args.validation_prompts:
        args.validation_prompts = DEFAULT_VALIDATION_PROMPTS
    if args.cache_latents and args.random_crop:
        raise SystemExit("--cache_latents stores one center crop per image: drop --random_crop, or the cache")
    if args.cache_latents:
        args.no_hflip = True  # one cached latent per image: no random flips
    if args.optimizer == "adafactor" and args.use_8bit_adam:
        raise SystemExit("--use_8bit_adam goes with --optimizer adamw, not adafactor")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise SystemExit("Do not pass --hub_token together with --report_to wandb (it would be logged); "
                         "use `huggingface-cli login` instead.")
    return args


DEFAULT_VALIDATION_PROMPTS = [
    "portrait photo of a girl, photograph, highly detailed face, depth of field",
    "A photo of beautiful mountain with realistic sunset and blue lake, highly detailed, masterpiece",
]
