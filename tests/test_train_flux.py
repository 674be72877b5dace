"""End to end: train_smpo_diffusion_flux.py on the tiny FLUX pipeline (CPU).

The runs are shared by the tests of this module (module-scoped fixtures), each a few steps: smpo_run's two
through `accelerate launch`, the others in this process (main_in_process)."""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from conftest import accelerate_launch, lora_up, main_in_process
from safetensors.torch import load_file

SCRIPT = "train_smpo_diffusion_flux.py"


def train(assets, dataset, output_dir, *extra, steps=2, launch=False):
    """A run in this process; with ``launch``, through `accelerate launch` (smpo_run's runs: the launch path)."""
    return (accelerate_launch if launch else main_in_process)(
        SCRIPT, "--pretrained_model_name_or_path", assets / "tiny-flux", "--dataset_name", dataset,
        "--output_dir", output_dir, "--resolution", 32, "--train_batch_size", 2, "--max_train_steps", steps,
        "--learning_rate", 1e-3, "--seed", 0, "--max_sequence_length", 16, "--checkpointing_steps", 1000, *extra)


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat wearing a hat", num_inference_steps=3, height=32, width=32, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def base_images(assets):
    from diffusers import FluxPipeline

    return generate(FluxPipeline.from_pretrained(assets / "tiny-flux"))


def metrics(output_dir):
    return [m for m in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m]


