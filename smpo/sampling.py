"""Sampling from a diffusion pipeline for evaluate.py and generate_pairs.py: their shared flags, prompts, seeds,
pipelines, checks.

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
# Flow models (SD3, FLUX): the Euler sampler they were trained for, itself deterministic. FLUX's latents are the
# unpacked (C, H / s, W / s) ones, the shape its training script noises, packed into 2x2 tokens for the pipeline.
FLOW_SAMPLER_RULE = "FlowMatchEulerDiscreteScheduler from the pipeline's scheduler config (Euler, deterministic)"
FLOW_NOISE_RECIPE = (NOISE_RECIPE.replace("8 for SD and SDXL", "8 for SD3 and FLUX")
                     + "; FLUX: packed into 2x2 tokens by the pipeline's _pack_latents first")


# ------------------------------------------------------------------------------------ flags
def add_sampling_flags(parser, dataset_split_name, num_images_per_prompt, output_dir):
    """The flags evaluate.py and generate_pairs.py share: the pipeline, the prompts, sampling, outputs.

    The defaults that differ between the two are parameters; :func:`check_sampling_args` checks them.
    """
    a = parser.add_argument
    a("--pretrained_model_name_or_path", required=True,
      help="The pipeline (SD 1.x/2.x, SDXL, SD3 / SD3.5 or FLUX; evaluate.py: the base): hub id or local folder.")
    a("--revision", default=None, help="Revision of --pretrained_model_name_or_path.")
    a("--variant", default=None, help="Weight variant of the model files, e.g. fp16.")
    a("--unet_init", default=None,
      help="Replace the pipeline's UNet with this one (a folder with a UNet config, or a pipeline with a unet/ "
           "subfolder), as training's --unet_init; e.g. a full fine-tune's.")
    a("--pretrained_vae_model_name_or_path", default=None,
      help="A VAE to use instead, e.g. madebyollin/sdxl-vae-fp16-fix.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts_file", default=None,
                        help="UTF-8 text file, one prompt a line; blank lines are skipped.")
    source.add_argument("--dataset_name", default=None,
                        help="A dataset (as in training: hub id, save_to_disk folder, parquet, metadata.jsonl "
                             "folder) whose caption column gives the prompts, each unique caption once.")
    a("--dataset_split_name", default=dataset_split_name)
    a("--caption_column", default="caption")
    a("--num_prompts", type=int, default=None, help="Use only the first N prompts (default: all).")
    a("--num_images_per_prompt", type=int, default=num_images_per_prompt)
    a("--num_inference_steps", type=int, default=50)
    a("--guidance_scale", type=float, default=7.5)
    a("--resolution", type=int, default=None, help="Height and width; default: the pipeline's own.")
    a("--max_sequence_length", type=int, default=None,
      help="SD3 / FLUX: T5 tokens per prompt (default: the pipeline's own, 256 for SD3, 512 for FLUX). Give the "
           "training's --max_sequence_length to sample with the conditioning the model was trained on.")
    a("--seed", type=int, default=0, help="Image k of prompt i uses seed + i * num_images_per_prompt + k.")
    a("--batch_size", type=int, default=4, help="Images per pipeline call and per reward model call.")
    a("--grid_prompts", type=int, default=8, help="Prompts (columns) in grid.png.")
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
      help="dtype of the diffusion pipelines (reward models run in fp32). Default: fp16 on CUDA, else no.")
    a("--disable_safety_checker", action="store_true",
      help="Drop the pipeline's safety checker (SD 1.x), which blacks out the images it flags.")
    a("--cache_dir", default=None)
    a("--output_dir", default=output_dir)


def check_sampling_args(parser, args):
    """Reject counts below 1; resolve --mixed_precision's default from the device (args.device, or CUDA's presence)."""
    for flag in ("num_images_per_prompt", "num_inference_steps", "batch_size", "grid_prompts"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        parser.error("--num_prompts must be >= 1")
    if args.mixed_precision is None:
        cuda = args.device.startswith("cuda") if args.device else torch.cuda.is_available()
        args.mixed_precision = "fp16" if cuda else "no"


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


def is_flow_model(args, name_or_path=None):
    """Whether a pipeline (default --pretrained_model_name_or_path) is a rectified flow (SD3, FLUX), from its
    model_index.json."""
    from .conditioning import pipeline_family

    family = pipeline_family(name_or_path or args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    return bool(family and family[1])


def sampling_rules(flow):
    """(sampler, initial-noise recipe) that generate_pairs.py records for a DDPM (False) or flow (True) pipeline."""
    return (FLOW_SAMPLER_RULE, FLOW_NOISE_RECIPE) if flow else (SAMPLER_RULE, NOISE_RECIPE)


def denoiser(pipe):
    """The pipeline's network: its transformer (SD3, FLUX) or its UNet."""
    return getattr(pipe, "transformer", None) or pipe.unet


