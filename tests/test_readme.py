"""The README's two opening commands: CI runs the second verbatim; the first (the quick start) works."""

import json
import os
import re
import sys

import pytest
from conftest import ROOT, lora_up, run_script


def readme_commands(*docs):
    """The ```bash blocks of README.md, then of the given docs/ files."""
    found = []
    for name in ("README.md", *(os.path.join("docs", d) for d in docs)):
        text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        found += re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    return found


def test_readme_is_short_and_links_the_docs():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 240
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert os.path.exists(os.path.join(ROOT, link)), link


def test_ci_runs_the_readme_test_command_verbatim():
    install_and_test = readme_commands()[1]
    assert "pytest tests" in install_and_test
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert install_and_test in ci


def launch_words(shell_script):
    """The words after `accelerate launch` in a shell script of the repository (its `"$@"` left out)."""
    import shlex

    text = open(os.path.join(ROOT, shell_script), encoding="utf-8").read()
    return shlex.split(text.split("accelerate launch", 1)[1].replace("\\\n", " ").replace('"$@"', ""), comments=True)


def script_commands(*docs):
    """(script, its arguments) of each command in the README's (and the given docs') bash blocks that runs one of
    this repository's top-level Python scripts, or a shell script of examples/ (its launch line's flags, then the
    command's own, which override them)."""
    import shlex

    found = []
    for block in readme_commands(*docs):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) > 1 and words[0] == "bash" and words[1].startswith("examples/") and words[1].endswith(".sh"):
                words = launch_words(words[1]) + words[2:]
            script = next((w for w in words if w.endswith(".py") and "/" not in w), None)
            if script is not None and "..." not in words:  # `script.py ...`: "the same flags", not a command
                found.append((script, words[words.index(script) + 1:]))
    return found


def test_readme_and_flow_doc_commands_use_flags_their_scripts_have(capsys):
    """Each command's flags are options in its script's --help, written out in full, and parse (hub ids are not
    looked up: parsing loads nothing)."""
    commands = script_commands("flow.md", "flux.md", "generate_pairs.md")
    scripts = {script for script, _ in commands}
    assert {"train_smpo_diffusion_sd3.py", "train_smpo_diffusion_flux.py", "train_smpo_diffusion_sdxl.py",
            "generate_pairs.py", "evaluate.py", "score_pairs.py"} <= scripts
    for script, argv in commands:
        module = __import__(script[:-3])
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        options = set(re.findall(r"^\s+(--[\w-]+)", capsys.readouterr().out, flags=re.M))
        flags = {w.split("=", 1)[0] for w in argv if w.startswith("--")}
        assert flags <= options, (script, flags - options)
        module.parse_args(argv)


@pytest.fixture(scope="module")
def quickstart_dir(tmp_path_factory, tiny_assets, scored_dataset):
    """A work folder laid out like the repository root after the quick start ran (on the session's assets:
    the quick start skips building and scoring what is already there)."""
    import shutil

    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(tiny_assets, work / "smpo-quickstart" / "assets")
    shutil.copytree(scored_dataset, work / "smpo-quickstart" / "pairs-scored")
    run_script(["bash", os.path.join(ROOT, "examples", "quickstart.sh"), str(work / "smpo-quickstart")])
    return work


def test_quickstart_script_runs_and_writes_a_lora_and_images(quickstart_dir):
    assert readme_commands()[0].endswith("python examples/toy_alignment.py --quick")  # tests/test_toy_alignment.py
    assert 'PATH="$PWD/.venv/bin:$PATH" bash examples/quickstart.sh' in readme_commands()
    out = quickstart_dir / "smpo-quickstart"
    for name in ("smpo-lora/pytorch_lora_weights.safetensors", "smpo-lora/README.md", "smpo-lora/metrics.jsonl",
                 "sample.png", "sample-base.png"):
        assert (out / name).exists(), name
    assert len((out / "smpo-lora" / "metrics.jsonl").read_text().splitlines()) == 1 + 8  # the context, then 8 steps
    assert_lora_trained_and_changes_the_image(out / "smpo-lora", out / "sample.png", out / "sample-base.png")


