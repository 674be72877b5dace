"""Model set-up: the process (noise schedule), the frozen parts (text encoders, VAE), the policy and reference
networks (UNet or transformer), the optimizer. Used by the training loop and by ``benchmarks/step_cost.py`` alike."""

import copy
import os

import torch

from .processes import Diffusion

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]


def load_noise_schedule(args):
    """The :class:`~smpo.processes.Diffusion` process: the training scheduler's alphas_cumprod in fp32, its
    prediction type (checked) and steps_offset."""
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
    return Diffusion(scheduler.alphas_cumprod.float(), prediction_type, scheduler.config.steps_offset)


def load_frozen_parts(args, conditioning_class, device, weight_dtype):
    """(conditioning, vae, process): everything but the trained network, frozen and on ``device``."""
    process = conditioning_class.load_process(args).to(device)
    conditioning = conditioning_class(args, device, weight_dtype)
    vae = conditioning.load_vae(args).requires_grad_(False)
    place(vae, device, conditioning.vae_dtype(args, weight_dtype))
    return conditioning, vae, process


def place(model, device, dtype):
    """Move ``model`` to ``device`` and cast it only if its dtype differs: diffusers warns about keeping modules in
    fp32 on every ``.to(dtype=...)``, even when there are none and nothing changes (as in every fp32 run)."""
    model.to(device)
    if model.dtype != dtype:
        model.to(dtype=dtype)
    return model


def load_unet(args):
    """The policy UNet: the base pipeline's, or --unet_init's."""
    from diffusers import UNet2DConditionModel

    if args.unet_init is None:
        return UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant)
    return load_unet_init(args.unet_init)


def load_unet_init(unet_init, **kwargs):
    """The UNet of --unet_init (training, evaluate.py and generate_pairs.py alike); ``kwargs`` go to from_pretrained.

    A UNet folder or hub id has its config.json at the root; a local folder without one is a pipeline folder,
    whose UNet is in unet/. A folder with both a root config.json and a unet/ subfolder is a UNet folder.
    """
    from diffusers import UNet2DConditionModel

    pipeline_folder = os.path.isdir(unet_init) and not os.path.exists(os.path.join(unet_init, "config.json"))
    return UNet2DConditionModel.from_pretrained(unet_init, subfolder="unet" if pipeline_folder else None, **kwargs)


def add_lora(unet, rank, target_modules=LORA_TARGET_MODULES):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))


def lora_targets(args, family=None):
    """--lora_layers (comma-separated module names) if given, else the family's targets, else SD's."""
    if getattr(args, "lora_layers", None):
        return [name.strip() for name in args.lora_layers.split(",") if name.strip()]
    return list(getattr(family, "lora_target_modules", LORA_TARGET_MODULES))


def setup_unets(args, device, weight_dtype, unet=None, family=None):
    """The policy network (``unet``, else the family's ``load_denoiser``, else :func:`load_unet`'s) and, for full
    fine-tuning, its frozen reference copy (None for LoRA). ``benchmarks/step_cost.py --random_init`` passes a
    random-weight ``unet``. ``family``: the conditioning class (its ``load_denoiser`` and ``lora_target_modules``).

    LoRA: the UNet is frozen in the weight dtype and its adapters train in fp32 (under fp16 and
    bf16 alike). Full: the UNet trains in fp32, the reference is a copy in the weight dtype.
    """
    from diffusers.training_utils import cast_training_params

    if unet is None:
        unet = family.load_denoiser(args) if family is not None else load_unet(args)
    ref_unet = None
    if args.full_finetune:
        ref_unet = place(copy.deepcopy(unet).requires_grad_(False), device, weight_dtype).eval()
        unet.requires_grad_(True).to(device)
    else:
        place(unet.requires_grad_(False), device, weight_dtype)
        add_lora(unet, args.rank, lora_targets(args, family))
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


def make_lr_scheduler(args, optimizer, num_processes):
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes, num_cycles=args.lr_num_cycles,
                         power=args.lr_power)