def packs_latents(pipe):
    """Whether the pipeline takes its latents packed into 2x2 tokens (FLUX)."""
    return hasattr(pipe, "_pack_latents")


def latent_shape(pipe, resolution=None):
    """(channels, h, w) of the pipeline's initial latents at ``resolution`` (default: the pipeline's own size);
    FLUX's before packing (its transformer's in_channels are 4 latent channels per 2x2 token)."""
    scale, net = pipe.vae_scale_factor, denoiser(pipe)
    size = resolution or (getattr(pipe, "default_sample_size", None) or net.config.sample_size) * scale
    if packs_latents(pipe):  # FluxPipeline.prepare_latents: 2 * (height // (vae_scale_factor * 2))
        return (net.config.in_channels // 4, 2 * (size // (scale * 2)), 2 * (size // (scale * 2)))
    return (net.config.in_channels, size // scale, size // scale)


def use_deterministic_sampler(pipe):
    """Swap the pipeline's scheduler for the deterministic one (see SAMPLER_RULE); returns its description.

    SD 1.5's default PNDM and SDXL's Euler are deterministic too, but DDIM with eta 0 is the one sampler
    whose trajectory smpo.renoise inverts, the same for every DDPM family these scripts train. A flow
    pipeline (SD3, FLUX) gets a fresh FlowMatchEulerDiscreteScheduler: the Euler steps smpo.renoise.flow_inversion
    runs backwards.
    """
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from .conditioning import family_of

    family = family_of(type(pipe).__name__)
    if family and family[0]:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        return "FlowMatchEulerDiscreteScheduler, Euler"
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
        if is_flow_model(args, str(name_or_path)):
            raise SystemExit("--unet_init loads a UNet: a flow pipeline (SD3, FLUX) samples with its transformer; "
                             "drop --unet_init and pass a complete pipeline instead.")
        components["unet"] = load_unet_init(args.unet_init, torch_dtype=dtype, cache_dir=args.cache_dir)
    extra = {"revision": args.revision, "variant": args.variant} if base else {}
    absent = saved_without(name_or_path, extra.get("revision"), args.cache_dir)  # e.g. SD3 without T5
    pipe = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype, cache_dir=args.cache_dir,
                                             **extra, **absent, **components)
    if args.disable_safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or args.device)


def saved_without(name_or_path, revision=None, cache_dir=None):
    """{component: None} for each component model_index.json records as absent (null), e.g. an SD3 pipeline saved
    with text_encoder_3=None: from_pretrained loads such a folder only when told so."""
    import diffusers

    index = diffusers.DiffusionPipeline.load_config(name_or_path, revision=revision, cache_dir=cache_dir)
    optional = set(getattr(getattr(diffusers, index.get("_class_name", ""), None), "_optional_components", ()))
    return {name: None for name, value in index.items()
            if name not in optional and isinstance(value, list) and value[0] is None}


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
def sample_images(pipe, prompts, seeds, num_inference_steps, guidance_scale, resolution=None, noise_shape=None,
                  max_sequence_length=None):
    """One image per (prompt, seed), each from its own CPU generator so batching does not change its noise.

    With ``noise_shape`` the initial latents are :func:`initial_noise` (seed, noise_shape), passed as
    ``latents=`` (generate_pairs.py, which records them); without, the pipeline draws them from the generators.
    Returns a list of (PIL image, problem): problem is None for a usable image, else why it is not (see
    image_problem); the image is returned either way, the caller decides.
    """
    from diffusers.image_processor import VaeImageProcessor

    size = {"height": resolution, "width": resolution} if resolution else {}
    if max_sequence_length is not None:
        if getattr(pipe, "transformer", None) is None:
            raise SystemExit("--max_sequence_length sets the T5 tokens of an SD3 or FLUX pipeline; this one has none")
        size["max_sequence_length"] = max_sequence_length
    if noise_shape is None:
        noise = {"generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]}
    else:
        latents = torch.stack([initial_noise(s, noise_shape) for s in seeds])
        if packs_latents(pipe):  # FLUX: the recorded (unpacked) noise, packed as FluxPipeline.prepare_latents packs
            latents = pipe._pack_latents(latents, *latents.shape)
        noise = {"latents": latents.to(pipe.device, denoiser(pipe).dtype)}
    out = pipe(prompt=list(prompts), num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               output_type="np", **size, **noise)
    flagged = getattr(out, "nsfw_content_detected", None) or [False] * len(seeds)
    results = []
    for pixels, nsfw in zip(np.asarray(out.images), flagged):
        problem = image_problem(pixels, bool(nsfw))
        results.append((VaeImageProcessor.numpy_to_pil(pixels[None])[0], problem))
    return results
