"""Random-weight models of the real architectures, built from the config files in benchmarks/configs/, no download.

``benchmarks/configs/MODEL/`` holds the published ``config.json`` of each component (denoiser ``unet/`` or
``transformer/``, ``vae/``, ``text_encoder*/``) and the scheduler's config. Step time and memory do not
depend on the weights' values, so ``benchmarks/step_cost.py --random_init MODEL`` measures them on these;
``--count_only`` builds them on the meta device (no memory) and counts their parameters.
"""

import json
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "configs")
MODELS = ("sd15", "sdxl", "sd35-medium", "sd35-large", "flux-dev")
SCRIPTS = {"sd15": "train_smpo_diffusion", "sdxl": "train_smpo_diffusion_sdxl"}  # the flow families have none yet
NATIVE_RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd35-medium": 1024, "sd35-large": 1024, "flux-dev": 1024}
TINY_ASSETS = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl"}  # --size tiny: examples/make_tiny_assets.py's models
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "examples")]  # smpo, make_tiny_assets


def config_folder(model, size, work):
    """A pipeline folder of configs (no weights) and tokenizers for ``model``: the published shapes
    (``size`` "full") or the tiny test models' (``size`` "tiny"), written under ``work``."""
    import make_tiny_assets

    folder = os.path.join(work, model)
    if size == "tiny":
        if model not in TINY_ASSETS:
            raise SystemExit(f"--size tiny exists for {', '.join(TINY_ASSETS)}, not {model}")
        getattr(make_tiny_assets, "build_" + TINY_ASSETS[model].split("-")[1])(work)
        return os.path.join(work, TINY_ASSETS[model])
    shutil.copytree(os.path.join(CONFIGS, model), folder)
    # the real tokenizers are not needed for timing: any tokenizer padding to CLIP's 77 tokens gives the same shapes
    for name in sorted(n for n in os.listdir(folder) if n.startswith("text_encoder")):
        make_tiny_assets.make_tokenizer().save_pretrained(os.path.join(folder, "tokenizer" + name[12:]))
    return folder


def components(folder):
    """The model subfolders of a pipeline folder (those with a config.json), denoiser first."""
    names = sorted(n for n in os.listdir(folder) if os.path.exists(os.path.join(folder, n, "config.json")))
    return sorted(names, key=lambda n: n not in ("unet", "transformer"))


def build(folder, name, device="cpu"):
    """The component ``name`` of ``folder`` with random weights, created on ``device`` ("meta": no memory)."""
    with open(os.path.join(folder, name, "config.json")) as f:
        config = json.load(f)
    with torch.device(device):
        if "_class_name" in config:  # a diffusers model
            import diffusers

            return getattr(diffusers, config["_class_name"]).from_config(config)
        import transformers

        model_class = getattr(transformers, config["architectures"][0])
        return model_class(model_class.config_class.from_dict(config))


def count_parameters(model, size="full", rank=8):
    """{"model", "denoiser", "denoiser_params", "<component>_params"..., "lora_params"}: each component built on the
    meta device; ``lora_params``: the adapters the scripts add to the denoiser (smpo.setup.add_lora) at ``rank``."""
    from smpo.setup import add_lora

    with tempfile.TemporaryDirectory() as work:
        folder = config_folder(model, size, work)
        names = components(folder)
        counts = {f"{name}_params": sum(p.numel() for p in build(folder, name, "meta").parameters()) for name in names}
        with torch.device("meta"):
            denoiser = build(folder, names[0], "meta")
            add_lora(denoiser, rank)
    lora = sum(p.numel() for name, p in denoiser.named_parameters() if "lora_" in name)
    return {"model": model, "size": size, "denoiser": names[0], "denoiser_params": counts.pop(f"{names[0]}_params"),
            **counts, "lora_rank": rank, "lora_params": lora}


def random_init_assets(args):
    """--random_init: a folder of the model's configs (no weights) and pairs of synthetic images with reward scores."""
    from make_tiny_assets import pickapic_rows

    model = args.random_init
    if model not in SCRIPTS:
        raise SystemExit(f"{model} has no training script yet (the flow-matching families wait for issue 18), so "
                         f"only --count_only works for it.")
    args.size = args.size or ("full" if args.device.startswith("cuda") else "tiny")
    folder = config_folder(model, args.size, tempfile.mkdtemp(prefix="smpo-random-"))
    args.pretrained_model_name_or_path, args.sdxl = folder, model == "sdxl"
    if args.resolution is None and args.size == "full":
        args.resolution = NATIVE_RESOLUTION[model]
    if args.sdxl:  # an fp16-safe VAE (same shapes), as examples/train_sdxl_lora_24gb.sh: it runs in the weight dtype
        args.extra_flags = ["--pretrained_vae_model_name_or_path", os.path.join(folder, "vae")]
    rows = pickapic_rows(args.train_batch_size)
    for i, row in enumerate(rows):
        row["reward_score_0"], row["reward_score_1"] = 20.0 + i % 3, 21.0
    return folder, rows


def random_init_conditioning(conditioning_class, folder, device):
    """The script's conditioning class, with its text encoders and VAE built from ``folder``'s configs."""

    class RandomInit(conditioning_class):
        @staticmethod
        def load_text_encoders(args):
            return [build(folder, name, device) for name in components(folder) if name.startswith("text_encoder")]

        @staticmethod
        def load_vae(args):
            return build(folder, "vae", device)

    return RandomInit

