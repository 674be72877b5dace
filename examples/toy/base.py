"""The tiny base text-to-image model: an AutoencoderKL, a UNet2DConditionModel and the char-level CLIP text
encoder of examples/make_tiny_assets.py, trained on the whole world (all hues, so it is neutral) and saved as a
StableDiffusionPipeline. A new model family replaces train_base (and, if its pipeline differs, runs.load_pipeline)."""

import hashlib
import json
import math

import numpy as np

from .world import CAPTION, RESOLUTION

BASE_VERSION = "toy-base-v1"  # change when the base-model code changes (invalidates the cache)
BASE_KEYS = ("world_size", "vae_channels", "vae_steps", "unet_channels", "unet_steps", "base_batch")
TEXT_INTERMEDIATE_SIZE = 64  # the toy's text encoders (base and reward model) are wider than make_tiny_assets' (37)


def cosine_lr(optimizer, total, warmup=20):
    """Linear warm-up from 1/warmup, then cosine decay to a 5% floor.

    Not diffusers' get_cosine_schedule_with_warmup: that one starts at 0 (the first step is lost) and decays to 0;
    over the quick base's 900 steps the two differ by up to 0.05 x lr (sums 473 vs 450 lr-steps). Every cached
    base and reward model, and every number in docs/ made with them, was trained with this one.
    """
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
    from make_tiny_assets import make_tokenizer, scheduler as make_scheduler, text_config
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
    text_encoder = CLIPTextModel(text_config(len(tokenizer), intermediate_size=TEXT_INTERMEDIATE_SIZE)).eval()
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
    """The cache key of the base model: its code version, the seed and the preset's base_* and world_* sizes."""
    keys = {k: cfg[k] for k in BASE_KEYS}
    text = json.dumps({"version": BASE_VERSION, "seed": seed, **keys}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:10], keys

