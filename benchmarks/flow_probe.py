"""inversion_probe.py on a flow pipeline (SD3-style, e.g. the toy's --family flow base): what each noise source
gives the loss, per sigma bucket, before any training.

For clean latents of the dataset's jpg_0 images (VAE posterior samples, as the training step encodes them; the
inversion amplifies the posterior's noise, so its mean would understate the noise) at sigmas drawn uniformly within
each bucket, derives the training noise with random forward noise and with the flow inversion
(smpo.renoise.flow_inversion, K Euler steps from 0 to sigma, R ReNoise refinements each; every K of
--num_inversion_steps with every R of --num_renoise_steps) and
reports per bucket, averaged over the samples:

- ``err``: the base transformer's velocity error on the target v = (x_s - x0) / s, mean squared;
- ``std``: the std of the derived noise eps = (x_s - (1 - s) x0) / s (forward noise: 1);
- ``corr_x0``: its correlation with the clean latent;
- ``recon``: RMS distance to x0 of the Euler sampler run back down the same grid from x_s (ReNoise's aim: an
  inversion the sampler undoes);
- ``forwards``: transformer image-forwards per sample the inversion spent, K (R + 1).

``err_train``: err averaged with the weight the training density (the SD3 script's default, logit-normal through
the scheduler's shift) gives each bucket. The transformer is told the caption's conditioning (zero T5 tokens
without T5, as StableDiffusion3Pipeline), in fp32 on the CPU. Writes probe.json and probe.md.
"""

import torch

from inversion_probe import write_outputs

SIGMA_BUCKETS = [(0.0, 0.05), (0.05, 0.2), (0.2, 0.4), (0.4, 0.7), (0.7, 1.0)]


