"""End to end: train_smpo_diffusion_sd3.py on tiny SD3 pipelines (with and without T5).

The runs are module-scoped and shared across assertions: each trains a few steps on the CPU, the 8-bit AdamW run
and its resume through `accelerate launch`, the others in this process (main_in_process: the same main, without
a new interpreter's imports, which are most of a tiny run's cost).
"""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from conftest import accelerate_launch, lora_up, main_in_process
from safetensors.torch import load_file

SCRIPT = "train_smpo_diffusion_sd3.py"
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}


def train(assets, dataset, output_dir, *extra, model="tiny-sd3", steps=2, env=None, launch=True):
    """Through `accelerate launch`; without ``launch``, in this process (runs whose launch path the others cover)."""
    argv = ("--pretrained_model_name_or_path", assets / model, "--dataset_name", dataset, "--output_dir", output_dir,
            "--resolution", 32, "--train_batch_size", 2, "--max_train_steps", steps, "--learning_rate", 1e-3,
            "--seed", 0, "--checkpointing_steps", 1000, "--num_inversion_steps", 2, *extra)
    if launch:
        return accelerate_launch(SCRIPT, *argv, env=env)
    return main_in_process(SCRIPT, *argv, env=env)


def pipeline(assets, model):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(assets / model, **(NO_T5 if model.endswith("no-t5") else {}))


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat wearing a hat", num_inference_steps=3, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def metrics(output_dir):
    return [m for m in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m]


