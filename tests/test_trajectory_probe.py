"""benchmarks/inversion_probe.py --trajectory: the ground truth is the path the DDIM sampler really took."""

import json
import os
import sys

import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import inversion_probe  # noqa: E402
from trajectory_probe import sample_trajectories, trajectory_probe  # noqa: E402


def test_the_recorded_trajectory_is_the_ddim_path_from_each_images_initial_noise(tiny_assets, tmp_path):
    """5 DDIM steps (leading spacing, steps_offset 1): levels 801, 601, 401, 201, 1; the first latent is the
    initial noise of seed i, each next one is an eta-0 DDIM step from it with the model's prediction."""
    from diffusers import StableDiffusionPipeline

    from smpo.sampling import initial_noise

    args = inversion_probe.parse_args(["--trajectory", "--pretrained_model_name_or_path", str(tiny_assets / "tiny-sd"),
                                       "--num_latents", "2", "--num_inference_steps", "5", "--num_inversion_steps", "2",
                                       "--caption", "a red circle", "--output_dir", str(tmp_path)])
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    levels, truth, _, images, noise = sample_trajectories(pipe, args)
    assert levels.tolist() == [801, 601, 401, 201, 1] and images.shape[0] == 2
    assert torch.equal(truth[0], noise) and torch.equal(noise[1], initial_noise(1, noise.shape[1:]))
    abar = pipe.scheduler.alphas_cumprod
    with torch.no_grad():
        ids = pipe.tokenizer([args.caption], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0].expand(2, -1, -1)
        for i in range(len(levels) - 1):
            a, a_next = abar[levels[i]], abar[levels[i + 1]]
            eps = pipe.unet(truth[i], levels[i], encoder_hidden_states=text).sample
            x0 = (truth[i] - (1 - a).sqrt() * eps) / a.sqrt()
            torch.testing.assert_close(truth[i + 1], a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps,
                                       rtol=1e-4, atol=1e-4)

    results = trajectory_probe(args)
    written = json.loads((tmp_path / "trajectory.json").read_text())
    assert written["levels"] == [801, 601, 401, 201, 1] and set(written["sources"]) == {
        "forward", "prior", "prior, sampler x0", "renoise exact K=2", "renoise exact K=2, sampler x0"}
    assert written["sources"] == json.loads(json.dumps(results["sources"]))
    assert "| prior |" in (tmp_path / "trajectory.md").read_text()