def lora_images(assets, output_dir):
    """The tiny FLUX pipeline's images with the LoRA of ``output_dir`` loaded, after checking that every saved
    matrix is in its transformer with the saved values (none skipped by the loader)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(assets / "tiny-flux")
    pipe.load_lora_weights(output_dir)
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(weights)
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key[len("transformer."):].replace(".weight", ".default_0.weight")], value)
    return generate(pipe)


@pytest.fixture(scope="module")
def smpo_run(tiny_assets, scored_dataset, tmp_path_factory):
    """SmPO (renoise) LoRA, 3 steps with checkpoint-2, cached T5 embeddings, 8-bit AdamW, gradient checkpointing;
    then a second run resumed from that checkpoint-2 to step 3."""
    root = tmp_path_factory.mktemp("flux-smpo")
    extra = ["--loss_type", "smpo", "--noise_source", "renoise", "--num_inversion_steps", 2, "--use_8bit_adam",
             "--gradient_checkpointing", "--cache_text_embeddings", "--checkpointing_steps", 2]
    train(tiny_assets, scored_dataset, root / "straight", *extra, steps=3, launch=True)
    shutil.copytree(root / "straight" / "checkpoint-2", root / "resumed" / "checkpoint-2")
    shutil.copy(root / "straight" / "metrics.jsonl", root / "resumed" / "metrics.jsonl")
    resumed = train(tiny_assets, scored_dataset, root / "resumed", *extra, "--resume_from_checkpoint", "latest",
                    steps=3, launch=True)
    return root, resumed


def test_smpo_renoise_lora_loads_into_flux_pipeline_and_changes_its_images(tiny_assets, smpo_run):
    root, _ = smpo_run
    out = root / "straight"
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("transformer.") for k in weights)
    assert any(".ff.net.2." in k for k in weights) and any(".attn.add_q_proj." in k for k in weights)
    assert any(v.abs().max() > 0 for v in lora_up(weights))
    assert np.abs(lora_images(tiny_assets, out) - base_images(tiny_assets)).max() > 1e-4
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in logged)
    assert all(0 < m["noise_std_w"] for m in logged)
    card = (out / "README.md").read_text()
    assert "FluxPipeline" in card and "load_lora_weights" in card and "--guidance_scale" in card


def test_resume_continues_exactly(smpo_run):
    root, resumed = smpo_run
    assert "Resuming from" in resumed.stdout + resumed.stderr
    name = "pytorch_lora_weights.safetensors"
    a, b = load_file(root / "straight" / name), load_file(root / "resumed" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(root / "straight")] == [m["loss"] for m in metrics(root / "resumed")]


def test_dpo_forward_lora_with_cached_latents_adafactor_and_lora_layers_changes_images(tiny_assets, scored_dataset,
                                                                                       tmp_path):
    out = tmp_path / "dpo"
    train(tiny_assets, scored_dataset, out, "--loss_type", "dpo", "--cache_latents", "--optimizer", "adafactor",
          "--guidance_scale", 3.5, "--lora_layers", "attn.to_q,ff.net.2", "--rank", 4)
    context = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["context"]
    assert context["noise_source"] == "forward" and context["time_scale"] == 1.0 and context["shift"] == 1.0
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".lora_")[0].split(".", 3)[-1] for k in weights} == {"attn.to_q", "ff.net.2"}
    assert {min(v.shape) for v in weights.values()} == {4}
    assert np.abs(lora_images(tiny_assets, out) - base_images(tiny_assets)).max() > 1e-4


def test_equal_preferences_do_not_move_the_model(tiny_assets, scored_dataset, tmp_path):
    equal = datasets.load_from_disk(str(scored_dataset)).map(lambda e: {"reward_score_1": e["reward_score_0"]})
    equal.save_to_disk(str(tmp_path / "equal"))
    out = tmp_path / "out"
    train(tiny_assets, tmp_path / "equal", out, "--adam_weight_decay", 0, "--num_inversion_steps", 1, steps=1)
    assert all(m["weight"] == 0 and abs(m["loss"] - np.log(2)) < 1e-6 for m in metrics(out))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora_up(weights) and all(v.abs().max() == 0 for v in lora_up(weights))
    np.testing.assert_array_equal(lora_images(tiny_assets, out), base_images(tiny_assets))


def test_full_finetune_saves_a_flux_pipeline_that_loads_and_differs(tiny_assets, scored_dataset, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "full"
    train(tiny_assets, scored_dataset, out, "--full_finetune", "--loss_type", "dpo", steps=1)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "FluxPipeline"
    assert np.abs(generate(pipe) - base_images(tiny_assets)).max() > 1e-4


def flux_without_t5(assets, folder):
    shutil.copytree(assets / "tiny-flux", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = index["tokenizer_2"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_2")
    return folder


@pytest.mark.parametrize("case", ["sd", "sd3", "no_t5", "resolution"])
def test_bad_model_or_resolution_stops_before_training_with_the_fix(case, tiny_assets, scored_dataset, tmp_path):
    import train_smpo_diffusion_flux as flux

    model = {"sd": tiny_assets / "tiny-sd", "sd3": tiny_assets / "tiny-sd3", "no_t5": tmp_path / "no-t5",
             "resolution": tiny_assets / "tiny-flux"}[case]
    if case == "no_t5":
        flux_without_t5(tiny_assets, model)
    resolution = "30" if case == "resolution" else "32"
    args = flux.parse_args(["--pretrained_model_name_or_path", str(model), "--dataset_name", str(scored_dataset),
                            "--output_dir", str(tmp_path / "out"), "--resolution", resolution])
    with pytest.raises(SystemExit) as stop:
        flux.main(args)
    message = str(stop.value)
    want = {"sd": "train_smpo_diffusion.py", "sd3": "train_smpo_diffusion_sd3.py", "no_t5": "text_encoder_2",
            "resolution": "use 28 or 32"}[case]
    assert want in message and message.count(". ") == 0, message
    assert not (tmp_path / "out").exists()  # nothing ran


def test_docs_24gb_command_parses_with_lora_bf16_8bit_adam_cached_t5_and_checkpointing():
    """docs/flux.md's command runs this script's flags as a 24 GB GPU needs them (its memory is computed there)."""
    import os
    import re
    import shlex

    from conftest import ROOT

    import train_smpo_diffusion_flux as flux

    text = open(os.path.join(ROOT, "docs", "flux.md"), encoding="utf-8").read()
    command = next(b for b in re.findall(r"```bash\n(.*?)\n```", text, flags=re.S) if SCRIPT in b)
    words = shlex.split(command.replace("\\\n", " "))
    args = flux.parse_args(words[words.index(SCRIPT) + 1:])
    assert not args.full_finetune and args.mixed_precision == "bf16" and args.use_8bit_adam
    assert args.cache_text_embeddings and args.gradient_checkpointing and args.resolution % 16 == 0
    assert args.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert f"`--beta_dpo {flux.BETA_DPO}`" in text and args.beta_dpo == flux.BETA_DPO  # the default the docs state


def test_default_beta_is_the_epsilon_beta_converted_on_unshifted_sigmas_and_help_says_so(capsys):
    from smpo.processes import RectifiedFlow, converted_beta, flow_sigmas

    import train_smpo_diffusion_flux as flux

    assert flux.BETA_DPO == round(converted_beta(2000.0, RectifiedFlow(flow_sigmas(1.0))))
    with pytest.raises(SystemExit):
        flux.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"Default {flux.BETA_DPO}: computed, not measured" in help_text
    assert "The policy, the reference and the ReNoise inversion all use this one value" in help_text


def test_every_transformer_call_gets_packed_latents_sigma_and_the_one_guidance_value(tiny_assets, scored_dataset):
    """Policy, reference and each ReNoise inversion call: 2x2-packed tokens (16 channels x 4), the timestep = the
    pair's sigma in (0, 1] (inversion: the grid up to it), and --guidance_scale for every row."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    import train_smpo_diffusion_flux as flux
    from smpo.data import PairDataset, PairTransform, PreferenceCollator
    from smpo.noise_sources import NOISE_SOURCES
    from smpo.objectives import OBJECTIVES
    from smpo.step import Models, make_reference, training_step

    args = flux.parse_args(["--pretrained_model_name_or_path", str(tiny_assets / "tiny-flux"), "--dataset_name",
                            str(scored_dataset), "--resolution", "32", "--num_inversion_steps", "3",
                            "--guidance_scale", "3.5", "--max_sequence_length", "16"])
    conditioning = flux.FluxConditioning(args, "cpu", torch.float32)
    collator = PreferenceCollator(PairTransform(32, random_crop=False, hflip=False), "smpo",
                                  temperature=args.preference_temperature, gamma=args.smoothing_gamma)
    pairs = PairDataset(datasets.load_from_disk(str(scored_dataset)), [0, 1])
    batch = collator([pairs[0], pairs[1]])
    transformer = FluxTransformer2DModel.from_pretrained(tiny_assets / "tiny-flux", subfolder="transformer")
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.append({k: kw[k].clone() for k in (
        "hidden_states", "timestep", "guidance")}), with_kwargs=True)
    vae = AutoencoderKL.from_pretrained(tiny_assets / "tiny-flux", subfolder="vae")
    models = Models(transformer, make_reference(transformer, transformer, conditioning), vae, conditioning,
                    flux.FluxConditioning.load_process(args))
    loss, _ = training_step(args, batch, models, torch.Generator().manual_seed(0), OBJECTIVES["smpo"],
                            NOISE_SOURCES["renoise"])
    assert torch.isfinite(loss) and len(seen) >= 2 * 3 + 2  # K = 3 steps x (1 + R = 1) calls, policy, reference
    for call in seen:
        n = len(call["timestep"])
        assert call["hidden_states"].shape == (n, (32 // 2 // 2) ** 2, 16 * 4)
        assert ((call["timestep"] > 0) & (call["timestep"] <= 1)).all()
        torch.testing.assert_close(call["guidance"], torch.full((n,), 3.5))
    torch.testing.assert_close(seen[-1]["timestep"], seen[-2]["timestep"])  # policy and reference at the pair's s
