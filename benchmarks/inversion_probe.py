#!/usr/bin/env python
"""What each noise source gives the loss, before any training: a probe of the inversion schedules.

    python benchmarks/inversion_probe.py --pretrained_model_name_or_path toy-alignment/base-<key> \\
        --dataset_name toy-alignment/data-<key>/pairs-scored --output_dir docs/probe

For clean latents of the dataset's images and timesteps spread over [0, 1000), derives the training
noise with each source (random forward noise; ReNoise inversion with each schedule and K; and, for
``exact``, the alternative step-count rule ceil(K (t + 1) / 1000) per sample) and reports, per t
bucket, averaged over the samples:

- ``err``: the reference (the base UNet) denoising error on that target, mean squared error;
- ``std``: the standard deviation of the derived noise (forward noise has 1);
- ``corr_x0``: its correlation with the clean latent (forward noise has ~0);
- ``forwards``: UNet image-forwards per sample spent on the inversion.

The UNet inverts and predicts with the conditional text embedding only, in fp32 on the CPU. Writes
probe.json and probe.md (a table) to --output_dir.

    python benchmarks/inversion_probe.py --trajectory --pretrained_model_name_or_path toy-alignment/base-<key> \
        --output_dir docs/probe

--trajectory: the ground truth is the model's own sampling trajectory. It samples --num_latents images as
generate_pairs.py does (DDIM, eta 0, from smpo.sampling.initial_noise(seed + i), guidance 1, the caption of the
toy, --num_inference_steps) and records the latent the sampler passed through at each of its levels t. The image
is then taken as training sees it (decoded, rounded to 8 bits, VAE-encoded, a posterior sample: x0) and, per
t bucket, the distance from the trajectory latent z_t is measured for

- ``forward``: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps random (Diffusion-DPO);
- ``prior``: the same with eps = the image's initial noise (--noise_source prior);
- ``renoise exact K=..``: ReNoise inversion of x0 to t by the same model (R = 1; --noise_source renoise);
- the last two also from the sampler's own final latent (``sampler x0``: no decode / encode round trip).

Distances are RMS over the latent's elements, divided by sqrt(1 - abar_t): in noise units, the RMS difference
between the noise the source implies and the trajectory's (forward noise: ~sqrt(2) where x0 is right).
Writes trajectory.json and trajectory.md to --output_dir.

A flow pipeline (SD3-style; the toy's --family flow base) is probed per sigma bucket instead, with the flow
inversion at each K of --num_inversion_steps and each R of --num_renoise_steps (flow_probe.py says what it
measures); --trajectory is for SD pipelines.
"""

