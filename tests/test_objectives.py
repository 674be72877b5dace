"""Objectives and noise sources as the user meets them: flag defaults, the diffusers DPO command line,
a copied script with its own objective, and the branches no end-to-end run covers (in-process)."""

import importlib.util
import json
import math
import os
import shutil

import datasets
import pytest
import torch
from conftest import ROOT, accelerate_launch, run_script

import train_smpo_diffusion as sd
import train_smpo_diffusion_sdxl as sdxl
from smpo.data import PairDataset, PairTransform, PreferenceCollator
from smpo.noise_sources import NOISE_SOURCES
from smpo.objectives import OBJECTIVES
from smpo.setup import load_noise_schedule, make_optimizer, setup_unets
from smpo.step import Models, make_reference, training_step


def parse(*flags, script=sd):
    return script.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", *map(str, flags)])


def metrics(output_dir):
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return lines[0]["context"], lines[1:]


# ----------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("loss_type, noise", [("smpo", "renoise"), ("dpo", "forward"), ("sigmoid", "forward"),
                                              ("hinge", "forward"), ("ipo", "forward"), ("sft", "forward")])
def test_noise_source_defaults_to_the_loss_types_own(loss_type, noise):
    args = parse("--loss_type", loss_type)
    assert args.noise_source == noise and args.loss_type in OBJECTIVES
    assert parse("--loss_type", loss_type, "--noise_source", "renoise").noise_source == "renoise"


def test_the_diffusers_dpo_scripts_other_flags_are_accepted():
    args = parse("--local_rank", 0, "--prior_generation_precision", "fp16", "--loss_type", "sigmoid")
    assert args.loss_type == "dpo"
    args = parse("--is_turbo", "--pretrained_vae_model_name_or_path", "vae", "--local_rank", 1, script=sdxl)
    assert args.is_turbo and args.noise_source == "renoise"


# ------------------------------------------------------------------ the diffusers README command
DIFFUSERS_README_SD_COMMAND = """accelerate launch train_diffusion_dpo.py \\
  --pretrained_model_name_or_path=runwayml/stable-diffusion-v1-5  \\
  --output_dir="diffusion-dpo" \\
  --mixed_precision="fp16" \\
  --dataset_name=kashif/pickascore \\
  --resolution=512 \\
  --train_batch_size=16 \\
  --gradient_accumulation_steps=2 \\
  --gradient_checkpointing \\
  --use_8bit_adam \\
  --rank=8 \\
  --learning_rate=1e-5 \\
  --report_to="wandb" \\
  --lr_scheduler="constant" \\
  --lr_warmup_steps=0 \\
  --max_train_steps=10000 \\
  --checkpointing_steps=2000 \\
  --run_validation --validation_steps=200 \\
  --seed="0" \\
  --report_to="wandb" \\
  --push_to_hub"""  # diffusers examples/research_projects/diffusion_dpo/README.md, "SD training command"


def test_diffusers_dpo_readme_command_trains_diffusion_dpo_with_forward_noise(tiny_assets, tmp_path):
    """Only the script name, the paths, the sizes and what needs a GPU or the network change; --loss_type sigmoid
    is added (the diffusers script's default)."""
    changes = {
        "accelerate launch train_diffusion_dpo.py": "accelerate launch --cpu --num_processes 1 --num_machines 1 "
                                                    "--dynamo_backend no " + os.path.join(ROOT, "train_smpo_diffusion.py"),
        "runwayml/stable-diffusion-v1-5": str(tiny_assets / "tiny-sd"),
        '"diffusion-dpo"': str(tmp_path / "diffusion-dpo"),
        "kashif/pickascore": str(tiny_assets / "tiny-pickapic"),
        '--mixed_precision="fp16"': '--mixed_precision="no"',  # no GPU
        "--resolution=512": "--resolution=32", "--train_batch_size=16": "--train_batch_size=2",
        "--gradient_accumulation_steps=2": "--gradient_accumulation_steps=1",
        "--max_train_steps=10000": "--max_train_steps=2", "--checkpointing_steps=2000": "--checkpointing_steps=2",
        "--validation_steps=200": "--validation_steps=200 --validation_num_inference_steps=2",
        '--report_to="wandb"': '--report_to="none"',  # no network, no wandb
        " \\\n  --push_to_hub": " \\\n  --loss_type sigmoid",
    }
    command = DIFFUSERS_README_SD_COMMAND
    for old, new in changes.items():
        assert old in command, old
        command = command.replace(old, new)
    proc = run_script(["bash", "-c", command], cwd=tmp_path)
    assert "dropped 1 tie" in proc.stderr  # human labels: the tie (row 2) has no binary preference
    out = tmp_path / "diffusion-dpo"
    context, steps = metrics(out)
    assert context["loss_type"] == "dpo" and context["noise_source"] == "forward"
    assert [m["weight"] for m in steps] == [1.0, 1.0]  # binary human labels
    # forward noise: one N(0, 1) draw a pair, shared by its two images (ReNoise inverts each image on its own)
    assert all(m["noise_std_w"] == m["noise_std_l"] == pytest.approx(1.0, abs=0.1) for m in steps)
    card = (out / "README.md").read_text()
    assert "Diffusion-DPO (binary human labels)" in card and "noise from random forward noise" in card
    assert (out / "checkpoint-2").is_dir() and (out / "validation" / "final-2.png").exists()


