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
# the family (benchmarks/step_cost.py --family) whose training script and conditioning each model runs
MODEL_FAMILY = {"sd15": "sd", "sdxl": "sdxl", "sd35-medium": "sd3", "sd35-large": "sd3", "flux-dev": "flux"}
NATIVE_RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd35-medium": 1024, "sd35-large": 1024, "flux-dev": 1024}
# --size tiny: examples/make_tiny_assets.py's models
TINY_ASSETS = {"sd15": "tiny-sd", "sdxl": "tiny-sdxl", "sd35-medium": "tiny-sd3", "sd35-large": "tiny-sd3",
               "flux-dev": "tiny-flux"}
# the flow scripts read model_index.json (the pipeline class; is there a T5?): written for the published configs
MODEL_INDEX = {"sd3": {"_class_name": "StableDiffusion3Pipeline", "text_encoder_3": ["transformers", "T5EncoderModel"]},
               "flux": {"_class_name": "FluxPipeline", "text_encoder_2": ["transformers", "T5EncoderModel"]}}
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
    # the real tokenizers are not needed for timing: any tokenizer padding to CLIP's 77 tokens (T5: to
    # --max_sequence_length) gives the same shapes
    for name in sorted(n for n in os.listdir(folder) if n.startswith("text_encoder")):
        t5 = "T5" in build_config(folder, name)["architectures"][0]
        tokenizer = make_tiny_assets.make_t5_tokenizer() if t5 else make_tiny_assets.make_tokenizer()
        tokenizer.save_pretrained(os.path.join(folder, "tokenizer" + name[12:]))
    if MODEL_FAMILY.get(model) in MODEL_INDEX:
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            json.dump(MODEL_INDEX[MODEL_FAMILY[model]], f)
    return folder


def build_config(folder, name):
    with open(os.path.join(folder, name, "config.json")) as f:
        return json.load(f)


def components(folder):
    """The model subfolders of a pipeline folder (those with a config.json), denoiser first."""
    names = sorted(n for n in os.listdir(folder) if os.path.exists(os.path.join(folder, n, "config.json")))
    return sorted(names, key=lambda n: n not in ("unet", "transformer"))


def build(folder, name, device="cpu"):
    """The component ``name`` of ``folder`` with random weights, created on ``device`` ("meta": no memory)."""
    config = build_config(folder, name)
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
    args.size = args.size or ("full" if args.device.startswith("cuda") else "tiny")
    folder = config_folder(model, args.size, tempfile.mkdtemp(prefix="smpo-random-"))
    args.pretrained_model_name_or_path, args.family = folder, MODEL_FAMILY[model]
    if args.resolution is None and args.size == "full":
        args.resolution = NATIVE_RESOLUTION[model]
    if args.family == "sdxl":  # an fp16-safe VAE (same shapes), as examples/train_sdxl_lora_24gb.sh (weight dtype)
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

