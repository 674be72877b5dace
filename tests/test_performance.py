"""Issue 5's knobs: latent / text-embedding caches, the inversion model, and the step-cost benchmark."""

import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, main_in_process, run_script
from safetensors.torch import load_file


def train(assets, dataset, output_dir, *extra):
    """In this process (test_train_sd.py launches the script)."""
    main_in_process(
        "train_smpo_diffusion.py", "--pretrained_model_name_or_path", assets / "tiny-sd", "--dataset_name", dataset,
        "--output_dir", output_dir, "--resolution", 32, "--train_batch_size", 3, "--max_train_steps", 3,
        "--learning_rate", 1e-3, "--seed", 0, "--no_hflip", *extra)


def losses(output_dir):
    return [m["loss"] for m in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m]


@pytest.fixture(scope="module")
def plain(tiny_assets, scored_dataset, tmp_path_factory):
    """A 3-step LoRA SmPO run without caches, inverting with the policy."""
    out = tmp_path_factory.mktemp("plain") / "plain"
    train(tiny_assets, scored_dataset, out)
    return out


def output_of(capsys, caplog, *run):
    """What a run wrote to stderr (its progress bars) and logged from INFO up."""
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="smpo"):
        train(*run)
    return capsys.readouterr().err + caplog.text


def test_cached_latents_and_text_train_like_the_uncached_run(tiny_assets, scored_dataset, plain, tmp_path, capsys,
                                                             caplog):
    log = output_of(capsys, caplog, tiny_assets, scored_dataset, tmp_path / "cached", "--cache_latents",
                    "--cache_text_embeddings")
    assert "caching latents" in log and "caching text embeddings" in log
    cache = scored_dataset / "smpo-cache"  # next to the dataset's own files
    assert any(f.name.startswith("latents-") for f in cache.iterdir())
    assert any(f.name.startswith("text-") for f in cache.iterdir())
    # the same posterior, the same noise draws: the same training up to float rounding
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(plain), rtol=1e-3)
    a = load_file(plain / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    log = output_of(capsys, caplog, tiny_assets, scored_dataset, tmp_path / "again", "--cache_latents",
                    "--cache_text_embeddings")
    assert "using cached latents" in log and "caching latents" not in log
    assert losses(tmp_path / "again") == losses(tmp_path / "cached")


def test_cache_latents_refuses_random_crops(tiny_assets, scored_dataset, tmp_path):
    import train_smpo_diffusion

    with pytest.raises(SystemExit, match="--random_crop"):
        train_smpo_diffusion.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "y",
                                         "--cache_latents", "--random_crop"])


def test_inversion_with_the_reference_model_differs_once_the_policy_moves(tiny_assets, scored_dataset, plain,
                                                                           tmp_path):
    train(tiny_assets, scored_dataset, tmp_path / "ref", "--inversion_model", "reference")
    ref, policy = losses(tmp_path / "ref"), losses(plain)
    assert all(np.isfinite(ref))
    assert ref[0] == policy[0]  # step 1: the LoRA is still zero, policy == reference
    assert ref[1:] != policy[1:]  # later the inverted trajectories differ


def step_cost(tmp_path, *args):
    """Run benchmarks/step_cost.py; (its stdout, its JSON)."""
    out = tmp_path / "step_cost.json"
    proc = run_script([sys.executable, os.path.join(ROOT, "benchmarks", "step_cost.py"), *map(str, args),
                       "--output_json", str(out)])
    return proc.stdout, json.loads(out.read_text())


