"""The tools around training take flow models (issue 18, item 3): docs/flow.md's generate -> train (prior noise)
-> evaluate -> inference commands, run as written on the tiny SD3 and FLUX models (CPU, offline)."""

import json
import os
import re
import sys

import numpy as np
import pytest
from conftest import ROOT, lora_up, run_script
from PIL import Image
from safetensors.torch import load_file

# what the docs' commands need next to them, as in a checkout
CHECKOUT = ("generate_pairs.py", "evaluate.py", "train_smpo_diffusion_sd3.py", "train_smpo_diffusion_flux.py", "smpo",
            "examples")
FAMILIES = ("sd3", "flux")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def docs_commands():
    """The bash blocks of docs/flow.md's "Generate, train, evaluate" section: SD3's, then FLUX's."""
    text = open(os.path.join(ROOT, "docs", "flow.md"), encoding="utf-8").read()
    section = text.split("## Generate, train, evaluate", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


@pytest.fixture(scope="module")
def quickstart(tiny_assets, tmp_path_factory):
    """A work folder laid out like a checkout after the quick start, where the docs' commands ran."""
    work = tmp_path_factory.mktemp("flow-docs")
    for name in CHECKOUT:
        os.symlink(os.path.join(ROOT, name), work / name)
    (work / "smpo-quickstart").mkdir()
    os.symlink(tiny_assets, work / "smpo-quickstart" / "assets")
    blocks = docs_commands()
    assert [f"$A/tiny-{family} " in block for family, block in zip(FAMILIES, blocks)] == [True, True]
    for block in blocks:
        run_script(["bash", "-euc", block], cwd=work, env=ONE_THREAD)
    return work / "smpo-quickstart"


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.mark.parametrize("family", FAMILIES)
def test_pairs_record_the_euler_sampler_and_train_with_prior_noise(quickstart, family):
    settings = json.loads((quickstart / f"{family}-pairs" / "generation_settings.json").read_text())
    assert settings["sampler"].startswith("FlowMatchEulerDiscreteScheduler")
    shard = json.loads((quickstart / f"{family}-pairs" / "shards" / "shard-00000.jsonl").read_text().splitlines()[0])
    assert {e["sampler"] for e in shard["images"]} == {"FlowMatchEulerDiscreteScheduler, Euler"}
    assert shard["images"][0]["noise_shape"] == {"sd3": [4, 16, 16], "flux": [16, 16, 16]}[family]  # FLUX: unpacked
    lora = quickstart / f"{family}-prior-lora"
    lines = (lora / "metrics.jsonl").read_text().splitlines()
    context = json.loads(lines[0])["context"]
    assert context["noise_source"] == "prior" and context["process"] == "rectified_flow"
    losses = [json.loads(line)["loss"] for line in lines[1:]]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6)  # LoRA B = 0: the policy starts at the reference
    assert "the initial noise each image was generated from" in (lora / "README.md").read_text()
    assert any(v.abs().max() > 0 for v in lora_up(load_file(lora / "pytorch_lora_weights.safetensors")))


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_compares_the_lora_with_its_base_and_names_the_sampler(quickstart, family):
    results = json.loads((quickstart / f"{family}-eval" / "results.json").read_text())
    assert results["settings"]["sampler"] == "FlowMatchEulerDiscreteScheduler"
    assert results["num_prompts"] == 4
    (scores,) = results["reward_models"].values()
    assert 0 <= scores["win_rate"] <= 1 and scores["wins"] + scores["ties"] + scores["losses"] == 4
    images = quickstart / f"{family}-eval" / "images"
    assert np.abs(pixels(images / "tuned" / "0000_0.png") - pixels(images / "base" / "0000_0.png")).max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_inference_lora_changes_the_image_of_the_same_seed(quickstart, family):
    assert np.abs(pixels(quickstart / f"{family}.png") - pixels(quickstart / f"{family}-base.png")).max() > 0


def test_inference_lora_loads_the_sd3_lora_into_the_pipeline_saved_without_t5(quickstart, tmp_path):
    """The same transformer as tiny-sd3's; the pipeline loads without text_encoder_3 (model_index.json's null)."""
    out = tmp_path / "no-t5.png"
    run_script([sys.executable, os.path.join(ROOT, "examples", "inference_lora.py"),
                "--pretrained_model_name_or_path", str(quickstart / "assets" / "tiny-sd3-no-t5"),
                "--lora_weights", str(quickstart / "sd3-prior-lora"), "--prompt", "a red circle", "--resolution", "32",
                "--num_inference_steps", "4", "--device", "cpu", "--output", str(out)], env=ONE_THREAD)
    assert np.abs(pixels(out) - pixels(tmp_path / "no-t5-base.png")).max() > 0
