"""The preference data: Pick-a-Pic-schema pairs (world images, or the base model's own samples) labelled by
simulated raters, a tiny reward model (a PickScore stand-in) and the pairs scored by score_pairs.py. A new data
source adds a builder here and a choice in preference_data()."""

import hashlib
import json
import math
import os
import sys

import numpy as np

from .base import TEXT_INTERMEDIATE_SIZE, cosine_lr
from .family import FAMILIES
from .runs import ROOT, cached_stage, run
from .world import CAPTION, RESOLUTION, draw_disks, encoded, hue_warmth, to_uint8, true_preference

DATA_VERSION = "toy-data-v1"
ON_POLICY_VERSION = "n1"  # n1: the pairs record each image's initial noise (--noise_source prior); older caches don't


def preference_data(args, cfg, work, base_dir, base_key, tqdm):
    """(scored pairs folder, its record, reward model folder) for --data_source; each stage cached on its settings."""
    data_key = hashlib.sha256(json.dumps([DATA_VERSION, args.seed, cfg["num_pairs"], cfg["reward_steps"],
                                          args.rater_temperature, args.reward_noise]).encode()).hexdigest()[:10]
    data_dir = os.path.join(work, f"data-{data_key}")
    pairs, reward, scored = (os.path.join(data_dir, n) for n in ("pairs", "reward-model", "pairs-scored"))

    def build_world_data():
        record = build_dataset(args, cfg, pairs, tqdm)
        train_reward_model(args, cfg, reward, tqdm)
        print("scoring the pairs with score_pairs.py")
        run([sys.executable, os.path.join(ROOT, "score_pairs.py"), "--dataset_name", pairs,
             "--reward_model_name_or_path", reward, "--output_dir", scored, "--batch_size", "64", "--device", "cpu"],
            args, os.path.join(data_dir, "score_pairs.log"), threads=args.base_threads)
        from datasets import load_from_disk

        return {**record, **score_stats(load_from_disk(scored))}

    record, cached = cached_stage(data_dir, build_world_data)
    if cached:
        print(f"reusing the cached preference data and reward model {data_dir}")
    if args.data_source == "on_policy":  # the base model's own samples, same reward model and raters
        on_policy_dir = os.path.join(work, f"on-policy-{ON_POLICY_VERSION}-{data_key}-{base_key}-"
                                           f"{args.on_policy_pairs or cfg['num_pairs']}")
        if not os.path.exists(os.path.join(on_policy_dir, "DONE")):
            print("sampling the base model's own pairs with generate_pairs.py")
        on_policy, _ = cached_stage(on_policy_dir,
                                    lambda: build_on_policy_dataset(args, cfg, base_dir, reward, on_policy_dir, tqdm,
                                                                    FAMILIES[args.family].sample_flags))
        record, scored = {"source": "on_policy", **on_policy}, os.path.join(on_policy_dir, "pairs-scored")
    return scored, record, reward


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
    from make_tiny_assets import make_tokenizer, text_config
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
    text_cfg = text_config(len(tokenizer), intermediate_size=TEXT_INTERMEDIATE_SIZE)
    model = CLIPModel(CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision.to_dict(), projection_dim=32))
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


def build_on_policy_dataset(args, cfg, base_dir, reward, out_dir, tqdm, extra=()):
    """The second data source: pairs of the base model's own samples. generate_pairs.py samples two images per
    prompt (the caption, num_pairs times) and scores them with the experiment's reward model; the same
    simulated raters as build_dataset() then label each pair from the images' true preference (from pixels)."""
    from datasets import load_from_disk

    from smpo.data import open_image

    prompts = os.path.join(out_dir, "prompts.txt")
    with open(prompts, "w") as f:
        f.write((CAPTION + "\n") * (args.on_policy_pairs or cfg["num_pairs"]))
    generated = os.path.join(out_dir, "generated")
    # seeds 10^6 + 2 i + k: away from the evaluation's (10^4 + seed + k)
    run([sys.executable, os.path.join(ROOT, "generate_pairs.py"), "--pretrained_model_name_or_path", base_dir,
         "--prompts_file", prompts, "--num_images_per_prompt", "2", "--pairing", "all",
         "--num_inference_steps", str(cfg["eval_inference_steps"]), "--guidance_scale", "1.0",
         "--resolution", str(RESOLUTION), "--seed", str(1_000_000 + args.seed), "--batch_size", "32",
         "--shard_size", "64", "--reward_model_name_or_path", reward, "--device", "cpu", "--output_dir", generated,
         *extra],
        args, os.path.join(out_dir, "generate_pairs.log"), threads=args.base_threads)
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