def assert_lora_trained_and_changes_the_image(lora, sample, base_sample):
    """The LoRA's zero-initialised up (B) matrices moved, and its image (inference_lora.py) differs from the base
    pipeline's for the same seed."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    up = lora_up(load_file(lora / "pytorch_lora_weights.safetensors"))
    assert up and any(v.abs().max() > 0 for v in up)
    with Image.open(sample) as tuned, Image.open(base_sample) as base:
        assert tuned.size == base.size == (32, 32)
        assert np.abs(np.asarray(tuned, dtype=int) - np.asarray(base, dtype=int)).max() > 0


def test_readme_sdxl_quickstart_command_runs(quickstart_dir):
    command = next(c for c in readme_commands("tiny_models.md") if "train_smpo_diffusion_sdxl.py" in c and "tiny-sdxl" in c)
    command = command.replace('PATH="$PWD/.venv/bin:$PATH"', f'PATH="{os.path.dirname(sys.executable)}:$PATH"')
    script = os.path.join(ROOT, "train_smpo_diffusion_sdxl.py")
    run_script(["bash", "-c", command.replace("train_smpo_diffusion_sdxl.py", script)], cwd=quickstart_dir)
    assert (quickstart_dir / "smpo-quickstart" / "sdxl-lora" / "pytorch_lora_weights.safetensors").exists()


def test_readme_evaluate_command_runs(quickstart_dir):
    command = next(c for c in readme_commands("evaluation.md") if "evaluate.py" in c and "tiny-sd" in c)
    command = command.replace(".venv/bin/python evaluate.py", f"{sys.executable} {os.path.join(ROOT, 'evaluate.py')}")
    run_script(["bash", "-c", command], cwd=quickstart_dir)
    results = json.loads((quickstart_dir / "smpo-quickstart" / "eval" / "results.json").read_text())
    assert results["num_prompts"] == 8 and 0 <= results["reward_models"][next(iter(results["reward_models"]))]["win_rate"] <= 1


def test_inference_script_loads_the_sdxl_lora(quickstart_dir):
    """examples/inference_lora.py with the LoRA of the README's SDXL command (run above when absent)."""
    lora = quickstart_dir / "smpo-quickstart" / "sdxl-lora"
    if not (lora / "pytorch_lora_weights.safetensors").exists():
        test_readme_sdxl_quickstart_command_runs(quickstart_dir)
    out = quickstart_dir / "sdxl.png"
    run_script([sys.executable, os.path.join(ROOT, "examples", "inference_lora.py"), "--pretrained_model_name_or_path",
                str(quickstart_dir / "smpo-quickstart" / "assets" / "tiny-sdxl"), "--lora_weights", str(lora),
                "--prompt", "a cat", "--resolution", "32", "--num_inference_steps", "3", "--device", "cpu",
                "--output", str(out)])
    assert_lora_trained_and_changes_the_image(lora, out, quickstart_dir / "sdxl-base.png")


@pytest.mark.parametrize("script, k", [("train_sd15_paper.sh", 5), ("train_sdxl_paper.sh", 10)])
def test_paper_scripts_reproduce_the_authors_inversion_and_data(script, k):
    """examples/train_*_paper.sh parse with their training script's flags and run the authors' loop as it
    ran (grid_above, their K, human ties dropped)."""
    words = launch_words(os.path.join("examples", script))
    training_script = next(w for w in words if w.endswith(".py"))
    # the optional `${UNET_INIT:+--unet_init $UNET_INIT}` splits into two words, both left out
    flags = [w for w in words[words.index(training_script) + 1:] if "UNET_INIT" not in w]
    module = __import__(training_script[:-3])
    args = module.parse_args(flags)
    assert (args.inversion_schedule, args.num_inversion_steps, args.drop_human_ties) == ("grid_above", k, True)
    assert (args.loss_type, args.noise_source, args.inversion_model, args.full_finetune) == ("smpo", "renoise",
                                                                                            "policy", True)


def test_readme_generate_train_evaluate_commands_run(quickstart_dir):
    """The tiny-model version of the README's three-command path: generate_pairs.py, train, evaluate."""
    command = next(c for c in readme_commands("generate_pairs.md") if "generate_pairs.py" in c and "tiny-sd" in c)
    for script in ("generate_pairs.py", "evaluate.py"):
        command = command.replace(f".venv/bin/python {script}", f"{sys.executable} {os.path.join(ROOT, script)}")
    command = command.replace('PATH="$PWD/.venv/bin:$PATH"', f'PATH="{os.path.dirname(sys.executable)}:$PATH"')
    command = command.replace(" train_smpo_diffusion.py", " " + os.path.join(ROOT, "train_smpo_diffusion.py"))
    assert command.count("\n") == 2  # three commands, each run as written
    run_script(["bash", "-ec", command], cwd=quickstart_dir)
    out = quickstart_dir / "smpo-quickstart"
    summary = json.loads((out / "onpolicy-pairs" / "generation_summary.json").read_text())
    assert summary["num_prompts"] == 8 and summary["num_pairs"] == 8 * 6
    assert (out / "onpolicy-lora" / "pytorch_lora_weights.safetensors").exists()
    context = json.loads((out / "onpolicy-lora" / "metrics.jsonl").read_text().splitlines()[0])["context"]
    assert context["loss_type"] == "smpo"  # SmPO on generate_pairs.py's save_to_disk output, as it is written
    assert json.loads((out / "onpolicy-eval" / "results.json").read_text())["num_prompts"] == 8
