"""examples/toy_alignment.py (the package examples/toy/) end to end at its minimal size: every stage runs, the
base model is cached, and Diffusion-DPO moves the preference the way the raters' labels point."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
from conftest import ROOT, run_script
from PIL import Image

SCRIPT = os.path.join(ROOT, "examples", "toy_alignment.py")
METHODS = ("dpo", "smpo_smooth", "smpo")

sys.path.insert(0, os.path.join(ROOT, "examples"))
from toy import world  # noqa: E402
from toy.runs import cached_stage, seconds_per_step  # noqa: E402


def test_true_preference_is_measured_from_pixels():
    rng = np.random.default_rng(0)
    images, hues = world.draw_disks(rng, 64)
    measured = world.measure_hue(images)
    assert not np.isnan(measured).any()
    assert np.abs(np.angle(np.exp(2j * np.pi * (measured - hues)))).max() < 0.05  # hue error < 3 degrees
    pref, has_disk = world.true_preference(images)
    assert has_disk.all() and np.allclose(pref, world.hue_warmth(hues), atol=0.05)
    grey = np.full((2, 32, 32, 3), 0.5, np.float32)
    pref, has_disk = world.true_preference(grey)
    assert not has_disk.any() and (pref == -1).all()  # no disk: the worst preference
    assert world.hue_diversity(images) > 0.9
    assert world.hue_diversity(np.repeat(images[:1], 8, axis=0)) == 0.0


def test_a_stage_counts_as_done_only_when_its_marker_is_whole(tmp_path):
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "partial-output").write_text("x")
    (folder / "DONE").write_text('{"seconds": 1')  # a marker cut short by a crash (the old non-atomic write)
    built = []

    def build():
        built.append(sorted(os.listdir(folder)))
        return {"seconds": 2.0}

    assert cached_stage(str(folder), build) == ({"seconds": 2.0}, False)
    assert built == [[]]  # rebuilt from an empty folder
    assert cached_stage(str(folder), build) == ({"seconds": 2.0}, True) and len(built) == 1

    def crash():
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError):
        cached_stage(str(folder), crash, rebuild=True)
    assert not (folder / "DONE").exists()  # no marker for a stage that did not finish
    assert cached_stage(str(folder), build) == ({"seconds": 2.0}, False)


def test_seconds_per_step_times_training_not_the_evaluation_cache(tmp_path):
    for step, written in ((2, 1000.0), (6, 1020.0)):  # 4 steps in 20 s: 5 s/step
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        weights = folder / "pytorch_lora_weights.safetensors"
        weights.write_bytes(b"")
        os.utime(weights, (written, written))
        (folder / "toy-eval-0123456789.json").write_text("{}")  # an evaluation, later, in the same folder
        os.utime(folder, (5000.0 - step, 5000.0 - step))  # evaluated in the other order
    assert seconds_per_step(str(tmp_path)) == 5.0


@pytest.fixture(scope="module")
def minimal_run(tmp_path_factory):
    """(work folder, --record file, the run) of the minimal experiment; its cached base serves the other tests."""
    tmp_path = tmp_path_factory.mktemp("toy")
    work = tmp_path / "toy"
    record = tmp_path / "recorded.json"
    record.write_text('{"other": 1}')
    first = run_script([sys.executable, SCRIPT, "--minimal", "--work_dir", str(work), "--jobs", "1",
                        "--record", "minimal_test", "--record_file", str(record)], timeout=900)
    return work, record, first


def test_minimal_run_then_rerun_reuses_the_cached_base(minimal_run):
    work, record, first = minimal_run
    assert "trained the base model" in first.stdout

    results = json.loads((work / "results.json").read_text())
    cfg = results["settings"]
    steps = list(range(0, cfg["steps"] + 1, cfg["checkpoint_every"]))
    assert set(results["methods"]) == set(METHODS)
    # K = 5 wrecked the toy model (README): the full SmPO run must train with K = 10
    assert results["settings"]["num_inversion_steps"] == 10
    assert "- `--num_inversion_steps`: `10`" in (work / "runs" / "smpo" / "seed-0" / "README.md").read_text()
    for name in METHODS:
        curve = results["methods"][name]["curve"]
        assert sorted(map(int, curve)) == steps, (name, curve.keys())
        for row in curve.values():
            for key in ("true_preference", "true_preference_se", "diversity", "drift", "disk_rate"):
                assert math.isfinite(row[key]), (name, key, row)
        assert math.isfinite(results["methods"][name]["final_gain_in_se"])
        assert (work / "runs" / name / "seed-0" / "metrics.jsonl").read_text().count("\n") == 1 + cfg["steps"]
    assert results["base"]["drift"] == 0.0

    with Image.open(work / "preference_vs_step.png") as plot:
        assert plot.size == tuple(results["plot_size"]) == (720, 440)
    with Image.open(work / "samples_grid.png") as grid:  # base + 3 methods, grid_samples cells of 64 px
        assert grid.size == (150 + cfg["grid_samples"] * 64, 4 * 64)
    assert "Diffusion-DPO" in first.stdout and "steps to reach" in first.stdout
    table = (work / "results.md").read_text()  # one training seed: no SE over seeds, and the table says so
    assert "nan" not in table and table.count("n/a (1 seed)") == len(METHODS)
    timings, machine = results["timings"], results["machine"]
    for stage in ("base_s", "data_s", "train_s", "eval_s", "total_s"):
        assert 0 <= timings[stage] <= timings["total_s"]
    assert machine["nproc"] == os.cpu_count() and machine["base_threads"] == machine["jobs"] == 1
    recorded = json.loads(record.read_text())
    assert recorded["other"] == 1 and recorded["minimal_test"]["settings"] == results["settings"]
    assert recorded["minimal_test"]["command"].startswith("python examples/toy_alignment.py --minimal")
    assert recorded["minimal_test"]["settings"]["data_source"] == "world"

    base_dirs = [d for d in os.listdir(work) if d.startswith("base-")]
    assert len(base_dirs) == 1
    weights = work / base_dirs[0] / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    # the rerun (one other method, fewer steps, two training seeds in two processes: the base settings are
    # unchanged) must not retrain the base
    second = run_script([sys.executable, SCRIPT, "--minimal", "--work_dir", str(work), "--methods",
                         "smpo_above5", "--steps", "2", "--checkpoint_every", "2", "--train_seeds", "3", "4",
                         "--jobs", "2"], timeout=900)
    assert "reusing the cached base model" in second.stdout
    assert "trained the base model" not in second.stdout
    assert weights.stat().st_mtime_ns == mtime
    rerun = json.loads((work / "results.json").read_text())
    assert rerun["timings"]["base_cached"] is True and rerun["timings"]["base_s"] < 5
    assert list(rerun["methods"]) == ["smpo_above5"]
    res = rerun["methods"]["smpo_above5"]  # the curve is the mean over the seeds, its SE the spread over them
    assert sorted(map(int, res["curve"])) == [0, 2]
    finals = list(res["final_by_seed"].values())
    assert sorted(res["final_by_seed"]) == ["3", "4"]
    assert math.isclose(res["final"]["true_preference"], np.mean(finals), abs_tol=1e-9)
    assert math.isclose(res["final"]["true_preference_se"], np.std(finals, ddof=1) / math.sqrt(2), abs_tol=1e-9)
    context = json.loads((work / "runs" / "smpo_above5" / "seed-4" / "metrics.jsonl").read_text().splitlines()[0])
    assert context["context"]["inversion_schedule"] == "grid_above" and context["context"]["seed"] == 4



def implicit_rewards(base_dir, lora_dirs, n=128, seed=12345, timesteps=(100, 300, 500, 700, 900)):
    """Per LoRA, the Diffusion-DPO implicit reward of n held-out warm disks (warmth > 0.7), then n cold ones (< -0.7).

    The implicit reward of an image is the fall of its denoising error from the base model to the tuned one (what
    the DPO loss raises for winners and lowers for losers), averaged over fixed timesteps with fixed noise, the
    same for the base and every LoRA. The images come from a seed the experiment does not use.
    """
    import torch

    from toy.runs import load_pipeline

    images, hues = world.draw_disks(np.random.default_rng(seed), 8 * n)
    warmth = world.hue_warmth(hues)
    warm, cold = images[warmth > 0.7][:n], images[warmth < -0.7][:n]
    assert len(warm) == len(cold) == n
    pipe = load_pipeline(str(base_dir))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pixels = torch.from_numpy(np.concatenate([warm, cold])).permute(0, 3, 1, 2) * 2 - 1
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([world.CAPTION], max_length=77, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0].expand(len(latents), -1, -1)
        noise = [torch.randn(latents.shape, generator=generator) for _ in timesteps]

        def denoising_error():
            err = 0
            for t, eps in zip(timesteps, noise):
                t = torch.full((len(latents),), t)
                pred = pipe.unet(pipe.scheduler.add_noise(latents, eps, t), t, encoder_hidden_states=cond).sample
                err = err + ((pred - eps) ** 2).mean((1, 2, 3)) / len(timesteps)
            return err.numpy()

        base_err = denoising_error()
        rewards = []
        for lora_dir in lora_dirs:
            pipe.load_lora_weights(str(lora_dir))
            rewards.append(base_err - denoising_error())
            pipe.unload_lora_weights()
    return rewards


def warm_minus_cold(reward):
    """(mean reward on the warm half - on the cold half, its standard error over the images)."""
    n = len(reward) // 2
    warm, cold = reward[:n], reward[n:]
    return warm.mean() - cold.mean(), math.sqrt(warm.var(ddof=1) / n + cold.var(ddof=1) / n)


def test_dpo_moves_the_model_the_way_the_raters_labels_point(minimal_run):
    """Diffusion-DPO on the raters' labels makes the model's implicit reward prefer warm disks to cold ones; the
    same run (same training seed, images and noise) with raters who prefer cold ones (the labels reversed) makes it
    prefer cold ones; and the two differ by more than 2 standard errors, image by image. A training that ignored
    the labels would give the two runs the same model. 20 steps of 8 pairs: the minimal 4 steps of 4 move the
    implicit reward by less than its noise."""
    work = minimal_run[0]
    base_dir = next(work.glob("base-*"))
    reversed_work = work.parent / "reversed-raters"  # the same base, cached: its folder is copied
    shutil.copytree(base_dir, reversed_work / base_dir.name)
    runs = []
    for folder, temperature in ((work, 0.3), (reversed_work, -0.3)):
        run_script([sys.executable, SCRIPT, "--minimal", "--work_dir", str(folder), "--methods", "dpo", "--steps",
                    "20", "--batch_size", "8", "--checkpoint_every", "20", "--train_seeds", "1", "--jobs", "1",
                    f"--rater_temperature={temperature}"], timeout=600)
        runs.append(folder / "runs" / "dpo" / "seed-1")
    preferring_warm, preferring_cold = implicit_rewards(base_dir, runs)
    gaps = [warm_minus_cold(r) for r in (preferring_warm, preferring_cold, preferring_warm - preferring_cold)]
    assert gaps[0][0] > 0 and gaps[1][0] < 0, gaps
    assert gaps[2][0] > 2 * gaps[2][1], gaps

def test_every_stored_result_names_the_command_that_made_it():
    """docs/results.json: keys written by --record hold their command line; older keys written by hand carry a
    provenance (the commit whose code produced them, the command, a note on what is superseded)."""
    with open(os.path.join(ROOT, "docs", "results.json")) as f:
        stored = json.load(f)
    for key, value in stored.items():
        if "command" in value:
            assert value["command"].startswith("python "), key
            continue
        provenance = value.get("provenance")
        assert isinstance(provenance, dict), f"docs/results.json[{key!r}] has neither 'command' nor 'provenance'"
        assert set(provenance) == {"commit", "command", "note"}, (key, provenance)
        assert len(provenance["commit"]) == 40 and int(provenance["commit"], 16) >= 0, (key, provenance["commit"])
        assert provenance["command"].startswith("python ") and provenance["note"], key