def load_flow(args):
    """(the transformer's velocity function v(z, sigma), clean latents, the scheduler config)."""
    import diffusers

    from smpo.data import PairTransform, load_preference_dataset, open_image
    from smpo.sampling import saved_without
    from smpo.step import encode_images

    path = args.pretrained_model_name_or_path
    pipeline_class = getattr(diffusers, diffusers.DiffusionPipeline.load_config(path)["_class_name"])
    if not hasattr(pipeline_class, "encode_prompt") or "FluxPipeline" in pipeline_class.__name__:
        raise SystemExit(f"the flow probe takes an SD3-style pipeline; {path} is a {pipeline_class.__name__}")
    pipe = pipeline_class.from_pretrained(path, dtype=torch.float32, **saved_without(path))
    dataset = load_preference_dataset(args.dataset_name, "train")
    transform = PairTransform(args.resolution, random_crop=False, hflip=False)
    import random

    pixels = torch.stack([transform([open_image(dataset[i]["jpg_0"])], random)[0][0] for i in range(args.num_latents)])
    # a posterior sample, shifted and scaled, as the training step encodes (not the mean: the inversion amplifies the
    # posterior's noise several times over, so the mean's derived noise understates what training sees)
    latents = encode_images(pipe.vae, pixels, args.batch_size, torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        cond, _, pooled, _ = pipe.encode_prompt(dataset[0]["caption"], None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=args.max_sequence_length)
    net = pipe.transformer.eval()

    @torch.no_grad()
    def v(z, sigma, index=None):
        return net(hidden_states=z, timestep=sigma * 1000.0, encoder_hidden_states=cond.expand(len(z), -1, -1),
                   pooled_projections=pooled.expand(len(z), -1)).sample

    return v, latents, pipe.scheduler.config


def flow_probe(args):
    from types import SimpleNamespace

    from smpo.processes import RectifiedFlow
    from smpo.renoise import flow_inversion

    torch.manual_seed(args.seed)
    v, latents, scheduler_config = load_flow(args)
    g = torch.Generator().manual_seed(args.seed)
    n, per = len(latents), args.timesteps_per_bucket
    s = torch.cat([lo + (hi - lo) * (1 - torch.rand(n * per, generator=g)) for lo, hi in SIGMA_BUCKETS])  # (lo, hi]
    x0 = latents.repeat(len(SIGMA_BUCKETS) * per, 1, 1, 1)
    col = s.view(-1, 1, 1, 1)
    batched = lambda fn, *xs: torch.cat([fn(*(x[i:i + args.batch_size] for x in xs))  # noqa: E731
                                         for i in range(0, len(s), args.batch_size)])

    def euler_down(x_s, sigma, k):
        z = x_s
        for j in range(k, 0, -1):
            z = z - (sigma / k).view(-1, 1, 1, 1) * v(z, sigma * j / k)
        return z

    def measure(noisy, k):
        target = (noisy - x0) / col
        err = batched(lambda z, sg, t: (v(z, sg) - t).pow(2).flatten(1).mean(1), noisy, s, target)
        noise = ((noisy - (1 - col) * x0) / col).flatten(1)
        centred, ref = noise - noise.mean(1, keepdim=True), x0.flatten(1) - x0.flatten(1).mean(1, keepdim=True)
        corr = (centred * ref).sum(1) / (centred.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-12)
        recon = batched(lambda z, sg, c: (euler_down(z, sg, k) - c).pow(2).flatten(1).mean(1).sqrt(), noisy, s, x0)
        return {"err": err, "std": noise.std(1), "corr_x0": corr, "recon": recon}

    process = RectifiedFlow.from_scheduler_config(scheduler_config, SimpleNamespace(
        weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29), time_scale=1000.0)
    drawn = process.draw_timesteps(100_000, torch.Generator().manual_seed(0))
    weights = [float(((drawn > lo) & (drawn <= hi)).float().mean()) for lo, hi in SIGMA_BUCKETS]
    names = [f"{lo:g}-{hi:g}" for lo, hi in SIGMA_BUCKETS]
    results = {"model": args.pretrained_model_name_or_path, "process": "rectified_flow", "num_latents": n,
               "samples": len(s), "buckets": names, "training_density_weights": dict(zip(names, weights)),
               "sources": {}}
    sources = {"forward": None, **{f"renoise K={k} R={r}": (k, r) for k in args.num_inversion_steps
                                   for r in args.num_renoise_steps}}
    for name, spec in sources.items():
        if spec is None:
            noisy, k, forwards = (1 - col) * x0 + col * torch.randn(x0.shape, generator=g), 10, 0
        else:
            k, r = spec
            noisy = batched(lambda c, sg: flow_inversion(v, c, sg, k, r), x0, s)
            forwards = k * (r + 1)
        stats = measure(noisy, k)
        rows = {b: {key: val[(s > lo) & (s <= hi)].mean().item() for key, val in stats.items()}
                for b, (lo, hi) in zip(names, SIGMA_BUCKETS)}
        results["sources"][name] = {"buckets": rows, "forwards": forwards, "num_inversion_steps": spec and spec[0],
                                    "num_renoise_steps": spec and spec[1],
                                    "err_train": sum(w * rows[b]["err"] for b, w in zip(names, weights))}
        print(f"{name:<18} err_train {results['sources'][name]['err_train']:.4f}  " + "  ".join(
            f"{b}: {row['err']:.3f}/{row['std']:.2f}/{row['recon']:.3f}" for b, row in rows.items()), flush=True)
    write_outputs(args.output_dir, "probe", results, markdown(results))
    return results


def markdown(results):
    buckets = results["buckets"]
    lines = ["| source | forwards/sample | err (training density) | " + " | ".join(f"s {b}" for b in buckets) + " |",
             "|---|---|---|" + "---|" * len(buckets)]
    for name, res in results["sources"].items():
        cells = [f"{r['err']:.3f} / {r['std']:.2f} / {r['corr_x0']:+.2f} / {r['recon']:.3f}"
                 for r in res["buckets"].values()]
        lines.append(f"| {name} | {res['forwards']} | {res['err_train']:.4f} | " + " | ".join(cells) + " |")
    weights = ", ".join(f"{b}: {w:.2f}" for b, w in results["training_density_weights"].items())
    return ("Each cell: the base transformer's velocity error on the target / the derived noise's std / its "
            "correlation with x0 / RMS distance of the Euler sampler's way back down to x0 "
            f"({results['samples']} samples of {results['num_latents']} latents). Training density's weight per "
            f"sigma bucket: {weights}.\n\n" + "\n".join(lines) + "\n")
