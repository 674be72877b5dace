#!/usr/bin/env python
"""A CPU-sized preference-alignment experiment that shows whether SmPO moves a model toward what people prefer.

    python examples/toy_alignment.py --quick          # ~13 min on a 2-core CPU from scratch (790 s measured)
    python examples/toy_alignment.py                  # the full experiment (27.5 min from scratch)
    python examples/toy_alignment.py --minimal        # a smoke test of every stage (CI, ~1 min)

Offline, everything in fp32 on the CPU, written to --work_dir (default ./toy-alignment):

1. A synthetic world: 32x32 coloured disks on grey, caption "a disk". The true preference is the
   disk's *warmth*, cos(hue - 30 deg) in [-1, 1] (orange best, cyan/blue worst), measured from
   pixels (`true_preference`). Raters are noisy: each pair's binary label is drawn from a
   Bradley-Terry model of the warmth, p(image 0 preferred) = sigmoid((w0 - w1) / rater_temperature),
   so near-ties are coin flips and some labels are flipped.
2. A tiny base text-to-image model trained on the whole world (all hues, so it is neutral): an
   AutoencoderKL, a UNet2DConditionModel and a char-level CLIP text encoder, saved as a real
   StableDiffusionPipeline in WORK/base-<key>/ (cached: a rerun with the same settings skips it).
3. A Pick-a-Pic-schema preference dataset (caption, jpg_0, jpg_1, label_0) of world pairs, and a
   tiny reward model (a transformers CLIPModel + CLIPProcessor trained for the purpose) whose
   cosine(image, caption) is 0.2 + 0.08 * (warmth + noise), noise ~ N(0, reward_noise) per
   training image: a PickScore stand-in whose score range equals PickScore's min-max range (tau).
   The pairs are scored by `score_pairs.py`, run as a user would.
4. Three LoRA runs of `train_smpo_diffusion.py` through `accelerate launch`, same steps, beta,
   learning rate, batch and seed: Diffusion-DPO (human labels, forward noise), SmPO smoothing only
   (reward-smoothed weights, forward noise) and full SmPO (smoothing + ReNoise inversion, K = 10:
   with the SD script's default K = 5 the inversion is too coarse for this model and full SmPO
   wrecks it; see the README).
5. Evaluation of the base and every checkpoint on fixed seeds: mean true preference of the samples
   (with its standard error), diversity (normalised entropy of the hue histogram; 1 = all hues
   equally often) and drift (RMS pixel distance to the base model's sample from the same seed).

Outputs in WORK: results.json, preference_vs_step.png, samples_grid.png, and a table in the terminal.
"""

import argparse
import colorsys
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # smpo, from a checkout
CAPTION = "a disk"
RESOLUTION = 32
WARM_HUE = 30.0 / 360.0  # orange: the most preferred hue
BASE_VERSION = "toy-base-v1"  # change when the base-model code changes (invalidates the cache)
DATA_VERSION = "toy-data-v1"

SMPO_RENOISE = ["--loss_type", "smpo", "--noise_source", "renoise"]


def inversion(schedule, k, model="policy"):
    return SMPO_RENOISE + ["--inversion_schedule", schedule, "--num_inversion_steps", str(k), "--inversion_model", model]


# "smpo" and "smpo_refinv" invert with the experiment's --inversion_schedule and --num_inversion_steps;
# the others fix theirs (the seeded ablation of docs/inversion.md).
METHODS = {
    "dpo": {"label": "Diffusion-DPO", "short": "Diffusion-DPO", "flags": ["--loss_type", "dpo", "--noise_source", "forward"]},
    "smpo_smooth": {"label": "SmPO smoothing only", "short": "SmPO smoothing", "flags": ["--loss_type", "smpo", "--noise_source", "forward"]},
    "smpo": {"label": "SmPO (smoothing + ReNoise)", "short": "SmPO smooth+ReNoise", "flags": SMPO_RENOISE},
    "smpo_refinv": {"label": "SmPO, reference inverts", "short": "SmPO ref-inv",
                    "flags": SMPO_RENOISE + ["--inversion_model", "reference"]},
    "smpo_exact10": {"label": "SmPO exact K=10", "short": "exact K10", "flags": inversion("exact", 10)},
    "smpo_above5": {"label": "SmPO grid_above K=5", "short": "above K5", "flags": inversion("grid_above", 5)},
    "smpo_above10": {"label": "SmPO grid_above K=10", "short": "above K10", "flags": inversion("grid_above", 10)},
    "smpo_below5": {"label": "SmPO grid_below K=5", "short": "below K5", "flags": inversion("grid_below", 5)},
    "refinv_exact10": {"label": "SmPO ref-inverts exact K=10", "short": "ref exact K10",
                       "flags": inversion("exact", 10, "reference")},
    "refinv_above5": {"label": "SmPO ref-inverts grid_above K=5", "short": "ref above K5",
                      "flags": inversion("grid_above", 5, "reference")},
}
ABLATION = ["dpo", "smpo_smooth", "smpo_exact10", "smpo_above5", "smpo_above10", "smpo_below5", "refinv_exact10",
            "refinv_above5"]
DEFAULT_METHODS = ["dpo", "smpo_smooth", "smpo"]

