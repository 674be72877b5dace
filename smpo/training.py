"""What both training scripts share: flags, model setup, the SmPO step, checkpoints, outputs.

The scripts differ only in how a batch of captions (and, for SDXL, image sizes and crops)
becomes UNet conditioning; they pass that in as a ``Conditioning`` object with
``pipeline_class``, ``__call__(batch, num_images_per_caption) -> unet kwargs`` and the model
loading they need. The algorithm itself is :func:`smpo_loss` (one screen, top to bottom).
"""

import argparse
import copy
import json
import logging
import math
import os
import sys

import torch

from .checkpoints import (StepGenerator, StopSignal, checkpoint_step, find_checkpoint, lora_state_dict,
                          register_checkpoint_hooks, remove_partial_checkpoints, save_checkpoint, unwrap)
from .data import (IMAGE_COLUMNS, PairDataset, PairTransform, PreferenceCollator, check_columns, describe_drops,
                   load_preference_dataset, select_pairs)
from .labels import DEFAULT_GAMMA, DEFAULT_TEMPERATURE
from .losses import denoising_error, denoising_target, preference_loss, sft_loss
from .renoise import SCHEDULES, epsilon_from_prediction, forward_noise, renoise_inversion

logger = logging.getLogger("smpo")
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
# Accepted so that a diffusers train_diffusion_dpo*.py command line works unchanged.
LOSS_TYPE_ALIASES = {"sigmoid": "dpo"}


