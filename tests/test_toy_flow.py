"""examples/toy_alignment.py --family flow at its minimal size: an SD3-style base trained from scratch on the toy
world, the flow inversion probe choosing SmPO's K and R, training runs through train_smpo_diffusion_sd3.py,
on-policy pairs sampled by the flow pipeline, and the prior-noise method."""

import json
import math
import os
import sys

import pytest
from conftest import ROOT, run_script

SCRIPT = os.path.join(ROOT, "examples", "toy_alignment.py")
sys.path.insert(0, os.path.join(ROOT, "examples"))
from toy.experiment import parse_args  # noqa: E402
from toy.pipeline import choose_inversion  # noqa: E402

MINIMAL = ["--family", "flow", "--minimal", "--steps", "2", "--checkpoint_every", "2", "--jobs", "1"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """(work folder, results): Flow-DPO, SmPO (renoise) and Flow-DPO + prior noise on the flow base's own samples
    (one run: the world pairs' reward model scores them, the probe inverts world images)."""
    work = tmp_path_factory.mktemp("toy-flow") / "work"
    run_script([sys.executable, SCRIPT, *MINIMAL, "--work_dir", str(work), "--methods", "dpo", "smpo", "dpo_prior",
                "--data_source", "on_policy", "--tag", "t"], timeout=900)
    return work, json.loads((work / "results_on_policy_t.json").read_text())


def test_flow_base_is_a_loadable_sd3_pipeline_without_t5(flow_run):
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    work, results = flow_run
    (base_dir,) = work.glob("base-*")
    assert results["base_model"]["settings"]["flow_steps"] == results["settings"]["flow_steps"]
    pipe = StableDiffusion3Pipeline.from_pretrained(base_dir, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and pipe.text_encoder_3 is None
    assert pipe.transformer.config.num_layers == results["settings"]["flow_layers"]
    assert pipe.vae.config.shift_factor is not None  # SD3's latent shift, set from the world's latents
    assert math.isfinite(results["base_model"]["transformer_loss"])


def test_flow_run_train_with_the_sd3_script_and_the_probed_inversion(flow_run):
    work, results = flow_run
    settings = results["settings"]
    assert settings["family"] == "flow" and settings["beta_dpo"] == 56.0  # 500 x E[(1 - s)^2], rounded
    probe = json.loads((work / os.path.relpath(settings["inversion_choice"]["probe"], work)).read_text())
    assert probe["process"] == "rectified_flow"
    assert [settings["num_inversion_steps"], settings["num_renoise_steps"]] == list(choose_inversion(probe))
    assert list(results["methods"]) == ["dpo", "smpo", "dpo_prior"] and results["methods"]["dpo"]["label"] == "Flow-DPO"
    for name, res in results["methods"].items():
        assert sorted(map(int, res["curve"])) == [0, 2]
        for row in res["curve"].values():
            assert all(math.isfinite(row[k]) for k in ("true_preference", "diversity", "drift", "disk_rate"))
        lines = (work / "runs-on-policy" / name / "seed-0" / "metrics.jsonl").read_text().splitlines()
        context = json.loads(lines[0])["context"]
        assert context["process"] == "rectified_flow" and context["beta_dpo"] == 56.0
        assert len(lines) == 3
    metrics = work / "runs-on-policy" / "smpo" / "seed-0" / "metrics.jsonl"
    context = json.loads(metrics.read_text().splitlines()[0])["context"]
    assert (context["num_inversion_steps"], context["num_renoise_steps"]) == (settings["num_inversion_steps"],
                                                                              settings["num_renoise_steps"])
    dpo, smpo = results["methods"]["dpo"]["unet_work_per_step"], results["methods"]["smpo"]["unet_work_per_step"]
    pairs = settings["batch_size"]  # inversion: K (R + 1) forwards for each of the 2 images of a pair
    assert smpo - dpo == 2 * pairs * settings["num_inversion_steps"] * (settings["num_renoise_steps"] + 1)


def test_prior_noise_on_the_flow_base_costs_what_flow_dpo_costs(flow_run):
    work, results = flow_run
    assert results["settings"]["data_source"] == "on_policy"
    methods = results["methods"]
    assert methods["dpo_prior"]["unet_work_per_step"] == methods["dpo"]["unet_work_per_step"] > 0
    (generated,) = work.glob("on-policy-*/generated/generation_settings.json")
    settings = json.loads(generated.read_text())
    assert settings["max_sequence_length"] == 16 and "Euler" in settings["sampler"]  # sampled as the base trained
    assert (work / "samples_grid_on_policy_t.png").exists()
    assert (work / "preference_vs_unet_work_on_policy_t.png").exists()


def test_inversion_choice_is_the_cheapest_candidate_that_agrees_with_the_most_exact():
    def source(k, r, err, std=(0.8, 0.9)):
        return {"num_inversion_steps": k, "num_renoise_steps": r, "forwards": k * (r + 1), "err_train": err,
                "buckets": {"0-0.05": {"std": std[0]}, "0.7-1": {"std": std[1]}}}

    probe = {"sources": {"forward": {"num_inversion_steps": None, "err_train": 2.0},
                         "a": source(5, 0, 0.011, std=(0.7, 0.9)), "b": source(5, 1, 0.011), "c": source(10, 1, 0.010)}}
    assert choose_inversion(probe) == (5, 1)  # a's noise is 0.1 less in a bucket: under-scaled
    probe["sources"]["b"] = source(5, 1, 0.040)  # 1.5% of forward noise's error above c's
    assert choose_inversion(probe) == (10, 1)
    probe["sources"] = {"forward": probe["sources"]["forward"], "c": source(10, 1, 0.010, std=(2.0, 0.9))}
    assert choose_inversion(probe) == (10, 1)  # nothing agrees (even itself, inflated): the most exact


def test_beta_variants_and_family_flags():
    args = parse_args(["--family", "flow", "--minimal", "--methods", "dpo", "dpo_beta169"])
    from toy.experiment import method

    assert method("dpo_beta169")["flags"][-2:] == ["--beta_dpo", "169"] and args.beta_dpo == 56.0
    assert parse_args(["--minimal"]).beta_dpo == 500.0  # the SD toy keeps its beta
    with pytest.raises(SystemExit):
        parse_args(["--minimal", "--methods", "dpo_beta"])
    with pytest.raises(SystemExit):
        parse_args(["--family", "flow", "--inversion_schedule", "grid_above"])