# -------------------------------------------------------------- a copied script with its own objective
def load_example():
    spec = importlib.util.spec_from_file_location("custom_objective", os.path.join(ROOT, "examples", "custom_objective.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_objective_cdpo_matches_hand_computed_values():
    cdpo = load_example().cdpo_loss
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # inside = -0.5 * 2 * 1 * ((0.3 - 0.2) - (0.25 - 0.25)) = -0.1 ; eps = 0.1
    loss, acc = cdpo(t([0.3]), t([0.2]), t([0.25]), t([0.25]), t([1.0]), 2.0)
    softplus = lambda x: math.log(1 + math.exp(-x))  # noqa: E731  -log sigmoid(x)
    assert loss.item() == pytest.approx(0.9 * softplus(-0.1) + 0.1 * softplus(0.1), rel=1e-12)
    assert acc.item() == 0.0


def test_a_copied_script_trains_its_own_objective_through_accelerate_launch(tiny_assets, tmp_path):
    """examples/custom_objective.py, copied out of the repository (smpo imported as if installed)."""
    script = tmp_path / "my_experiment.py"
    shutil.copy(os.path.join(ROOT, "examples", "custom_objective.py"), script)
    out = tmp_path / "cdpo"
    accelerate_launch(script, "--pretrained_model_name_or_path", tiny_assets / "tiny-sd", "--dataset_name",
                      tiny_assets / "tiny-pickapic", "--output_dir", out, "--loss_type", "cdpo", "--resolution", 32,
                      "--train_batch_size", 2, "--max_train_steps", 2, "--learning_rate", 1e-3, "--seed", 0,
                      cwd=tmp_path)
    context, steps = metrics(out)
    assert context["loss_type"] == "cdpo" and context["noise_source"] == "forward"
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference, inside = 0
    assert math.isfinite(steps[1]["loss"]) and steps[1]["loss"] != steps[0]["loss"]
    assert "conservative DPO (cDPO, label smoothing 0.1" in (out / "README.md").read_text()


# ----------------------------------------------------- branches no end-to-end run trains (in-process)
@pytest.fixture(scope="module")
def tiny_sd(tiny_assets, scored_dataset):
    """The tiny SD model's parts and a 2-pair batch, loaded once."""
    args = parse("--resolution", 32)
    args.pretrained_model_name_or_path, args.dataset_name = str(tiny_assets / "tiny-sd"), str(scored_dataset)
    from diffusers import AutoencoderKL

    conditioning = sd.SDConditioning(args, "cpu", torch.float32)
    vae = AutoencoderKL.from_pretrained(tiny_assets / "tiny-sd", subfolder="vae")
    collator = PreferenceCollator(PairTransform(32, hflip=False), "smpo")
    batch = collator([PairDataset(datasets.load_from_disk(str(scored_dataset)), [0, 1])[i] for i in range(2)])
    return args, conditioning, vae, load_noise_schedule(args), batch


def step_once(args, tiny_sd, objective, noise_source):
    """One optimizer step; returns (metrics, largest change of a trained parameter, the optimizer)."""
    _, conditioning, vae, schedule, batch = tiny_sd
    unet, ref_unet = setup_unets(args, "cpu", torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = make_optimizer(args, params)
    models = Models(unet, make_reference(unet, ref_unet), vae, conditioning, schedule)
    loss, logged = training_step(args, batch, models, torch.Generator().manual_seed(0), objective, noise_source)
    loss.backward()
    optimizer.step()
    return logged, max((p.detach() - b).abs().max().item() for p, b in zip(params, before)), optimizer


def test_sft_trains_on_the_winners_only(tiny_sd):
    args = parse("--loss_type", "sft", "--resolution", 32, "--learning_rate", 1e-3)
    args.pretrained_model_name_or_path = tiny_sd[0].pretrained_model_name_or_path
    logged, moved, _ = step_once(args, tiny_sd, OBJECTIVES["sft"], NOISE_SOURCES["forward"])
    assert set(logged) == {"loss", "model_err_w"} and logged["loss"] == logged["model_err_w"] > 0
    assert moved > 0


def test_adafactor_trains_the_lora(tiny_sd):
    args = parse("--optimizer", "adafactor", "--resolution", 32, "--learning_rate", 1e-2, "--loss_type", "dpo")
    args.pretrained_model_name_or_path = tiny_sd[0].pretrained_model_name_or_path
    # DPO's first step has zero gradient (policy == reference); SFT's does not
    _, moved, optimizer = step_once(args, tiny_sd, OBJECTIVES["sft"], NOISE_SOURCES["forward"])
    assert moved > 0
    # Adafactor's own state: a matrix keeps the row and column means of its squared gradients (factored), not
    # AdamW's full exp_avg / exp_avg_sq
    from transformers.optimization import Adafactor

    assert type(optimizer) is Adafactor
    states = list(optimizer.state.values())
    assert states and all("exp_avg_sq_row" in s and "exp_avg_sq_col" in s and "exp_avg" not in s for s in states)


def test_sdxl_turbo_trains_on_its_four_timesteps(tiny_assets):
    args = parse("--is_turbo", "--resolution", 32, script=sdxl)
    args.pretrained_model_name_or_path = str(tiny_assets / "tiny-sdxl")
    conditioning = sdxl.SDXLConditioning(args, "cpu", torch.float32)
    t = conditioning.sample_timesteps(400, 1000, torch.Generator().manual_seed(0))
    assert set(t.tolist()) == {249, 499, 749, 999}
    args.is_turbo = False
    plain = sdxl.SDXLConditioning(args, "cpu", torch.float32).sample_timesteps(400, 1000, torch.Generator().manual_seed(0))
    assert len(set(plain.tolist())) > 100
