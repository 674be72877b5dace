#!/usr/bin/env python
"""From prompts to preference data: sample the model, score every image, write Pick-a-Pic-schema pairs.

    python generate_pairs.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file prompts.txt --num_images_per_prompt 4 --output_dir sd15-pairs

For every prompt the base pipeline (optionally ``--unet_init`` / ``--lora_weights`` on top, for a
second round) samples ``--num_images_per_prompt`` images with DDIM, eta 0 (deterministic; a flow model, SD3
or FLUX: its FlowMatchEulerDiscreteScheduler, Euler, deterministic too); image k of
prompt i (both from 0) starts from the latents ``smpo.sampling.initial_noise(seed + i * num_images_per_prompt
+ k, latent shape)`` (fp32 noise of a CPU generator with that seed, as in evaluate.py), whatever the batch
size or the number of processes (FLUX: that unpacked (C, H/8, W/8) noise, packed with the pipeline's
_pack_latents before it is passed, so the recorded shape is the latents its training script noises). Every
pair row records them (noise_seed_0, noise_seed_1, noise_shape,
sampler), so that training can redraw each image's own noise (``--noise_source prior``). The reward model
(PickScore by default) scores every image: the cosine similarity of image and prompt embeddings, no logit
scale (smpo/rewards.py, the same scoring as score_pairs.py and evaluate.py). The images of a prompt are
then paired (``--pairing``):

    all         every pair of its images (N (N - 1) / 2)
    best_worst  its best-scored image against its worst
    random      --pairs_per_prompt distinct pairs, drawn with a generator seeded by (seed, prompt index)

Pairs whose scores differ by less than ``--min_score_gap`` are left out and counted. In each pair image 0
is the one with the smaller k; ``label_0`` is 1 if it scored higher, 0 if lower, 0.5 on an exact tie.
An image that is NaN, all black, or flagged (and blacked out) by SD 1.x's safety checker is left out
(``--disable_safety_checker`` drops the checker), and reported.

Writes to ``--output_dir``:

    images/{i:06d}_{k}.png      every usable sample (PNG, lossless: the scored pixels are the trained ones)
    shards/shard-{s:05d}.jsonl  per prompt of shard s: its images' seeds, scores, problems (resume state)
    generation_settings.json    what the images depend on; a rerun with other settings is refused
    the pairs                   --output_format save_to_disk (default): a datasets folder with columns
                                caption, jpg_0, jpg_1 (PNG bytes), label_0, label_1, reward_score_0/1, ...;
                                metadata_jsonl: metadata.jsonl with image_0 / image_1 paths into images/
    generation_summary.json     counts, settings, score statistics, what was left out and why
    grid.png                    the first --grid_prompts prompts: best image over worst, scores under them

Both outputs train as they are: ``--dataset_name OUTPUT_DIR`` (SmPO uses the reward scores, DPO label_0).
Work is written in shards of ``--shard_size`` prompts as they finish; rerunning the same command resumes
at the first unfinished shard, and a rerun that only changes the pairing flags or the format regenerates
nothing. ``accelerate launch`` (several GPUs, or ``--multi_gpu`` on CPU) splits the unfinished shards over
the processes; each image is generated once and the dataset is the same as one process writes.
"""

import argparse
import hashlib
import itertools
import json
import os
import shutil
import signal

import numpy as np
import torch
from tqdm.auto import tqdm

from smpo.bookkeeping import end_processes
from smpo.grid import make_grid
from smpo.preflight import require, reward_needs, sampling_needs
from smpo.rewards import PICKSCORE, default_reward_processor, load_reward_model, reward_scores
from smpo.sampling import (SEED_RULE, add_sampling_flags, check_sampling_args, image_seed, is_flow_model, latent_shape,
                           load_pipeline, read_prompts, read_prompts_file, sample_images, sampling_rules,
                           use_deterministic_sampler)

