"""What every script checks before heavy work (smpo/preflight.py), what a run prints, what trackers receive."""

import importlib.util
import json
import os
import sys

import pytest
from conftest import ROOT, accelerate_launch, run_script

SCRIPTS = ("train_smpo_diffusion.py", "train_smpo_diffusion_sdxl.py", "train_smpo_diffusion_sd3.py",
           "train_smpo_diffusion_flux.py", "evaluate.py", "generate_pairs.py", "score_pairs.py")
# The notices every run printed before smpo/notices.py and smpo.setup.place (issue 17).
LIBRARY_NOTICES = ("requires torchvision (not installed); falling back to", "gemm_4bit_forward from kernels-community",
                   "should be kept in float32")


def run(script, *args, env=None):
    """The script in a plain Python process; returns the CompletedProcess, whatever its exit status."""
    return run_script([sys.executable, os.path.join(ROOT, script), *map(str, args)], check=False, env=env)


def assert_stopped_with(proc, *sentences):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    for sentence in sentences:
        assert sentence in proc.stderr, proc.stderr[-3000:]
    # no traceback but `accelerate launch`'s own, which reports that the script failed
    tracebacks = proc.stderr.split("Traceback (most recent call last)")[1:]
    assert all("simple_launcher" in t for t in tracebacks), proc.stderr[-3000:]