def assert_prior_costs_what_dpo_costs(stdout, configs):
    """--noise_source prior (SmPO smoothing on each image's recorded noise) is measured, in the table and the JSON,
    and counts no inversion: DPO's image-forwards and UNet work, floor 1."""
    assert (configs["prior"]["loss_type"], configs["prior"]["noise_source"]) == ("smpo", "prior")
    assert configs["prior"]["image_forwards"] == configs["dpo"]["image_forwards"]
    assert configs["prior"]["unet_work_per_step"] == configs["dpo"]["unet_work_per_step"]
    assert configs["prior"]["floor_x_dpo"] == 1.0 and configs["prior"]["seconds_per_step"] > 0
    forwards = configs["dpo"]["image_forwards_per_step"]
    assert re.search(rf"^prior\s+[\d.]+\s+[\d.]+\s+{forwards:.1f}\s+1\.00", stdout, re.M)  # the printed table


def test_step_cost_benchmark_quick_counts_every_image_forward(tiny_assets, scored_dataset, tmp_path):
    stdout, result = step_cost(tmp_path, "--quick", "--steps", 2, "--resolution", 32, "--assets", tiny_assets,
                               "--dataset_name", scored_dataset)
    assert re.search(r"^smpo\s+[\d.]+\s+[\d.]+\s+44\.0\s+6\.00", stdout, re.M)  # the printed table
    settings, configs = result["settings"], result["configs"]
    # the scripts' defaults: K = 10 inversion steps on the exact schedule, R = 1
    assert (settings["num_inversion_steps"], settings["inversion_schedule"], settings["num_renoise_steps"]) == (
        10, "exact", 1)
    # per step, 1 pair = 2 images: policy 2 + reference 2; SmPO's inversion adds K (R + 1) = 20 per image (exact
    # schedule; fewer only for t < K, which seed 0 does not draw)
    assert configs["dpo"]["image_forwards"] == [4, 4] and configs["smpo-forward"]["image_forwards"] == [4, 4]
    assert configs["smpo"]["image_forwards"] == [44, 44]
    assert configs["smpo"]["floor_x_dpo"] == 6.0 and configs["dpo"]["x_dpo"] == 1.0
    # UNet work (smpo.cost, the training loop's counter): 2 images x (3 + 1) for DPO, + 40 no-grad forwards for SmPO
    assert configs["dpo"]["unet_work_per_step"] == 8 and configs["smpo"]["unet_work_per_step"] == 48
    assert_prior_costs_what_dpo_costs(stdout, configs)
    assert configs["dpo"]["peak_memory_mib"] is None  # no accelerator memory on the CPU


def test_step_cost_random_init_runs_the_tiny_configs_on_the_cpu(tmp_path):
    """--random_init: the model built from configs (tiny on the CPU), full fine-tuning counts the reference UNet."""
    stdout, result = step_cost(tmp_path, "--random_init", "sdxl", "--steps", 1, "--warmup_steps", 1, "--resolution", 32,
                          "--train_batch_size", 2, "--full_finetune", "--cache_text_embeddings")
    assert result["settings"]["size"] == "tiny" and result["settings"]["random_init"] == "sdxl"
    configs = result["configs"]
    assert configs["dpo"]["image_forwards"] == [8]  # 4 images through the policy and 4 through the reference copy
    assert configs["smpo"]["image_forwards"] == [8 + 4 * 10 * 2]
    assert all(c["seconds_per_step"] > 0 for c in configs.values())
    assert_prior_costs_what_dpo_costs(stdout, configs)


