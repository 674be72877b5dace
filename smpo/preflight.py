"""Up-front checks: what a run needs is looked for before any heavy import, model load or output folder.

Each ``missing_*`` function returns None, or one sentence saying what is missing; :func:`require` stops
the run with all of them at once. A local folder must exist and hold its config (``model_index.json``
for a pipeline, ``config.json`` for a model); a hub id is looked up in the local Hugging Face cache
when ``HF_HUB_OFFLINE`` is set (online, the download itself is the check). :func:`training_needs`,
:func:`sampling_needs` and :func:`reward_needs` list what each script needs.
"""

import importlib.util
import os
import re

PIPELINE_FILES = ("model_index.json",)
MODEL_FILES = ("config.json",)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# --report_to value -> the package accelerate needs for it (it drops a tracker it cannot import, silently)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def require(problems):
    """Stop with every problem found (one sentence each), or return."""
    problems = [p for p in problems if p]
    if problems:
        raise SystemExit("\n".join(problems))


def is_local(name):
    """A path (an existing one, or one that cannot be a hub id such as ./x, /x, a/b/c) rather than a hub id."""
    return os.path.exists(name) or not HUB_ID.match(name) or name.startswith(".")


def hub_offline():
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def missing_model(what, name, files=MODEL_FILES, subfolders=("",), revision=None, cache_dir=None):
    """None if ``name`` (local folder or hub id) holds one of ``files`` in one of ``subfolders``, else why not."""
    if name is None:
        return None
    wanted = [os.path.join(sub, f) if sub else f for sub in subfolders for f in files]
    if is_local(name):
        if not os.path.isdir(name):
            return f"{what} '{name}': no such folder."
        if not any(os.path.isfile(os.path.join(name, f)) for f in wanted):
            return f"{what} '{name}': the folder has no {' or '.join(wanted)}."
        return None
    if not hub_offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    for f in wanted:
        if isinstance(try_to_load_from_cache(name, f, cache_dir=cache_dir, revision=revision), str):
            return None
    return (f"{what} '{name}': not in the local Hugging Face cache and HF_HUB_OFFLINE is set (no folder of that "
            "name either); download it while online, or give a local folder.")


def missing_path(what, path):
    """None if the file or folder ``path`` exists (a hub dataset id is not checked here)."""
    if path is None or not is_local(path) or os.path.exists(path):
        return None
    return f"{what} {path}: no such file or folder."


def missing_folder(what, path):
    """None if ``path`` is None or an existing folder (never a hub id)."""
    return None if path is None or os.path.isdir(path) else f"{what} {path}: no such folder."


def missing_package(module, needed_by):
    """None if ``module`` can be imported, else which flag needs it and how to install it."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"{needed_by} needs the {module} package, which is not installed: pip install {module}."


def missing_tracker(report_to):
    package = TRACKER_PACKAGES.get(report_to)
    if package is None or (package == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        return None  # accelerate's tensorboard tracker also runs on tensorboardX
    return missing_package(package, f"--report_to {report_to}")


def unsupported_mixed_precision(mixed_precision, device):
    """fp16/bf16 training without a GPU: no autocast or scaler covers the frozen fp16 models on the CPU."""
    if mixed_precision in ("fp16", "bf16") and str(device).startswith("cpu"):
        return (f"--mixed_precision {mixed_precision} needs a GPU: on the CPU train in fp32 (--mixed_precision no, "
                "also in the accelerate config).")
    return None


def training_needs(args):
    """What a training run needs: the base model (and --unet_init, a VAE), local data, trackers, optional packages."""
    revision = args.revision
    return [
        missing_model("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, PIPELINE_FILES,
                      revision=revision),
        missing_model("--unet_init", args.unet_init, MODEL_FILES, subfolders=("", "unet")),
        missing_model("--pretrained_vae_model_name_or_path", getattr(args, "pretrained_vae_model_name_or_path", None)),
        missing_path("--dataset_name", args.dataset_name),
        missing_folder("--resume_from_checkpoint",
                       None if args.resume_from_checkpoint in (None, "latest") else args.resume_from_checkpoint),
        missing_tracker(args.report_to),
        missing_package("bitsandbytes", "--use_8bit_adam") if args.use_8bit_adam else None,
        missing_package("xformers", "--enable_xformers_memory_efficient_attention")
        if args.enable_xformers_memory_efficient_attention else None,
    ]


def sampling_needs(args):
    """What evaluate.py / generate_pairs.py need to sample: the pipeline (+ --unet_init, VAE, LoRA) and the prompts."""
    lora = getattr(args, "lora_weights", None)
    return [
        missing_model("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, PIPELINE_FILES,
                      revision=args.revision, cache_dir=args.cache_dir),
        missing_model("--unet_init", args.unet_init, MODEL_FILES, subfolders=("", "unet"), cache_dir=args.cache_dir),
        missing_model("--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path,
                      cache_dir=args.cache_dir),
        missing_model("--lora_weights", lora, LORA_FILES, cache_dir=args.cache_dir),
        None if args.prompts_file is None or os.path.isfile(args.prompts_file) else
        f"cannot read the prompts file {args.prompts_file}: no such file.",
        missing_path("--dataset_name", args.dataset_name),
    ]


def reward_needs(models, processors, cache_dir=None):
    """Each reward model (a CLIP-like model: config.json) and its processor."""
    problems = []
    from .rewards import not_built_in

    for model, processor in zip(models, processors):
        problem = not_built_in(model) or missing_model("cannot load the reward model", model, cache_dir=cache_dir)
        problems.append(problem or missing_model(f"cannot load the reward processor (of reward model '{model}'; set "
                                                 "--reward_processor_name_or_path)", processor, PROCESSOR_FILES,
                                                 cache_dir=cache_dir))
    return problems