def run_and_list_heavy_imports(script, *args):
    """The script run in-process on ``args`` until it exits (its exit message on stderr); its stdout ends with
    'HEAVY [...]', the heavy packages it had imported by then."""
    code = ("import runpy, sys\nsys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    print(e, file=sys.stderr)\n"
            "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'transformers', 'peft', "
            "'bitsandbytes'}))")
    return run_script([sys.executable, "-c", code, os.path.join(ROOT, script), *map(str, args)])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_neither_diffusers_nor_transformers(script):
    proc = run_and_list_heavy_imports(script, "--help")
    assert "--output_dir" in proc.stdout  # the help was printed
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_missing_model_is_named_before_the_heavy_imports(script, tmp_path):
    """The up-front check answers in about --help's time (issue 17): evaluate.py imported diffusers.training_utils
    (and with it torch._dynamo, peft, bitsandbytes) before its check, 5.9 s against --help's 1.4 s."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from startup_time import missing_model_args  # the arguments benchmarks/startup_time.py times

    (tmp_path / "prompts.txt").write_text("a photo of a cat\n", encoding="utf-8")
    proc = run_and_list_heavy_imports(script, *missing_model_args(script, str(tmp_path)))
    assert f"'{tmp_path / 'no-such-model'}': no such folder." in proc.stderr, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_training_names_every_missing_thing_before_making_its_output_folder(tiny_assets, scored_dataset, tmp_path):
    out = tmp_path / "out"
    proc = run("train_smpo_diffusion.py", "--pretrained_model_name_or_path", tmp_path / "no-such-model",
               "--dataset_name", tmp_path / "no-such-data", "--unet_init", tiny_assets / "tiny-reward",
               "--report_to", "wandb", "--resume_from_checkpoint", "checkpoint-9", "--output_dir", out)
    assert_stopped_with(proc, f"--pretrained_model_name_or_path '{tmp_path / 'no-such-model'}': no such folder.",
                        f"--dataset_name {tmp_path / 'no-such-data'}: no such file or folder.",
                        "--resume_from_checkpoint checkpoint-9: no such folder.",
                        "--report_to wandb needs the wandb package, which is not installed: pip install wandb.")
    assert "--unet_init" not in proc.stderr  # tiny-reward has a config.json: a model folder, found
    assert not out.exists()

    # a hub id, offline, with nothing in the cache
    proc = run("train_smpo_diffusion_sdxl.py", "--pretrained_model_name_or_path", "someone/no-such-model",
               "--pretrained_vae_model_name_or_path", tiny_assets / "tiny-sd", "--dataset_name", scored_dataset,
               "--output_dir", out, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert_stopped_with(proc, "--pretrained_model_name_or_path 'someone/no-such-model': not in the local Hugging "
                              "Face cache and HF_HUB_OFFLINE is set",
                        f"--pretrained_vae_model_name_or_path '{tiny_assets / 'tiny-sd'}': the folder has no "
                        "config.json.")
    assert not out.exists()


def test_a_missing_tracker_package_stops_a_run_that_would_otherwise_train(tiny_assets, scored_dataset, tmp_path):
    """accelerate drops a tracker it cannot import (at DEBUG level) and trains on: wandb is not installed here."""
    assert importlib.util.find_spec("wandb") is None
    out = tmp_path / "out"
    proc = accelerate_launch("train_smpo_diffusion.py", "--pretrained_model_name_or_path", tiny_assets / "tiny-sd",
                             "--dataset_name", scored_dataset, "--output_dir", out, "--resolution", 32,
                             "--max_train_steps", 1, "--report_to", "wandb", check=False)
    assert_stopped_with(proc, "--report_to wandb needs the wandb package, which is not installed: pip install wandb.")
    assert not out.exists()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_the_cpu_is_refused_before_models_load(tiny_assets, scored_dataset, tmp_path, precision):
    out = tmp_path / "out"
    proc = accelerate_launch("train_smpo_diffusion.py", "--pretrained_model_name_or_path", tiny_assets / "tiny-sd",
                             "--dataset_name", scored_dataset, "--output_dir", out, "--resolution", 32,
                             "--max_train_steps", 1, "--mixed_precision", precision, check=False)
    assert_stopped_with(proc, f"--mixed_precision {precision} needs a GPU: on the CPU train in fp32")
    assert not out.exists()


def test_sampling_scripts_name_a_missing_model_before_generating_anything(tiny_assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    out = tmp_path / "out"
    # evaluate.py: the reward model is found missing before any image is generated (it used to be after)
    proc = run("evaluate.py", "--pretrained_model_name_or_path", tiny_assets / "tiny-sd", "--lora_weights",
               tmp_path / "no-lora", "--prompts_file", prompts, "--reward_model_name_or_path", tmp_path / "no-reward",
               "--device", "cpu", "--output_dir", out)
    assert_stopped_with(proc, f"--lora_weights '{tmp_path / 'no-lora'}': no such folder.",
                        f"cannot load the reward model '{tmp_path / 'no-reward'}': no such folder.")
    assert not out.exists()

    proc = run("generate_pairs.py", "--pretrained_model_name_or_path", tiny_assets / "tiny-sd", "--unet_init",
               tmp_path, "--prompts_file", tmp_path / "none.txt", "--reward_model_name_or_path",
               tiny_assets / "tiny-reward", "--device", "cpu", "--output_dir", out)
    assert_stopped_with(proc, f"--unet_init '{tmp_path}': the folder has no config.json or unet/config.json.",
                        f"cannot read the prompts file {tmp_path / 'none.txt'}: no such file.")
    assert not out.exists()

    proc = run("score_pairs.py", "--dataset_name", tmp_path / "no-data", "--reward_model_name_or_path",
               tiny_assets / "tiny-reward", "--reward_processor_name_or_path", tiny_assets / "tiny-sd",
               "--device", "cpu", "--output_dir", out)
    assert_stopped_with(proc, f"--dataset_name {tmp_path / 'no-data'}: no such file or folder.",
                        f"cannot load the reward processor (of reward model '{tiny_assets / 'tiny-reward'}'; set "
                        f"--reward_processor_name_or_path) '{tiny_assets / 'tiny-sd'}': the folder has no")
    assert not out.exists()


def test_tensorboard_gets_the_loss_and_smpo_metrics_and_the_run_prints_no_library_notices(tiny_assets,
                                                                                          scored_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    proc = accelerate_launch("train_smpo_diffusion.py", "--pretrained_model_name_or_path", tiny_assets / "tiny-sd",
                             "--dataset_name", scored_dataset, "--output_dir", out, "--resolution", 32,
                             "--train_batch_size", 2, "--max_train_steps", 2, "--learning_rate", 1e-3, "--seed", 0,
                             "--report_to", "tensorboard")
    for notice in LIBRARY_NOTICES:
        assert notice not in proc.stderr, proc.stderr[-3000:]

    events = EventAccumulator(str(out / "logs" / "smpo-diffusion"))
    events.Reload()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    for name in ("loss", "implicit_acc", "reward_margin", "weight"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([m[name] for m in logged], rel=1e-6)