# ------------------------------------------------------------------------------------ flags
def build_parser(description, resolution, num_inversion_steps, beta_dpo, inversion_schedule="exact"):
    """All flags of both scripts; names and meanings follow the diffusers DPO examples."""
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
    a("--loss_type", default="smpo", choices=["smpo", "dpo", "sft", *LOSS_TYPE_ALIASES],
      help="smpo: reward-smoothed weights; dpo: human binary labels (Diffusion-DPO; 'sigmoid' is an alias); "
           "sft: denoising loss on the winners.")
    a("--beta_dpo", type=float, default=beta_dpo,
      help="KL strength beta, in the -0.5 * beta convention of the authors and the diffusers SDXL DPO "
           "script (the diffusers SD DPO script's beta B equals 2 * B here).")
    a("--noise_source", default="renoise", choices=["renoise", "forward"],
      help="renoise: ReNoise inversion of each image to t (SmPO); forward: random forward noise (Diffusion-DPO).")
    a("--num_inversion_steps", type=int, default=num_inversion_steps,
      help="K: inversion steps (exact: K steps to t; grid_*: the grid of K levels over [0, 1000), stepped up to "
           "t). The paper's ablation chose 9-10 (docs/inversion.md).")
    a("--inversion_schedule", default=inversion_schedule, choices=list(SCHEDULES),
      help="exact: invert to exactly t (the paper's text); grid_above: the authors' released loop under the "
           "diffusers 0.20 they pin (ends at the grid level above t: what produced the paper's numbers); "
           "grid_below: the same loop under diffusers >= 0.22 (ends below t). See docs/inversion.md.")
    a("--num_renoise_steps", type=int, default=1)
    a("--inversion_model", default="policy", choices=["policy", "reference"],
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
    a("--max_bad_pair_fraction", type=float, default=0.01,
      help="Stop when more than this fraction of the training pairs had an unreadable image (each is dropped "
           "whole and logged with its row).")
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
    return p


def finish_args(args):
    """Resolve aliases and reject flag combinations that cannot work."""
    args.loss_type = LOSS_TYPE_ALIASES.get(args.loss_type, args.loss_type)
    if args.num_inversion_steps < 1 or args.num_renoise_steps < 0:
        raise SystemExit("--num_inversion_steps must be >= 1 and --num_renoise_steps >= 0")
    for name in ("proportion_empty_prompts", "max_bad_pair_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise SystemExit(f"--{name} must be in [0, 1]")
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


# ------------------------------------------------------------------------------- the step
def smpo_loss(args, batch, unet, reference, vae, conditioning, alphas_cumprod, prediction_type, generator,
              steps_offset=1):
    """One SmPO (or DPO / SFT) loss on a batch, following the method notes step by step.

    ``batch["pixel_values"]`` holds the B winners then the B losers; ``reference(noisy, t, cond)``
    is the frozen reference UNet's prediction; ``steps_offset`` is the model scheduler's (it places the
    grid_* inversion levels). Returns (loss, metrics).
    """
    sft = args.loss_type == "sft"
    pixels = batch.get("pixel_values")
    num_pairs = len(batch["captions"])
    keep = num_pairs if sft else 2 * num_pairs  # supervised fine-tuning sees the winners only
    # 1. encode: latents of all images, conditioning for each (a pair shares its caption)
    if "latent_mean" in batch:  # --cache_latents: sample the cached posterior
        latents = sample_latents(batch["latent_mean"][:keep], batch["latent_std"][:keep], vae, generator)
    else:
        latents = encode_images(vae, pixels[:keep], args.vae_encode_batch_size, generator)
    cond = conditioning(batch, num_images_per_caption=1 if sft else 2)
    # 2. one timestep per pair, shared by winner and loser (drawn on the CPU: no device sync later)
    t_cpu = torch.randint(0, len(alphas_cumprod), (num_pairs,), generator=generator, device=generator.device)
    if getattr(args, "is_turbo", False):  # SDXL-Turbo's four timesteps
        t_cpu = 250 * (t_cpu % 4) + 249
    t_cpu = t_cpu.repeat(1 if sft else 2)
    t = t_cpu.to(latents.device, non_blocking=True)
    # 3. noise: the model's own trajectory (ReNoise inversion) or random forward noise
    if args.noise_source == "renoise":
        inverter = reference if args.inversion_model == "reference" else (
            lambda z, step_t, c: unet(z, step_t, **c).sample)  # no_grad: no DDP sync is set up

        def eps_fn(z, step_t, index):  # only the samples still inverting, with their own conditioning
            pred = inverter(z.to(latents.dtype), step_t, select_rows(cond, index, len(t_cpu)))
            return epsilon_from_prediction(pred, z, step_t, alphas_cumprod, prediction_type)

        noisy, noise = renoise_inversion(eps_fn, latents, t_cpu, alphas_cumprod, args.num_inversion_steps,
                                         args.num_renoise_steps, args.inversion_schedule, steps_offset)
    else:
        noise = torch.randn(latents[:num_pairs].shape, generator=generator, device=generator.device)
        noise = noise.to(latents.device).repeat(1 if sft else 2, 1, 1, 1)  # a pair shares its noise
        noisy, noise = forward_noise(latents, noise, t, alphas_cumprod)
    target = denoising_target(noise, latents, t, alphas_cumprod, prediction_type)
    noisy = noisy.to(latents.dtype)
    # 4. denoising errors of the policy (with gradients) and the reference (without)
    model_err = denoising_error(unet(noisy, t, **cond).sample, target)
    if sft:
        return sft_loss(model_err), {"loss": sft_loss(model_err).detach(), "model_err_w": model_err.mean()}
    with torch.no_grad():
        ref_err = denoising_error(reference(noisy, t, cond), target)
    # 5. the smoothed preference loss
    model_err_w, model_err_l = model_err.chunk(2)
    ref_err_w, ref_err_l = ref_err.chunk(2)
    weight = batch["weight"].to(latents.device)
    loss, implicit_acc = preference_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, weight, args.beta_dpo)
    margin = -0.5 * args.beta_dpo * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))
    noise_std_w, noise_std_l = noise.detach().flatten(1).std(dim=1).chunk(2)  # forward noise: ~1
    return loss, {
        "loss": loss.detach(), "implicit_acc": implicit_acc,
        "model_err_w": model_err_w.detach().mean(), "model_err_l": model_err_l.detach().mean(),
        "ref_err_w": ref_err_w.mean(), "ref_err_l": ref_err_l.mean(),
        "model_minus_ref_w": (model_err_w.detach() - ref_err_w).mean(),  # m_w - r_w: < 0 is what DPO rewards
        "model_minus_ref_l": (model_err_l.detach() - ref_err_l).mean(),  # m_l - r_l: > 0 is what DPO rewards
        "noise_std_w": noise_std_w.mean(), "noise_std_l": noise_std_l.mean(),
        "reward_margin": margin.detach().mean(), "weight": weight.mean(),
    }