import argparse
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BUCKETS = [(0, 50), (50, 200), (200, 400), (400, 700), (700, 1000)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="an SD pipeline folder (the base model), or an SD3-style flow pipeline")
    p.add_argument("--dataset_name", default=None, help="a preference dataset (its jpg_0 images are probed)")
    p.add_argument("--trajectory", action="store_true",
                   help="probe against the model's own sampling trajectory (no dataset: the images are sampled)")
    p.add_argument("--num_inference_steps", type=int, default=25,
                   help="--trajectory: DDIM steps (the full toy experiment's on-policy pairs: 25)")
    p.add_argument("--caption", default="a disk", help="--trajectory: the prompt (the toy's caption)")
    p.add_argument("--num_latents", type=int, default=48)
    p.add_argument("--timesteps_per_bucket", type=int, default=2, help="timesteps drawn per latent and bucket")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num_inversion_steps", type=int, nargs="+", default=[5, 10])
    p.add_argument("--num_renoise_steps", type=int, nargs="+", default=[0, 1, 2],
                   help="flow pipelines: R, the ReNoise refinements per Euler step, each probed with each K")
    p.add_argument("--max_sequence_length", type=int, default=256,
                   help="flow pipelines: T5 tokens of the conditioning (zeros without T5; the pipeline's default 256)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def load(args):
    from diffusers import StableDiffusionPipeline

    from smpo.data import PairTransform, load_preference_dataset, open_image

    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=torch.float32)
    dataset = load_preference_dataset(args.dataset_name, "train")
    transform = PairTransform(args.resolution, random_crop=False, hflip=False)
    images = [open_image(dataset[i]["jpg_0"]) for i in range(args.num_latents)]
    pixels = torch.stack([transform([im], random)[0][0] for im in images])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer([dataset[0]["caption"]], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
    config = pipe.scheduler.config
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(config)
    return pipe.unet.eval(), latents, text, scheduler.alphas_cumprod.float(), config.get("steps_offset", 0)


def main(args):
    from smpo.renoise import add_noise, inversion_plan, renoise_inversion

    torch.manual_seed(args.seed)
    unet, latents, text, alphas_cumprod, steps_offset = load(args)
    g = torch.Generator().manual_seed(args.seed)
    n = len(latents)
    # every latent at `timesteps_per_bucket` random timesteps of each bucket
    t = torch.cat([torch.randint(lo, hi, (n * args.timesteps_per_bucket,), generator=g) for lo, hi in BUCKETS])
    x0 = latents.repeat(len(BUCKETS) * args.timesteps_per_bucket, 1, 1, 1)

    @torch.no_grad()
    def eps(z, step_t, index=None):
        return unet(z, step_t, encoder_hidden_states=text.expand(len(z), -1, -1)).sample

    def measure(noisy, noise):
        errors = torch.cat([(eps(noisy[i:i + args.batch_size], t[i:i + args.batch_size]) - noise[i:i + args.batch_size])
                            .pow(2).flatten(1).mean(1) for i in range(0, len(t), args.batch_size)])
        flat, ref = noise.flatten(1), x0.flatten(1)
        std = flat.std(1)
        centred, ref_c = flat - flat.mean(1, keepdim=True), ref - ref.mean(1, keepdim=True)
        corr = (centred * ref_c).sum(1) / (centred.norm(dim=1) * ref_c.norm(dim=1)).clamp_min(1e-12)
        return errors, std, corr

    def invert(k, schedule, proportional=False):
        """(noisy, noise, image-forwards per sample); proportional: exact with ceil(K (t+1) / 1000) steps."""
        if not proportional:
            out = [renoise_inversion(eps, x0[i:i + args.batch_size], t[i:i + args.batch_size], alphas_cumprod, k, 1,
                                     schedule, steps_offset) for i in range(0, len(t), args.batch_size)]
            counts = inversion_plan(t, len(alphas_cumprod), k, schedule, steps_offset)[3]
            return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), 2 * counts.float()
        steps = torch.clamp(-(-k * (t + 1) // len(alphas_cumprod)), min=1, max=k)
        noisy, noise = torch.empty_like(x0), torch.empty_like(x0)
        for s in steps.unique().tolist():
            rows = torch.nonzero(steps == s).view(-1)
            noisy[rows], noise[rows] = renoise_inversion(eps, x0[rows], t[rows], alphas_cumprod, s, 1, "exact")
        return noisy, noise, 2 * torch.clamp(steps, max=t.clamp(min=1)).float()

    sources = {"forward": None}
    for k in args.num_inversion_steps:
        sources[f"exact K={k}"] = (k, "exact", False)
        sources[f"exact-proportional K={k}"] = (k, "exact", True)
        sources[f"grid_above K={k}"] = (k, "grid_above", False)
        sources[f"grid_below K={k}"] = (k, "grid_below", False)
    results = {"model": args.pretrained_model_name_or_path, "num_latents": n, "samples": len(t),
               "buckets": [f"{lo}-{hi - 1}" for lo, hi in BUCKETS], "sources": {}}
    for name, spec in sources.items():
        if spec is None:
            noise = torch.randn(x0.shape, generator=g)
            noisy, forwards = add_noise(x0, noise, t, alphas_cumprod), torch.zeros(len(t))
        else:
            noisy, noise, forwards = invert(*spec)
        errors, std, corr = measure(noisy, noise)
        rows = {}
        for lo, hi in BUCKETS:
            m = (t >= lo) & (t < hi)
            rows[f"{lo}-{hi - 1}"] = {"err": errors[m].mean().item(), "std": std[m].mean().item(),
                                      "corr_x0": corr[m].mean().item(), "forwards": forwards[m].mean().item()}
        results["sources"][name] = {"buckets": rows, "forwards_mean": forwards.mean().item(),
                                    "err_mean": errors.mean().item()}
        print(f"{name:<26}" + "  ".join(f"{b}: {r['err']:.3f}/{r['std']:.2f}/{r['corr_x0']:+.2f}"
                                        for b, r in rows.items()),
              flush=True)
    write_outputs(args.output_dir, "probe", results, markdown(results))
    return results


def write_outputs(output_dir, name, results, table):
    """NAME.json (the results) and NAME.md (the table) in output_dir."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(output_dir, f"{name}.md"), "w") as f:
        f.write(table)


def markdown(results):
    buckets = results["buckets"]
    lines = ["| source | forwards/sample | " + " | ".join(f"t {b}" for b in buckets) + " |",
             "|---|---|" + "---|" * len(buckets)]
    for name, res in results["sources"].items():
        cells = [f"{r['err']:.3f} / {r['std']:.2f} / {r['corr_x0']:+.2f}" for r in res["buckets"].values()]
        lines.append(f"| {name} | {res['forwards_mean']:.1f} | " + " | ".join(cells) + " |")
    return ("Each cell: the base model's denoising error on the target / the target noise's std / its "
            f"correlation with x0 ({results['samples']} samples of {results['num_latents']} latents).\n\n"
            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    from smpo.conditioning import pipeline_family

    args = parse_args()
    if args.trajectory:
        from trajectory_probe import trajectory_probe

        trajectory_probe(args)
    elif args.dataset_name is None:
        raise SystemExit("give --dataset_name (the images to probe), or --trajectory")
    elif (pipeline_family(args.pretrained_model_name_or_path) or (None, False))[1]:  # a rectified flow
        from flow_probe import flow_probe

        flow_probe(args)
    else:
        main(args)
