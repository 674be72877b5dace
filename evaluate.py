#!/usr/bin/env python
"""Is the tuned model preferred over its base? Generate with both, score with reward models, compare.

    python evaluate.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --lora_weights smpo-sd15-lora --prompts_file prompts.txt --output_dir smpo-sd15-lora/eval

The base and the tuned model (``--lora_weights DIR``: the base plus a LoRA; or
``--tuned_model_name_or_path DIR``: a complete pipeline) generate every prompt from the same
seeds: image k of prompt i (both counted from 0) starts from the noise of a CPU generator seeded
with ``seed + i * num_images_per_prompt + k``, whatever the batch size and device. Each reward model
(``--reward_model_name_or_path``, repeatable; PickScore by default) scores every image against its
prompt: the cosine similarity of the image and text embeddings, no logit scale (x100 gives
PickScore's usual scale), as in ``score_pairs.py``.

Per prompt, the tuned model wins (1), ties (0.5) or loses (0) on the mean score of its images
against the base's. The win rate is the mean over prompts, with a 95% Wilson score interval over
the number of prompts (ties counted half). Writes to ``--output_dir``:

    results.json      base, tuned, settings, and per reward model: mean_base, mean_tuned,
                      win_rate, win_rate_ci95, wins / ties / losses, num_prompts
    per_prompt.csv    prompt_index, prompt, and per reward model: base score, tuned score, outcome
    images/base/{i:04d}_{k}.png, images/tuned/{i:04d}_{k}.png
    grid.png          the first --grid_prompts prompts (image 0 of each): base row over tuned row,
                      the prompt under each pair
"""

import argparse
import csv
import json
import math
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from smpo.data import open_image
from smpo.grid import make_grid
from smpo.preflight import PIPELINE_FILES, missing_model, require, reward_needs, sampling_needs
from smpo.rewards import PICKSCORE, PICKSCORE_PROCESSOR, default_reward_processor, load_reward_model, reward_scores
from smpo.sampling import (SEED_RULE, add_sampling_flags, check_sampling_args, image_seed, load_pipeline, read_prompts,
                           sample_images)

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal


# ------------------------------------------------------------------------------------ flags
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(p, dataset_split_name="test", num_images_per_prompt=1, output_dir="smpo-eval")
    tuned = p.add_mutually_exclusive_group(required=True)
    tuned.add_argument("--lora_weights", default=None,
                       help="Folder with pytorch_lora_weights.safetensors: tuned = base + this LoRA.")
    tuned.add_argument("--tuned_model_name_or_path", default=None,
                       help="A complete tuned pipeline (e.g. the output of --full_finetune).")
    a = p.add_argument
    a("--reward_model_name_or_path", action="append", default=None,
      help=f"A CLIP-like reward model (CLIPModel: PickScore, CLIP); repeat for several. Default: {PICKSCORE}.")
    a("--reward_processor_name_or_path", action="append", default=None,
      help="The processor of each reward model, paired by position; missing ones default to the model path "
           f"({PICKSCORE_PROCESSOR} for PickScore).")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    if args.reward_model_name_or_path is None:
        args.reward_model_name_or_path = [PICKSCORE]
    processors = args.reward_processor_name_or_path or []
    if len(processors) > len(args.reward_model_name_or_path):
        p.error("more --reward_processor_name_or_path than --reward_model_name_or_path")
    args.reward_processor_name_or_path = processors + [
        default_reward_processor(m) for m in args.reward_model_name_or_path[len(processors):]]
    return args


def check_run(args):
    """Stop before any model loads when a model, the prompts or a reward model cannot be found."""
    require(sampling_needs(args) + reward_needs(args.reward_model_name_or_path, args.reward_processor_name_or_path,
                                                args.cache_dir)
            + [missing_model("--tuned_model_name_or_path", args.tuned_model_name_or_path, PIPELINE_FILES,
                             cache_dir=args.cache_dir)])


# ------------------------------------------------------------------------------- generation
def image_path(output_dir, which, prompt_index, k):
    return os.path.join(output_dir, "images", which, f"{prompt_index:04d}_{k}.png")


