"""inversion_probe.py --trajectory: how far each noise source's x_t lies from the model's own sampling trajectory.

See inversion_probe.py's docstring for what is measured; this module samples, records and compares.
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from inversion_probe import BUCKETS, write_outputs  # noqa: E402


def sample_trajectories(pipe, args):
    """(levels (L,), trajectory latents (L, N, C, h, w), sampler's final latents, decoded images in [0, 1],
    initial noises). Level l of the trajectory is the DDIM level the latent is at (the initial noise at the
    first timestep, then each step's result at timestep - T // steps)."""
    from smpo.sampling import initial_noise, latent_shape, use_deterministic_sampler

    use_deterministic_sampler(pipe)  # DDIM, eta 0: what generate_pairs.py samples with
    shape = latent_shape(pipe, args.resolution)
    noise = torch.stack([initial_noise(args.seed + i, shape) for i in range(args.num_latents)])
    recorded = []

    def record(pipeline, i, t, kwargs):
        recorded.append(kwargs["latents"].detach().clone())
        return kwargs

    with torch.no_grad():
        images = pipe([args.caption] * len(noise), num_inference_steps=args.num_inference_steps, guidance_scale=1.0,
                      height=args.resolution, width=args.resolution, latents=noise.clone(), output_type="np",
                      callback_on_step_end=record).images
    timesteps = pipe.scheduler.timesteps.long()
    ratio = pipe.scheduler.config.num_train_timesteps // args.num_inference_steps
    levels = [int(timesteps[0])] + [int(t) - ratio for t in timesteps]  # where each latent is
    latents = [noise] + recorded
    keep = [i for i, level in enumerate(levels) if level >= 0]  # the last latent is the sample, not a level
    return (torch.tensor([levels[i] for i in keep]), torch.stack([latents[i] for i in keep]), recorded[-1],
            torch.from_numpy(images), noise)


def training_latents(pipe, images, seed):
    """x0 as training sees the image: rounded to 8 bits (a PNG), in [-1, 1], VAE-encoded, a posterior sample."""
    from smpo.step import encode_images

    pixels = (images * 255).round() / 255 * 2 - 1
    return encode_images(pipe.vae, pixels.permute(0, 3, 1, 2).float(), 64, torch.Generator().manual_seed(seed))


def trajectory_probe(args):
    from diffusers import StableDiffusionPipeline

    from smpo.renoise import add_noise, renoise_inversion

    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.float()
    steps_offset = pipe.scheduler.config.get("steps_offset", 0)
    levels, truth, sampler_x0, images, noise = sample_trajectories(pipe, args)
    x0 = training_latents(pipe, images, args.seed)
    with torch.no_grad():
        ids = pipe.tokenizer([args.caption], padding="max_length", truncation=True,
                             max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
    unet, n, num_levels = pipe.unet.eval(), len(noise), len(levels)
    t = levels.repeat_interleave(n)  # (level, image) flattened, level-major like truth
    flat = lambda x: x.repeat(num_levels, 1, 1, 1)  # noqa: E731  one copy per level
    target = truth.flatten(0, 1)

    @torch.no_grad()
    def eps(z, step_t, index=None):
        return unet(z, step_t, encoder_hidden_states=text.expand(len(z), -1, -1)).sample

    def invert(clean, k):
        out = [renoise_inversion(eps, clean[i:i + args.batch_size], t[i:i + args.batch_size], alphas_cumprod, k, 1,
                                 "exact", steps_offset)[0] for i in range(0, len(t), args.batch_size)]
        return torch.cat(out)

    g = torch.Generator().manual_seed(args.seed + 1)
    sources = {"forward": add_noise(flat(x0), torch.randn(flat(x0).shape, generator=g), t, alphas_cumprod),
               "prior": add_noise(flat(x0), flat(noise), t, alphas_cumprod),
               "prior, sampler x0": add_noise(flat(sampler_x0), flat(noise), t, alphas_cumprod)}
    for k in args.num_inversion_steps:
        sources[f"renoise exact K={k}"] = invert(flat(x0), k)
        sources[f"renoise exact K={k}, sampler x0"] = invert(flat(sampler_x0), k)
    scale = (1 - alphas_cumprod[t]).sqrt()
    results = {"model": args.pretrained_model_name_or_path, "num_images": n, "num_inference_steps":
               args.num_inference_steps, "levels": levels.tolist(), "buckets": [], "sources": {},
               "vae_round_trip_rms": (x0 - sampler_x0).pow(2).mean().sqrt().item()}
    buckets = [(lo, hi) for lo, hi in BUCKETS if ((levels >= lo) & (levels < hi)).any()]
    results["buckets"] = [f"{lo}-{hi - 1}" for lo, hi in buckets]
    for name, x_t in sources.items():
        rms = (x_t - target).pow(2).flatten(1).mean(1).sqrt()
        rows = {}
        for lo, hi in buckets:
            m = (t >= lo) & (t < hi)
            rows[f"{lo}-{hi - 1}"] = {"noise_units": (rms[m] / scale[m]).mean().item(), "latent_rms": rms[m].mean().item(),
                                      "levels": sorted(set(t[m].tolist()))}
        results["sources"][name] = rows
        print(f"{name:<34}" + "  ".join(f"{b}: {r['noise_units']:.3f}" for b, r in rows.items()), flush=True)
    write_outputs(args.output_dir, "trajectory", results, markdown(results))
    return results


def markdown(results):
    buckets = results["buckets"]
    lines = ["| x_t from | " + " | ".join(f"t {b}" for b in buckets) + " |", "|---|" + "---|" * len(buckets)]
    for name, rows in results["sources"].items():
        lines.append(f"| {name} | " + " | ".join(f"{rows[b]['noise_units']:.3f}" for b in buckets) + " |")
    return (f"Distance from the sampling trajectory's latent at t, RMS / sqrt(1 - abar_t) (noise units), mean over "
            f"{results['num_images']} own samples ({results['num_inference_steps']} DDIM steps, eta 0) and the "
            f"trajectory's levels in each bucket. VAE round trip (x0 vs the sampler's final latent): RMS "
            f"{results['vae_round_trip_rms']:.3f}.\n\n" + "\n".join(lines) + "\n")
