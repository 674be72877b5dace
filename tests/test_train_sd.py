"""End to end: train_smpo_diffusion.py on the tiny assets (CPU): the first run through `accelerate launch`, the
others in this process (the same main; test_reliability.py launches more)."""

import json

import datasets
import numpy as np
import pytest
import torch
from conftest import accelerate_launch, index_only_model, lora_up, main_in_process
from safetensors.torch import load_file

SCRIPT = "train_smpo_diffusion.py"


def train(assets, dataset, output_dir, *extra, model="tiny-sd", steps=2, launch=False):
    """A run in this process; with ``launch``, through `accelerate launch` (the first test's run: the launch path)."""
    return (accelerate_launch if launch else main_in_process)(
        SCRIPT, "--pretrained_model_name_or_path", assets / model, "--dataset_name", dataset,
        "--output_dir", output_dir, "--resolution", 32, "--train_batch_size", 2, "--max_train_steps", steps,
        "--learning_rate", 1e-3, "--seed", 0, "--checkpointing_steps", 1000, *extra)


def generate(pipe, prompt="a red circle on grey"):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, generator=generator, output_type="np").images


def base_images(assets, model="tiny-sd"):
    from diffusers import DiffusionPipeline

    return generate(DiffusionPipeline.from_pretrained(assets / model))


def metrics(output_dir):
    return [m for m in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m]


def optimizer_states(checkpoint):
    """The per-parameter states of a checkpoint's optimizer.bin (bitsandbytes nests its quantised ones)."""
    states = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)["state"].values()
    return [s.get("__bnb_optimizer_quant_state__", s) for s in states]


def test_lora_smpo_run_saves_weights_that_load_and_change_images(tiny_assets, scored_dataset, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "lora"
    # rank 64: the 64x64 projections' LoRA matrices reach bitsandbytes' min_8bit_size (4096 elements, below
    # which it keeps 32-bit state), the 64x32 cross-attention inputs stay under it
    train(tiny_assets, scored_dataset, out, "--use_8bit_adam", "--gradient_checkpointing", "--rank", 64,
          "--checkpointing_steps", 3, steps=3, launch=True)
    states = optimizer_states(out / "checkpoint-3")
    assert {s["state1"].numel() >= 4096 for s in states} == {True, False}
    for s in states:
        dtype = torch.uint8 if s["state1"].numel() >= 4096 else torch.float32
        assert s["state1"].dtype == s["state2"].dtype == dtype, s["state1"].shape
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
    # UNet work (smpo.cost), counted by hand: per image 3 (policy forward + backward; gradient checkpointing
    # recomputes inside the UNet's blocks, not another UNet call) + 1 (reference) + K = 10 exact inversion steps
    # of R + 1 = 2 no-grad forwards (every t drawn here is >= 10, so each sample takes all K steps)
    assert [m["unet_work"] for m in logged] == [2 * len(m["rows"]) * (3 + 1 + 10 * 2) for m in logged]
    assert [m["unet_work_total"] for m in logged] == list(np.cumsum([m["unet_work"] for m in logged]))
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


def test_dpo_unet_work_is_counted_over_accumulated_micro_batches(tiny_assets, scored_dataset, tmp_path):
    """Diffusion-DPO with forward noise, 2 micro-batches of 2 pairs per step: each pair's 2 images cost 3 units
    (policy forward + backward) + 1 (reference forward) = 8 per pair, 32 per step."""
    out = tmp_path / "dpo"
    train(tiny_assets, scored_dataset, out, "--loss_type", "dpo", "--gradient_accumulation_steps", 2)
    logged = metrics(out)
    assert [len(m["rows"]) for m in logged] == [4, 4]
    assert [(m["unet_work"], m["unet_work_total"]) for m in logged] == [(32, 32), (32, 64)]


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
                                                                                   tmp_path, capsys):
    """A new run given a straight 7-step run's checkpoint-2 (and its metrics.jsonl, whose later lines the resume
    drops) resumes to step 7 (crossing an epoch) == the straight run, 8-bit AdamW state included. (LoRA, and a
    run really interrupted: the killed-save test in test_reliability.py.)"""
    import shutil

    from diffusers import DiffusionPipeline

    extra = ["--train_batch_size", 3, "--checkpointing_steps", 2, "--full_finetune", "--use_8bit_adam"]
    train(tiny_assets, scored_dataset, tmp_path / "straight", *extra, steps=7)
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    shutil.copy(tmp_path / "straight" / "metrics.jsonl", tmp_path / "resumed" / "metrics.jsonl")
    capsys.readouterr()
    train(tiny_assets, scored_dataset, tmp_path / "resumed", *extra, "--resume_from_checkpoint", "latest", steps=7)
    assert "Resuming from" in capsys.readouterr().out
    assert sorted(d.name for d in (tmp_path / "resumed").glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6)]
    # the counted UNet work (a second, frozen reference UNet here) continues from the checkpoint's total
    work = [[(m["unet_work"], m["unet_work_total"]) for m in metrics(tmp_path / run)] for run in ("straight", "resumed")]
    assert work[0] == work[1] and all(w > 0 for w, _ in work[0])
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

    model = index_only_model(tiny_assets, tmp_path / "index-only")
    args = train_smpo_diffusion.parse_args(["--pretrained_model_name_or_path", str(model),
                                            "--dataset_name", str(tiny_assets / "tiny-pickapic"),
                                            "--output_dir", str(tmp_path / "x")])
    with pytest.raises(PreferenceDataError, match="score_pairs.py") as err:
        train_smpo_diffusion.main(args)
    assert "reward_score_0" in str(err.value)