# Sizes of each mode. "base_*" and "world_*" keys make the base cache key; the others are the experiment.
PRESETS = {
    "minimal": dict(world_size=256, vae_channels=(8, 16), vae_steps=20, unet_channels=(16, 32), unet_steps=20,
                    base_batch=16, num_pairs=48, reward_steps=20, steps=4, batch_size=4, checkpoint_every=2,
                    num_eval_samples=8, eval_inference_steps=4, grid_samples=4),
    "quick": dict(world_size=2000, vae_channels=(16, 32), vae_steps=300, unet_channels=(32, 64), unet_steps=900,
                  base_batch=32, num_pairs=1000, reward_steps=300, steps=60, batch_size=8, checkpoint_every=20,
                  num_eval_samples=96, eval_inference_steps=20, grid_samples=8),
    "full": dict(world_size=4000, vae_channels=(16, 32), vae_steps=400, unet_channels=(32, 64), unet_steps=1500,
                 base_batch=32, num_pairs=2000, reward_steps=500, steps=200, batch_size=8, checkpoint_every=50,
                 num_eval_samples=256, eval_inference_steps=25, grid_samples=8),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="The README's first command: a few minutes.")
    mode.add_argument("--minimal", action="store_true", help="Tiny sizes, a few steps: checks every stage (CI).")
    p.add_argument("--work_dir", default="toy-alignment")
    p.add_argument("--steps", type=int, default=None, help="Training steps of each method (default: per mode).")
    p.add_argument("--checkpoint_every", type=int, default=None, help="Evaluate every N steps (default: per mode).")
    p.add_argument("--batch_size", type=int, default=None, help="Pairs per training step (default: per mode).")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--beta_dpo", type=float, default=500.0, help="KL strength, -0.5 * beta convention.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    p.add_argument("--num_inversion_steps", type=int, default=10,
                   help="K for full SmPO (the paper's ablation choice). With the SD script's default, 5, the "
                        "inversion is too coarse for this model and full SmPO degrades it (see the README).")
    p.add_argument("--num_eval_samples", type=int, default=None)
    p.add_argument("--eval_inference_steps", type=int, default=None, help="DDIM steps when sampling.")
    p.add_argument("--rater_temperature", type=float, default=0.3,
                   help="Bradley-Terry temperature of the simulated human raters (in warmth units).")
    p.add_argument("--reward_noise", type=float, default=0.15, help="Noise std of the reward model's targets.")
    p.add_argument("--inversion_schedule", default="exact", choices=["exact", "grid_above", "grid_below"],
                   help="The inversion schedule of the 'smpo' and 'smpo_refinv' methods (docs/inversion.md).")
    p.add_argument("--data_source", default="world", choices=["world", "on_policy"],
                   help="world: pairs of world images (like Pick-a-Pic's pairs of other models' samples); on_policy: "
                        "pairs of the base model's own samples made by generate_pairs.py, scored by the same reward "
                        "model and labelled by the same simulated raters.")
    p.add_argument("--on_policy_pairs", type=int, default=None,
                   help="Pairs sampled for --data_source on_policy (default: the mode's number of world pairs).")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS) + ["ablation"],
                   help=f"'ablation' stands for {' '.join(ABLATION)}.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the world, the base model, the data and the reward model.")
    p.add_argument("--train_seeds", type=int, nargs="+", default=None,
                   help="Training seeds of every method (default: --seed). With several, each method's curve is the "
                        "mean over seeds and its error bar the standard error over seeds.")
    p.add_argument("--reuse_runs", action="store_true",
                   help="Keep training runs that already reached the last step (same settings assumed) instead of "
                        "training them again; checkpoint evaluations are always cached beside the checkpoint.")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="Training runs and evaluations at once, each with --threads torch threads (default: 2, or 1 "
                        "on a 1-core machine). Every run and evaluation gives the same numbers whatever --jobs is "
                        "(wall-clock s/step aside).")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads, also for the training subprocesses (default 1: on a shared 2-core machine a second "
                        "thread that has to wait for a busy core made every step ~10x slower).")
    p.add_argument("--rebuild_base", action="store_true", help="Retrain the base model even if it is cached.")
    args = p.parse_args(argv)
    args.mode = "minimal" if args.minimal else "quick" if args.quick else "full"
    cfg = dict(PRESETS[args.mode])
    for key in ("steps", "checkpoint_every", "batch_size", "num_eval_samples", "eval_inference_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    args.cfg = cfg
    # each method once, in order ("dpo ablation" would otherwise train dpo twice into the same folder)
    args.methods = list(dict.fromkeys(m for name in args.methods for m in (ABLATION if name == "ablation" else [name])))
    args.train_seeds = args.train_seeds if args.train_seeds is not None else [args.seed]
    return args


# ------------------------------------------------------------------------------- the world
def hue_warmth(hue):
    """The true preference of a hue in [0, 1): cos(hue - 30 deg), 1 for orange, -1 for cyan-blue."""
    return np.cos(2 * np.pi * (np.asarray(hue) - WARM_HUE))


def draw_disks(rng, n):
    """n images (n, 32, 32, 3) in [0, 1] of one antialiased disk on grey, and their hues."""
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float32) + 0.5
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), np.float32)
    hues = rng.random(n)
    for i in range(n):
        sat, val = rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)
        colour = np.array(colorsys.hsv_to_rgb(hues[i], sat, val), np.float32)
        radius = rng.uniform(6.0, 11.0)
        cy, cx = rng.uniform(radius + 1, RESOLUTION - radius - 1, size=2)
        inside = np.clip(radius - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) + 0.5, 0.0, 1.0)[..., None]
        images[i] = 0.5 * (1 - inside) + colour * inside
    return images, hues


