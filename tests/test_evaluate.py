"""evaluate.py: generate with base and tuned models from the same seeds, score, compare, show (CPU, tiny assets)."""

import csv
import json
import math
import os
import sys

import numpy as np
import pytest
from conftest import ROOT, main_in_process, run_script
from PIL import Image

import evaluate
from smpo.grid import GRID_CAPTION_HEIGHT

sys.path.insert(0, os.path.join(ROOT, "examples"))
from make_tiny_assets import CAPTIONS  # noqa: E402  the tiny-pickapic captions, row i has CAPTIONS[i % 8]

RES = 32  # tiny-sd's native size too
# The tiny models gain nothing from threads, and on a busy 2-core machine two threads per process
# make a run several times slower (contention), so the scripts run single-threaded.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CAPTION_HEIGHT = GRID_CAPTION_HEIGHT


def run_evaluate(*args, in_process=False):
    """evaluate.py as a user runs it; ``in_process``: its main in this process (one thread too)."""
    args = ("--resolution", RES, "--num_inference_steps", 2, "--device", "cpu", *args)
    if in_process:
        return main_in_process("evaluate.py", *args)
    return run_script([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, args)], env=ONE_THREAD)


def read_csv(folder):
    with open(folder / "per_prompt.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lora_dir(tiny_assets, scored_dataset, tmp_path_factory):
    """A LoRA from a short SmPO run, with a learning rate high enough to change the images (trained in this
    process: test_train_sd.py launches the script)."""
    out = tmp_path_factory.mktemp("eval-lora") / "lora"
    main_in_process("train_smpo_diffusion.py", "--pretrained_model_name_or_path", tiny_assets / "tiny-sd",
                    "--dataset_name", scored_dataset, "--output_dir", out, "--resolution", RES,
                    "--train_batch_size", 2, "--max_train_steps", 2, "--learning_rate", 1e-2, "--seed", 0,
                    "--checkpointing_steps", 1000)
    return out


@pytest.fixture(scope="module")
def lora_eval(tiny_assets, lora_dir, tmp_path_factory):
    """The LoRA against its base on the first 3 unique tiny-pickapic captions, 2 images each, 2 reward models."""
    out = tmp_path_factory.mktemp("eval-lora-out")
    reward = tiny_assets / "tiny-reward"
    run_evaluate("--pretrained_model_name_or_path", tiny_assets / "tiny-sd", "--lora_weights", lora_dir,
                 "--dataset_name", tiny_assets / "tiny-pickapic", "--num_prompts", 3, "--num_images_per_prompt", 2,
                 "--reward_model_name_or_path", reward, "--reward_model_name_or_path", reward,
                 "--reward_processor_name_or_path", reward, "--batch_size", 4, "--seed", 5, "--output_dir", out)
    return out


def test_lora_against_base_writes_all_outputs(tiny_assets, lora_dir, lora_eval):
    results = json.loads((lora_eval / "results.json").read_text(encoding="utf-8"))
    assert results["base"] == str(tiny_assets / "tiny-sd") and results["tuned"] == str(lora_dir)
    assert results["num_prompts"] == 3 and results["num_images_per_prompt"] == 2
    assert results["settings"]["num_inference_steps"] == 2 and results["settings"]["tuned_kind"] == "lora"
    reward = str(tiny_assets / "tiny-reward")
    assert list(results["reward_models"]) == [reward, reward + "#2"]
    for r in results["reward_models"].values():
        assert 0 <= r["win_rate"] <= 1 and r["num_prompts"] == 3
        low, high = r["win_rate_ci95"]
        assert 0 <= low <= r["win_rate"] <= high <= 1
        assert r["wins"] + r["ties"] + r["losses"] == 3
        assert np.isfinite(r["mean_base"]) and np.isfinite(r["mean_tuned"])
    assert results["reward_models"][reward] == results["reward_models"][reward + "#2"]  # same model twice

    rows = read_csv(lora_eval)
    assert [r["prompt"] for r in rows] == CAPTIONS[:3] and [r["prompt_index"] for r in rows] == ["0", "1", "2"]
    assert {r[f"{reward} outcome"] for r in rows} <= {"win", "tie", "loss"}
    mean_tuned = np.mean([float(r[f"{reward} tuned"]) for r in rows])
    assert math.isclose(mean_tuned, results["reward_models"][reward]["mean_tuned"], abs_tol=1e-5)

    for which in ("base", "tuned"):
        names = sorted(p.name for p in (lora_eval / "images" / which).iterdir())
        assert names == [f"{i:04d}_{k}.png" for i in range(3) for k in range(2)]
    base = np.asarray(Image.open(lora_eval / "images" / "base" / "0001_1.png"), dtype=np.int16)
    tuned = np.asarray(Image.open(lora_eval / "images" / "tuned" / "0001_1.png"), dtype=np.int16)
    assert base.shape == (RES, RES, 3) and np.abs(base - tuned).max() > 0  # the LoRA changed the image

    with Image.open(lora_eval / "grid.png") as grid:
        assert grid.size == (3 * RES, 2 * RES + CAPTION_HEIGHT)
        grid.load()


def test_base_images_follow_the_documented_seed_rule(tiny_assets, lora_eval):
    """Image k of prompt i comes from seed + i * num_images_per_prompt + k, whatever the batch."""
    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(tiny_assets / "tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = pipe(CAPTIONS[1], num_inference_steps=2, height=RES, width=RES,
                     generator=torch.Generator().manual_seed(5 + 1 * 2 + 1)).images[0]
    finally:
        torch.set_num_threads(threads)
    saved = np.asarray(Image.open(lora_eval / "images" / "base" / "0001_1.png"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - saved).max() <= 2  # batched vs alone: rounding only


def test_tuned_equal_to_base_gives_win_rate_one_half_and_non_ascii_prompts_work(tiny_assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("une pomme rouge é\n\n   \n猫\nStraße\n\n", encoding="utf-8")
    out = tmp_path / "same"
    run_evaluate("--pretrained_model_name_or_path", tiny_assets / "tiny-sd",
                 "--tuned_model_name_or_path", tiny_assets / "tiny-sd", "--prompts_file", prompts,
                 "--reward_model_name_or_path", tiny_assets / "tiny-reward", "--batch_size", 2, "--output_dir", out,
                 in_process=True)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    [r] = results["reward_models"].values()
    assert r["win_rate"] == 0.5 and r["ties"] == 3 and r["mean_base"] == r["mean_tuned"]
    low, high = r["win_rate_ci95"]
    assert math.isclose(low + high, 1.0)  # symmetric around 0.5
    assert [row["prompt"] for row in read_csv(out)] == ["une pomme rouge é", "猫", "Straße"]
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * RES, 2 * RES + CAPTION_HEIGHT)


def test_prompts_file_skips_blank_lines_and_keeps_non_ascii(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n  a cat  \n\n猫\r\nStraße\n \n", encoding="utf-8")
    assert evaluate.read_prompts(prompts_file=path) == ["a cat", "猫", "Straße"]
    assert evaluate.read_prompts(prompts_file=path, num_prompts=2) == ["a cat", "猫"]
    (tmp_path / "blank.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no prompts"):
        evaluate.read_prompts(prompts_file=tmp_path / "blank.txt")


def test_dataset_prompts_are_its_unique_captions_capped_by_num_prompts(tiny_assets):
    dataset = str(tiny_assets / "tiny-pickapic")  # 16 rows cycling through the 8 captions
    assert evaluate.read_prompts(dataset_name=dataset) == CAPTIONS
    assert evaluate.read_prompts(dataset_name=dataset, num_prompts=3) == CAPTIONS[:3]
    with pytest.raises(SystemExit, match="--caption_column"):
        evaluate.read_prompts(dataset_name=dataset, caption_column="prompt")


def test_win_rate_with_ci_matches_hand_computed_wilson_intervals():
    z = evaluate.Z_95
    # n = 1, a win: [1 / (1 + z^2), 1]
    assert evaluate.win_rate_with_ci([1]) == pytest.approx((1.0, 1 / (1 + z * z), 1.0))
    # n = 1, a tie: 0.5 +- 0.5 z / sqrt(1 + z^2) = 0.5 +- 0.97998 / 2.20033 = 0.5 +- 0.44538
    rate, low, high = evaluate.win_rate_with_ci([0.5])
    assert rate == 0.5 and low == pytest.approx(0.05462, abs=1e-5) and high == pytest.approx(0.94538, abs=1e-5)
    # 3 wins of 4: centre (0.75 + 0.48018) / 1.96036 = 0.62753, half 0.99980 * sqrt(0.046875 + 0.060023) = 0.32689
    rate, low, high = evaluate.win_rate_with_ci([1, 1, 0, 1])
    assert rate == 0.75 and low == pytest.approx(0.30065, abs=1e-4) and high == pytest.approx(0.95441, abs=1e-4)
    # ties count half: 1 win, 2 ties, 1 loss -> 0.5, symmetric
    rate, low, high = evaluate.win_rate_with_ci([1, 0.5, 0.5, 0])
    assert rate == 0.5 and low + high == pytest.approx(1.0)
    assert evaluate.win_rate_with_ci([0, 0, 0])[:2] == (0.0, 0.0)
    with pytest.raises(ValueError):
        evaluate.win_rate_with_ci([])


def test_outcomes_compare_mean_scores_per_prompt():
    base = np.array([[0.2, 0.4], [0.3, 0.3], [0.5, 0.5]])
    tuned = np.array([[0.1, 0.6], [0.3, 0.3], [0.4, 0.5]])  # means 0.35 > 0.3, equal, 0.45 < 0.5
    np.testing.assert_array_equal(evaluate.outcomes(base, tuned), [1.0, 0.5, 0.0])


@pytest.mark.parametrize("size,cell", [((40, 24), (40, 24)), ((300, 300), (256, 256)), ((512, 256), (256, 128))])
def test_grid_has_base_row_over_tuned_row_and_a_caption_band(size, cell):
    base = [Image.new("RGB", size, "red")] * 3
    tuned = [Image.new("RGB", size, "blue")] * 3
    grid = evaluate.make_grid(base, tuned, ["a cat", "猫 " * 40, "Straße"])
    assert grid.size == (3 * cell[0], 2 * cell[1] + CAPTION_HEIGHT)
    assert grid.getpixel((cell[0] // 2, cell[1] // 2)) == (255, 0, 0)
    assert grid.getpixel((cell[0] // 2, cell[1] + cell[1] // 2)) == (0, 0, 255)


def test_reward_processors_pair_with_models_by_position():
    common = ["--pretrained_model_name_or_path", "m", "--lora_weights", "l", "--prompts_file", "p"]
    assert evaluate.parse_args(common).reward_processor_name_or_path == [evaluate.PICKSCORE_PROCESSOR]
    args = evaluate.parse_args(common + ["--reward_model_name_or_path", "a", "--reward_model_name_or_path",
                                         evaluate.PICKSCORE, "--reward_processor_name_or_path", "pa"])
    assert args.reward_processor_name_or_path == ["pa", evaluate.PICKSCORE_PROCESSOR]
    with pytest.raises(SystemExit):  # base against nothing
        evaluate.parse_args(["--pretrained_model_name_or_path", "m", "--prompts_file", "p"])


def test_a_scorer_that_is_not_built_in_says_so():
    with pytest.raises(SystemExit, match="not built in"):
        evaluate.load_reward_model("ImageReward", "ImageReward", "cpu")