def scaled_unet(assets, factor=1.5):
    """tiny-sd's UNet with every weight multiplied by ``factor``: a UNet that predicts differently."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets / "tiny-sd", subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(factor)
    return unet


def assert_same_unet(loaded, expected, where):
    assert loaded.config.sample_size == expected.config.sample_size, where
    weights = loaded.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in expected.state_dict().items()), where


def test_unet_init_starts_policy_and_reference_from_another_unet(tiny_assets, scored_dataset, tmp_path):
    """--unet_init takes a UNet folder or a pipeline folder (its unet/); the card says how to load."""
    scaled_unet(tiny_assets).save_pretrained(tmp_path / "sft-unet")
    train(tiny_assets, scored_dataset, tmp_path / "other", "--unet_init", tmp_path / "sft-unet", steps=1)
    train(tiny_assets, scored_dataset, tmp_path / "base", steps=1)  # the same run on the base UNet
    first, base = metrics(tmp_path / "other")[0], metrics(tmp_path / "base")[0]
    assert first["model_err_w"] == first["ref_err_w"]  # the policy starts where the reference is (LoRA B = 0)
    # ... and that is the --unet_init UNet, not the base pipeline's: same data, seed and noise, other errors
    assert abs(first["ref_err_w"] - base["ref_err_w"]) > 1e-3 * base["ref_err_w"]
    assert abs(first["ref_err_l"] - base["ref_err_l"]) > 1e-3 * base["ref_err_l"]
    # which UNet that is: the --unet_init folder's, or a pipeline folder's unet/
    import train_smpo_diffusion

    from smpo.setup import load_unet

    for init, expected in ((tmp_path / "sft-unet", scaled_unet(tiny_assets)), (tiny_assets / "tiny-sd", scaled_unet(
            tiny_assets, 1.0))):
        args = train_smpo_diffusion.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "y",
                                                "--unet_init", str(init)])
        assert_same_unet(load_unet(args), expected, init)
    assert str(tmp_path / "sft-unet") in (tmp_path / "other" / "README.md").read_text()


def test_unet_init_folder_with_a_root_config_and_a_unet_subfolder_is_read_alike_everywhere(tiny_assets, tmp_path):
    """Training (smpo.setup.load_unet) and sampling (evaluate.py / generate_pairs.py through
    smpo.sampling.load_pipeline) take the same UNet from such a folder: the one whose config is at its root."""
    from types import SimpleNamespace

    import train_smpo_diffusion

    from smpo.sampling import load_pipeline
    from smpo.setup import load_unet

    both = tmp_path / "both"
    root_unet = scaled_unet(tiny_assets)
    root_unet.save_pretrained(both)
    other = scaled_unet(tiny_assets, 0.5)
    other.register_to_config(sample_size=8)  # (diffusers reads the root's weights even with subfolder="unet")
    other.save_pretrained(both / "unet")
    args = train_smpo_diffusion.parse_args(["--pretrained_model_name_or_path", str(tiny_assets / "tiny-sd"),
                                            "--dataset_name", "y", "--unet_init", str(both)])
    assert_same_unet(load_unet(args), root_unet, "training")
    sampling_args = SimpleNamespace(mixed_precision="no", pretrained_vae_model_name_or_path=None, cache_dir=None,
                                    disable_safety_checker=True, unet_init=str(both), revision=None, variant=None,
                                    device="cpu")
    assert_same_unet(load_pipeline(tiny_assets / "tiny-sd", sampling_args).unet, root_unet, "sampling")