@torch.no_grad()
def generate_images(pipe, prompts, args, which):
    """Generate num_images_per_prompt images of every prompt into images/{which}/; returns their paths (P, k)."""
    n = args.num_images_per_prompt
    jobs = [(i, k) for i in range(len(prompts)) for k in range(n)]
    os.makedirs(os.path.dirname(image_path(args.output_dir, which, 0, 0)), exist_ok=True)
    for start in tqdm(range(0, len(jobs), args.batch_size), desc=f"generating ({which})", unit="batch"):
        batch = jobs[start:start + args.batch_size]
        sampled = sample_images(pipe, [prompts[i] for i, _ in batch], [image_seed(args.seed, i, k, n) for i, k in batch],
                                args.num_inference_steps, args.guidance_scale, args.resolution,
                                max_sequence_length=args.max_sequence_length)
        for (i, k), (image, _) in zip(batch, sampled):  # every image is scored, as the model made it
            image.save(image_path(args.output_dir, which, i, k))
    return [[image_path(args.output_dir, which, i, k) for k in range(n)] for i in range(len(prompts))]


def generate_base_and_tuned(prompts, args):
    """Paths of the base's and the tuned model's images, and the sampler; one pipeline in memory at a time.

    Each samples with its pipeline's own scheduler (a flow model's: FlowMatchEulerDiscreteScheduler, Euler);
    results.json names the base's.
    """
    from diffusers.training_utils import free_memory

    pipe = load_pipeline(args.pretrained_model_name_or_path, args)
    sampler = type(pipe.scheduler).__name__
    base = generate_images(pipe, prompts, args, "base")
    if args.lora_weights:
        pipe.load_lora_weights(args.lora_weights)
    else:
        del pipe
        free_memory()
        pipe = load_pipeline(args.tuned_model_name_or_path, args, base=False)
    tuned = generate_images(pipe, prompts, args, "tuned")
    del pipe
    free_memory()
    return base, tuned, sampler


# ---------------------------------------------------------------------------------- scoring
def score_images(model, processor, paths, prompts, device, batch_size, desc="scoring"):
    """Reward scores of the images at paths (P, k) against their prompts, as a (P, k) float64 array."""
    flat = [(path, prompts[i]) for i, row in enumerate(paths) for path in row]
    scores = []
    for start in tqdm(range(0, len(flat), batch_size), desc=desc, unit="batch"):
        batch = flat[start:start + batch_size]
        images = [open_image(path) for path, _ in batch]
        scores.append(reward_scores(model, processor, images, [prompt for _, prompt in batch], device))
    return torch.cat(scores).double().numpy().reshape(len(paths), -1)


def outcomes(base_scores, tuned_scores):
    """Per prompt: 1 if the tuned model's mean score is higher, 0.5 if equal, 0 if lower."""
    base, tuned = np.mean(base_scores, axis=1), np.mean(tuned_scores, axis=1)
    return np.where(tuned > base, 1.0, np.where(tuned == base, 0.5, 0.0))


def win_rate_with_ci(outcome, z=Z_95):
    """Win rate (ties count half) and its Wilson score interval over n = len(outcome) prompts.

    With p the win rate: centre (p + z^2 / 2n) / (1 + z^2 / n), half-width
    z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2). It stays inside [0, 1] and is defined for
    n = 1 (p = 1 gives [1 / (1 + z^2), 1]).
    """
    outcome = np.asarray(outcome, dtype=np.float64)
    n = outcome.size
    if n == 0:
        raise ValueError("no outcomes to compute a win rate from")
    p = float(outcome.mean())
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


def reward_model_result(base_scores, tuned_scores):
    """results.json entry of one reward model: mean scores, win rate with its 95% interval, outcome counts."""
    result = outcomes(base_scores, tuned_scores)
    rate, low, high = win_rate_with_ci(result)
    return {"mean_base": float(np.mean(base_scores)), "mean_tuned": float(np.mean(tuned_scores)),
            "win_rate": rate, "win_rate_ci95": [low, high], "wins": int((result == 1).sum()),
            "ties": int((result == 0.5).sum()), "losses": int((result == 0).sum()), "num_prompts": int(result.size)}