@pytest.fixture(scope="module")
def runs(tiny_assets, scored_dataset, tmp_path_factory):
    """LoRA runs: {model: {loss: output folder}} for SD3 with and without T5, smpo+renoise and dpo+forward.
    With T5, smpo: 3 steps, a checkpoint at 2, 8-bit AdamW, gradient checkpointing, cached text embeddings.
    Without T5: smpo with validation images; dpo with cached latents and Adafactor. The first through `accelerate
    launch` (with the resume and error tests: the launch path), the others in this process."""
    root = tmp_path_factory.mktemp("sd3")
    out = {}
    for model in ("tiny-sd3", "tiny-sd3-no-t5"):
        for loss, noise in (("smpo", "renoise"), ("dpo", "forward")):
            folder = root / f"{model}-{loss}"
            extra = ["--loss_type", loss, "--noise_source", noise]
            if model == "tiny-sd3" and loss == "smpo":
                extra += ["--use_8bit_adam", "--gradient_checkpointing", "--cache_text_embeddings",
                          "--checkpointing_steps", 2]
            if model == "tiny-sd3-no-t5" and loss == "dpo":
                extra += ["--cache_latents", "--optimizer", "adafactor"]
            if model == "tiny-sd3-no-t5" and loss == "smpo":
                extra += ["--run_validation", "--validation_steps", 1, "--validation_num_inference_steps", 2,
                          "--validation_prompts", "a cat"]
            launch = model == "tiny-sd3" and loss == "smpo"  # launched; the other three in this process
            train(tiny_assets, scored_dataset, folder, *extra, model=model,
                  steps=3 if "--checkpointing_steps" in extra else 2, launch=launch)
            out.setdefault(model, {})[loss] = folder
    return out


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-sd3-no-t5"])
@pytest.mark.parametrize("loss", ["smpo", "dpo"])
def test_lora_trains_and_loads_into_the_sd3_pipeline_and_changes_its_images(runs, tiny_assets, model, loss):
    out = runs[model][loss]
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in weights)
    assert {k.split(".attn.")[1].rsplit(".lora_", 1)[0] for k in weights} == {
        "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "to_k", "to_out.0", "to_q", "to_v"}
    assert any(v.abs().max() > 0 for v in lora_up(weights))
    pipe = pipeline(tiny_assets, model)
    base = generate(pipe)
    pipe.load_lora_weights(out)
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(weights)  # every saved matrix is in the pipeline (none skipped by the loader)
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key[len("transformer."):].replace(".weight", ".default_0.weight")], value)
    assert np.abs(generate(pipe) - base).max() > 1e-5
    logged = metrics(out)
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["reward_margin"]) for m in logged)
    assert logged[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # LoRA B = 0: the policy starts at the reference
    context = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["context"]
    assert context["process"] == "rectified_flow" and context["shift"] == 3.0 and context["time_scale"] == 1000.0
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline" in card and ("text_encoder_3=None" in card) == model.endswith("no-t5")
    if model == "tiny-sd3-no-t5" and loss == "smpo":
        assert (out / "validation" / "step-1.png").exists() and (out / "validation" / "final-2.png").exists()


def test_zero_t5_embeddings_without_t5_and_t5_tokens_with_it(tiny_assets):
    """The conditioning's tokens: 77 CLIP + --max_sequence_length T5 (zeros without T5, as the SD3 pipeline), and
    the same embeddings as StableDiffusion3Pipeline.encode_prompt."""
    import train_smpo_diffusion_sd3 as sd3

    for model in ("tiny-sd3", "tiny-sd3-no-t5"):
        args = sd3.parse_args(["--pretrained_model_name_or_path", str(tiny_assets / model), "--dataset_name", "x",
                               "--max_sequence_length", "20"])
        conditioning = sd3.SD3Conditioning(args, "cpu", torch.float32)
        embeds, pooled = conditioning.encode_prompts(["a cat", "a bowl of fruit"])
        assert embeds.shape == (2, 77 + 20, 64) and pooled.shape == (2, 64)
        assert (embeds[:, 77:].abs().sum() == 0) == model.endswith("no-t5")
        expected, _, expected_pooled, _ = pipeline(tiny_assets, model).encode_prompt(
            ["a cat", "a bowl of fruit"], None, None, do_classifier_free_guidance=False, max_sequence_length=20)
        torch.testing.assert_close(embeds, expected)
        torch.testing.assert_close(pooled, expected_pooled)


def test_resume_continues_exactly(runs, tiny_assets, scored_dataset, tmp_path):
    """A new run given the 3-step run's checkpoint-2 ends with the same step-3 loss and the same LoRA."""
    straight = runs["tiny-sd3"]["smpo"]
    shutil.copytree(straight / "checkpoint-2", tmp_path / "checkpoint-2")
    shutil.copy(straight / "metrics.jsonl", tmp_path / "metrics.jsonl")
    proc = train(tiny_assets, scored_dataset, tmp_path, "--loss_type", "smpo", "--noise_source", "renoise",
                 "--use_8bit_adam", "--gradient_checkpointing", "--cache_text_embeddings", "--checkpointing_steps", 2,
                 "--resume_from_checkpoint", "latest", steps=3)
    assert "Resuming from" in proc.stdout + proc.stderr
    assert [m["loss"] for m in metrics(tmp_path)] == [m["loss"] for m in metrics(straight)]
    name = "pytorch_lora_weights.safetensors"
    a, b = load_file(straight / name), load_file(tmp_path / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_equal_preferences_do_not_move_the_model(tiny_assets, scored_dataset, tmp_path):
    equal = datasets.load_from_disk(str(scored_dataset)).map(lambda e: {"reward_score_1": e["reward_score_0"]})
    equal.save_to_disk(str(tmp_path / "equal"))
    out = tmp_path / "out"
    train(tiny_assets, tmp_path / "equal", out, "--adam_weight_decay", 0, model="tiny-sd3-no-t5",
          launch=False)
    assert all(m["weight"] == 0 and abs(m["loss"] - np.log(2)) < 1e-6 for m in metrics(out))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora_up(weights) and all(v.abs().max() == 0 for v in lora_up(weights))


def test_full_finetune_saves_a_pipeline_that_loads_and_differs(tiny_assets, scored_dataset, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    train(tiny_assets, scored_dataset, tmp_path, "--full_finetune", "--loss_type", "dpo", steps=1,
          model="tiny-sd3-no-t5", launch=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path, **NO_T5)
    assert np.abs(generate(pipe) - generate(pipeline(tiny_assets, "tiny-sd3-no-t5"))).max() > 1e-5
    assert "A fully fine-tuned transformer" in (tmp_path / "README.md").read_text()


def test_the_wrong_family_or_an_sd_only_schedule_stops_before_training_naming_the_fix(tiny_assets, scored_dataset,
                                                                                     tmp_path):
    """SD into the SD3 script, the reverse, and grid_above (in-process: test_run_checks.py shows such a stop
    through `accelerate launch`)."""
    import train_smpo_diffusion
    import train_smpo_diffusion_sd3

    with pytest.raises(SystemExit, match="use train_smpo_diffusion.py instead"):
        train(tiny_assets, scored_dataset, tmp_path / "a", model="tiny-sd", launch=False)
    common = ["--dataset_name", str(scored_dataset), "--output_dir", str(tmp_path / "b")]
    args = train_smpo_diffusion.parse_args(["--pretrained_model_name_or_path", str(tiny_assets / "tiny-sd3"), *common])
    with pytest.raises(SystemExit, match="use train_smpo_diffusion_sd3.py instead"):
        train_smpo_diffusion.main(args)
    with pytest.raises(SystemExit, match="use --inversion_schedule exact"):
        train_smpo_diffusion_sd3.parse_args(["--pretrained_model_name_or_path", str(tiny_assets / "tiny-sd3"),
                                             "--inversion_schedule", "grid_above", *common])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_nan_loss_skips_its_update_as_in_the_sd_scripts(tiny_assets, scored_dataset, tmp_path, caplog):
    train(tiny_assets, scored_dataset, tmp_path, "--loss_type", "dpo", model="tiny-sd3-no-t5",
          env={"SMPO_TEST_NAN_LOSS_AT_STEPS": "1"}, launch=False)
    assert "non-finite loss" in caplog.text
    assert [m["skipped_update"] for m in metrics(tmp_path)] == [1, 0]


# docs/flow.md, "Another flow family": a copy of this script with its own conditioning class
NEW_FAMILY = '''

class NewFlowConditioning(SD3Conditioning):
    """A stand-in for another flow family: its own LoRA targets, a transformer told sigma in [0, 1] and called
    through the family's own predict (SD3's text encoders, for the tiny SD3 pipeline)."""

    lora_target_modules = ("attn.to_q", "attn.to_v")

    @staticmethod
    def load_process(args):
        from smpo.processes import RectifiedFlow

        return RectifiedFlow.from_pipeline(args, time_scale=1.0)

    def predict(self, model, noisy, model_t, cond):
        assert float(model_t.max()) <= 1.0, "told sigma * 1000: the swapped load_process was not used"
        print("NewFlowConditioning.predict", flush=True)
        return model(hidden_states=noisy, timestep=model_t, return_dict=False, **cond)[0]
'''


def test_a_copied_flow_script_trains_with_its_own_conditioning_class(tiny_assets, scored_dataset, tmp_path):
    """Adding a flow family = a copy of a flow script whose conditioning class is swapped; the shared code runs it
    (LoRA targets, process, predict all the class's own), through accelerate launch."""
    from conftest import ROOT

    source = open(f"{ROOT}/{SCRIPT}", encoding="utf-8").read()
    call = "training.train(args, SD3Conditioning,"
    assert source.count(call) == 1 and source.count("\n\ndef parse_args") == 1
    copy = tmp_path / "train_smpo_new_family.py"
    copy.write_text(source.replace("\n\ndef parse_args", NEW_FAMILY + "\n\ndef parse_args")
                    .replace(call, "training.train(args, NewFlowConditioning,"))
    out = tmp_path / "out"
    proc = accelerate_launch(copy, "--pretrained_model_name_or_path", tiny_assets / "tiny-sd3-no-t5",
                             "--dataset_name", scored_dataset, "--output_dir", out, "--resolution", 32,
                             "--train_batch_size", 2, "--max_train_steps", 2, "--learning_rate", 1e-3, "--seed", 0,
                             "--num_inversion_steps", 2, cwd=tmp_path)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".attn.")[1].rsplit(".lora_", 1)[0] for k in weights} == {"to_q", "to_v"}
    assert any(v.abs().max() > 0 for v in lora_up(weights))
    context = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["context"]
    assert context["process"] == "rectified_flow" and context["time_scale"] == 1.0
    # the policy, the reference and the ReNoise inversion all called the family's predict (2 steps)
    assert proc.stdout.count("NewFlowConditioning.predict") > 2 * 2
    logged = metrics(out)
    assert len(logged) == 2 and all(np.isfinite(m["loss"]) for m in logged)
    assert logged[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and logged[1]["loss"] != logged[0]["loss"]


def test_flow_probe_inverts_posterior_samples_as_the_training_step_encodes(tiny_assets, scored_dataset):
    """benchmarks/flow_probe.py inverts the latents training inverts: VAE posterior samples, not the posterior means.
    (The flow inversion amplifies the posterior's noise: on the toy flow base the means' derived noise understates the
    training step's by about half, docs/flow/posterior_noise.json.)"""
    import os
    import random
    import sys

    from conftest import ROOT

    from smpo.data import PairTransform, load_preference_dataset, open_image

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import flow_probe
    import inversion_probe

    args = inversion_probe.parse_args(["--pretrained_model_name_or_path", str(tiny_assets / "tiny-sd3-no-t5"),
                                       "--dataset_name", str(scored_dataset), "--num_latents", "3",
                                       "--max_sequence_length", "16", "--output_dir", "unused"])
    _, latents, _ = flow_probe.load_flow(args)
    vae = pipeline(tiny_assets, "tiny-sd3-no-t5").vae
    dataset = load_preference_dataset(str(scored_dataset), "train")
    transform = PairTransform(32, random_crop=False, hflip=False)
    pixels = torch.stack([transform([open_image(dataset[i]["jpg_0"])], random)[0][0] for i in range(3)])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    mean = (posterior.mean - vae.config.shift_factor) * vae.config.scaling_factor
    standardised = (latents - mean) / (posterior.std * vae.config.scaling_factor)
    assert abs(standardised.mean().item()) < 0.1 and abs(standardised.std().item() - 1) < 0.1
