"""train_smpo_diffusion_sdxl.py: micro-conditioning per image, and end-to-end runs (CPU, tiny SDXL)."""

import json

import datasets
import numpy as np
import torch
from conftest import accelerate_launch, main_in_process
from safetensors.torch import load_file

from smpo.data import PairDataset, PairTransform, PreferenceCollator
from smpo.noise_sources import NOISE_SOURCES
from smpo.objectives import OBJECTIVES
from smpo.setup import load_noise_schedule
from smpo.step import Models, make_reference, training_step

SCRIPT = "train_smpo_diffusion_sdxl.py"


def train(assets, dataset, output_dir, *extra, steps=2, launch=False):
    """A run in this process; with ``launch``, through `accelerate launch` (the LoRA run: the launch path)."""
    return (accelerate_launch if launch else main_in_process)(
        SCRIPT, "--pretrained_model_name_or_path", assets / "tiny-sdxl", "--dataset_name", dataset,
        "--output_dir", output_dir, "--resolution", 32, "--train_batch_size", 2, "--max_train_steps", steps,
        "--learning_rate", 1e-3, "--seed", 0, "--use_8bit_adam", "--gradient_checkpointing", *extra)


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat wearing a hat", num_inference_steps=3, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_time_ids_passed_to_the_unet_carry_each_images_own_size_and_crop(tiny_assets, scored_dataset):
    """Rows 0 and 1 hold images of 48x40 / 40x56 and 64x32 / 36x36 (width x height). Every UNet call,
    the ReNoise inversion calls included, gets [orig_h, orig_w, crop_top, crop_left, 32, 32] per image."""
    import train_smpo_diffusion_sdxl as sdxl

    args = sdxl.parse_args(["--pretrained_model_name_or_path", str(tiny_assets / "tiny-sdxl"),
                            "--dataset_name", str(scored_dataset), "--resolution", "32", "--num_inversion_steps", "3"])
    conditioning = sdxl.SDXLConditioning(args, "cpu", torch.float32)
    dataset = datasets.load_from_disk(str(scored_dataset))
    collator = PreferenceCollator(PairTransform(32, random_crop=False, hflip=False), "smpo",
                                  temperature=args.preference_temperature, gamma=args.smoothing_gamma)
    pairs = PairDataset(dataset, [0, 1])
    batch = collator([pairs[0], pairs[1]])

    # By hand: shorter side -> 32, centre crop. (height, width) -> (top, left) of the crop.
    expected = {
        (40, 48): (0, 3),   # 48x40 -> 38x32
        (56, 40): (6, 0),   # 40x56 -> 32x45, (45 - 32) // 2 = 6
        (32, 64): (0, 16),  # 64x32 -> 64x32
        (36, 36): (0, 0),   # 36x36 -> 32x32
    }
    first_wins = [bool(w) for w in (torch.tensor(dataset[:2]["reward_score_0"])
                                    >= torch.tensor(dataset[:2]["reward_score_1"])).tolist()]
    sizes = [((40, 48), (56, 40)), ((32, 64), (36, 36))]
    winners = [s[0] if w else s[1] for s, w in zip(sizes, first_wins)]
    losers = [s[1] if w else s[0] for s, w in zip(sizes, first_wins)]
    want = torch.tensor([[*size, *expected[size], 32, 32] for size in winners + losers], dtype=torch.float32)

    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_assets / "tiny-sdxl", subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_assets / "tiny-sdxl", subfolder="vae")
    seen = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"].clone()),
                                   with_kwargs=True)
    models = Models(unet, make_reference(unet, unet), vae, conditioning, load_noise_schedule(args))
    loss, _ = training_step(args, batch, models, torch.Generator().manual_seed(0), OBJECTIVES["smpo"],
                            NOISE_SOURCES["renoise"])
    assert torch.isfinite(loss)
    assert len(seen) >= 4  # >= 1 inversion step x 2 forwards, the policy and the reference
    for time_ids in seen:
        torch.testing.assert_close(time_ids, want)


def test_lora_run_on_uneven_pairs_loads_into_sdxl_pipeline_and_changes_images(tiny_assets, scored_dataset, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lora"
    train(tiny_assets, scored_dataset, out, "--random_crop", steps=3, launch=True)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora.up." in k or "lora_B" in k)

    base = generate(StableDiffusionXLPipeline.from_pretrained(tiny_assets / "tiny-sdxl"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_assets / "tiny-sdxl")
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe) - base).max() > 1e-4
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "context" in logged[0]  # then one line per step
    assert len(logged) == 1 + 3 and all(np.isfinite(m["loss"]) for m in logged[1:])


def test_full_run_with_validation_saves_a_loadable_pipeline_and_a_grid(tiny_assets, scored_dataset, tmp_path):
    from diffusers import DiffusionPipeline
    from PIL import Image

    out = tmp_path / "full"
    train(tiny_assets, scored_dataset, out, "--full_finetune", "--run_validation", "--validation_steps", 1,
          "--validation_prompts", "a cat", "a blue square", "--validation_num_inference_steps", 2)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    base = generate(DiffusionPipeline.from_pretrained(tiny_assets / "tiny-sdxl"))
    assert np.abs(generate(pipe) - base).max() > 1e-4
    for name in ("step-1.png", "step-2.png", "final-2.png"):
        with Image.open(out / "validation" / name) as grid:
            assert grid.size == (2 * 32, 32)
