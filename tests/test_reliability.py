"""Bad data, non-finite losses, interrupted saves, stop signals and two-process training (CPU)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import datasets
import pytest
import torch
from conftest import ROOT, accelerate_launch, run_script, main_in_process
from safetensors.torch import load_file

from smpo.data import PairDataset, PairTransform, PreferenceCollator, load_preference_dataset, open_image, select_pairs
from smpo.labels import preference_weight

CORRUPT_ROW, TRUNCATED_ROW, TIE_ROW, NAN_ROW = 1, 5, 2, 7
LORA = "pytorch_lora_weights.safetensors"


def train_args(assets, dataset, output_dir, *extra, steps=2):
    return ["--pretrained_model_name_or_path", assets / "tiny-sd", "--dataset_name", dataset,
            "--output_dir", output_dir, "--resolution", 32, "--train_batch_size", 3, "--max_train_steps", steps,
            "--learning_rate", 1e-3, "--seed", 0, "--checkpointing_steps", 2, *extra]


def train(assets, dataset, output_dir, *extra, steps=2, check=True, env=None, launch=False):
    """A run in this process (its messages in caplog, a stop raises); with ``launch``, through `accelerate launch`:
    the runs that are killed, and the two-process ones."""
    argv = train_args(assets, dataset, output_dir, *extra, steps=steps)
    if launch:
        return accelerate_launch("train_smpo_diffusion.py", *argv, check=check, env=env)
    return main_in_process("train_smpo_diffusion.py", *argv, env=env)


def summary(output_dir):
    return json.loads((output_dir / "train_summary.json").read_text())


def metrics(output_dir):
    return [m for m in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m]


def max_diff(dir_a, dir_b, name=LORA):
    a, b = load_file(dir_a / name), load_file(dir_b / name)
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def dirty_dataset(scored_dataset, tmp_path_factory):
    """The scored tiny dataset with a corrupt image, a truncated JPEG, a tie and a NaN score."""
    rows = datasets.load_from_disk(str(scored_dataset)).to_list()
    rows[CORRUPT_ROW]["jpg_1"] = b"this is not an image"
    rows[TRUNCATED_ROW]["jpg_0"] = rows[TRUNCATED_ROW]["jpg_0"][: len(rows[TRUNCATED_ROW]["jpg_0"]) // 2]
    assert rows[TIE_ROW]["label_0"] == 0.5
    rows[NAN_ROW]["reward_score_1"] = float("nan")
    path = tmp_path_factory.mktemp("dirty") / "dirty"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_data_layer_yields_exactly_the_good_pairs_winner_first(dirty_dataset):
    dataset = load_preference_dataset(str(dirty_dataset))
    rows, dropped = select_pairs(dataset, "smpo")
    assert dropped == {"non-finite reward score": [NAN_ROW]}
    dpo_rows, dpo_dropped = select_pairs(dataset, "dpo")  # human labels: the tie goes, the NaN score stays
    assert dpo_dropped == {"tie (label_0 = 0.5)": [TIE_ROW]} and NAN_ROW in dpo_rows
    transform = PairTransform(32, hflip=False)
    collator = PreferenceCollator(transform, "smpo", temperature=0.16658, gamma=10.0)
    pairs = PairDataset(dataset, rows)
    seen, bad = [], []
    for start in range(0, len(pairs), 4):
        batch = collator([pairs[i] for i in range(start, min(start + 4, len(pairs)))])
        bad += batch["bad_rows"]
        b = len(batch["rows"])
        for i, row in enumerate(batch["rows"].tolist()):
            example = dataset[row]
            zero_wins, weight = preference_weight(torch.tensor([example["reward_score_0"]]),
                                                  torch.tensor([example["reward_score_1"]]))
            images = [open_image(example[c]) for c in ("jpg_0", "jpg_1")]
            (p0, _, _), (p1, _, _) = transform(images, None)
            winner, loser = (p0, p1) if zero_wins.item() else (p1, p0)
            torch.testing.assert_close(batch["pixel_values"][i], winner)
            torch.testing.assert_close(batch["pixel_values"][b + i], loser)
            assert batch["captions"][i] == example["caption"]
            torch.testing.assert_close(batch["weight"][i], weight[0])
            seen.append(row)
    assert sorted(bad) == [CORRUPT_ROW, TRUNCATED_ROW]
    assert seen == [r for r in range(16) if r not in (CORRUPT_ROW, TRUNCATED_ROW, NAN_ROW)]


def test_dirty_dataset_trains_to_the_end_and_reports_each_bad_row(tiny_assets, dirty_dataset, tmp_path, caplog):
    # 15 pairs after the NaN row, 5 batches of 3 = one epoch; 2 of them hold an unreadable pair. Two epochs: the
    # limit (0.2 x 15 = 3 pairs) counts each bad row once, not once per epoch.
    with caplog.at_level(logging.INFO, logger="smpo"):
        train(tiny_assets, dirty_dataset, tmp_path / "smpo", "--max_bad_pair_fraction", 0.2, steps=10)
    log = caplog.text
    assert f"row {CORRUPT_ROW}: unreadable image in jpg_1" in log and f"row {TRUNCATED_ROW}" in log
    assert f"[{NAN_ROW}]" in log
    s = summary(tmp_path / "smpo")
    assert s["unreadable_rows"] == [CORRUPT_ROW, TRUNCATED_ROW]
    assert s["dropped_before_training"] == {"non-finite reward score": [NAN_ROW]}
    trained = [r for m in metrics(tmp_path / "smpo") for r in m["rows"]]
    assert sorted(trained) == sorted(2 * [r for r in range(16) if r not in (CORRUPT_ROW, TRUNCATED_ROW, NAN_ROW)])
    assert metrics(tmp_path / "smpo")[-1]["bad_pairs"] == 2


@pytest.mark.parametrize("cache", [[], ["--cache_latents"]], ids=["decoded", "cached"])
def test_too_many_bad_pairs_stop_the_run_with_a_clear_message(tiny_assets, dirty_dataset, tmp_path, cache):
    with pytest.raises(SystemExit, match="--max_bad_pair_fraction 0.01 allows") as stop:  # the default, 1%
        _main(train_args(tiny_assets, dirty_dataset, tmp_path / "x", *cache, steps=5))
    assert f"of 15 pairs of {dirty_dataset} have an unreadable image" in str(stop.value)


@pytest.fixture(scope="module")
def unreadable_dataset(scored_dataset, tmp_path_factory):
    """The scored tiny dataset (16 pairs) with no readable image 0."""
    rows = [{**row, "jpg_0": b"not an image"} for row in datasets.load_from_disk(str(scored_dataset)).to_list()]
    path = tmp_path_factory.mktemp("unreadable") / "unreadable"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def test_a_dataset_with_no_readable_pair_stops_at_the_first_batch(tiny_assets, unreadable_dataset, tmp_path):
    with pytest.raises(SystemExit, match=r"^3 of 16 pairs .* have an unreadable image .*--max_bad_pair_fraction"):
        _main(train_args(tiny_assets, unreadable_dataset, tmp_path / "x", steps=5))


def launch_two_processes(*args, timeout=300):
    """`accelerate launch` on two CPU processes (gloo) on a free port; a hang fails at ``timeout``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           os.path.join(ROOT, "train_smpo_diffusion.py"), *map(str, args)]
    return run_script(cmd, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=timeout, check=False)


