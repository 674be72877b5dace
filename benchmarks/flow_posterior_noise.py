"""Why the flow probe on posterior means understated training's derived noise: the inversion amplifies the VAE
posterior's noise (docs/flow.md).

On a few pairs of a scored dataset, derives the SmPO noise exactly as train_smpo_diffusion_sd3.py's training step does
(its conditioning, process and --noise_source renoise, the policy equal to the base) from the VAE posterior mean and
from a posterior sample (what training encodes) at fixed sigmas, and reports per sigma: the std of each derived noise,
the regression of their difference on the posterior noise (sample - mean), and the base's velocity error on each
target. Writes --output (json).

    python benchmarks/flow_posterior_noise.py --pretrained_model_name_or_path toy-flow/base-* \\
      --dataset_name toy-flow/data-*/pairs-scored --max_sequence_length 16 --output docs/flow/posterior_noise.json
"""

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--dataset_name", required=True)
    p.add_argument("--rows", type=int, nargs="+", default=[44, 640, 983, 1458])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3, 0.55, 0.85, 0.95])
    p.add_argument("--num_inversion_steps", type=int, default=5)
    p.add_argument("--num_renoise_steps", type=int, default=1)
    p.add_argument("--max_sequence_length", type=int, default=16)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    import train_smpo_diffusion_sd3 as sd3
    from smpo.data import PairTransform, load_preference_dataset, open_image
    from smpo.noise_sources import NOISE_SOURCES
    from smpo.step import Models, encode_images, predict, sample_latents

    args = sd3.parse_args(["--pretrained_model_name_or_path", a.pretrained_model_name_or_path, "--dataset_name",
                           a.dataset_name, "--output_dir", "unused", "--loss_type", "smpo", "--noise_source", "renoise",
                           "--num_inversion_steps", str(a.num_inversion_steps), "--num_renoise_steps",
                           str(a.num_renoise_steps), "--max_sequence_length", str(a.max_sequence_length)])
    conditioning = sd3.SD3Conditioning(args, "cpu", torch.float32)
    pipe = conditioning.pipeline_class.from_pretrained(a.pretrained_model_name_or_path, **conditioning.base_kwargs)
    models = Models(pipe.transformer.eval(), None, pipe.vae, conditioning, sd3.SD3Conditioning.load_process(args))
    dataset = load_preference_dataset(a.dataset_name, "train")
    transform = PairTransform(a.resolution, random_crop=False, hflip=False)
    pixels = torch.stack([transform([open_image(dataset[i][c])], random)[0][0] for c in ("jpg_0", "jpg_1")
                          for i in a.rows])
    with torch.no_grad():
        mean = pipe.vae.encode(pixels).latent_dist.mean
    latents = {"mean": sample_latents(mean, torch.zeros_like(mean), pipe.vae, torch.Generator()),
               "sample": encode_images(pipe.vae, pixels, len(pixels), torch.Generator().manual_seed(0))}
    cond = conditioning({"captions": [dataset[i]["caption"] for i in a.rows]}, num_images_per_caption=2)
    delta = (latents["sample"] - latents["mean"]).flatten(1)
    rows = []
    for sigma in a.sigmas:
        s = torch.full((len(pixels),), sigma)
        row = {"sigma": sigma}
        for name, x0 in latents.items():
            noisy, noise = NOISE_SOURCES["renoise"].make(args, models, x0, s, cond, None, len(a.rows))
            with torch.no_grad():
                v = predict(models.unet, noisy, models.process.model_time(s), cond)
            row[f"noise_std_{name}"] = noise.flatten(1).std(1).mean().item()
            row[f"velocity_err_{name}"] = (v - models.process.target(x0, noise, s)).pow(2).mean().item()
            row[f"_{name}"] = noise.flatten(1)
        added = row.pop("_sample") - row.pop("_mean")
        row["regression_on_posterior_noise"] = ((added * delta).sum(1) / (delta * delta).sum(1)).mean().item()
        row["correlation_with_posterior_noise"] = torch.nn.functional.cosine_similarity(added, delta).mean().item()
        rows.append(row)
        print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    result = {"model": a.pretrained_model_name_or_path, "rows": a.rows,
              "posterior_noise_std": delta.std(1).mean().item(),
              "mean_latent_std": latents["mean"].flatten(1).std(1).mean().item(),
              "num_inversion_steps": a.num_inversion_steps, "num_renoise_steps": a.num_renoise_steps, "sigmas": rows}
    with open(a.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
