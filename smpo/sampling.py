"""Sampling from a diffusion pipeline for evaluate.py and generate_pairs.py: prompts, seeds, pipelines, checks.

The seed rule (both scripts): image k of prompt i (counted from 0) starts from the noise of a CPU
generator seeded with ``seed + i * num_images_per_prompt + k``, whatever the batch size, device or
number of processes.
"""

import numpy as np
import torch

SEED_RULE = "image k of prompt i: seed + i * num_images_per_prompt + k (CPU generator)"
NOISE_RECIPE = ("smpo.sampling.initial_noise(seed, shape): torch.randn(shape, generator=torch.Generator('cpu')"
                ".manual_seed(seed), dtype=torch.float32), shape = (latent channels, height / s, width / s) "
                "(s: the pipeline's vae_scale_factor, 8 for SD and SDXL), cast to the pipeline's dtype and "
                "passed as latents=")
SAMPLER_RULE = "DDIMScheduler from the pipeline's scheduler config, eta 0 (deterministic)"


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


def initial_noise(seed, shape):
    """The initial noise of an image: ``torch.randn(shape)`` in fp32 from a CPU generator seeded with ``seed``.

    ``shape`` is one image's latent shape (channels, height // vae_scale_factor, width // vae_scale_factor),
    e.g. (4, 64, 64) for SD 1.5 at 512 px. generate_pairs.py passes these (stacked, cast to the pipeline's
    dtype) as the pipeline's ``latents=``, and ``--noise_source prior`` redraws them from the recorded seed:
    the same numbers on any machine and device, whatever the batch. For an fp32 pipeline they are the
    numbers diffusers draws itself from ``generator=torch.Generator("cpu").manual_seed(seed)``.
    """
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(int(n) for n in shape), generator=generator, dtype=torch.float32)


def latent_shape(pipe, resolution=None):
    """(channels, h, w) of the pipeline's initial latents at ``resolution`` (default: the pipeline's own size)."""
    scale = pipe.vae_scale_factor
    size = resolution or pipe.unet.config.sample_size * scale
    return (pipe.unet.config.in_channels, size // scale, size // scale)


def use_deterministic_sampler(pipe):
    """Swap the pipeline's scheduler for DDIM (see SAMPLER_RULE); returns the sampler's description.

    SD 1.5's default PNDM and SDXL's Euler are deterministic too, but DDIM with eta 0 is the one sampler
    whose trajectory smpo.renoise inverts, the same for every model family these scripts train.
    """
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return "DDIMScheduler, eta 0"


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
def sample_images(pipe, prompts, seeds, num_inference_steps, guidance_scale, resolution=None, noise_shape=None):
    """One image per (prompt, seed), each from its own CPU generator so batching does not change its noise.

    With ``noise_shape`` the initial latents are :func:`initial_noise` (seed, noise_shape), passed as
    ``latents=`` (generate_pairs.py, which records them); without, the pipeline draws them from the generators.
    Returns a list of (PIL image, problem): problem is None for a usable image, else why it is not (see
    image_problem); the image is returned either way, the caller decides.
    """
    from diffusers.image_processor import VaeImageProcessor

    size = {"height": resolution, "width": resolution} if resolution else {}
    if noise_shape is None:
        noise = {"generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]}
    else:
        latents = torch.stack([initial_noise(s, noise_shape) for s in seeds])
        noise = {"latents": latents.to(pipe.device, pipe.unet.dtype)}
    out = pipe(prompt=list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               output_type="np", **size, **noise)
    flagged = getattr(out, "nsfw_content_detected", None) or [False] * len(seeds)
    results = []
    for pixels, nsfw in zip(np.asarray(out.images), flagged):
        problem = image_problem(pixels, bool(nsfw))
        results.append((VaeImageProcessor.numpy_to_pil(pixels[None])[0], problem))
    return results