def select_rows(cond, index, num_rows):
    """The UNet conditioning (a dict of tensors, nested for SDXL) of the batch rows in ``index``."""
    if len(index) == num_rows:  # every sample is still inverting: nothing to select
        return cond
    if isinstance(cond, dict):
        return {k: select_rows(v, index, num_rows) for k, v in cond.items()}
    return cond.index_select(0, index) if torch.is_tensor(cond) and cond.shape[0] == num_rows else cond


def encode_images(vae, pixels, batch_size, generator):
    """VAE latents (sampled from the posterior with ``generator``), scaled, in chunks."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        dists = [vae.encode(chunk).latent_dist for chunk in pixels.split(batch_size)]
        return sample_latents(torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists]), vae, generator)


def sample_latents(mean, std, vae, generator):
    """mean + std * noise, scaled by the VAE's scaling factor (noise drawn with ``generator``)."""
    mean, std = mean.to(vae.device, vae.dtype), std.to(vae.device, vae.dtype)
    noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device, mean.dtype)
    return (mean + std * noise) * vae.config.scaling_factor


def make_reference(unet, ref_unet):
    """reference(noisy, t, cond) -> prediction: a frozen copy, or the LoRA UNet with adapters off."""
    if ref_unet is not None:
        return lambda noisy, t, cond: ref_unet(noisy.to(ref_unet.dtype), t, **cond).sample

    def lora_reference(noisy, t, cond):
        adapters = unwrap(unet)  # disable_adapters is not reachable through a DDP/FSDP wrapper
        adapters.disable_adapters()
        try:
            return unet(noisy, t, **cond).sample  # through the wrapper, so sharded (FSDP) weights work
        finally:
            adapters.enable_adapters()

    return lora_reference


# ------------------------------------------------------------------------- model set-up
def load_unet(args):
    """The policy UNet: the base pipeline's, or --unet_init's."""
    from diffusers import UNet2DConditionModel

    if args.unet_init is None:
        return UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant)
    # a local pipeline folder keeps its UNet in unet/; a UNet folder or hub id has the config at its root
    pipeline_folder = os.path.isdir(args.unet_init) and not os.path.exists(os.path.join(args.unet_init, "config.json"))
    subfolder = "unet" if pipeline_folder else None
    return UNet2DConditionModel.from_pretrained(args.unet_init, subfolder=subfolder)


