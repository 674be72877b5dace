"""The tiny base text-to-image model, trained on the whole world (all hues, so it is neutral): an AutoencoderKL
(shared), then the family's denoiser with char-level CLIP text encoders (examples/make_tiny_assets.py). SD: a
UNet2DConditionModel, saved as a StableDiffusionPipeline; flow: an SD3Transformer2DModel on a rectified flow, saved
as a StableDiffusion3Pipeline without T5. Family versions (family.py) key the cache: change one with its code."""

import hashlib
import json
import math

import numpy as np

from .world import CAPTION, RESOLUTION

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


def train_base(cfg, world, out_dir, seed, tqdm, family):
    """Train the VAE, then the family's denoiser on the world; save its pipeline to out_dir."""
    import torch

    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    pixels = torch.from_numpy(world).permute(0, 3, 1, 2) * 2 - 1  # (n, 3, 32, 32) in [-1, 1]
    vae, latents, log = train_vae(cfg, pixels, gen, tqdm)
    train = {"sd": train_unet, "flow": train_transformer}[family.name]
    pipe, log[f"{family.denoiser}_loss"] = train(cfg, vae, latents, gen, tqdm)
    pipe.save_pretrained(out_dir)
    return log


def train_vae(cfg, pixels, gen, tqdm):
    """(the VAE, eval mode, the posterior means of the world's images, {"vae_mse": last batch's})."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    batch = cfg["base_batch"]
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
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in pixels.split(256)])
    return vae, latents, {"vae_mse": mse.item()}


def fit(model, steps, desc, batch_loss, tqdm):
    """Train ``model`` for ``steps`` on ``batch_loss()`` (AdamW 1e-3, cosine_lr, gradients clipped at 1); returns
    the loss's moving average (0.98)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = cosine_lr(opt, steps)
    bar = tqdm(range(steps), desc=desc, unit="step")
    ema = None
    for _ in bar:
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
    return ema


def train_unet(cfg, vae, latents, gen, tqdm):
    """The SD base: a UNet2DConditionModel predicting the noise (DDPM loss), a char-level CLIP text encoder;
    (a StableDiffusionPipeline, the UNet's last loss average)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from make_tiny_assets import make_tokenizer, scheduler as make_scheduler, text_config
    from transformers import CLIPTextModel

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
    batch = cfg["base_batch"]

    def batch_loss():
        x0 = latents[gen.integers(0, len(latents), batch)]
        noise = torch.randn_like(x0)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (batch,))
        pred = unet(ddpm.add_noise(x0, noise, t), t, encoder_hidden_states=cond.expand(batch, -1, -1)).sample
        return F.mse_loss(pred, noise)

    loss = fit(unet, cfg["unet_steps"], "base 2/2: UNet", batch_loss, tqdm)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe, loss


def train_transformer(cfg, vae, latents, gen, tqdm):
    """The flow base: an SD3Transformer2DModel predicting the velocity eps - x0 of the rectified flow
    x_s = (1 - s) x0 + s eps (sigmas drawn as train_smpo_diffusion_sd3.py draws them: logit-normal through the
    scheduler's shift 3), two char-level CLIP text encoders and no T5 (zero T5 tokens, as the pipeline conditions
    without one); (a StableDiffusion3Pipeline saved with text_encoder_3=None, the transformer's last loss average).
    The VAE gets SD3's shift and scaling factors: the latents' mean, 1 / their std."""
    import torch
    import torch.nn.functional as F
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from make_tiny_assets import make_tokenizer, text_config
    from transformers import CLIPTextModelWithProjection

    from .family import FLOW_SHIFT, FLOW_T5_TOKENS, flow_process

    shift = float(latents.mean())
    scaling = float(1.0 / (latents - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    latents = (latents - shift) * scaling
    config = text_config(len(make_tokenizer()), intermediate_size=TEXT_INTERMEDIATE_SIZE)
    encoders = [CLIPTextModelWithProjection(config).eval() for _ in range(2)]
    heads, head_dim = cfg["flow_heads"], cfg["flow_head_dim"]
    transformer = SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4,
                                        num_layers=cfg["flow_layers"], attention_head_dim=head_dim,
                                        num_attention_heads=heads, caption_projection_dim=heads * head_dim,
                                        joint_attention_dim=64, pooled_projection_dim=64)  # the two CLIPs joined
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=encoders[0], tokenizer=make_tokenizer(),
                                    text_encoder_2=encoders[1], tokenizer_2=make_tokenizer(),
                                    text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        cond, _, pooled, _ = pipe.encode_prompt(CAPTION, None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=FLOW_T5_TOKENS)
    process = flow_process()
    draws = torch.Generator().manual_seed(int(gen.integers(0, 2 ** 31)))
    batch = cfg["base_batch"]

    def batch_loss():
        x0 = latents[gen.integers(0, len(latents), batch)]
        noise = torch.randn_like(x0)
        s = process.draw_timesteps(batch, draws)
        pred = transformer(hidden_states=process.add_noise(x0, noise, s), timestep=process.model_time(s),
                           encoder_hidden_states=cond.expand(batch, -1, -1),
                           pooled_projections=pooled.expand(batch, -1)).sample
        return F.mse_loss(pred, process.target(x0, noise, s))

    loss = fit(transformer, cfg["flow_steps"], "base 2/2: transformer", batch_loss, tqdm)
    transformer.eval()
    return pipe, loss


def base_key(cfg, seed, family):
    """The cache key of the base model: the family's code version, the seed and the preset's sizes that make it."""
    keys = {k: cfg[k] for k in family.base_keys}
    text = json.dumps({"version": family.base_version, "seed": seed, **keys}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:10], keys

