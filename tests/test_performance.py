"""Issue 5's knobs: latent / text-embedding caches, the inversion model, and the step-cost benchmark."""

import json
import os
import re
import sys

import numpy as np
import pytest
from conftest import ROOT, accelerate_launch, run_script
from safetensors.torch import load_file


def train(assets, dataset, output_dir, *extra):
    return accelerate_launch(
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


def test_cached_latents_and_text_train_like_the_uncached_run(tiny_assets, scored_dataset, plain, tmp_path):
    proc = train(tiny_assets, scored_dataset, tmp_path / "cached", "--cache_latents", "--cache_text_embeddings")
    assert "caching latents" in proc.stderr and "caching text embeddings" in proc.stderr
    cache = scored_dataset / "smpo-cache"  # next to the dataset's own files
    assert any(f.name.startswith("latents-") for f in cache.iterdir())
    assert any(f.name.startswith("text-") for f in cache.iterdir())
    # the same posterior, the same noise draws: the same training up to float rounding
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(plain), rtol=1e-3)
    a = load_file(plain / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

    proc = train(tiny_assets, scored_dataset, tmp_path / "again", "--cache_latents", "--cache_text_embeddings")
    assert "using cached latents" in proc.stderr and "caching latents" not in proc.stderr
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


def test_step_cost_benchmark_quick_prints_the_table(tiny_assets, scored_dataset):
    proc = run_script([sys.executable, os.path.join(ROOT, "benchmarks", "step_cost.py"), "--quick", "--steps", "2",
                       "--resolution", "32", "--assets", str(tiny_assets), "--dataset_name", str(scored_dataset)])
    rows = {m.group(1): m.groups()[1:] for m in
            re.finditer(r"^(smpo|smpo-forward|dpo)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", proc.stdout, re.M)}
    assert set(rows) == {"smpo", "smpo-forward", "dpo"}
    # UNet image-forwards per step for 1 pair (2 images): policy 2 + reference 2; SmPO adds K * (R + 1) per image at
    # most (K = 5, R = 1), and at least one inversion step
    assert float(rows["dpo"][2]) == 4.0 and float(rows["smpo-forward"][2]) == 4.0
    assert 4.0 + 2 * 2 <= float(rows["smpo"][2]) <= 4.0 + 5 * 2 * 2
    assert float(rows["dpo"][1]) == 1.0