@pytest.mark.parametrize("family, model", [("sd3", "sd35-medium"), ("flux", "flux-dev")])
def test_step_cost_measures_the_flow_families_on_their_tiny_models_and_random_init(family, model, tiny_assets,
                                                                                   scored_dataset, tmp_path):
    """SD3 and FLUX: --quick --family (the tiny model) and --random_init (tiny on the CPU), both measured, no
    refusal; the flow inversion counts K (R + 1) = 20 transformer image-forwards per image (every sigma is above
    0, so no image stops early), FLUX's packed calls counted by the latents they carry."""
    stdout, result = step_cost(tmp_path, "--quick", "--family", family, "--steps", 1, "--resolution", 32,
                               "--assets", tiny_assets, "--dataset_name", scored_dataset)
    assert result["settings"]["family"] == family
    assert result["settings"]["pretrained_model_name_or_path"].endswith(f"tiny-{family}")
    assert re.search(r"^smpo\s+[\d.]+\s+[\d.]+\s+44\.0\s+6\.00", stdout, re.M)
    assert_prior_costs_what_dpo_costs(stdout, result["configs"])
    stdout, result = step_cost(tmp_path, "--random_init", model, "--steps", 1, "--warmup_steps", 1,
                               "--resolution", 32, "--full_finetune", "--cache_text_embeddings")
    assert result["settings"]["family"] == family and result["settings"]["size"] == "tiny"
    configs = result["configs"]
    assert configs["dpo"]["image_forwards"] == [4]  # 2 images through the policy and 2 through the reference copy
    assert configs["smpo"]["image_forwards"] == [4 + 2 * 10 * 2]
    assert_prior_costs_what_dpo_costs(stdout, configs)


# published parameter counts: SD 1.5 UNet 859.52 M, SDXL UNet 2.567 B, FLUX.1-dev transformer 11.9 B,
# SD3.5 medium 2.5 B ("2.5 billion parameters"; its MMDiT-X transformer alone 2.24 B) and large 8.1 B; CLIP ViT-L/14
# text 123.06 M, OpenCLIP bigG text + projection 694.66 M, T5 v1.1 XXL encoder 4.76 B
PUBLISHED = {"sd15": (859.5e6, 859.6e6), "sdxl": (2.567e9, 2.568e9), "sd35-medium": (2.2e9, 2.5e9),
             "sd35-large": (8.0e9, 8.15e9), "flux-dev": (11.85e9, 11.95e9)}
TEXT_ENCODERS = {"sd15": [123060480], "sdxl": [123060480, 694659840],
                 "sd35-medium": [123650304, 694659840, 4762310656], "sd35-large": [123650304, 694659840, 4762310656],
                 "flux-dev": [123060480, 4762310656]}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_random_init_configs_have_the_published_sizes(model):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import random_models

    counts = random_models.count_parameters(model)
    low, high = PUBLISHED[model]
    assert low <= counts["denoiser_params"] <= high
    assert [n for k, n in counts.items() if k.startswith("text_encoder")] == TEXT_ENCODERS[model]
    assert 83e6 < counts["vae_params"] < 84e6


def test_count_only_prints_one_json_line():
    bench = [sys.executable, os.path.join(ROOT, "benchmarks", "step_cost.py"), "--random_init", "flux-dev"]
    lines = run_script(bench + ["--count_only"]).stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["denoiser_params"] == 11901408320


def test_what_fits_json_is_what_the_command_computes_now():
    """docs/performance/what_fits.json (the docs' "what fits" table) is benchmarks/what_fits.py's output for today's
    configs, and its verdicts follow the documented rule."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import what_fits

    stored = json.loads((Path(ROOT) / "docs" / "performance" / "what_fits.json").read_text())
    for model, modes in stored["modes"].items():
        counts = what_fits.random_models.count_parameters(model)
        assert counts == stored["counts"][model]
        assert what_fits.what_fits(counts) == modes
    sd15 = stored["modes"]["sd15"]["full-adamw"]  # 18 bytes per UNet parameter + the bf16 VAE
    assert sd15["resident_gib"] == round((18 * 859520964 + 2 * 83653863) / 2**30, 1)
    assert what_fits.verdict(20.0, 3.0, 24) == "tight"  # 23 GiB > 90% of 24, but the resident 20 GiB <= 24
    assert what_fits.verdict(25.0, 0.0, 24) == "no" and what_fits.verdict(10.0, 3.0, 24) == "fits"


def test_gpu_check_without_a_gpu_says_how_to_rehearse(tmp_path):
    proc = run_script(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], check=False,
                      env={"PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert proc.returncode == 1 and "no CUDA device is visible to torch" in proc.stdout and "--dry_run" in proc.stdout
