"""Noise-tracked pairs (issue 19): generate_pairs.py records each image's initial noise, and
--noise_source prior trains each image on the line between it and that noise (CPU, tiny assets)."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import index_only_model, main_in_process
from PIL import Image

from smpo.data import PairTransform, PreferenceCollator, load_preference_dataset, open_image
from smpo.noise_sources import NOISE_SOURCES
from smpo.prior_noise import PRIOR_ON_DDPM
from smpo.processes import Diffusion, RectifiedFlow
from smpo.sampling import initial_noise

RES = 32
PROMPTS = ["a red circle on grey", "sunset over the sea"]


def generate(assets, model, out, *extra):
    """2 prompts x 2 images, one image per pipeline call (so a regeneration one by one is bit-exact)."""
    argv = ["--pretrained_model_name_or_path", assets / model, "--prompts_file", out.parent / "prompts.txt",
            "--reward_model_name_or_path", assets / "tiny-reward", "--num_images_per_prompt", 2,
            "--num_inference_steps", 3, "--resolution", RES, "--batch_size", 1, "--seed", 5, "--output_dir", out]
    main_in_process("generate_pairs.py", *argv, *extra)  # one thread (test_generate_pairs.py runs the script)


@pytest.fixture(scope="module")
def pairs_of(tiny_assets, tmp_path_factory):
    """{(model, format): dataset folder}: each model's samples in both formats (the second format
    rewrites the first's samples, nothing is generated again)."""
    made = {}

    def make(model, output_format):
        if (model, output_format) not in made:
            folder = tmp_path_factory.mktemp(model)
            (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
            generate(tiny_assets, model, folder / "pairs")
            made[model, "save_to_disk"] = folder / "pairs"
            shutil.copytree(folder / "pairs", folder / "pairs-jsonl")
            generate(tiny_assets, model, folder / "pairs-jsonl", "--output_format", "metadata_jsonl")
            made[model, "metadata_jsonl"] = folder / "pairs-jsonl"
        return made[model, output_format]

    return make


# ------------------------------------------------------------------------------- generation
def test_initial_noise_is_a_seeded_cpu_fp32_draw():
    noise = initial_noise(7, (4, 2, 3))
    assert noise.dtype == torch.float32 and noise.shape == (4, 2, 3)
    assert torch.equal(noise, torch.randn((4, 2, 3), generator=torch.Generator("cpu").manual_seed(7)))
    assert not torch.equal(noise, initial_noise(8, (4, 2, 3)))


# each model's deterministic sampler, as generate_pairs.py records it (smpo.sampling.use_deterministic_sampler)
SAMPLERS = {"tiny-sd": ("DDIMScheduler", "DDIMScheduler, eta 0"),
            "tiny-sd3": ("FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler, Euler"),
            "tiny-flux": ("FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler, Euler")}
REGENERATED = [("tiny-sd", "save_to_disk"), ("tiny-sd", "metadata_jsonl"), ("tiny-sd3", "save_to_disk"),
               ("tiny-flux", "save_to_disk")]


@pytest.mark.parametrize("model, output_format", REGENERATED)
def test_stored_images_are_regenerated_exactly_from_the_recorded_noise(pairs_of, tiny_assets, model, output_format):
    """Every image of the dataset again, from initial_noise(noise_seed_k, noise_shape) and the recorded sampler,
    steps, guidance and size, through a freshly loaded pipeline: the same PNG pixels, bit for bit. FLUX records
    the unpacked noise (the latents its training script noises) and is given it packed into 2x2 tokens."""
    import diffusers

    folder = pairs_of(model, output_format)
    pairs = load_preference_dataset(str(folder))
    summary = json.loads((folder / "generation_summary.json").read_text())
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_assets / model)
    pipe.set_progress_bar_config(disable=True)
    net = getattr(pipe, "transformer", None) or pipe.unet
    packed = model == "tiny-flux"  # its transformer's in_channels: 4 latent channels per 2x2 token
    shape = [net.config.in_channels // (4 if packed else 1), RES // pipe.vae_scale_factor, RES // pipe.vae_scale_factor]
    assert summary["settings"]["latent_shape"] == shape
    assert "initial_noise(seed, shape)" in summary["settings"]["initial_noise"]
    scheduler, sampler = SAMPLERS[model]
    assert summary["settings"]["sampler"].startswith(scheduler)
    eta = {"eta": 0.0} if scheduler == "DDIMScheduler" else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as generate_pairs.py ran
    try:
        for row in pairs:
            assert row["sampler"] == sampler and row["noise_shape"] == shape
            pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
            for k in (0, 1):
                assert row[f"noise_seed_{k}"] == 5 + row["prompt_index"] * 2 + row[f"image_index_{k}"]
                latents = initial_noise(row[f"noise_seed_{k}"], row["noise_shape"])[None]
                latents = pipe._pack_latents(latents, *latents.shape) if packed else latents
                again = pipe(row["caption"], num_inference_steps=row["num_inference_steps"], **eta,
                             guidance_scale=row["guidance_scale"], height=row["height"], width=row["width"],
                             latents=latents, output_type="pil").images[0]
                stored = np.asarray(open_image(row[f"jpg_{k}"]))
                np.testing.assert_array_equal(np.asarray(again), stored)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------- training
def test_prior_latent_is_the_t_point_between_each_image_and_its_own_noise():
    """Hand-made numbers: abar = (0.64, 0.36) at t = (0, 1), so x_t = 0.8 x0 + 0.6 eps or 0.6 x0 + 0.8 eps."""
    latents = torch.tensor([[[[1.0, 2.0]]], [[[3.0, -1.0]]]])  # (2, 1, 1, 2): a winner and a loser
    seeds, shapes = torch.tensor([11, 22]), torch.tensor([[1, 1, 2]] * 2)
    models = SimpleNamespace(process=Diffusion(torch.tensor([0.64, 0.36]), "epsilon"))
    noisy, noise = NOISE_SOURCES["prior"].make(None, models, latents, torch.tensor([0, 1]), None, None, 1,
                                               noise_seeds=seeds, noise_shapes=shapes)
    eps_w, eps_l = initial_noise(11, (1, 1, 2)), initial_noise(22, (1, 1, 2))
    torch.testing.assert_close(noise, torch.stack([eps_w, eps_l]))
    torch.testing.assert_close(noisy[0], 0.8 * latents[0] + 0.6 * eps_w)
    torch.testing.assert_close(noisy[1], 0.6 * latents[1] + 0.8 * eps_l)
    with pytest.raises(ValueError, match="recorded noise shapes"):
        NOISE_SOURCES["prior"].make(None, models, latents, torch.tensor([0, 1]), None, None, 1,
                                    noise_seeds=seeds, noise_shapes=torch.tensor([[1, 2, 1]] * 2))
    # a flow model: x_s = (1 - s) x0 + s eps_prior at sigmas 0.25 and 0.5
    flow = SimpleNamespace(process=RectifiedFlow(torch.tensor([1.0, 0.5, 0.25])))
    noisy, noise = NOISE_SOURCES["prior"].make(None, flow, latents, torch.tensor([0.25, 0.5]), None, None, 1,
                                               noise_seeds=seeds, noise_shapes=shapes)
    torch.testing.assert_close(noise, torch.stack([eps_w, eps_l]))
    torch.testing.assert_close(noisy[0], 0.75 * latents[0] + 0.25 * eps_w)
    torch.testing.assert_close(noisy[1], 0.5 * latents[1] + 0.5 * eps_l)


def image_bytes(value):
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (RES, RES), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("labels", ["dpo", "smpo"])
def test_the_winner_gets_its_own_noise_seed_after_the_label_swap(labels):
    """Row 0: image 1 preferred (label_0 = 0, reward_score_1 higher); row 1: image 0 preferred. The winners'
    seeds come first, each with its own image (grey level 10 * seed)."""
    rows = [{"row": 0, "caption": "a", "jpg_0": image_bytes(110), "jpg_1": image_bytes(220), "label_0": 0.0,
             "reward_score_0": 0.1, "reward_score_1": 0.3, "noise_seed_0": 11, "noise_seed_1": 22,
             "noise_shape": [4, 4, 4]},
            {"row": 1, "caption": "b", "jpg_0": image_bytes(30), "jpg_1": image_bytes(40), "label_0": 1.0,
             "reward_score_0": 0.5, "reward_score_1": 0.2, "noise_seed_0": 3, "noise_seed_1": 4,
             "noise_shape": [4, 4, 4]}]
    batch = PreferenceCollator(PairTransform(RES, hflip=False), labels)(rows)
    assert batch["noise_seeds"].tolist() == [22, 3, 11, 4]  # winners (row 0's image 1, row 1's image 0), losers
    grey = ((batch["pixel_values"][:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert grey == [220, 30, 110, 40]  # the same order as the seeds
    assert batch["noise_shapes"].tolist() == [[4, 4, 4]] * 4


def metrics(output_dir):
    return [m for m in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m]


def train(script, model, assets, dataset, out, *extra):
    """In this process (test_train_sd.py and test_train_sdxl.py launch the scripts)."""
    main_in_process(script, "--pretrained_model_name_or_path", assets / model, "--dataset_name", dataset,
                    "--output_dir", out, "--resolution", RES, "--train_batch_size", 2, "--max_train_steps", 2,
                    "--learning_rate", 1e-3, "--seed", 0, "--noise_source", "prior", *extra)
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2] and all(np.isfinite(m["loss"]) for m in logged)
    context = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["context"]
    assert context["noise_source"] == "prior"
    card = (out / "README.md").read_text()
    assert "the initial noise each image was generated from" in card and "`--no_hflip`: `True`" in card
    return logged


def test_sd_trains_on_generated_pairs_of_both_formats_with_prior_noise_the_latent_cache_too(pairs_of, tiny_assets,
                                                                                           tmp_path, caplog):
    """The same pairs from save_to_disk (through --cache_latents) and from metadata.jsonl (images decoded
    every step): the same winners, noises and timesteps, so the same errors (the cache only rounds)."""
    script = "train_smpo_diffusion.py"
    cached = train(script, "tiny-sd", tiny_assets, pairs_of("tiny-sd", "save_to_disk"), tmp_path / "a",
                   "--cache_latents")
    plain = train(script, "tiny-sd", tiny_assets, pairs_of("tiny-sd", "metadata_jsonl"), tmp_path / "b")
    assert caplog.text.count(PRIOR_ON_DDPM) == 2  # each run warns: prior noise trained an SD model the wrong way
    for key in ("model_err_w", "model_err_l", "noise_std_w", "noise_std_l"):
        np.testing.assert_allclose([m[key] for m in cached], [m[key] for m in plain], rtol=1e-4, err_msg=key)


@pytest.mark.parametrize("output_format", ["save_to_disk", "metadata_jsonl"])
def test_sdxl_trains_on_its_own_generated_pairs_with_prior_noise(pairs_of, tiny_assets, tmp_path, output_format,
                                                                 caplog):
    train("train_smpo_diffusion_sdxl.py", "tiny-sdxl", tiny_assets, pairs_of("tiny-sdxl", output_format),
          tmp_path / "out", "--loss_type", "dpo")
    assert PRIOR_ON_DDPM in caplog.text


def refuse(tiny_assets, tmp_path, dataset, *extra):
    """Run the SD script's main in-process on a model folder with no model in it: only checks that come
    before any model loads can answer."""
    import train_smpo_diffusion

    model = tmp_path / "index-only"
    if not model.exists():
        index_only_model(tiny_assets, model)
    args = train_smpo_diffusion.parse_args(["--pretrained_model_name_or_path", str(model),
                                            "--dataset_name", str(dataset), "--output_dir", str(tmp_path / "x"),
                                            "--noise_source", "prior", *map(str, extra)])
    train_smpo_diffusion.main(args)


def test_data_without_recorded_noise_is_refused_naming_generate_pairs(scored_dataset, tiny_assets, tmp_path):
    from smpo.data import PreferenceDataError

    with pytest.raises(PreferenceDataError, match="generate_pairs.py") as err:
        refuse(tiny_assets, tmp_path, scored_dataset, "--resolution", RES)
    assert "noise_seed_0" in str(err.value)


def test_random_crops_and_another_resolution_are_refused(pairs_of, tiny_assets, tmp_path):
    dataset = pairs_of("tiny-sd", "save_to_disk")
    with pytest.raises(SystemExit, match="--random_crop"):
        refuse(tiny_assets, tmp_path, dataset, "--resolution", RES, "--random_crop")
    with pytest.raises(SystemExit, match=f"--resolution {RES}"):
        refuse(tiny_assets, tmp_path, dataset, "--resolution", 2 * RES)