def test_two_processes_with_cached_latents_and_no_readable_pair_both_stop_with_the_message(
        tiny_assets, unreadable_dataset, tmp_path):
    proc = launch_two_processes(*train_args(tiny_assets, unreadable_dataset, tmp_path / "x", "--cache_latents"))
    assert proc.returncode != 0
    assert proc.stderr.count("16 of 16 pairs of") == 2, proc.stderr[-3000:]  # each process says why it stops


def test_two_processes_skip_together_a_batch_one_of_them_cannot_read(tiny_assets, scored_dataset, tmp_path):
    """One pair per batch, one unreadable pair in 16: the process that gets it has nothing to train on in that batch;
    the other skips it too, else it would take an 8th step alone and wait for gradients that never come."""
    rows = datasets.load_from_disk(str(scored_dataset)).to_list()
    rows[CORRUPT_ROW]["jpg_1"] = b"this is not an image"
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one-bad"))
    out = tmp_path / "two"
    proc = launch_two_processes(*train_args(tiny_assets, tmp_path / "one-bad", out, "--train_batch_size", 1,
                                            "--max_bad_pair_fraction", 0.1, steps=8))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 process(es) got a batch without a readable pair: every process skips this batch" in proc.stderr
    s = summary(out)
    assert s["num_processes"] == 2 and s["replicas_identical"] is True and s["unreadable_rows"] == [CORRUPT_ROW]
    assert [len(set(m["rows"])) for m in metrics(out)] == [2] * 7  # the 8th batch of each process was skipped


@pytest.fixture(scope="module")
def straight(tiny_assets, scored_dataset, tmp_path_factory):
    """One uninterrupted 7-step LoRA run (a checkpoint after every step) that the other runs are compared with
    (in this process, one thread: the same numbers as a launched run)."""
    out = tmp_path_factory.mktemp("straight") / "straight"
    train(tiny_assets, scored_dataset, out, "--checkpointing_steps", 1, steps=7)
    return out


