"""End to end: train_smpo_diffusion.py through `accelerate launch` on the tiny assets (CPU)."""

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import accelerate_launch
from safetensors.torch import load_file

SCRIPT = "train_smpo_diffusion.py"


def train(assets, dataset, output_dir, *extra, model="tiny-sd", steps=2, check=True):
    return accelerate_launch(
        SCRIPT, "--pretrained_model_name_or_path", assets / model, "--dataset_name", dataset,
        "--output_dir", output_dir, "--resolution", 32, "--train_batch_size", 2, "--max_train_steps", steps,
        "--learning_rate", 1e-3, "--seed", 0, "--checkpointing_steps", 1000, *extra, check=check)


def generate(pipe, prompt="a red circle on grey"):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, generator=generator, output_type="np").images


def base_images(assets, model="tiny-sd"):
    from diffusers import DiffusionPipeline

    return generate(DiffusionPipeline.from_pretrained(assets / model))


def lora_up(weights):
    """The LoRA up (B) matrices, zero at initialisation, in diffusers' saved format."""
    return [v for k, v in weights.items() if ".lora.up." in k or "lora_B" in k]


def metrics(output_dir):
    return [m for m in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m]


def test_lora_smpo_run_saves_weights_that_load_and_change_images(tiny_assets, scored_dataset, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "lora"
    train(tiny_assets, scored_dataset, out, "--use_8bit_adam", "--gradient_checkpointing", steps=3)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") for k in weights)
    assert any(v.abs().max() > 0 for v in lora_up(weights))  # training moved the zero-initialised up weights

    pipe = DiffusionPipeline.from_pretrained(tiny_assets / "tiny-sd")
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe) - base_images(tiny_assets)).max() > 1e-4

    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3]
    for key in ("loss", "implicit_acc", "model_err_w", "model_err_l", "ref_err_w", "ref_err_l",
                "model_minus_ref_w", "model_minus_ref_l", "noise_std_w", "noise_std_l", "reward_margin", "weight", "lr"):
        assert all(np.isfinite(m[key]) for m in logged), key
    assert all(0 < m["weight"] < 10 for m in logged)  # smoothed weights, not hard labels
    for m in logged:
        assert m["model_minus_ref_w"] == pytest.approx(m["model_err_w"] - m["ref_err_w"], abs=1e-6)
        assert 0 < m["noise_std_w"] and 0 < m["noise_std_l"]
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and str(tiny_assets / "tiny-sd") in card and "SmPO" in card


def test_equal_preferences_do_not_move_the_model(tiny_assets, scored_dataset, tmp_path):
    """Equal reward scores give weight 0 for every pair: loss log 2, zero gradient, no change (the LoRA's up
    matrices stay zero and the pipeline's images stay the base model's)."""
    from diffusers import DiffusionPipeline

    equal = datasets.load_from_disk(str(scored_dataset))
    equal = equal.map(lambda e: {"reward_score_1": e["reward_score_0"]})
    equal.save_to_disk(str(tmp_path / "equal"))
    out = tmp_path / "out"
    train(tiny_assets, tmp_path / "equal", out, "--adam_weight_decay", 0)
    assert all(m["weight"] == 0 and abs(m["loss"] - np.log(2)) < 1e-6 for m in metrics(out))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora_up(weights) and all(v.abs().max() == 0 for v in lora_up(weights))
    pipe = DiffusionPipeline.from_pretrained(tiny_assets / "tiny-sd")
    pipe.load_lora_weights(out)
    np.testing.assert_array_equal(generate(pipe), base_images(tiny_assets))