def measure_hue(images, chroma_threshold=0.25, min_pixels=6):
    """Hue of the mean colour of the coloured (non-grey) pixels of each image; NaN where there is no disk.

    ``images``: (n, H, W, 3) floats in [0, 1]. A pixel is coloured when max(RGB) - min(RGB) exceeds
    ``chroma_threshold`` (grey has 0, the world's disks at least 0.6).
    """
    images = np.asarray(images, np.float64)
    chroma = images.max(-1) - images.min(-1)
    hues = np.full(len(images), np.nan)
    for i, (image, c) in enumerate(zip(images, chroma)):
        mask = c > chroma_threshold
        if mask.sum() >= min_pixels:
            hues[i] = colorsys.rgb_to_hsv(*image[mask].mean(0))[0]
    return hues


def true_preference(images):
    """The true preference measured from pixels: warmth of the disk's hue; -1 (the worst) where there is no disk."""
    hues = measure_hue(images)
    return np.where(np.isnan(hues), -1.0, hue_warmth(np.nan_to_num(hues))), ~np.isnan(hues)


def hue_diversity(images, bins=12):
    """Normalised entropy of the hue histogram of the samples with a disk: 1 = all hues equally often, 0 = one hue."""
    hues = measure_hue(images)
    hues = hues[~np.isnan(hues)]
    if len(hues) == 0:
        return 0.0
    counts = np.histogram(hues, bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
    prob = counts[counts > 0] / counts.sum()
    return float(-(prob * np.log(prob)).sum() / np.log(bins))


def to_uint8(images):
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def encoded(image, fmt="JPEG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format=fmt, quality=95)
    return buf.getvalue()


# -------------------------------------------------------------------------- the base model
def make_tokenizer():
    """A CLIPTokenizer over single characters (as examples/make_tiny_assets.py), model_max_length 77."""
    import string

    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=[], model_max_length=77)


def text_config(vocab_size, hidden=32, projection_dim=32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def cosine_lr(optimizer, total, warmup=20):
    import torch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.95 + 0.05

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_base(cfg, world, out_dir, seed, tqdm):
    """Train the VAE, then the UNet on the world; save a StableDiffusionPipeline to out_dir."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    pixels = torch.from_numpy(world).permute(0, 3, 1, 2) * 2 - 1  # (n, 3, 32, 32) in [-1, 1]
    batch = cfg["base_batch"]
    log = {}

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(cfg["vae_channels"]),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=RESOLUTION)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = cosine_lr(opt, cfg["vae_steps"])
    bar = tqdm(range(cfg["vae_steps"]), desc="base 1/2: VAE", unit="step")
    for _ in bar:
        x = pixels[gen.integers(0, len(pixels), batch)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = dist.kl().mean() / x[0].numel()
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    log["vae_mse"] = mse.item()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in pixels.split(256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    tokenizer = make_tokenizer()
    text_encoder = CLIPTextModel(text_config(len(tokenizer))).eval()
    with torch.no_grad():
        ids = tokenizer([CAPTION], max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        cond = text_encoder(ids)[0]

    c1, c2 = cfg["unet_channels"]
    unet = UNet2DConditionModel(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(c1, c2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = make_scheduler()
    ddpm = DDPMScheduler.from_config(scheduler.config)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    sched = cosine_lr(opt, cfg["unet_steps"])
    bar = tqdm(range(cfg["unet_steps"]), desc="base 2/2: UNet", unit="step")
    ema = None
    for _ in bar:
        x0 = latents[gen.integers(0, len(latents), batch)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (batch,))
        pred = unet(ddpm.add_noise(x0, noise, t), t, encoder_hidden_states=cond.expand(batch, -1, -1)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    log["unet_loss"] = ema
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return log


def base_key(cfg, seed):
    keys = {k: cfg[k] for k in ("world_size", "vae_channels", "vae_steps", "unet_channels", "unet_steps", "base_batch")}
    text = json.dumps({"version": BASE_VERSION, "seed": seed, **keys}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:10], keys


# ------------------------------------------------------------------ data and reward model
def build_dataset(args, cfg, out_dir, tqdm):
    """Pick-a-Pic-schema pairs of world images with Bradley-Terry rater labels; save_to_disk."""
    from datasets import Dataset

    rng = np.random.default_rng(args.seed + 1)
    images, hues = draw_disks(rng, 2 * cfg["num_pairs"])
    warmth = hue_warmth(hues)
    rows = []
    for i in tqdm(range(cfg["num_pairs"]), desc="preference pairs", unit="pair"):
        w0, w1 = warmth[2 * i], warmth[2 * i + 1]
        p0 = 1.0 / (1.0 + math.exp(-(w0 - w1) / args.rater_temperature))
        label_0 = float(rng.random() < p0)
        rows.append({"caption": CAPTION, "jpg_0": encoded(images[2 * i]), "jpg_1": encoded(images[2 * i + 1]),
                     "label_0": label_0, "label_1": 1.0 - label_0, "true_preference_0": float(w0),
                     "true_preference_1": float(w1), "ranking_id": i})
    Dataset.from_list(rows).save_to_disk(out_dir)
    w0, w1 = warmth[0::2], warmth[1::2]
    labels = np.array([r["label_0"] for r in rows])
    return {"num_pairs": len(rows), "labels_agree_with_truth": float(((w0 > w1) == (labels == 1)).mean()),
            "near_ties (|w0 - w1| < 0.1)": float((np.abs(w0 - w1) < 0.1).mean())}


def train_reward_model(args, cfg, out_dir, tqdm):
    """A tiny CLIPModel + CLIPProcessor: cosine(image, caption) ~ 0.2 + 0.08 * (warmth + noise)."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from smpo.rewards import projected_embedding

    torch.manual_seed(args.seed + 2)
    rng = np.random.default_rng(args.seed + 2)
    n = max(512, cfg["num_pairs"])
    images, hues = draw_disks(rng, n)
    target = 0.2 + 0.08 * (hue_warmth(hues) + args.reward_noise * rng.standard_normal(n))
    tokenizer = make_tokenizer()
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              image_size=RESOLUTION, patch_size=4, projection_dim=32)
    model = CLIPModel(CLIPConfig(text_config=text_config(len(tokenizer)).to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=32))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": RESOLUTION},
                                                                 crop_size={"height": RESOLUTION, "width": RESOLUTION}),
                              tokenizer=tokenizer)
    from PIL import Image

    pixel_values = processor(images=[Image.fromarray(im) for im in to_uint8(images)], return_tensors="pt")["pixel_values"]
    text = processor(text=[CAPTION], padding=True, return_tensors="pt")
    target = torch.tensor(target, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = cosine_lr(opt, cfg["reward_steps"])
    bar = tqdm(range(cfg["reward_steps"]), desc="reward model", unit="step")
    for _ in bar:
        idx = torch.from_numpy(rng.integers(0, n, 64))
        img = F.normalize(projected_embedding(model.get_image_features(pixel_values=pixel_values[idx])), dim=-1)
        txt = F.normalize(projected_embedding(model.get_text_features(**text)), dim=-1)
        loss = F.mse_loss((img * txt).sum(-1), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rmse=f"{loss.item() ** 0.5:.4f}")
    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_on_policy_dataset(args, cfg, base_dir, reward, out_dir, tqdm):
    """The second data source: pairs of the base model's own samples. generate_pairs.py samples two images per
    prompt (the caption, num_pairs times) and scores them with the experiment's reward model; the same
    simulated raters as build_dataset() then label each pair from the images' true preference (from pixels)."""
    from datasets import load_from_disk

    from smpo.data import open_image

    os.makedirs(out_dir)
    prompts = os.path.join(out_dir, "prompts.txt")
    with open(prompts, "w") as f:
        f.write((CAPTION + "\n") * (args.on_policy_pairs or cfg["num_pairs"]))
    generated = os.path.join(out_dir, "generated")
    # seeds 10^6 + 2 i + k: away from the evaluation's (10^4 + seed + k)
    run([sys.executable, os.path.join(ROOT, "generate_pairs.py"), "--pretrained_model_name_or_path", base_dir,
         "--prompts_file", prompts, "--num_images_per_prompt", "2", "--pairing", "all",
         "--num_inference_steps", str(cfg["eval_inference_steps"]), "--guidance_scale", "1.0",
         "--resolution", str(RESOLUTION), "--seed", str(1_000_000 + args.seed), "--batch_size", "32",
         "--shard_size", "64", "--reward_model_name_or_path", reward, "--device", "cpu", "--output_dir", generated],
        args, os.path.join(out_dir, "generate_pairs.log"))
    ds = load_from_disk(generated)
    decode = lambda column: np.stack([np.asarray(open_image(v), np.float32) / 255.0 for v in ds[column]])  # noqa: E731
    w0, w1 = true_preference(decode("jpg_0"))[0], true_preference(decode("jpg_1"))[0]
    rng = np.random.default_rng(args.seed + 4)
    labels = (rng.random(len(ds)) < 1.0 / (1.0 + np.exp(-(w0 - w1) / args.rater_temperature))).astype(np.float64)
    ds = ds.remove_columns([c for c in ("label_0", "label_1") if c in ds.column_names])
    for name, values in (("label_0", labels), ("label_1", 1.0 - labels), ("true_preference_0", w0),
                         ("true_preference_1", w1)):
        ds = ds.add_column(name, [float(v) for v in values])
    scored = os.path.join(out_dir, "pairs-scored")
    ds.save_to_disk(scored)
    return {"num_pairs": len(ds), "labels_agree_with_truth": float(((w0 > w1) == (labels == 1)).mean()),
            "near_ties (|w0 - w1| < 0.1)": float((np.abs(w0 - w1) < 0.1).mean()), **score_stats(ds)}


def score_stats(ds):
    """How well the reward scores of a scored pair dataset track the true preference."""
    import torch

    from smpo.labels import preference_weight

    s0, s1 = np.array(ds["reward_score_0"]), np.array(ds["reward_score_1"])
    w0, w1 = np.array(ds["true_preference_0"]), np.array(ds["true_preference_1"])
    _, weight = preference_weight(torch.from_numpy(s0), torch.from_numpy(s1))  # the training scripts' defaults
    return {"reward_corr_with_truth": float(np.corrcoef(np.r_[s0, s1], np.r_[w0, w1])[0, 1]),
            "reward_agrees_with_truth": float(((s0 > s1) == (w0 > w1)).mean()),
            "mean_smoothed_weight": float(weight.mean())}


def python_env(args):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(cmd, args, log_path):
    """Run a command; its output goes to log_path (the progress bars stay on our terminal)."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=python_env(args), stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = open(log_path).read()[-4000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log_path} ---\n{tail}")


def accelerate_cmd():
    return [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "train_smpo_diffusion.py")]


# ---------------------------------------------------------------------------- evaluation
def load_pipeline(path):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, cfg, seed, batch=32):
    """num_eval_samples images (n, 32, 32, 3) in [0, 1]; image k starts from the noise of seed + k."""
    import torch

    out = []
    n = cfg["num_eval_samples"]
    with torch.no_grad():
        for start in range(0, n, batch):
            ks = range(start, min(n, start + batch))
            gens = [torch.Generator().manual_seed(seed + k) for k in ks]
            out.append(pipe([CAPTION] * len(gens), height=RESOLUTION, width=RESOLUTION, guidance_scale=1.0,
                            num_inference_steps=cfg["eval_inference_steps"], generator=gens, output_type="np").images)
    return np.concatenate(out).astype(np.float32)


def summarize(images, base_images):
    """Mean true preference (+ its standard error, and the paired gain over the base on the same seeds),
    hue diversity, drift from the base's samples (RMS pixel distance, pixels in [0, 1]) and the disk rate."""
    pref, has_disk = true_preference(images)
    gain = pref - true_preference(base_images)[0]
    se = (lambda x: float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0)
    return {"true_preference": float(pref.mean()), "true_preference_se": se(pref),
            "paired_gain": float(gain.mean()), "paired_gain_se": se(gain),
            "diversity": hue_diversity(images),
            "drift": float(np.sqrt(((images - base_images) ** 2).mean(axis=(1, 2, 3))).mean()),
            "disk_rate": float(has_disk.mean())}


def checkpoint_dirs(run_dir):
    found = {}
    if not os.path.isdir(run_dir):
        return found
    for name in os.listdir(run_dir):
        if name.startswith("checkpoint-") and os.path.exists(os.path.join(run_dir, name, "pytorch_lora_weights.safetensors")):
            found[int(name.split("-")[1])] = os.path.join(run_dir, name)
    return dict(sorted(found.items()))


def run_dir(runs_dir, name, seed):
    return os.path.join(runs_dir, name, f"seed-{seed}")


def parallel(fn, items, jobs, tqdm, desc, unit="run", init=None):
    """fn over items, in order; with jobs > 1 in that many worker processes (evaluation) or threads (runs
    of subprocesses). ``init`` = (initializer, args) runs in each worker (or once here for jobs == 1)."""
    bar = tqdm(total=len(items), desc=desc, unit=unit)
    if jobs <= 1:
        if init:
            init[0](*init[1])
        out = []
        for item in items:
            out.append(fn(item))
            bar.update(1)
    elif init is None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(fn, item) for item in items]
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            out = [future.result() for future in futures]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs, initializer=init[0], initargs=init[1]) as pool:
            out = []
            for result in pool.imap(fn, items):
                out.append(result)
                bar.update(1)
    bar.close()
    return out