def load_noise_scheduler(args):
    """The training scheduler's alphas_cumprod in fp32, its prediction type (checked) and steps_offset."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision)
    if "FlowMatch" in config.get("_class_name", "") or "beta_schedule" not in config:
        raise SystemExit(f"the scheduler of {args.pretrained_model_name_or_path} ({config.get('_class_name')}) has no "
                         "DDPM noise schedule (alphas_cumprod): these scripts train SD 1.x/2.x/XL-style diffusion "
                         "models, not flow-matching ones such as SD3 or FLUX.")
    scheduler = DDPMScheduler.from_config(config)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise SystemExit(f"prediction_type '{prediction_type}' of {args.pretrained_model_name_or_path} is not "
                         "supported: SmPO training needs an epsilon or v_prediction model.")
    return scheduler.alphas_cumprod.float(), prediction_type, scheduler.config.steps_offset


def add_lora(unet, rank):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGET_MODULES))


def setup_unets(args, device, weight_dtype):
    """The policy UNet and, for full fine-tuning, its frozen reference copy (None for LoRA).

    LoRA: the UNet is frozen in the weight dtype and its adapters train in fp32 (under fp16 and
    bf16 alike). Full: the UNet trains in fp32, the reference is a copy in the weight dtype.
    """
    from diffusers.training_utils import cast_training_params

    unet = load_unet(args)
    ref_unet = None
    if args.full_finetune:
        ref_unet = copy.deepcopy(unet).requires_grad_(False).to(device, dtype=weight_dtype).eval()
        unet.requires_grad_(True).to(device)
    else:
        unet.requires_grad_(False).to(device, dtype=weight_dtype)
        add_lora(unet, args.rank)
        cast_training_params(unet, torch.float32)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet, ref_unet


def make_optimizer(args, params):
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=args.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=args.adam_weight_decay)
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def make_dataloader(args, seed, accelerator, vae):
    """The training pairs, their collator, and what was left out (by reason, with rows)."""
    dataset = load_preference_dataset(args.dataset_name, args.dataset_split_name, args.cache_dir)
    check_columns(dataset.column_names, args.caption_column, args.loss_type)
    rows, dropped = select_pairs(dataset, args.loss_type, args.max_train_samples, seed, args.drop_human_ties)
    transform = PairTransform(args.resolution, args.random_crop, hflip=not args.no_hflip)
    latent_cache = None
    if args.cache_latents:
        latent_cache = load_latent_cache(args, accelerator, dataset, rows, transform, vae)
        dropped["unreadable image"] = latent_cache.bad_rows
        bad = set(latent_cache.bad_rows)
        rows = [r for r in rows if r not in bad]
        dataset = dataset.remove_columns(list(IMAGE_COLUMNS))  # the images are not read again
    logger.info(describe_drops(dropped, len(rows)))
    collator = PreferenceCollator(transform, args.loss_type, args.caption_column, args.preference_temperature,
                                  args.smoothing_gamma, args.proportion_empty_prompts, seed=seed,
                                  latent_cache=latent_cache)
    loader = torch.utils.data.DataLoader(PairDataset(dataset, rows), batch_size=args.train_batch_size,
                                         shuffle=True, collate_fn=collator,
                                         num_workers=args.dataloader_num_workers)
    return loader, collator, dropped, dataset, rows


def load_latent_cache(args, accelerator, dataset, rows, transform, vae):
    """Build the latent cache once (main process first), then read it on every process."""
    from .cache import LatentCache, build_latent_cache, cache_folder, cache_key

    vae_name = getattr(args, "pretrained_vae_model_name_or_path", None) or args.pretrained_model_name_or_path
    key = cache_key(getattr(dataset, "_fingerprint", args.dataset_name), rows, vae_name, args.revision,
                    args.resolution, vae.dtype, "latents-v1")
    path = os.path.join(cache_folder(dataset, args.output_dir), f"latents-{key}.safetensors")
    with accelerator.main_process_first():
        if not os.path.exists(path):
            if accelerator.is_main_process:
                build_latent_cache(path, PairDataset(dataset, rows), transform, vae, args.vae_encode_batch_size)
        else:
            logger.info(f"using cached latents {path}")
    return LatentCache(path)


def cache_text_embeddings(args, accelerator, conditioning, dataset, rows):
    """Encode each unique caption once, give the conditioning the cache, move the encoders off the GPU."""
    from .cache import TextCache, build_text_cache, cache_folder, cache_key

    captions = set(dataset.select(rows)[args.caption_column])
    if args.proportion_empty_prompts > 0:
        captions.add("")
    key = cache_key(getattr(dataset, "_fingerprint", args.dataset_name), sorted(captions),
                    args.pretrained_model_name_or_path, args.revision, type(conditioning).__name__,
                    conditioning.text_encoders[0].dtype, "text-v1")
    path = os.path.join(cache_folder(dataset, args.output_dir), f"text-{key}.pt")
    with accelerator.main_process_first():
        if not os.path.exists(path) and accelerator.is_main_process:
            build_text_cache(path, captions, conditioning.encode_prompts)
    conditioning.text_cache = TextCache(path, accelerator.device)
    for encoder in conditioning.text_encoders:
        encoder.to("cpu")


# ------------------------------------------------------------------------------- training
def train(args, conditioning_class):
    """The Accelerate training loop, shared by the SD and SDXL scripts."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state)
    seed = shared_seed(args.seed)  # data order and augmentations: the same on every process
    accelerator.dataloader_config.data_seed = seed
    if args.seed is not None:  # 0 is a seed
        set_seed(args.seed, device_specific=True)  # model-side randomness: different on each process
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    pipeline_class = conditioning_class.pipeline_class

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    alphas_cumprod, prediction_type, steps_offset = load_noise_scheduler(args)
    alphas_cumprod = alphas_cumprod.to(accelerator.device)
    conditioning = conditioning_class(args, accelerator.device, weight_dtype)
    vae = conditioning.load_vae(args)
    vae.requires_grad_(False)
    vae.to(accelerator.device, dtype=conditioning.vae_dtype(args, weight_dtype))
    unet, ref_unet = setup_unets(args, accelerator.device, weight_dtype)
    register_checkpoint_hooks(accelerator, args.full_finetune, pipeline_class)

    train_dataloader, collator, dropped, dataset, rows = make_dataloader(args, seed, accelerator, vae)
    if args.cache_text_embeddings:
        cache_text_embeddings(args, accelerator, conditioning, dataset, rows)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, params)
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles, power=args.lr_power)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)
    step_generator = StepGenerator(seed + accelerator.process_index)
    accelerator.register_for_checkpointing(step_generator)
    reference = make_reference(unet, ref_unet)

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_name, config=tracker_config(args))

    health = RunHealth(args, num_pairs=len(train_dataloader.dataset))
    accelerator.register_for_checkpointing(health)
    global_step, first_epoch, resume_batches = 0, 0, 0
    if accelerator.is_main_process:
        remove_partial_checkpoints(args.output_dir)
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(checkpoint)
        global_step = checkpoint_step(checkpoint)
        first_epoch = global_step // num_update_steps_per_epoch
        resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps

    logger.info(f"loss {args.loss_type}, noise {args.noise_source}, {'full' if args.full_finetune else 'LoRA'}; "
                f"{args.max_train_steps} steps of {args.train_batch_size} pairs x {args.gradient_accumulation_steps} "
                f"accumulation x {accelerator.num_processes} processes; lr {args.learning_rate}")
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    metrics_log = MetricsLog(args.output_dir, accelerator, resume_step=global_step if checkpoint else None,
                             context=run_context(args, accelerator, prediction_type, steps_offset))
    stop = StopSignal()
    pending, rows, stopped_by = {}, [], None
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    unet.train()
    for epoch in range(first_epoch, args.num_train_epochs):
        collator.epoch = epoch
        train_dataloader.set_epoch(epoch)  # the shuffle order depends on (seed, epoch) only: exact resume
        loader = train_dataloader
        if epoch == first_epoch and resume_batches:
            loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in loader:
            health.add_bad_rows(batch["bad_rows"])
            if "captions" not in batch:  # every pair of this batch was unreadable
                continue
            with accelerator.accumulate(unet):
                loss, metrics = smpo_loss(args, batch, unet, reference, vae, conditioning, alphas_cumprod,
                                          prediction_type, step_generator.generator, steps_offset)
                loss = _nonfinite_if_asked(loss, global_step + 1)
                nonfinite = nonfinite | ~torch.isfinite(loss.detach())  # checked once per update, below
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    skip_update = not all_finite(accelerator, nonfinite)  # then no process steps
                    if not skip_update:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                pending.setdefault(k, []).append(v.detach().float())
            rows.extend(batch["rows"].tolist())
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            logs = gather_means(accelerator, pending, totals={"bad_pairs": len(health.bad_rows)})
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            logs["skipped_update"] = int(skip_update)
            health.after_step(global_step, skip_update, num_bad=logs["bad_pairs"])
            metrics_log.write(global_step, logs, rows=gather_rows(accelerator, rows))
            pending, rows = {}, []
            nonfinite = torch.zeros_like(nonfinite)
            progress.update(1)
            progress.set_postfix(**{k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "implicit_acc", "lr")})
            accelerator.log(logs, step=global_step)
            stopped_by = stop.requested(accelerator)
            if global_step % args.checkpointing_steps == 0 or stopped_by:
                save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
            if stopped_by:
                break
            if args.run_validation and global_step % args.validation_steps == 0:
                log_validation(args, accelerator, conditioning, unet, weight_dtype, global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps or stopped_by:
            break
    stop.restore()
    if global_step == 0 and not stopped_by:
        raise SystemExit("no optimizer step was taken: every batch was unreadable (see the rows logged above)")
    if global_step < args.max_train_steps and not stopped_by:
        logger.warning(f"finished after {global_step} of {args.max_train_steps} steps: batches without a readable "
                       "pair were skipped")

    accelerator.wait_for_everyone()
    summary = health.summary(accelerator, global_step, dropped, replicas_identical(accelerator, params))
    if stopped_by:
        logger.warning(f"stopped by signal {stopped_by} after step {global_step}; checkpoint-{global_step} saved. "
                       "Continue with --resume_from_checkpoint latest.")
        end_processes(accelerator, exit_code=128 + stopped_by)
    if accelerator.is_main_process:
        write_summary(args.output_dir, summary)
        save_final_model(args, accelerator, conditioning, unet, dropped)
    if args.run_validation:
        log_validation(args, accelerator, conditioning, unet, weight_dtype, global_step, final=True)
    end_processes(accelerator)


def end_processes(accelerator, exit_code=0):
    """Every process waits for the others (the main one may still be saving), then the run ends.

    Several CPU processes (gloo) leave with ``os._exit`` once everything is written: torch's gloo
    process group can deadlock when Python frees it at exit (its destructor joins its worker threads
    while holding the GIL that one of them needs to free a finished collective's tensor; seen with
    torchrun on 2 CPU processes in CI).
    """
    accelerator.wait_for_everyone()
    gloo = accelerator.num_processes > 1 and torch.distributed.get_backend() == "gloo"
    accelerator.end_training()
    if gloo:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    if exit_code:
        raise SystemExit(exit_code)


class RunHealth:
    """Counts what went wrong (unreadable pairs, non-finite losses) and stops the run when it is too much.

    Saved in checkpoints, so the counts survive a resume.
    """

    def __init__(self, args, num_pairs):
        self.max_bad = args.max_bad_pair_fraction * num_pairs
        self.max_nonfinite = args.max_nonfinite_steps
        self.bad_rows, self.skipped_steps, self.nonfinite_in_a_row = [], [], 0

    def add_bad_rows(self, rows):
        self.bad_rows.extend(rows)

    def after_step(self, step, skipped, num_bad):
        """Count this update; stop the run if too much went wrong (num_bad: bad pairs of all processes)."""
        if skipped:
            self.skipped_steps.append(step)
            self.nonfinite_in_a_row += 1
            logger.warning(f"step {step}: non-finite loss, update skipped ({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= self.max_nonfinite:
                raise SystemExit(
                    f"{self.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (steps "
                    f"{self.skipped_steps[-self.nonfinite_in_a_row:]}): stopping. Lower --learning_rate or "
                    "--beta_dpo, use bf16 instead of fp16, or resume from an earlier checkpoint.")
        else:
            self.nonfinite_in_a_row = 0
        if num_bad > self.max_bad:
            raise SystemExit(
                f"{num_bad} pairs had unreadable images (rows so far on this process: {self.bad_rows[:20]}), more "
                f"than --max_bad_pair_fraction allows ({self.max_bad:.1f} pairs). Clean the dataset (score_pairs.py "
                "lists and leaves out bad rows) or raise --max_bad_pair_fraction.")

    def summary(self, accelerator, steps, dropped, identical):
        from accelerate.utils import gather_object

        bad = sorted(r for rows in gather_object([self.bad_rows]) for r in rows)
        return {"steps": steps, "num_processes": accelerator.num_processes, "replicas_identical": identical,
                "dropped_before_training": dropped, "unreadable_rows": bad, "skipped_nonfinite_steps": self.skipped_steps}

    def state_dict(self):
        return {"bad_rows": self.bad_rows, "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state):
        self.bad_rows, self.skipped_steps = list(state["bad_rows"]), list(state["skipped_steps"])
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]


def shared_seed(seed):
    """--seed, or one random seed drawn by the main process and shared with the others."""
    from accelerate.utils import broadcast_object_list

    if seed is not None:
        return seed
    return broadcast_object_list([int(torch.randint(0, 2**31 - 1, ()).item())])[0]


def all_finite(accelerator, nonfinite):
    """False when any process saw a non-finite loss in this update (all skip together)."""
    flag = nonfinite.float().reshape(1)
    if accelerator.num_processes > 1:
        flag = accelerator.gather(flag)
    return not bool(flag.max() > 0)


def gather_means(accelerator, pending, totals):
    """Each metric averaged over the update's micro-batches and the processes, and each count in
    ``totals`` summed over the processes: one gather, one sync."""
    names = sorted(pending)
    means = [torch.stack(pending[k]).mean() for k in names]
    counts = torch.tensor([float(v) for v in totals.values()], device=accelerator.device)
    gathered = accelerator.gather(torch.cat([torch.stack(means), counts]).reshape(1, -1))
    logs = dict(zip(names, gathered[:, :len(names)].mean(0).tolist()))
    logs.update(zip(totals, map(int, gathered[:, len(names):].sum(0).tolist())))
    return logs


def _nonfinite_if_asked(loss, step):
    """Test hook: SMPO_TEST_NAN_LOSS_AT_STEPS=2,3 makes the loss NaN at those optimizer steps."""
    steps = os.environ.get("SMPO_TEST_NAN_LOSS_AT_STEPS")
    if steps and str(step) in steps.split(","):
        return loss * float("nan")
    return loss


def gather_rows(accelerator, rows):
    from accelerate.utils import gather_object

    if accelerator.num_processes == 1:
        return list(rows)
    return [r for part in gather_object([list(rows)]) for r in part]


def replicas_identical(accelerator, params):
    """Whether every process ends with the same trained parameters (always True on one process)."""
    if accelerator.num_processes == 1:
        return True
    checksum = torch.stack([p.detach().double().sum() for p in params] + [p.detach().double().abs().sum() for p in params])
    gathered = accelerator.gather(checksum.reshape(1, -1))
    return bool((gathered == gathered[0]).all())


def write_summary(output_dir, summary):
    """OUTPUT_DIR/train_summary.json: steps, what was dropped and why (by row), skipped steps."""
    with open(os.path.join(output_dir, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl: a first line ``{"context": {...}}`` (the method and its settings), then one
    JSON line per optimizer step with its metrics and the rows trained on.

    On resume, lines after the checkpoint's step (from the interrupted run) are dropped.
    """

    def __init__(self, output_dir, accelerator, resume_step=None, context=None):
        self.path = os.path.join(output_dir, "metrics.jsonl") if accelerator.is_main_process else None
        if not self.path:
            return
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
        if not kept:
            kept = [json.dumps({"context": context}) + "\n"]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step, logs, rows):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **logs, "rows": rows}) + "\n")


def run_context(args, accelerator, prediction_type, steps_offset):
    """What a metrics.jsonl reader needs to know about the run: the method, its noise and its scale."""
    keys = ("loss_type", "noise_source", "num_inversion_steps", "num_renoise_steps", "inversion_schedule",
            "inversion_model", "beta_dpo", "learning_rate", "train_batch_size", "gradient_accumulation_steps",
            "drop_human_ties", "full_finetune", "seed")
    return {**{k: getattr(args, k) for k in keys}, "steps_offset": steps_offset, "prediction_type": prediction_type,
            "num_processes": accelerator.num_processes}


def tracker_config(args):
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


# -------------------------------------------------------------------------------- outputs
def save_final_model(args, accelerator, conditioning, unet, dropped):
    """LoRA -> pytorch_lora_weights.safetensors; full -> a complete pipeline. Plus a model card."""
    pipeline_class = conditioning.pipeline_class
    unet = unwrap(accelerator.unwrap_model(unet))
    if args.full_finetune:
        pipeline = conditioning.pipeline_from_pretrained(args, unet=unet.to(torch.float32))
        pipeline.save_pretrained(args.output_dir)
    else:
        pipeline_class.save_lora_weights(args.output_dir, unet_lora_layers=lora_state_dict(unet))
    write_model_card(args, pipeline_class.__name__, dropped)
    if args.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                              exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                      ignore_patterns=["checkpoint-*", "step_*", "epoch_*"])


def write_model_card(args, pipeline_class_name, dropped):
    method = {"smpo": "SmPO (reward-smoothed preference weights)", "dpo": "Diffusion-DPO (binary human labels)",
              "sft": "supervised fine-tuning on the preferred images"}[args.loss_type]
    noise = {"renoise": f"ReNoise inversion (schedule `{args.inversion_schedule}`, {args.num_inversion_steps} "
                        f"inversion steps, {args.num_renoise_steps} renoise iterations, inverted by the "
                        f"{args.inversion_model})", "forward": "random forward noise"}
    if args.full_finetune:
        how = f'pipe = DiffusionPipeline.from_pretrained("{args.output_dir}", torch_dtype=torch.float16)'
    else:
        base = args.pretrained_model_name_or_path
        how = (f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16)\n'
               f'pipe.load_lora_weights("{args.output_dir}")')
        if args.unet_init:
            how += (f"\n# trained on top of the UNet {args.unet_init}: load it into the pipeline first "
                    "(pipe.unet = UNet2DConditionModel.from_pretrained(...)) before load_lora_weights")
    flags = "\n".join(f"- `--{k}`: `{v}`" for k, v in sorted(vars(args).items()) if k != "hub_token")
    card = f"""---
library_name: diffusers
base_model: {args.pretrained_model_name_or_path}
tags: [diffusers, {'lora, ' if not args.full_finetune else ''}smpo, preference-optimization, text-to-image]
---
# {os.path.basename(os.path.abspath(args.output_dir))}

{'LoRA (rank ' + str(args.rank) + ') weights' if not args.full_finetune else 'A fully fine-tuned UNet'} for
{pipeline_class_name} `{args.pretrained_model_name_or_path}`{f' (UNet initialised from `{args.unet_init}`)' if args.unet_init else ''},
trained with {method} on `{args.dataset_name}` (split `{args.dataset_split_name}`), noise from {noise[args.noise_source]},
beta {args.beta_dpo} (-0.5 * beta convention), {args.max_train_steps} optimizer steps.
Pairs left out of training: { {why: len(rows) for why, rows in dropped.items()} }.

Method: Smoothed Preference Optimization via ReNoise Inversion (Lu et al., ICML 2025).

## How to load
```python
import torch
from diffusers import DiffusionPipeline
{how}
image = pipe("a photo of a cat").images[0]
```

## Training flags
{flags}
"""
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(card)


def log_validation(args, accelerator, conditioning, unet, weight_dtype, step, final=False):
    """Generate --validation_prompts with fixed seeds; save a PNG grid and log to the trackers."""
    import numpy as np
    from PIL import Image

    if not accelerator.is_main_process:
        return
    model = unwrap(accelerator.unwrap_model(unet))
    was_training = model.training
    pipeline = conditioning.pipeline_from_pretrained(args, unet=model, torch_dtype=weight_dtype)
    pipeline.set_progress_bar_config(disable=True)
    images = []
    with torch.no_grad(), accelerator.autocast():
        for i, prompt in enumerate(args.validation_prompts):
            generator = torch.Generator(device=accelerator.device).manual_seed(i if args.seed is None else args.seed + i)
            images.append(pipeline(prompt, num_inference_steps=args.validation_num_inference_steps,
                                   height=args.resolution, width=args.resolution, generator=generator).images[0])
    model.train(was_training)
    grid = Image.new("RGB", (args.resolution * len(images), args.resolution))
    for i, image in enumerate(images):
        grid.paste(image, (i * args.resolution, 0))
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid.save(os.path.join(folder, f"{'final' if final else 'step'}-{step}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, args.validation_prompts)]})
    del pipeline