def test_v_prediction_model_trains_with_the_authors_inversion_and_data_selection_recorded(tiny_assets,
                                                                                          scored_dataset, tmp_path):
    """A v-prediction model with --inversion_schedule grid_above --drop_human_ties: the LoRA changes the images;
    the tie (row 2) is left out and reported; the schedule, K and the scheduler's steps_offset are in
    metrics.jsonl's context line and the model card."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "vpred"
    train(tiny_assets, scored_dataset, out, "--inversion_schedule", "grid_above", "--num_inversion_steps", 5,
          "--drop_human_ties", model="tiny-sd-vpred")
    pipe = DiffusionPipeline.from_pretrained(tiny_assets / "tiny-sd-vpred")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.load_lora_weights(out)
    assert np.abs(generate(pipe) - base_images(tiny_assets, "tiny-sd-vpred")).max() > 1e-4
    assert all(np.isfinite(m["loss"]) for m in metrics(out))

    context = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["context"]
    assert context["inversion_schedule"] == "grid_above" and context["num_inversion_steps"] == 5
    assert context["steps_offset"] == 1 and context["drop_human_ties"] is True
    dropped = json.loads((out / "train_summary.json").read_text())["dropped_before_training"]
    assert [rows for why, rows in dropped.items() if "human tie" in why] == [[2]]
    assert "schedule `grid_above`, 5 inversion steps" in (out / "README.md").read_text()


def test_full_finetune_resumes_exactly_and_saves_a_pipeline_that_loads_and_differs(tiny_assets, scored_dataset,
                                                                                   tmp_path):
    """A new run given a straight 7-step run's checkpoint-2 (and its metrics.jsonl, whose later lines the resume
    drops) resumes to step 7 (crossing an epoch) == the straight run, 8-bit AdamW state included. (LoRA, and a
    run really interrupted: the killed-save test in test_reliability.py.)"""
    import shutil

    from diffusers import DiffusionPipeline

    extra = ["--train_batch_size", 3, "--checkpointing_steps", 2, "--full_finetune", "--use_8bit_adam"]
    train(tiny_assets, scored_dataset, tmp_path / "straight", *extra, steps=7)
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    shutil.copy(tmp_path / "straight" / "metrics.jsonl", tmp_path / "resumed" / "metrics.jsonl")
    proc = train(tiny_assets, scored_dataset, tmp_path / "resumed", *extra, "--resume_from_checkpoint", "latest",
                 steps=7)
    assert "Resuming from" in proc.stdout + proc.stderr
    assert sorted(d.name for d in (tmp_path / "resumed").glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "resumed")]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "straight")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert np.abs(generate(pipe) - base_images(tiny_assets)).max() > 1e-4
    assert "from_pretrained" in (tmp_path / "straight" / "README.md").read_text()


def test_smpo_without_scores_says_to_run_score_pairs_before_loading_a_model(tiny_assets, tmp_path):
    import train_smpo_diffusion

    from smpo.data import PreferenceDataError

    model = tmp_path / "index-only"  # passes the up-front check (smpo/preflight.py) but holds no model to load
    model.mkdir()
    (model / "model_index.json").write_text((tiny_assets / "tiny-sd" / "model_index.json").read_text())
    args = train_smpo_diffusion.parse_args(["--pretrained_model_name_or_path", str(model),
                                            "--dataset_name", str(tiny_assets / "tiny-pickapic"),
                                            "--output_dir", str(tmp_path / "x")])
    with pytest.raises(PreferenceDataError, match="score_pairs.py") as err:
        train_smpo_diffusion.main(args)
    assert "reward_score_0" in str(err.value)


def test_unet_init_starts_policy_and_reference_from_another_unet(tiny_assets, scored_dataset, tmp_path):
    """--unet_init takes a UNet folder or a pipeline folder (its unet/); the card says how to load."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_assets / "tiny-sd", subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.5)
    unet.save_pretrained(tmp_path / "sft-unet")
    train(tiny_assets, scored_dataset, tmp_path / "other", "--unet_init", tmp_path / "sft-unet", steps=1)
    first = metrics(tmp_path / "other")[0]
    assert first["model_err_w"] == first["ref_err_w"]  # the policy starts where the reference is (LoRA B = 0)
    # which UNet that is: the --unet_init folder's, or a pipeline folder's unet/ (the LoRA reference is this UNet
    # with its adapters off)
    import train_smpo_diffusion

    from smpo.setup import load_unet

    for init, expected in ((tmp_path / "sft-unet", unet), (tiny_assets / "tiny-sd", UNet2DConditionModel.from_pretrained(
            tiny_assets / "tiny-sd", subfolder="unet"))):
        args = train_smpo_diffusion.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "y",
                                                "--unet_init", str(init)])
        loaded = load_unet(args).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.state_dict().items()), init
    assert str(tmp_path / "sft-unet") in (tmp_path / "other" / "README.md").read_text()