_EVAL = {}


def init_evaluation(base_dir, cfg, eval_seed, base_images, threads):
    import torch

    torch.set_num_threads(threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    _EVAL.update(pipe=load_pipeline(base_dir), cfg=cfg, eval_seed=eval_seed, base_images=base_images)


def evaluate_checkpoint(job):
    """summarize() of one LoRA checkpoint's samples (in a worker that holds the base pipeline)."""
    name, seed, step, path = job
    cfg = _EVAL["cfg"]
    key = hashlib.sha256(json.dumps([_EVAL["eval_seed"], cfg["num_eval_samples"], cfg["eval_inference_steps"],
                                     os.path.getmtime(os.path.join(path, "pytorch_lora_weights.safetensors"))])
                         .encode()).hexdigest()[:10]
    cached = os.path.join(path, f"toy-eval-{key}.json")  # the same checkpoint and settings: the same numbers
    if os.path.exists(cached):
        return json.load(open(cached))
    pipe = _EVAL["pipe"]
    pipe.load_lora_weights(path)
    images = sample(pipe, cfg, _EVAL["eval_seed"])
    pipe.unload_lora_weights()
    summary = summarize(images, _EVAL["base_images"])
    with open(cached, "w") as f:
        json.dump(summary, f)
    return summary


def seconds_per_step(run_path):
    """Training seconds per step between the first and the last checkpoint (start-up excluded)."""
    steps = checkpoint_dirs(run_path)
    if len(steps) < 2:
        return None
    (first, a), (last, b) = min(steps.items()), max(steps.items())
    return (os.path.getmtime(b) - os.path.getmtime(a)) / (last - first)


def aggregate(args, runs_dir, runs, jobs, evaluated, base):
    """Per method: each seed's curve, and the curve over seeds (mean; SE over seeds when there are several,
    else the one run's sampling SE), its final point, area under the curve, s/step, training metrics."""
    per_run = {}
    for (name, seed, step, _), row in zip(jobs, evaluated):
        per_run.setdefault((name, seed), {"0": dict(base)})[str(step)] = row
    methods = {}
    for name in args.methods:
        seeds = {seed: per_run[(name, seed)] for n, seed in runs if n == name}
        curve = {}
        for step in sorted(next(iter(seeds.values())), key=int):
            rows = [c[step] for c in seeds.values()]
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            if len(rows) > 1:
                values = [r["true_preference"] for r in rows]
                mean["true_preference_se"] = float(np.std(values, ddof=1) / math.sqrt(len(rows)))
            curve[step] = mean
        final = curve[str(max(map(int, curve)))]
        metrics = []
        for seed in seeds:
            with open(os.path.join(run_dir(runs_dir, name, seed), "metrics.jsonl")) as f:
                metrics.append([m for m in map(json.loads, f) if "step" in m][-1])
        speeds = [v for v in (seconds_per_step(run_dir(runs_dir, name, seed)) for seed in seeds) if v]
        methods[name] = {
            "label": METHODS[name]["label"], "flags": METHODS[name]["flags"], "curve": curve, "final": final,
            "final_gain_in_se": (final["true_preference"] - base["true_preference"]) / math.hypot(
                final["true_preference_se"], base["true_preference_se"]),
            "auc": area_under_curve(curve), "auc_by_seed": {str(s): area_under_curve(c) for s, c in seeds.items()},
            "final_by_seed": {str(s): c[str(max(map(int, c)))]["true_preference"] for s, c in seeds.items()},
            "seconds_per_step": float(np.median(speeds)) if speeds else None,
            "train_metrics_last": {k: float(np.mean([m[k] for m in metrics])) for k in
                                   ("loss", "implicit_acc", "weight", "model_minus_ref_w", "model_minus_ref_l",
                                    "noise_std_w", "noise_std_l") if k in metrics[0]},
        }
    return methods


def area_under_curve(curve):
    """Mean true preference over the training steps (trapezoids between evaluated steps, the base at 0)."""
    steps = sorted(map(int, curve))
    values = [curve[str(s)]["true_preference"] for s in steps]
    return float(np.trapezoid(values, steps) / steps[-1]) if steps[-1] else values[0]


def compare_with_dpo(results):
    """Steps to reach Diffusion-DPO's final mean preference, and s/step and cost to get there relative to DPO."""
    if "dpo" not in results["methods"]:
        return
    dpo = results["methods"]["dpo"]
    level = dpo["final"]["true_preference"]
    results["dpo_final"] = level
    results["steps_to_dpo_final"] = {k: steps_to_reach(r["curve"], level) for k, r in results["methods"].items()}
    for name, res in results["methods"].items():
        speed = res["seconds_per_step"] / dpo["seconds_per_step"] if res["seconds_per_step"] and dpo["seconds_per_step"] else None
        res["step_cost_vs_dpo"] = speed
        steps, dpo_steps = results["steps_to_dpo_final"][name], results["steps_to_dpo_final"]["dpo"]
        res["cost_to_dpo_final_vs_dpo"] = speed * steps / dpo_steps if speed and steps and dpo_steps else None


def steps_to_reach(curve, level):
    """First evaluated step whose mean true preference reaches ``level`` (None if never)."""
    for step, row in sorted(curve.items(), key=lambda kv: int(kv[0])):
        if row["true_preference"] >= level:
            return int(step)
    return None


# ------------------------------------------------------------------------------- outputs
def plot_curves(results, path, size=(720, 440)):
    """True preference vs step for each method (mean +- 1 SE band), the base as a dashed line (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax.axhline(results["base"]["true_preference"], color="grey", linestyle="--", label="base")
    for name, res in results["methods"].items():
        steps = sorted(map(int, res["curve"]))
        mean = np.array([res["curve"][str(s)]["true_preference"] for s in steps])
        se = np.array([res["curve"][str(s)]["true_preference_se"] for s in steps])
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=res["label"])
        ax.fill_between(steps, mean - se, mean + se, color=line.get_color(), alpha=0.15)
    seeds = results["settings"]["train_seeds"]
    ax.set_xlabel("training step")
    ax.set_ylabel("mean true preference (warmth)")
    ax.set_title(f"{results['mode']} mode, {len(seeds)} training seed(s): mean +- 1 SE", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def sample_grid(rows, labels, path, scale=2):
    """One row per model (base first), the same seeds in each column, a label on the left."""
    from PIL import Image, ImageDraw

    cell = RESOLUTION * scale
    label_w = 150
    n = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + n * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (images, label) in enumerate(zip(rows, labels)):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(Image.fromarray(to_uint8(image)).resize((cell, cell), Image.NEAREST), (label_w + c * cell, r * cell))
    grid.save(path)
    return grid.size


def print_table(results):
    base = results["base"]
    header = (f"{'model':<32}{'step':>6}  {'true pref +- se':>16}  {'vs base (se)':>12}  {'diversity':>9}  {'drift':>6}")
    print("\n" + header + "\n" + "-" * len(header))
    print(f"{'base':<32}{0:>6}  {base['true_preference']:>+8.3f} +- {base['true_preference_se']:.3f}  {'':>12}  "
          f"{base['diversity']:>9.3f}  {0.0:>6.3f}")
    for name, res in results["methods"].items():
        for step in sorted(res["curve"], key=int):
            row = res["curve"][step]
            z = (row["true_preference"] - base["true_preference"]) / math.hypot(row["true_preference_se"],
                                                                                base["true_preference_se"])
            print(f"{res['label']:<32}{int(step):>6}  {row['true_preference']:>+8.3f} +- "
                  f"{row['true_preference_se']:.3f}  {z:>+12.1f}  {row['diversity']:>9.3f}  {row['drift']:>6.3f}")
    if "steps_to_dpo_final" in results:
        print(f"\nsteps to reach Diffusion-DPO's final mean preference ({results['dpo_final']:+.3f}): "
              + ", ".join(f"{results['methods'][k]['label']}: {v if v is not None else 'not reached'}"
                          for k, v in results["steps_to_dpo_final"].items()))
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{'model':<32}{'AUC':>7}{'s/step x DPO':>14}{'cost to DPO level x DPO':>25}")
        for name, res in results["methods"].items():
            print(f"{res['label']:<32}{res['auc']:>+7.3f}{fmt(res['step_cost_vs_dpo']):>14}"
                  f"{fmt(res['cost_to_dpo_final_vs_dpo']):>25}")


def markdown_table(results):
    """results.md: one row per method, the numbers the README and docs/inversion.md quote."""
    base = results["base"]
    seeds = results["settings"]["train_seeds"]
    se = lambda values: np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")  # noqa: E731
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    lines = [f"{results['mode']} mode, data {results['settings'].get('data_source', 'world')}, training seeds {seeds}; "
             f"base {base['true_preference']:+.3f} +- {base['true_preference_se']:.3f} (diversity {base['diversity']:.3f}). "
             "Final and AUC: mean +- SE over the seeds; vs base: (final - base) / combined SE.", "",
             "| method | final | vs base | AUC | steps to DPO final | diversity | drift | s/step x DPO | "
             "cost to DPO final x DPO | m_w - r_w | m_l - r_l | noise std w / l |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results["methods"].items():
        final, last = res["final"], res["train_metrics_last"]
        aucs = list(res["auc_by_seed"].values())
        lines.append(
            f"| {res['label']} | {final['true_preference']:+.3f} +- {final['true_preference_se']:.3f} | "
            f"{res['final_gain_in_se']:+.1f} SE | {res['auc']:+.3f} +- {se(aucs):.3f} | "
            f"{fmt(results.get('steps_to_dpo_final', {}).get(name), 'd')} | {final['diversity']:.3f} | {final['drift']:.3f} | "
            f"{fmt(res.get('step_cost_vs_dpo'), '.2f')} | {fmt(res.get('cost_to_dpo_final_vs_dpo'), '.2f')} | "
            f"{last.get('model_minus_ref_w', float('nan')):+.4f} | {last.get('model_minus_ref_l', float('nan')):+.4f} | "
            f"{last.get('noise_std_w', float('nan')):.2f} / {last.get('noise_std_l', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main
def main(args):
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected here
    os.environ.update({k: v for k, v in python_env(args).items() if k.endswith("OFFLINE")})
    cfg = args.cfg
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    timings, t_start = {}, time.time()
    print(f"toy alignment, {args.mode} mode, in {work}")

    # 1-2. the world and the base model (cached on the settings that make it)
    key, key_cfg = base_key(cfg, args.seed)
    base_dir = os.path.join(work, f"base-{key}")
    t0 = time.time()
    if os.path.exists(os.path.join(base_dir, "DONE")) and not args.rebuild_base:
        base_log = json.load(open(os.path.join(base_dir, "DONE")))
        print(f"reusing the cached base model {base_dir} (trained in {base_log['seconds']:.0f} s)")
        timings["base_cached"] = True
    else:
        shutil.rmtree(base_dir, ignore_errors=True)
        world, _ = draw_disks(np.random.default_rng(args.seed), cfg["world_size"])
        base_log = train_base(cfg, world, base_dir, args.seed, tqdm)
        base_log.update(seconds=time.time() - t0, settings=key_cfg)
        json.dump(base_log, open(os.path.join(base_dir, "DONE"), "w"), indent=1, default=list)
        print(f"trained the base model in {base_log['seconds']:.0f} s: {base_dir}")
        timings["base_cached"] = False
    timings["base_s"] = time.time() - t0

    # 3. preference data, reward model, scores (cached on their settings too)
    t0 = time.time()
    data_key = hashlib.sha256(json.dumps([DATA_VERSION, args.seed, cfg["num_pairs"], cfg["reward_steps"],
                                          args.rater_temperature, args.reward_noise]).encode()).hexdigest()[:10]
    data_dir = os.path.join(work, f"data-{data_key}")
    pairs, reward, scored = (os.path.join(data_dir, n) for n in ("pairs", "reward-model", "pairs-scored"))
    if os.path.exists(os.path.join(data_dir, "DONE")):
        data_log = json.load(open(os.path.join(data_dir, "DONE")))
        print(f"reusing the cached preference data and reward model {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
        data_log = build_dataset(args, cfg, pairs, tqdm)
        train_reward_model(args, cfg, reward, tqdm)
        print("scoring the pairs with score_pairs.py")
        run([sys.executable, os.path.join(ROOT, "score_pairs.py"), "--dataset_name", pairs,
             "--reward_model_name_or_path", reward, "--output_dir", scored, "--batch_size", "64", "--device", "cpu"],
            args, os.path.join(data_dir, "score_pairs.log"))
        from datasets import load_from_disk

        data_log.update(score_stats(load_from_disk(scored)))
        json.dump(data_log, open(os.path.join(data_dir, "DONE"), "w"), indent=1)
    if args.data_source == "on_policy":  # the base model's own samples, same reward model and raters
        on_policy_dir = os.path.join(work, f"on-policy-{data_key}-{key}-{args.on_policy_pairs or cfg['num_pairs']}")
        if not os.path.exists(os.path.join(on_policy_dir, "DONE")):
            shutil.rmtree(on_policy_dir, ignore_errors=True)
            print("sampling the base model's own pairs with generate_pairs.py")
            json.dump(build_on_policy_dataset(args, cfg, base_dir, reward, on_policy_dir, tqdm),
                      open(os.path.join(on_policy_dir, "DONE"), "w"), indent=1)
        data_log = {"source": "on_policy", **json.load(open(os.path.join(on_policy_dir, "DONE")))}
        scored = os.path.join(on_policy_dir, "pairs-scored")
    print("data: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in data_log.items()))
    timings["data_s"] = time.time() - t0

    # 4. the training runs: every method with every training seed, same settings
    runs_dir = os.path.join(work, "runs" if args.data_source == "world" else "runs-on-policy")
    common = ["--pretrained_model_name_or_path", base_dir, "--dataset_name", scored, "--resolution", str(RESOLUTION),
              "--train_batch_size", str(cfg["batch_size"]), "--max_train_steps", str(cfg["steps"]),
              "--learning_rate", str(args.learning_rate), "--lr_scheduler", "constant", "--beta_dpo", str(args.beta_dpo),
              "--rank", str(args.rank), "--num_inversion_steps", str(args.num_inversion_steps),
              "--inversion_schedule", args.inversion_schedule, "--checkpointing_steps", str(cfg["checkpoint_every"])]
    t0 = time.time()
    runs = [(name, seed) for name in args.methods for seed in args.train_seeds]

    def train(run_key):
        name, seed = run_key
        out = run_dir(runs_dir, name, seed)
        if args.reuse_runs and cfg["steps"] in checkpoint_dirs(out):
            return f"  {METHODS[name]['label']} (seed {seed}): reusing {out}"
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        t1 = time.time()
        # a method's own flags come last: they override the common K and schedule
        run(accelerate_cmd() + common + ["--seed", str(seed)] + METHODS[name]["flags"] + ["--output_dir", out], args,
            out + ".log")
        timings[f"train_{name}_seed{seed}_s"] = time.time() - t1
        return f"  {METHODS[name]['label']} (seed {seed}): {cfg['steps']} steps in {time.time() - t1:.0f} s"

    for line in parallel(train, runs, args.jobs, tqdm, "training runs"):
        tqdm.write(line)
    timings["train_s"] = time.time() - t0

    # 5. evaluation on fixed seeds
    t0 = time.time()
    eval_seed = 10_000 + args.seed
    base_images = sample(load_pipeline(base_dir), cfg, eval_seed)
    base = summarize(base_images, base_images)
    jobs = [(name, seed, step, path) for name, seed in runs
            for step, path in checkpoint_dirs(run_dir(runs_dir, name, seed)).items()]
    evaluated = parallel(evaluate_checkpoint, jobs, args.jobs, tqdm, "evaluating", unit="model",
                         init=(init_evaluation, (base_dir, cfg, eval_seed, base_images, args.threads)))
    timings["eval_s"] = time.time() - t0

    results = {"mode": args.mode, "settings": {**cfg, "learning_rate": args.learning_rate, "beta_dpo": args.beta_dpo,
                                                "rank": args.rank, "num_inversion_steps": args.num_inversion_steps,
                                                "inversion_schedule": args.inversion_schedule,
                                                "rater_temperature": args.rater_temperature,
                                                "reward_noise": args.reward_noise, "seed": args.seed,
                                                "data_source": args.data_source,
                                                "train_seeds": args.train_seeds},
               "data": data_log, "base_model": base_log, "base": base,
               "methods": aggregate(args, runs_dir, runs, jobs, evaluated, base)}
    compare_with_dpo(results)
    grid_rows, grid_labels = [base_images[:cfg["grid_samples"]]], ["base"]
    pipe = load_pipeline(base_dir)
    for name in args.methods:  # the first training seed's final model
        pipe.load_lora_weights(checkpoint_dirs(run_dir(runs_dir, name, args.train_seeds[0]))[cfg["steps"]])
        grid_rows.append(sample(pipe, {**cfg, "num_eval_samples": cfg["grid_samples"]}, eval_seed))
        grid_labels.append(f"{METHODS[name]['short']} @{cfg['steps']}")
        pipe.unload_lora_weights()
    timings["total_s"] = time.time() - t_start
    results["timings"] = timings
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": args.threads, "jobs": args.jobs}
    suffix = "" if args.data_source == "world" else "_on_policy"
    results["plot_size"] = plot_curves(results, os.path.join(work, f"preference_vs_step{suffix}.png"))
    results["grid_size"] = sample_grid(grid_rows, grid_labels, os.path.join(work, f"samples_grid{suffix}.png"))
    with open(os.path.join(work, f"results{suffix}.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(work, f"results{suffix}.md"), "w") as f:
        f.write(markdown_table(results))
    print_table(results)
    print(f"\ntimes: base {timings['base_s']:.0f} s ({'cached' if timings['base_cached'] else 'trained'}), "
          f"data {timings['data_s']:.0f} s, training {timings['train_s']:.0f} s, evaluation {timings['eval_s']:.0f} s, "
          f"total {timings['total_s']:.0f} s")
    print(f"wrote {work}/results{suffix}.json, preference_vs_step{suffix}.png, samples_grid{suffix}.png")
    return results


if __name__ == "__main__":
    main(parse_args())