def test_a_nan_loss_skips_its_update_and_too_many_in_a_row_stop_the_run(tiny_assets, scored_dataset, straight,
                                                                         tmp_path, caplog):
    """NaN losses at steps 2, 4 and 5 with --max_nonfinite_steps 2: step 2 is skipped and training goes on (step 3
    resets the count), steps 4 and 5 in a row stop the run."""
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as stop:
        train(tiny_assets, scored_dataset, out, "--max_nonfinite_steps", 2, "--checkpointing_steps", 2,
              env={"SMPO_TEST_NAN_LOSS_AT_STEPS": "2,4,5"}, steps=7)
    assert "non-finite loss" in caplog.text and "steps [4, 5]" in str(stop.value)
    assert [m["skipped_update"] for m in metrics(out)] == [0, 1, 0, 1]  # the run stops before logging step 5
    # the skipped step 2 changed nothing: checkpoint-2 holds the weights after step 1
    assert max_diff(out / "checkpoint-2", straight / "checkpoint-1") == 0


def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(tiny_assets, scored_dataset, straight,
                                                                         tmp_path, capsys):
    """Killed while writing checkpoint-4: resumed from checkpoint-2 (LoRA), across the epoch's end (6 batches of
    3 pairs), the weights and losses equal a straight run's."""
    out = tmp_path / "killed"
    proc = train(tiny_assets, scored_dataset, out, env={"SMPO_TEST_KILL_DURING_SAVE": "4"}, steps=7, check=False,
                 launch=True)
    assert proc.returncode != 0
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4.tmp").is_dir()
    assert not (out / "checkpoint-4").exists()
    capsys.readouterr()
    train(tiny_assets, scored_dataset, out, "--resume_from_checkpoint", "latest", steps=7)
    assert f"Resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert not (out / "checkpoint-4.tmp").exists() and (out / "checkpoint-4").is_dir()
    assert max_diff(out, straight) <= 1e-6
    assert [m["step"] for m in metrics(out)] == list(range(1, 8))
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(straight)]


def test_sigterm_saves_a_checkpoint_then_resume_continues(tiny_assets, scored_dataset, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", os.path.join(ROOT, "train_smpo_diffusion.py"),
           *map(str, train_args(tiny_assets, scored_dataset, out, "--checkpointing_steps", 1000, steps=1000))]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    saved = [d.name for d in out.iterdir() if d.name.startswith("checkpoint-")]
    assert len(saved) == 1 and not saved[0].endswith(".tmp"), stderr[-3000:]
    step = int(saved[0].split("-")[1])
    assert "stopped by signal 15" in stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 1))
    train(tiny_assets, scored_dataset, out, "--resume_from_checkpoint", "latest", steps=step + 1)
    assert metrics(out)[-1]["step"] == step + 1 and (out / LORA).exists()


def test_two_processes_with_torchrun_end_with_identical_weights(tiny_assets, scored_dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port
           os.path.join(ROOT, "train_smpo_diffusion.py"),
           *map(str, train_args(tiny_assets, scored_dataset, out, "--train_batch_size", 2, steps=3))]
    run_script(cmd, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, timeout=300)  # ~1 min normally
    s = summary(out)
    assert s["num_processes"] == 2 and s["replicas_identical"] is True
    for m in metrics(out):  # each step: 2 processes x 2 pairs, all different rows
        assert len(m["rows"]) == 4 and len(set(m["rows"])) == 4
    assert (out / LORA).exists()


def _main(args):
    import train_smpo_diffusion

    train_smpo_diffusion.main(train_smpo_diffusion.parse_args([str(a) for a in args]))


def test_wrong_prediction_type_is_an_error(tiny_assets, scored_dataset, tmp_path):
    import shutil

    model = tmp_path / "sample-pred"
    shutil.copytree(tiny_assets / "tiny-sd", model)
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(SystemExit, match="prediction_type 'sample'"):
        _main(["--pretrained_model_name_or_path", model, "--dataset_name", scored_dataset, "--output_dir", tmp_path / "o"])
    (model / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}))
    with pytest.raises(SystemExit, match="flow-matching"):
        _main(["--pretrained_model_name_or_path", model, "--dataset_name", scored_dataset, "--output_dir", tmp_path / "o"])


def test_missing_columns_and_empty_data_are_errors(tiny_assets, scored_dataset, tmp_path):
    from smpo.data import PreferenceDataError

    base = ["--pretrained_model_name_or_path", tiny_assets / "tiny-sd", "--output_dir", tmp_path / "o"]
    with pytest.raises(PreferenceDataError, match="--caption_column"):
        _main([*base, "--dataset_name", scored_dataset, "--caption_column", "prompt"])
    ties = datasets.load_from_disk(str(scored_dataset)).map(lambda e: {"label_0": 0.5})
    ties.save_to_disk(str(tmp_path / "ties"))
    with pytest.raises(PreferenceDataError, match="no pairs left"):
        _main([*base, "--dataset_name", tmp_path / "ties", "--loss_type", "dpo"])
    with pytest.raises(SystemExit, match="--use_8bit_adam goes with --optimizer adamw"):
        _main([*base, "--dataset_name", scored_dataset, "--optimizer", "adafactor", "--use_8bit_adam"])
