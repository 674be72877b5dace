"""What a run leaves behind: the LoRA or the pipeline, the model card, validation images."""

import os

import torch

from .checkpoints import save_lora


def save_final_model(args, accelerator, conditioning, unet, dropped, objective, noise_source):
    """LoRA -> pytorch_lora_weights.safetensors; full -> a complete pipeline. Plus a model card."""
    pipeline_class = conditioning.pipeline_class
    unet = accelerator.unwrap_model(unet)
    if args.full_finetune:
        pipeline = conditioning.pipeline_from_pretrained(args, unet.to(torch.float32))
        pipeline.save_pretrained(args.output_dir)
    else:
        save_lora(pipeline_class, args.output_dir, unet, conditioning.denoiser)
    write_model_card(args, pipeline_class.__name__, dropped, objective.card, noise_source.card(args),
                     conditioning.denoiser, getattr(conditioning, "load_kwargs", ""))
    if args.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
                              exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                      ignore_patterns=["checkpoint-*", "step_*", "epoch_*"])


def write_model_card(args, pipeline_class_name, dropped, method, noise, denoiser="unet", load_kwargs=""):
    """OUTPUT_DIR/README.md: metadata, what was trained how, how to load it, every flag.

    The metadata block and tags come from huggingface_hub's ModelCardData and diffusers'
    ``populate_model_card``. Not diffusers' ``load_or_create_model_card``: it looks the output folder's
    name up on the Hub (a network call at the end of every run, and a stranger's card when the name is
    taken) and fills a template with TODO sections.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    if args.full_finetune:
        how = f'pipe = DiffusionPipeline.from_pretrained("{args.output_dir}", torch_dtype=torch.float16{load_kwargs})'
    else:
        base = args.pretrained_model_name_or_path
        how = (f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16{load_kwargs})\n'
               f'pipe.load_lora_weights("{args.output_dir}")')
        if args.unet_init:
            how += (f"\n# trained on top of the UNet {args.unet_init}: load it into the pipeline first "
                    "(pipe.unet = UNet2DConditionModel.from_pretrained(...)) before load_lora_weights")
    flags = "\n".join(f"- `--{k}`: `{v}`" for k, v in sorted(vars(args).items()) if k != "hub_token")
    network = {"unet": "UNet"}.get(denoiser, denoiser)
    what = f"LoRA (rank {args.rank}) weights" if not args.full_finetune else f"A fully fine-tuned {network}"
    init = f" (UNet initialised from `{args.unet_init}`)" if args.unet_init else ""
    text = f"""
# {os.path.basename(os.path.abspath(args.output_dir))}

{what} for
{pipeline_class_name} `{args.pretrained_model_name_or_path}`{init},
trained with {method} on `{args.dataset_name}` (split `{args.dataset_split_name}`), noise from {noise},
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
    data = ModelCardData(library_name="diffusers", base_model=args.pretrained_model_name_or_path)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
    tags = ["text-to-image", "diffusers", *(["lora"] if not args.full_finetune else []), "smpo",
            "preference-optimization", f"loss-{args.loss_type}", f"noise-{args.noise_source}"]
    populate_model_card(card, tags=tags).save(os.path.join(args.output_dir, "README.md"))


def log_validation(args, accelerator, conditioning, unet, weight_dtype, step, final=False):
    """Generate --validation_prompts with fixed seeds; save a PNG grid and log to the trackers."""
    import numpy as np
    from diffusers.training_utils import free_memory
    from diffusers.utils import make_image_grid

    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(unet)
    was_training = model.training
    pipeline = conditioning.pipeline_from_pretrained(args, model, torch_dtype=weight_dtype)
    pipeline.set_progress_bar_config(disable=True)
    images = []
    with torch.no_grad(), accelerator.autocast():
        for i, prompt in enumerate(args.validation_prompts):
            generator = torch.Generator(device=accelerator.device).manual_seed(i if args.seed is None else args.seed + i)
            images.append(pipeline(prompt, num_inference_steps=args.validation_num_inference_steps,
                                   height=args.resolution, width=args.resolution, generator=generator).images[0])
    model.train(was_training)
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid = make_image_grid(images, rows=1, cols=len(images))
    grid.save(os.path.join(folder, f"{'final' if final else 'step'}-{step}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for im, p in zip(images, args.validation_prompts)]})
    del pipeline
    free_memory()