def reward_model_keys(names):
    """Names for results.json / CSV columns: the path as given, '#2', '#3'... when one repeats."""
    keys, seen = [], {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


# ---------------------------------------------------------------------------------- outputs
def write_csv(path, prompts, keys, scores):
    """One row a prompt: index, prompt, and per reward model the mean base / tuned score and the outcome."""
    names = {1.0: "win", 0.5: "tie", 0.0: "loss"}
    columns = ["prompt_index", "prompt"] + [f"{key} {c}" for key in keys for c in ("base", "tuned", "outcome")]
    per_model = {key: (np.mean(b, axis=1), np.mean(t, axis=1), outcomes(b, t)) for key, (b, t) in scores.items()}
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, prompt in enumerate(prompts):
            row = [i, prompt]
            for key in keys:
                base, tuned, outcome = per_model[key]
                row += [f"{base[i]:.8f}", f"{tuned[i]:.8f}", names[float(outcome[i])]]
            writer.writerow(row)


def settings(args, image_size, sampler):
    return {
        "prompts": args.prompts_file or f"{args.dataset_name} (split {args.dataset_split_name}, "
                                        f"unique values of {args.caption_column})",
        "tuned_kind": "lora" if args.lora_weights else "pipeline",
        "unet_init": args.unet_init,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "image_size": list(image_size),
        "seed": args.seed,
        "seeds": SEED_RULE,
        "sampler": sampler,
        "mixed_precision": args.mixed_precision,
        "score": "cosine similarity of image and prompt embeddings, no logit scale",
        "win_rate": "per prompt, mean tuned score vs mean base score over its images; win 1, tie 0.5, loss 0; "
                    "95% Wilson score interval over prompts",
        "reward_processors": dict(zip(reward_model_keys(args.reward_model_name_or_path),
                                      args.reward_processor_name_or_path)),
    }


# ------------------------------------------------------------------------------------- main
def main(args):
    check_run(args)  # before the heavy imports: a missing model is named in about as long as --help takes
    from diffusers.training_utils import free_memory
    from PIL import Image

    prompts = read_prompts(args.prompts_file, args.dataset_name, args.dataset_split_name, args.caption_column,
                           args.num_prompts, args.cache_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"{len(prompts)} prompts x {args.num_images_per_prompt} images, base and tuned")
    base_paths, tuned_paths, sampler = generate_base_and_tuned(prompts, args)

    keys = reward_model_keys(args.reward_model_name_or_path)
    scores = {}
    for key, name, processor_name in zip(keys, args.reward_model_name_or_path, args.reward_processor_name_or_path):
        model, processor = load_reward_model(name, processor_name, args.device, args.cache_dir)
        scores[key] = tuple(score_images(model, processor, paths, prompts, args.device, args.batch_size,
                                         desc=f"scoring {which} ({os.path.basename(key.rstrip('/'))})")
                            for which, paths in (("base", base_paths), ("tuned", tuned_paths)))
        del model, processor
        free_memory()

    shown = range(min(args.grid_prompts, len(prompts)))
    base_images = [Image.open(base_paths[i][0]) for i in shown]
    make_grid(base_images, [Image.open(tuned_paths[i][0]) for i in shown],
              [prompts[i] for i in shown]).save(os.path.join(args.output_dir, "grid.png"))
    write_csv(os.path.join(args.output_dir, "per_prompt.csv"), prompts, keys, scores)
    results = {
        "base": args.pretrained_model_name_or_path,
        "tuned": args.lora_weights or args.tuned_model_name_or_path,
        "num_prompts": len(prompts),
        "num_images_per_prompt": args.num_images_per_prompt,
        "settings": settings(args, base_images[0].size, sampler),
        "reward_models": {key: reward_model_result(*scores[key]) for key in keys},
    }
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)

    for key, r in results["reward_models"].items():
        low, high = r["win_rate_ci95"]
        print(f"{key}: mean base {r['mean_base']:.4f}, tuned {r['mean_tuned']:.4f}; tuned wins "
              f"{r['win_rate']:.1%} [{low:.1%}, {high:.1%}] of {r['num_prompts']} prompts "
              f"({r['wins']} wins, {r['ties']} ties, {r['losses']} losses)")
    print(f"wrote {args.output_dir}: results.json, per_prompt.csv, grid.png, images/")
    return results


if __name__ == "__main__":
    main(parse_args())