PAIRINGS = ("all", "best_worst", "random")
FORMATS = ("save_to_disk", "metadata_jsonl")
# What the images and scores depend on: a resumed run must agree on all of these.
GENERATION_KEYS = ("pretrained_model_name_or_path", "revision", "variant", "unet_init",
                   "pretrained_vae_model_name_or_path", "lora_weights", "num_images_per_prompt",
                   "num_inference_steps", "guidance_scale", "resolution", "seed", "mixed_precision",
                   "disable_safety_checker", "reward_model_name_or_path", "reward_processor_name_or_path",
                   "shard_size", "max_sequence_length")
DATASET_FILES = ("state.json", "dataset_info.json")  # plus data-*.arrow: what save_to_disk writes
NO_TWO_IMAGES = "prompts with fewer than 2 usable images"


# ------------------------------------------------------------------------------------ flags
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_flags(p, dataset_split_name="train", num_images_per_prompt=4, output_dir="generated-pairs")
    a = p.add_argument
    a("--lora_weights", default=None, help="Folder with pytorch_lora_weights.safetensors to sample with.")
    a("--reward_model_name_or_path", default=PICKSCORE, help="A CLIP-like reward model (PickScore, a CLIPModel).")
    a("--reward_processor_name_or_path", default=None,
      help="Its processor; default: the model path (laion/CLIP-ViT-H-14-laion2B-s32B-b79K for PickScore).")
    a("--pairing", choices=PAIRINGS, default="all")
    a("--pairs_per_prompt", type=int, default=1, help="Pairs drawn per prompt with --pairing random.")
    a("--min_score_gap", type=float, default=0.0,
      help="Leave out pairs whose reward scores differ by less than this (near-ties); they are counted.")
    a("--output_format", choices=FORMATS, default="save_to_disk")
    a("--shard_size", type=int, default=16, help="Prompts per shard: the unit of resume and of work per process.")
    a("--device", default=None, help="Default: the process's accelerate device (cuda:N, or cpu).")
    args = p.parse_args(argv)
    check_sampling_args(p, args)
    for flag in ("shard_size", "pairs_per_prompt"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if args.num_images_per_prompt < 2:
        p.error("--num_images_per_prompt must be >= 2: a pair needs two images of the same prompt")
    if args.min_score_gap < 0:
        p.error("--min_score_gap must be >= 0")
    max_pairs = args.num_images_per_prompt * (args.num_images_per_prompt - 1) // 2
    if args.pairing == "random" and args.pairs_per_prompt > max_pairs:
        p.error(f"--pairs_per_prompt {args.pairs_per_prompt} is more than the {max_pairs} pairs of "
                f"{args.num_images_per_prompt} images")
    if args.reward_processor_name_or_path is None:
        args.reward_processor_name_or_path = default_reward_processor(args.reward_model_name_or_path)
    return args


# ---------------------------------------------------------------------------------- prompts
def load_prompts(args):
    """The prompts, and notes on what was skipped (blank lines of a prompts file)."""
    if args.prompts_file is not None:
        prompts, blank = read_prompts_file(args.prompts_file)
        if not prompts:
            raise SystemExit(f"no prompts in {args.prompts_file}")
        if blank:
            print(f"{args.prompts_file}: skipped {len(blank)} blank lines (lines {blank[:20]}"
                  f"{' ...' if len(blank) > 20 else ''})")
        prompts = prompts[:args.num_prompts] if args.num_prompts is not None else prompts
        return prompts, {"blank lines of the prompts file": blank}
    return read_prompts(None, args.dataset_name, args.dataset_split_name, args.caption_column, args.num_prompts,
                        args.cache_dir), {}


# ------------------------------------------------------------------------------------ state
def image_file(prompt_index, k):
    """The image's path relative to the output folder."""
    return os.path.join("images", f"{prompt_index:06d}_{k}.png")


def shard_file(output_dir, shard):
    return os.path.join(output_dir, "shards", f"shard-{shard:05d}.jsonl")


def shard_prompts(shard, shard_size, num_prompts):
    return range(shard * shard_size, min((shard + 1) * shard_size, num_prompts))


def generation_settings(args, prompts):
    settings = {key: getattr(args, key) for key in GENERATION_KEYS}
    settings["prompts_sha256"] = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()
    settings["num_prompts"] = len(prompts)
    settings["sampler"], settings["initial_noise"] = sampling_rules(args.flow_model)  # older runs sampled otherwise
    return settings


def check_or_write_settings(output_dir, settings):
    """Write generation_settings.json, or refuse to resume a run made with other settings."""
    path = os.path.join(output_dir, "generation_settings.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differ:
            detail = ", ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
            raise SystemExit(f"{output_dir} holds a run with other generation settings ({detail}); "
                             "use another --output_dir, or the same settings to resume it.")
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def _kill_here_if_asked(images_done):
    """Test hook: SMPO_TEST_KILL_AFTER_IMAGES=N kills the process once it has saved N images."""
    if os.environ.get("SMPO_TEST_KILL_AFTER_IMAGES") == str(images_done):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------- generation
def generate_shard(shard, prompts, pipe, reward, args, device, progress, counter, sampler):
    """Sample, save and score the images of one shard's prompts, then write its record file atomically.

    Each image's record keeps what redraws its initial noise: its seed, the latent shape and the sampler.
    """
    model, processor = reward
    noise_shape = latent_shape(pipe, args.resolution)
    n = args.num_images_per_prompt
    indices = shard_prompts(shard, args.shard_size, len(prompts))
    jobs = [(i, k) for i in indices for k in range(n)]
    records = {i: {"prompt_index": i, "prompt": prompts[i], "images": []} for i in indices}
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        seeds = [image_seed(args.seed, i, k, n) for i, k in batch]
        samples = sample_images(pipe, [prompts[i] for i, _ in batch], seeds, args.num_inference_steps,
                                args.guidance_scale, args.resolution, noise_shape=noise_shape,
                                max_sequence_length=args.max_sequence_length)
        usable = [j for j, (_, problem) in enumerate(samples) if problem is None]
        scores = {}
        if usable:
            values = reward_scores(model, processor, [samples[j][0] for j in usable],
                                   [prompts[batch[j][0]] for j in usable], device)
            scores = dict(zip(usable, values.tolist()))
        for j, ((i, k), seed, (image, problem)) in enumerate(zip(batch, seeds, samples)):
            entry = {"k": k, "seed": seed, "file": None, "score": None, "problem": problem,
                     "noise_shape": list(noise_shape), "sampler": sampler}
            if problem is None:
                entry["file"], entry["score"] = image_file(i, k), scores[j]
                image.save(os.path.join(args.output_dir, entry["file"]))
            else:
                print(f"prompt {i}, image {k} (seed {seed}): left out, {problem}", flush=True)
            records[i]["images"].append(entry)
            counter[0] += 1
            _kill_here_if_asked(counter[0])
        progress.update(len(batch))
    path = shard_file(args.output_dir, shard)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i in indices:
            f.write(json.dumps(records[i], ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def read_records(output_dir, num_shards):
    records = []
    for shard in range(num_shards):
        with open(shard_file(output_dir, shard), encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


# ---------------------------------------------------------------------------------- pairing
def label_from_scores(score_0, score_1):
    """label_0 from the reward scores: 1 if image 0 scored higher, 0 if lower, 0.5 on an exact tie."""
    return 1.0 if score_0 > score_1 else 0.0 if score_0 < score_1 else 0.5


def candidate_pairs(usable, scores, pairing, pairs_per_prompt, rng):
    """Pairs (a, b) of image indices k, a < b, of one prompt's usable images under the pairing rule."""
    every = list(itertools.combinations(sorted(usable), 2))
    if pairing == "all" or not every:
        return every
    if pairing == "best_worst":
        best = max(usable, key=lambda k: (scores[k], -k))  # the first best and the first worst on ties
        worst = min(usable, key=lambda k: (scores[k], k))
        return [tuple(sorted((best, worst)))] if best != worst else []
    chosen = rng.choice(len(every), size=min(pairs_per_prompt, len(every)), replace=False)
    return [every[c] for c in sorted(chosen)]


def make_pairs(records, args):
    """Rows of the pair dataset (image columns as paths relative to the output folder), and what was left out."""
    rows, left_out = [], {"near-tie": 0, NO_TWO_IMAGES: []}
    height = width = None
    for record in records:
        i, images = record["prompt_index"], {e["k"]: e for e in record["images"]}
        scores = {k: e["score"] for k, e in images.items() if e["problem"] is None}
        if len(scores) < 2:
            left_out[NO_TWO_IMAGES].append(i)
            continue
        rng = np.random.default_rng([args.seed, i])
        for a, b in candidate_pairs(list(scores), scores, args.pairing, args.pairs_per_prompt, rng):
            if abs(scores[a] - scores[b]) < args.min_score_gap:
                left_out["near-tie"] += 1
                continue
            if height is None:
                from PIL import Image

                with Image.open(os.path.join(args.output_dir, images[a]["file"])) as im:
                    width, height = im.size
            label = label_from_scores(scores[a], scores[b])
            rows.append({
                "caption": record["prompt"], "image_0": images[a]["file"], "image_1": images[b]["file"],
                "label_0": label, "label_1": 1.0 - label,
                "reward_score_0": scores[a], "reward_score_1": scores[b],
                "prompt_index": i, "image_index_0": a, "image_index_1": b,
                "seed_0": images[a]["seed"], "seed_1": images[b]["seed"],
                **noise_columns(images[a], images[b]),
                "model": args.pretrained_model_name_or_path, "unet": args.unet_init or "",
                "lora_weights": args.lora_weights or "", "num_inference_steps": args.num_inference_steps,
                "guidance_scale": args.guidance_scale, "height": height, "width": width,
            })
    return rows, left_out


def noise_columns(image_0, image_1):
    """What redraws the pair's initial noises: smpo.sampling.initial_noise(noise_seed_k, noise_shape)."""
    return {"noise_seed_0": image_0["seed"], "noise_seed_1": image_1["seed"], "noise_shape": image_0["noise_shape"],
            "sampler": image_0["sampler"]}


# ---------------------------------------------------------------------------------- outputs
def remove_old_pairs(output_dir):
    """Remove the pair files of an earlier run (either format): a folder holds one dataset, and the loader
    reads metadata.jsonl before a save_to_disk dataset."""
    for name in os.listdir(output_dir):
        if name in ("metadata.jsonl", *DATASET_FILES) or (name.startswith("data-") and name.endswith(".arrow")):
            os.remove(os.path.join(output_dir, name))


def write_pairs(rows, args):
    remove_old_pairs(args.output_dir)
    if args.output_format == "metadata_jsonl":
        path = os.path.join(args.output_dir, "metadata.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        return
    import datasets

    def with_bytes(row):
        out = {"caption": row["caption"]}
        for k in (0, 1):
            with open(os.path.join(args.output_dir, row[f"image_{k}"]), "rb") as f:
                out[f"jpg_{k}"] = f.read()
        return {**out, **{key: v for key, v in row.items() if key not in ("caption", "image_0", "image_1")}}

    # Written beside the work folders, then moved in: save_to_disk refuses no folder, but a half-written
    # dataset must never sit where the training scripts look.
    tmp = os.path.join(args.output_dir, "dataset.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_list([with_bytes(row) for row in rows]).save_to_disk(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(args.output_dir, name))
    os.rmdir(tmp)


def score_statistics(records, rows):
    scores = np.array([e["score"] for r in records for e in r["images"] if e["problem"] is None], dtype=np.float64)
    spreads = []
    for r in records:
        s = [e["score"] for e in r["images"] if e["problem"] is None]
        if len(s) >= 2:
            spreads.append(max(s) - min(s))
    gaps = np.array([abs(r["reward_score_0"] - r["reward_score_1"]) for r in rows], dtype=np.float64)
    stats = {"num_scored_images": int(scores.size)}
    if scores.size:
        stats.update(mean=float(scores.mean()), std=float(scores.std()), min=float(scores.min()),
                     max=float(scores.max()))
    if spreads:
        stats["mean_best_minus_worst_per_prompt"] = float(np.mean(spreads))
    if gaps.size:
        stats["mean_abs_gap_of_pairs"] = float(gaps.mean())
    return stats


def write_grid(records, args):
    """Best image over worst image for the first --grid_prompts prompts with two usable images."""
    from PIL import Image

    best, worst, captions = [], [], []
    for record in records:
        usable = [e for e in record["images"] if e["problem"] is None]
        if len(usable) < 2:
            continue
        top = max(usable, key=lambda e: e["score"])
        bottom = min(usable, key=lambda e: e["score"])
        best.append(Image.open(os.path.join(args.output_dir, top["file"])))
        worst.append(Image.open(os.path.join(args.output_dir, bottom["file"])))
        captions.append(f"{top['score']:.3f} / {bottom['score']:.3f} {record['prompt']}")
        if len(captions) == args.grid_prompts:
            break
    if captions:
        make_grid(best, worst, captions).save(os.path.join(args.output_dir, "grid.png"))


def generation_summary(records, rows, left_out, skipped, args, run_info):
    """generation_summary.json: images and pairs made, what was left out and why, score statistics, settings."""
    images = [dict(e, prompt_index=r["prompt_index"]) for r in records for e in r["images"]]
    bad = [{"prompt_index": e["prompt_index"], "k": e["k"], "seed": e["seed"], "problem": e["problem"]}
           for e in images if e["problem"] is not None]
    by_problem = {}
    for e in bad:
        by_problem[e["problem"]] = by_problem.get(e["problem"], 0) + 1
    labels = [row["label_0"] for row in rows]
    return {
        "num_prompts": len(records),
        "num_images_per_prompt": args.num_images_per_prompt,
        "num_images": len(images),
        "num_images_used": len(images) - len(bad),
        "num_pairs": len(rows),
        "label_0_counts": {"1": labels.count(1.0), "0": labels.count(0.0), "0.5": labels.count(0.5)},
        "pairing": args.pairing,
        "pairs_per_prompt": args.pairs_per_prompt if args.pairing == "random" else None,
        "min_score_gap": args.min_score_gap,
        "left_out": {
            "images": {"count": len(bad), "by_problem": by_problem, "images": bad},
            f"pairs with |score gap| < min_score_gap ({args.min_score_gap})": left_out["near-tie"],
            NO_TWO_IMAGES: left_out[NO_TWO_IMAGES],
            "prompts skipped": skipped,
        },
        "scores": score_statistics(records, rows),
        "output_format": args.output_format,
        "settings": {**{key: getattr(args, key) for key in GENERATION_KEYS}, "seeds": SEED_RULE,
                     **dict(zip(("sampler", "initial_noise"), sampling_rules(args.flow_model))),
                     "latent_shape": next((e["noise_shape"] for r in records for e in r["images"]), None),
                     "batch_size": args.batch_size,
                     "score": "cosine similarity of image and prompt embeddings, no logit scale",
                     "label_0": "1 if reward_score_0 > reward_score_1, 0 if lower, 0.5 if equal; image 0 is the "
                                "image with the smaller index k"},
        "run": run_info,
    }


# ------------------------------------------------------------------------------------- main
def make_state(args):
    """accelerate's PartialState: one process, or those of `accelerate launch` (gloo on CPU)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = (args.device or "").startswith("cpu") or parse_flag_from_env("ACCELERATE_USE_CPU") or (
        args.device is None and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def main(args):
    require(sampling_needs(args) + reward_needs([args.reward_model_name_or_path], [args.reward_processor_name_or_path],
                                                args.cache_dir))  # before any model loads or folder is made
    args.flow_model = is_flow_model(args)  # SD3, FLUX: the Euler sampler (smpo.sampling.FLOW_SAMPLER_RULE)
    state = make_state(args)
    device = state.device if state.num_processes > 1 or args.device is None else torch.device(args.device)
    prompts, skipped = load_prompts(args)
    num_shards = -(-len(prompts) // args.shard_size)
    if state.is_main_process:
        check_or_write_settings(args.output_dir, generation_settings(args, prompts))
        os.makedirs(os.path.join(args.output_dir, "images"), exist_ok=True)
        os.makedirs(os.path.join(args.output_dir, "shards"), exist_ok=True)
    state.wait_for_everyone()
    todo = [s for s in range(num_shards) if not os.path.exists(shard_file(args.output_dir, s))]
    state.wait_for_everyone()  # every process has its list before any shard is written
    if state.is_main_process:
        print(f"{len(prompts)} prompts x {args.num_images_per_prompt} images in {num_shards} shards; "
              f"{num_shards - len(todo)} already done, {len(todo)} to generate on {state.num_processes} process(es)")

    counter = [0]
    with state.split_between_processes(todo) as mine:
        if mine:
            # The reward model first: a model that cannot be loaded stops the run before any sampling.
            reward = load_reward_model(args.reward_model_name_or_path, args.reward_processor_name_or_path,
                                       device, args.cache_dir)
            pipe = load_pipeline(args.pretrained_model_name_or_path, args, device=device)
            sampler = use_deterministic_sampler(pipe)
            if args.lora_weights:
                pipe.load_lora_weights(args.lora_weights)
            total = sum(len(shard_prompts(s, args.shard_size, len(prompts))) for s in mine) * args.num_images_per_prompt
            with tqdm(total=total, desc=f"sampling and scoring (process {state.process_index})", unit="image",
                      disable=not state.is_local_main_process) as progress:
                for shard in mine:
                    generate_shard(shard, prompts, pipe, reward, args, device, progress, counter, sampler)
    state.wait_for_everyone()

    summary = None
    if state.is_main_process:
        records = read_records(args.output_dir, num_shards)
        rows, left_out = make_pairs(records, args)
        run_info = {"num_processes": state.num_processes, "shards": num_shards,
                    "shards_generated_by_this_run": len(todo), "shards_reused": num_shards - len(todo)}
        summary = generation_summary(records, rows, left_out, skipped, args, run_info)
        with open(os.path.join(args.output_dir, "generation_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, ensure_ascii=False)
        if rows:
            write_pairs(rows, args)
            write_grid(records, args)
        report(summary, args)
    failed = summary is not None and not summary["num_pairs"]
    end_processes(state, f"no pairs to write: see {os.path.join(args.output_dir, 'generation_summary.json')} "
                         "for the images and pairs left out" if failed else 0)
    return summary


def report(summary, args):
    """Print what was written and what was left out."""
    left = summary["left_out"]
    print(f"{summary['num_pairs']} pairs from {summary['num_prompts']} prompts "
          f"({summary['num_images_used']} of {summary['num_images']} images usable); labels {summary['label_0_counts']}")
    if left["images"]["count"]:
        print(f"left out {left['images']['count']} images: {left['images']['by_problem']}")
    near = left[f"pairs with |score gap| < min_score_gap ({args.min_score_gap})"]
    if near:
        print(f"left out {near} near-tie pairs (|score gap| < {args.min_score_gap})")
    if left[NO_TWO_IMAGES]:
        print(f"no pair for prompts {left[NO_TWO_IMAGES][:20]}: fewer than 2 usable images")
    if "mean" in summary["scores"]:
        s = summary["scores"]
        print(f"scores: mean {s['mean']:.4f}, std {s['std']:.4f}, min {s['min']:.4f}, max {s['max']:.4f}")
    print(f"wrote {args.output_dir} ({args.output_format}); generation_summary.json, grid.png")


if __name__ == "__main__":
    main(parse_args())
