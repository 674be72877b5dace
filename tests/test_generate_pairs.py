"""generate_pairs.py: prompts -> samples -> reward scores -> Pick-a-Pic-schema pairs (CPU, tiny assets)."""

import itertools
import json
import os
import shutil
import socket
import sys

import datasets
import numpy as np
import pytest
from conftest import ROOT, main_in_process, run_script
from PIL import Image

import generate_pairs
from smpo.data import load_preference_dataset
from smpo.sampling import image_problem

SCRIPT = os.path.join(ROOT, "generate_pairs.py")
RES, N, STEPS = 32, 3, 2
PROMPTS = ["a red circle on grey", "a blue square", "", "猫 wearing a hat", "sunset over the sea", "a bowl of fruit"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
LABEL_COLUMNS = ("caption", "label_0", "label_1", "reward_score_0", "reward_score_1")


def common_args(assets, prompts_file, out, *extra):
    return [str(a) for a in (
        "--pretrained_model_name_or_path", assets / "tiny-sd", "--prompts_file", prompts_file,
        "--reward_model_name_or_path", assets / "tiny-reward", "--num_images_per_prompt", N,
        "--num_inference_steps", STEPS, "--resolution", RES, "--batch_size", 4, "--shard_size", 2,
        "--output_dir", out, *extra)]


def run_main(*argv):
    return generate_pairs.main(generate_pairs.parse_args([str(a) for a in argv]))


def summary_of(out):
    return json.loads((out / "generation_summary.json").read_text(encoding="utf-8"))


def records_of(out):
    return [json.loads(line) for path in sorted((out / "shards").iterdir()) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")  # line 3 is blank
    return path


@pytest.fixture(scope="module")
def straight(tiny_assets, prompts_file, tmp_path_factory):
    """One uninterrupted run, as a user types it: 5 prompts x 3 images, all pairs, save_to_disk, 3 shards."""
    out = tmp_path_factory.mktemp("gen") / "pairs"
    run_script([sys.executable, SCRIPT, *common_args(tiny_assets, prompts_file, out, "--seed", 7)], env=ONE_THREAD)
    return out


@pytest.fixture(scope="module")
def jsonl_pairs(straight, tiny_assets, prompts_file, tmp_path_factory):
    """The straight run's samples written again as metadata.jsonl + images (no image is generated again)."""
    out = tmp_path_factory.mktemp("gen-jsonl") / "pairs"
    shutil.copytree(straight, out)
    run_main(*common_args(tiny_assets, prompts_file, out, "--seed", 7, "--output_format", "metadata_jsonl"))
    return out


def test_pairs_have_the_pick_a_pic_schema_labels_from_scores_and_seeds_from_the_rule(straight):
    pairs = datasets.load_from_disk(str(straight))
    prompts = [p for p in PROMPTS if p]
    assert len(pairs) == len(prompts) * N * (N - 1) // 2  # all pairs of 3 images
    for column in ("caption", "jpg_0", "jpg_1", "label_0", "reward_score_0", "reward_score_1", "seed_0", "seed_1"):
        assert column in pairs.column_names
    for row in pairs:
        i, a, b = row["prompt_index"], row["image_index_0"], row["image_index_1"]
        assert row["caption"] == prompts[i] and a < b
        assert (row["seed_0"], row["seed_1"]) == (7 + i * N + a, 7 + i * N + b)
        s0, s1 = row["reward_score_0"], row["reward_score_1"]
        assert row["label_0"] == (1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5) and row["label_1"] == 1 - row["label_0"]
        assert (row["num_inference_steps"], row["guidance_scale"], row["height"], row["width"]) == (STEPS, 7.5, RES, RES)
        # the image bytes are the saved sample (PNG, lossless)
        assert row["jpg_0"] == (straight / "images" / f"{i:06d}_{a}.png").read_bytes()
    labels = np.asarray(pairs["label_0"])
    assert 0 < labels.mean() < 1  # both orders occur

    summary = summary_of(straight)
    assert summary["num_prompts"] == 5 and summary["num_images"] == summary["num_images_used"] == 15
    assert summary["num_pairs"] == 15 and sum(summary["label_0_counts"].values()) == 15
    assert summary["left_out"]["prompts skipped"] == {"blank lines of the prompts file": [3]}
    assert summary["left_out"]["images"]["count"] == 0
    scores = [e["score"] for r in records_of(straight) for e in r["images"]]
    assert summary["scores"]["mean"] == pytest.approx(np.mean(scores))
    assert summary["settings"]["seeds"].startswith("image k of prompt i: seed + i * num_images_per_prompt + k")
    assert summary["run"] == {"num_processes": 1, "shards": 3, "shards_generated_by_this_run": 3, "shards_reused": 0}
    with Image.open(straight / "grid.png") as grid:
        assert grid.size == (5 * RES, 2 * RES + 40)


def test_reward_scores_are_the_shared_implementation(straight, tiny_assets):
    from smpo.rewards import load_reward_model, reward_scores

    model, processor = load_reward_model(str(tiny_assets / "tiny-reward"), device="cpu")
    record = records_of(straight)[3]  # prompt 3: "sunset over the sea"
    images = [Image.open(straight / e["file"]) for e in record["images"]]
    by_hand = reward_scores(model, processor, images, [record["prompt"]] * len(images), "cpu").numpy()
    np.testing.assert_allclose([e["score"] for e in record["images"]], by_hand, rtol=0, atol=1e-5)


def test_batch_size_does_not_change_the_images(straight, tiny_assets, prompts_file, tmp_path):
    """Batch 1 against the straight run's batch 4: the same seeds, so the same images (up to the float
    rounding of batched arithmetic: at most one or two of 255 levels) and the same scores to 1e-4."""
    out = tmp_path / "batch1"
    run_main(*common_args(tiny_assets, prompts_file, out, "--seed", 7, "--batch_size", 1, "--shard_size", 5))
    diffs = []
    for path in sorted((straight / "images").iterdir()):
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(out / "images" / path.name), dtype=np.int16)
        diffs.append(np.abs(a - b).max())
    assert len(diffs) == 15 and max(diffs) <= 2
    first = [e["score"] for r in records_of(straight) for e in r["images"]]
    second = [e["score"] for r in records_of(out) for e in r["images"]]
    np.testing.assert_allclose(first, second, rtol=0, atol=1e-4)
    # and different seeds give different images: the comparison above is not vacuous
    other = [np.asarray(Image.open(straight / "images" / f"000000_{k}.png"), dtype=np.int16) for k in range(2)]
    assert np.abs(other[0] - other[1]).max() > 10


def test_a_killed_run_resumes_where_it_stopped_and_ends_with_the_same_dataset(straight, tiny_assets, prompts_file,
                                                                             tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, SCRIPT, *common_args(tiny_assets, prompts_file, out, "--seed", 7)]
    # shard 0 (prompts 0-1, 6 images) finished, shard 1 had one image when the process was killed
    proc = run_script(cmd, env={**ONE_THREAD, "SMPO_TEST_KILL_AFTER_IMAGES": "7"}, check=False)
    assert proc.returncode != 0
    assert [p.name for p in (out / "shards").iterdir()] == ["shard-00000.jsonl"]
    assert not (out / "state.json").exists() and not (out / "generation_summary.json").exists()
    assert len(list((out / "images").iterdir())) == 7

    proc = run_script(cmd, env=ONE_THREAD)
    assert "1 already done, 2 to generate" in proc.stdout
    assert summary_of(out)["run"] == {"num_processes": 1, "shards": 3, "shards_generated_by_this_run": 2,
                                      "shards_reused": 1}
    assert datasets.load_from_disk(str(out)).to_list() == datasets.load_from_disk(str(straight)).to_list()


def test_a_rerun_with_other_generation_settings_is_refused(straight, tiny_assets, prompts_file, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(straight, out)
    with pytest.raises(SystemExit, match="num_inference_steps: 2 there, 3 now"):
        run_main(*common_args(tiny_assets, prompts_file, out, "--seed", 7, "--num_inference_steps", 3))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_same_dataset_as_one(straight, tiny_assets, prompts_file, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), SCRIPT, *common_args(tiny_assets, prompts_file, out, "--seed", 7)]
    proc = run_script(cmd, env=ONE_THREAD, timeout=300)
    assert "on 2 process(es)" in proc.stdout
    assert summary_of(out)["run"]["num_processes"] == 2
    assert datasets.load_from_disk(str(out)).to_list() == datasets.load_from_disk(str(straight)).to_list()
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(p.name for p in (straight / "images").iterdir())


def test_metadata_jsonl_output_is_read_with_its_scores(straight, jsonl_pairs):
    assert not (jsonl_pairs / "state.json").exists()  # one dataset per folder: the save_to_disk files are gone
    assert summary_of(jsonl_pairs)["run"]["shards_generated_by_this_run"] == 0
    line = json.loads((jsonl_pairs / "metadata.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert line["image_0"] == os.path.join("images", "000000_0.png")
    loaded = load_preference_dataset(str(jsonl_pairs))
    reference = datasets.load_from_disk(str(straight))
    for column in LABEL_COLUMNS:
        assert loaded[column] == reference[column], column
    assert Image.open(loaded[4]["jpg_1"]).tobytes() == Image.open(
        straight / "images" / f"{reference[4]['prompt_index']:06d}_{reference[4]['image_index_1']}.png").tobytes()


def test_best_worst_and_random_pairing_with_a_minimum_gap(straight, tiny_assets, prompts_file, tmp_path):
    out = tmp_path / "pairing"
    shutil.copytree(straight, out)
    records = records_of(straight)
    run_main(*common_args(tiny_assets, prompts_file, out, "--seed", 7, "--pairing", "best_worst"))
    pairs = datasets.load_from_disk(str(out))
    assert len(pairs) == 5
    for row, record in zip(pairs, records):
        scores = [e["score"] for e in record["images"]]
        assert {row["image_index_0"], row["image_index_1"]} == {int(np.argmax(scores)), int(np.argmin(scores))}

    gaps = [abs(a - b) for r in records for a, b in itertools.combinations([e["score"] for e in r["images"]], 2)]
    gap = float(np.median(gaps))
    summary = run_main(*common_args(tiny_assets, prompts_file, out, "--seed", 7, "--pairing", "random",
                                    "--pairs_per_prompt", 2, "--min_score_gap", gap))
    pairs = datasets.load_from_disk(str(out))
    drawn = len(pairs) + summary["left_out"][f"pairs with |score gap| < min_score_gap ({gap})"]
    assert drawn == 5 * 2
    assert all(abs(r["reward_score_0"] - r["reward_score_1"]) >= gap for r in pairs)
    assert 0 < len(pairs) < 10
    again = run_main(*common_args(tiny_assets, prompts_file, out, "--seed", 7, "--pairing", "random",
                                  "--pairs_per_prompt", 2, "--min_score_gap", gap))
    assert again["num_pairs"] == len(pairs) and datasets.load_from_disk(str(out)).to_list() == pairs.to_list()


def test_training_reads_the_jsonl_output_unchanged(jsonl_pairs, tiny_assets, tmp_path):
    """Diffusion-DPO on the metadata.jsonl output. (SmPO on the save_to_disk output: the README's
    generate -> train -> evaluate commands, run by tests/test_readme.py.) In this process: test_train_sd.py
    launches the script."""
    out = tmp_path / "dpo-lora"
    main_in_process("train_smpo_diffusion.py", "--pretrained_model_name_or_path", tiny_assets / "tiny-sd",
                    "--dataset_name", jsonl_pairs, "--loss_type", "dpo", "--output_dir", out, "--resolution", RES,
                    "--train_batch_size", 2, "--max_train_steps", 2, "--checkpointing_steps", 1000, "--seed", 0)
    assert (out / "pytorch_lora_weights.safetensors").exists()
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "step" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(np.isfinite(m["loss"]) for m in steps)


def test_image_problems_name_nan_black_and_safety_checker_images():
    fine = np.full((4, 4, 3), 0.5, dtype=np.float32)
    assert image_problem(fine) is None
    assert image_problem(np.where(np.eye(4)[..., None] > 0, np.nan, fine)) == "NaN or infinite pixels"
    assert image_problem(np.zeros_like(fine)) == "an all-black image"
    assert image_problem(np.full_like(fine, 0.001)) == "an all-black image"  # rounds to 0 in every channel
    assert "--disable_safety_checker" in image_problem(np.zeros_like(fine), flagged=True)
    assert image_problem(np.full_like(fine, 0.003)) is None  # dark, not black


def test_black_samples_are_left_out_and_reported(tiny_assets, tmp_path):
    import torch
    from diffusers import AutoencoderKL

    model = tmp_path / "black-vae-sd"
    shutil.copytree(tiny_assets / "tiny-sd", model)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():  # every decoded pixel -1, i.e. black after (x + 1) / 2
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.fill_(-5.0)
    vae.save_pretrained(model / "vae")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    out = tmp_path / "black"
    args = ["--pretrained_model_name_or_path", model, "--prompts_file", prompts, "--reward_model_name_or_path",
            tiny_assets / "tiny-reward", "--num_images_per_prompt", 2, "--num_inference_steps", 1,
            "--resolution", RES, "--output_dir", out]
    with pytest.raises(SystemExit, match="no pairs to write"):
        run_main(*args)
    left = summary_of(out)["left_out"]
    assert left["images"]["by_problem"] == {"an all-black image": 4}
    assert {(e["prompt_index"], e["k"]) for e in left["images"]["images"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert left["prompts with fewer than 2 usable images"] == [0, 1]
    assert list((out / "images").iterdir()) == [] and not (out / "state.json").exists()


def test_bad_input_is_a_clear_error(tiny_assets, tmp_path):
    def args_with(prompts, *extra):
        return ["--pretrained_model_name_or_path", tiny_assets / "tiny-sd", "--prompts_file", prompts,
                "--reward_model_name_or_path", tiny_assets / "tiny-reward", "--num_images_per_prompt", 2,
                "--num_inference_steps", 1, "--resolution", RES, "--output_dir", tmp_path / "out", *extra]

    with pytest.raises(SystemExit, match="cannot read the prompts file .*missing.txt"):
        run_main(*args_with(tmp_path / "missing.txt"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a cat\nune pomme é\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="latin1.txt, line 2: not UTF-8"):
        run_main(*args_with(latin1))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(SystemExit, match="no prompts in"):
        run_main(*args_with(blank))
    good = tmp_path / "good.txt"
    good.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="cannot load the reward model '.*no-such-reward'"):
        run_main(*args_with(good, "--reward_model_name_or_path", tmp_path / "no-such-reward"))
    assert not (tmp_path / "out").exists()  # stopped before sampling anything, or making the output folder
    with pytest.raises(SystemExit):
        generate_pairs.parse_args([str(a) for a in args_with(good, "--num_images_per_prompt", 1)])
    with pytest.raises(SystemExit):  # 3 images have only 3 pairs
        generate_pairs.parse_args([str(a) for a in args_with(good, "--num_images_per_prompt", 3, "--pairing",
                                                             "random", "--pairs_per_prompt", 4)])
