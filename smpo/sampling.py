"""Sampling from a diffusion pipeline for evaluate.py and generate_pairs.py: prompts, seeds, pipelines, checks.

The seed rule (both scripts): image k of prompt i (counted from 0) starts from the noise of a CPU
generator seeded with ``seed + i * num_images_per_prompt + k``, whatever the batch size, device or
number of processes.
"""

import numpy as np
import torch

SEED_RULE = "image k of prompt i: seed + i * num_images_per_prompt + k (CPU generator)"


# ---------------------------------------------------------------------------------- prompts
def read_prompts_file(path):
    """The non-blank lines of a UTF-8 text file, stripped, and the numbers (from 1) of the blank lines skipped.

    Raises SystemExit naming the file (and the line, for text that is not UTF-8) when it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as err:
        raise SystemExit(f"cannot read the prompts file {path}: {err.strerror or err}") from None
    prompts, blank = [], []
    for line_no, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise SystemExit(f"{path}, line {line_no}: not UTF-8 text ({err.reason} at byte {err.start}); "
                             "save the prompts file as UTF-8.") from None
        if line:
            prompts.append(line)
        else:
            blank.append(line_no)
    return prompts, blank


def read_prompts(prompts_file=None, dataset_name=None, split="test", caption_column="caption", num_prompts=None,
                 cache_dir=None):
    """The prompts: the non-blank lines of a file, or a dataset's unique non-empty captions in first-seen order."""
    from .data import load_preference_dataset

    if prompts_file is not None:
        prompts, _ = read_prompts_file(prompts_file)
        where = prompts_file
    else:
        dataset = load_preference_dataset(dataset_name, split, cache_dir)
        if caption_column not in dataset.column_names:
            raise SystemExit(f"caption column '{caption_column}' not found in {dataset_name}; it has columns "
                             f"{sorted(dataset.column_names)}. Set --caption_column.")
        captions = (str(c).strip() for c in dataset.select_columns([caption_column])[caption_column] if c is not None)
        prompts = list(dict.fromkeys(c for c in captions if c))  # unique, first-seen order
        where = f"{dataset_name} (column {caption_column})"
    if not prompts:
        raise SystemExit(f"no prompts in {where}")
    return prompts[:num_prompts] if num_prompts is not None else prompts


# ------------------------------------------------------------------------------- generation
def image_seed(seed, prompt_index, k, num_images_per_prompt):
    """The seed of image k of prompt i (see SEED_RULE)."""
    return seed + prompt_index * num_images_per_prompt + k


def pipeline_dtype(mixed_precision):
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def load_pipeline(name_or_path, args, base=True, device=None):
    """A diffusion pipeline in ``args.mixed_precision`` on ``device`` (default ``args.device``), progress bar off.

    Reads from ``args``: mixed_precision, pretrained_vae_model_name_or_path, cache_dir, disable_safety_checker,
    and for the base model unet_init (a UNet replacing the pipeline's, e.g. a full fine-tune's), revision, variant.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline

    from .setup import load_unet_init

    dtype = pipeline_dtype(args.mixed_precision)
    components = {}
    if args.pretrained_vae_model_name_or_path:
        components["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=dtype,
                                                          cache_dir=args.cache_dir)
    if base and args.unet_init:
        components["unet"] = load_unet_init(args.unet_init, torch_dtype=dtype, cache_dir=args.cache_dir)
    extra = {"revision": args.revision, "variant": args.variant} if base else {}
    pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype, cache_dir=args.cache_dir,
                                             **extra, **components)
    if args.disable_safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or args.device)


def image_problem(pixels, flagged=False):
    """Why a sampled image cannot be used, or None. ``pixels``: (H, W, 3) floats in [0, 1] as the pipeline returns."""
    if not np.isfinite(pixels).all():
        return "NaN or infinite pixels"
    if flagged:
        return "flagged by the safety checker, which blacks it out (--disable_safety_checker keeps it)"
    if np.round(pixels * 255).max() <= 0:
        return "an all-black image"
    return None


@torch.no_grad()
def sample_images(pipe, prompts, seeds, num_inference_steps, guidance_scale, resolution=None):
    """One image per (prompt, seed), each from its own CPU generator so batching does not change its noise.

    Returns a list of (PIL image, problem): problem is None for a usable image, else why it is not (see
    image_problem); the image is returned either way, the caller decides.
    """
    from diffusers.image_processor import VaeImageProcessor

    size = {"height": resolution, "width": resolution} if resolution else {}
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(prompt=list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               generator=generators, output_type="np", **size)
    flagged = getattr(out, "nsfw_content_detected", None) or [False] * len(seeds)
    results = []
    for pixels, nsfw in zip(np.asarray(out.images), flagged):
        problem = image_problem(pixels, bool(nsfw))
        results.append((VaeImageProcessor.numpy_to_pil(pixels[None])[0], problem))
    return results
