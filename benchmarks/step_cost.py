#!/usr/bin/env python
"""SmPO's optimizer-step cost next to Diffusion-DPO's, measured side by side in one process.

    python benchmarks/step_cost.py --quick --output_json docs/performance/step_cost_quick.json  # tiny SD, CPU (~3 min)
    python benchmarks/step_cost.py --random_init sdxl --mixed_precision bf16 --use_8bit_adam \\
        --gradient_checkpointing --output_json sdxl.json      # full-size SDXL, random weights, on a GPU; no download
    python benchmarks/step_cost.py --quick --family sd3 --output_json docs/performance/step_cost_quick_sd3.json
    python benchmarks/step_cost.py --random_init sd35-medium --mixed_precision bf16 --use_8bit_adam \\
        --gradient_checkpointing --cache_text_embeddings        # full-size SD3.5 medium, random weights, on a GPU
    python benchmarks/step_cost.py --quick --family flux --output_json docs/performance/step_cost_quick_flux.json
    python benchmarks/step_cost.py --random_init flux-dev --count_only    # parameter counts (meta device), seconds
    python benchmarks/step_cost.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name PAIRS-scored --resolution 512 --mixed_precision fp16     # your own model and data

Runs the training step of smpo.step (the same code the scripts run, set up by smpo.setup) for four configurations
on the same model, batch and data, after warm-up, interleaving them round by round so machine
noise hits all four alike:

    smpo          --loss_type smpo --noise_source renoise (K inversion steps, R renoise steps; the scripts' K=10 exact)
    smpo-forward  --loss_type smpo --noise_source forward (smoothing only)
    prior         --loss_type smpo --noise_source prior   (each image's recorded generation noise, no inversion)
    dpo           --loss_type dpo  --noise_source forward (Diffusion-DPO; Flow-DPO on a flow model)

prior reads the batch's noise_seeds and noise_shapes (smpo.data.noise_columns, from the rows' noise_seed_0,
noise_seed_1 and noise_shape as generate_pairs.py writes them); rows without them (the synthetic and the tiny
data) get seeds of the benchmark's own at the training latents' shape: the cost does not depend on the seeds.

--family picks the training script whose conditioning and process run (sd, sdxl, sd3, flux); on a flow
model (sd3, flux) the inversion is the Euler + ReNoise one and "UNet" below means its transformer.

and prints seconds per optimizer step (median), UNet image-forwards per step (counted by a hook: a call on n
images counts n), peak accelerator memory, each as a ratio to DPO, and the floor ratio implied by the
forward count: DPO costs 4 UNet units per image (policy forward + backward ~3, reference forward 1) and
each no-grad inversion image-forward adds 1, so floor = (4 + inversion image-forwards per image) / 4.

Peak memory (CUDA only; null on the CPU) is what one configuration would need alone: the shared frozen parts
(text encoders, VAE, batch), plus its own UNet(s) and optimizer state (measured after its first step), plus
the largest growth of torch.cuda.max_memory_allocated within a measured step (reset before each).

--random_init MODEL builds the model from the published configs in benchmarks/configs/MODEL/ with random
weights (benchmarks/random_models.py): --size full (the default on a GPU) or tiny (the test models of
examples/make_tiny_assets.py; the default on the CPU), at the family's native resolution, on a synthetic batch.
"""

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import random_models  # noqa: E402

CONFIGS = {"smpo": ("smpo", "renoise"), "smpo-forward": ("smpo", "forward"), "prior": ("smpo", "prior"),
           "dpo": ("dpo", "forward")}
# --family: (training script, its conditioning class, its tiny model of examples/make_tiny_assets.py)
FAMILIES = {"sd": ("train_smpo_diffusion", "SDConditioning", "tiny-sd"),
            "sdxl": ("train_smpo_diffusion_sdxl", "SDXLConditioning", "tiny-sdxl"),
            "sd3": ("train_smpo_diffusion_sd3", "SD3Conditioning", "tiny-sd3"),
            "flux": ("train_smpo_diffusion_flux", "FluxConditioning", "tiny-flux")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny assets built on the fly, CPU, few steps")
    p.add_argument("--assets", default=None, help="with --quick: reuse this examples/make_tiny_assets.py output")
    p.add_argument("--random_init", default=None, choices=random_models.MODELS, metavar="MODEL",
                   help=f"random weights of the real architecture, no download: one of {', '.join(random_models.MODELS)}")
    p.add_argument("--count_only", action="store_true",
                   help="with --random_init: print one JSON line of parameter counts (meta device) and exit")
    p.add_argument("--size", default=None, choices=["full", "tiny"],
                   help="with --random_init: published shapes or the tiny test models (default: full on CUDA, else tiny)")
    p.add_argument("--output_json", default=None, help="also write the results here")
    p.add_argument("--pretrained_model_name_or_path", default=None)
    p.add_argument("--family", default="sd", choices=sorted(FAMILIES),
                   help="the training script whose conditioning and process run (with --quick: its tiny model)")
    p.add_argument("--sdxl", action="store_true", help="the same as --family sdxl")
    p.add_argument("--dataset_name", default=None, help="a scored preference dataset (default: the tiny one)")
    p.add_argument("--resolution", type=int, default=None,
                   help="default: the family's native size with --random_init --size full, else 96, chosen for the "
                        "tiny model: at 32 px its per-call overhead (~2 images of work) hides the image-forward cost "
                        "that a GPU's time follows, and at 64 px it still adds 3-10%%")
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--num_inversion_steps", type=int, default=10, help="K (the scripts' default, 10)")
    p.add_argument("--inversion_schedule", default="exact", choices=["exact", "grid_above", "grid_below"])
    p.add_argument("--num_renoise_steps", type=int, default=1)
    p.add_argument("--full_finetune", action="store_true")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--cache_text_embeddings", action="store_true",
                   help="encode the captions once and move the text encoders to the CPU, as the scripts' flag")
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="measured steps per configuration (default 20; 8 --quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick, else torch's). With 2 threads the tiny model's "
                        "small inversion calls (one image each as samples finish) pay the threads' hand-off on every "
                        "call, a CPU artefact that is not the image-forward cost the ratio is about.")
    return p.parse_args(argv)


def allocated(device):
    return torch.cuda.memory_allocated() if device.startswith("cuda") else None


class Setup:
    """One configuration: its own LoRA (or full) UNet and optimizer on shared frozen parts."""

    def __init__(self, name, args, script, frozen, batch, build_unet=None, family=None):
        from smpo.cost import UNetWork
        from smpo.setup import make_optimizer, setup_unets
        from smpo.step import Models, make_reference

        conditioning, vae, schedule = frozen
        loss_type, noise_source = CONFIGS[name]
        before = allocated(args.device)
        self.args = script.parse_args(self.flags(args, loss_type, noise_source))
        self.objective, self.noise_source = script.OBJECTIVES[loss_type], script.NOISE_SOURCES[noise_source]
        unet = build_unet() if build_unet else None  # --random_init: built here, so that own_memory counts it
        unet, reference_unet = setup_unets(self.args, args.device, self.weight_dtype(args), unet=unet, family=family)
        self.unet, self.name, self.batch = unet, name, batch
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.args, self.params)
        self.models = Models(unet, make_reference(unet, reference_unet, conditioning), vae, conditioning, schedule)
        self.generator = torch.Generator().manual_seed(args.seed)  # on the host, as in training
        self.counter = UNetWork(unet, reference_unet)  # full fine-tuning: the reference is a second UNet
        self.autocast = torch.autocast(args.device.split(":")[0], dtype=self.weight_dtype(args),
                                       enabled=args.mixed_precision != "no")
        self.times, self.call_counts, self.work_counts, self.step_growth = [], [], [], 0
        self.step()  # the optimizer state exists after the first step
        self.own_memory = None if before is None else allocated(args.device) - before

    @staticmethod
    def weight_dtype(args):
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)

    @staticmethod
    def flags(args, loss_type, noise_source):
        flags = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                 "--dataset_name", str(args.dataset_name), "--resolution", str(args.resolution),
                 "--loss_type", loss_type, "--noise_source", noise_source,
                 "--num_inversion_steps", str(args.num_inversion_steps),
                 "--inversion_schedule", args.inversion_schedule, "--rank", str(args.rank),
                 "--num_renoise_steps", str(args.num_renoise_steps), "--train_batch_size", str(args.train_batch_size)]
        switches = {"--full_finetune": args.full_finetune, "--use_8bit_adam": args.use_8bit_adam,
                    "--gradient_checkpointing": args.gradient_checkpointing}
        return flags + [flag for flag, on in switches.items() if on] + getattr(args, "extra_flags", [])

    def step(self):
        from smpo.step import training_step

        with self.autocast:
            loss, _ = training_step(self.args, self.batch, self.models, self.generator, self.objective,
                                    self.noise_source)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def measure(self, device):
        cuda = device.startswith("cuda")
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        self.counter.take()
        sync()
        start = time.perf_counter()
        self.step()
        sync()
        self.times.append(time.perf_counter() - start)
        forwards, work = self.counter.take()
        self.call_counts.append(forwards)
        self.work_counts.append(work)
        if cuda:
            self.step_growth = max(self.step_growth, torch.cuda.max_memory_allocated() - base)


def make_batch(args, rows, vae):
    """One training batch of the first --train_batch_size pairs of ``rows`` (a dataset or a list of row dicts),
    with each image's initial noise seed and shape for --noise_source prior (see :func:`with_noise_seeds`)."""
    from smpo.data import PairDataset, PairTransform, PreferenceCollator

    collator = PreferenceCollator(PairTransform(args.resolution), "smpo", seed=args.seed)
    pairs = PairDataset(rows, list(range(args.train_batch_size)))
    shape = latent_shape(vae, args.resolution)
    batch = collator([with_noise_seeds(pairs[i], shape, args.seed) for i in range(len(pairs))])
    return {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def latent_shape(vae, resolution):
    """(channels, h, w) of one image's training latents: the VAE's, downsampled 2 ** (levels - 1) times (FLUX's
    before packing), the shape generate_pairs.py records as noise_shape (smpo.sampling.latent_shape)."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return [vae.config.latent_channels, resolution // scale, resolution // scale]


def with_noise_seeds(example, shape, seed):
    """A row as generate_pairs.py writes it: its own noise_seed_0 / noise_seed_1 / noise_shape where it records them,
    else seeds of the benchmark's own (2 row + seed, 2 row + seed + 1) at ``shape``."""
    from smpo.data import NOISE_SEED_COLUMNS

    if all(c in example for c in (*NOISE_SEED_COLUMNS, "noise_shape")):
        return example
    seeds = dict(zip(NOISE_SEED_COLUMNS, (2 * example["row"] + seed, 2 * example["row"] + seed + 1)))
    return {**example, **seeds, "noise_shape": list(shape)}


def quick_assets(args):
    """--quick: build the tiny assets and score them, like the quick start."""
    work = tempfile.mkdtemp(prefix="smpo-bench-")
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], check=True, cwd=ROOT, capture_output=True)  # noqa: E731
    assets = args.assets or work
    if args.assets is None:
        run("examples/make_tiny_assets.py", work)
    if args.dataset_name is None:
        run("score_pairs.py", "--dataset_name", f"{assets}/tiny-pickapic", "--reward_model_name_or_path",
            f"{assets}/tiny-reward", "--output_dir", f"{work}/scored", "--device", "cpu")
        args.dataset_name = f"{work}/scored"
    args.pretrained_model_name_or_path = f"{assets}/{FAMILIES[args.family][2]}"
    args.device, args.warmup_steps = "cpu", 2
    args.steps = args.steps or 8
    args.threads = args.threads or 1


def cache_text_embeddings(args, conditioning, batch):
    from smpo.cache import TextCache, build_text_cache

    path = os.path.join(tempfile.mkdtemp(prefix="smpo-text-"), "text.pt")
    build_text_cache(path, batch["captions"], conditioning.encode_prompts)
    conditioning.text_cache = TextCache(path, args.device)
    for encoder in conditioning.text_encoders:
        encoder.to("cpu")


def main(args):
    if args.count_only:
        if args.random_init is None:
            raise SystemExit("--count_only goes with --random_init MODEL")
        print(json.dumps(random_models.count_parameters(args.random_init, args.size or "full", args.rank)))
        return
    if args.quick and args.random_init:
        raise SystemExit("give --quick or --random_init MODEL, not both")
    args.family = "sdxl" if args.sdxl else args.family
    folder, rows = random_models.random_init_assets(args) if args.random_init else (None, None)
    if args.quick:
        quick_assets(args)
    args.steps = args.steps or 20
    args.resolution = args.resolution or 96
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pretrained_model_name_or_path is None or (args.dataset_name is None and rows is None):
        raise SystemExit("give --quick, --random_init MODEL, or --pretrained_model_name_or_path and --dataset_name "
                         "(a scored dataset)")
    script_name, class_name, _ = FAMILIES[args.family]
    script = importlib.import_module(script_name)
    conditioning_class = getattr(script, class_name)
    if folder:
        conditioning_class = random_models.random_init_conditioning(conditioning_class, folder, args.device)
    from smpo.setup import load_frozen_parts

    torch.manual_seed(args.seed)
    base_args = script.parse_args(Setup.flags(args, "smpo", "renoise"))
    frozen = load_frozen_parts(base_args, conditioning_class, args.device, Setup.weight_dtype(args))
    if rows is None:
        import datasets

        rows = datasets.load_from_disk(args.dataset_name)
    batch = make_batch(args, rows, frozen[1])
    if args.cache_text_embeddings:
        cache_text_embeddings(args, frozen[0], batch)
    shared = allocated(args.device)
    denoiser = conditioning_class.denoiser  # "unet", or "transformer" (SD3)
    build_unet = (lambda: random_models.build(folder, denoiser, args.device)) if folder else None
    setups = [Setup(name, args, script, frozen, batch, build_unet, conditioning_class) for name in CONFIGS]

    for _ in range(args.warmup_steps - 1):  # each Setup took one step already
        for s in setups:
            s.step()
    from tqdm.auto import tqdm

    for _ in tqdm(range(args.steps), desc="measuring (interleaved)"):
        for s in setups:
            s.measure(args.device)
    report(args, setups, shared)


def results(args, setups, shared):
    """The JSON record: settings and, per configuration, the medians, counts, floors and memory."""
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s))")
    settings = {k: getattr(args, k) for k in (
        "random_init", "size", "family", "pretrained_model_name_or_path", "resolution", "train_batch_size",
        "num_inversion_steps", "inversion_schedule", "num_renoise_steps", "full_finetune", "rank", "mixed_precision",
        "use_8bit_adam", "gradient_checkpointing", "cache_text_embeddings", "warmup_steps", "steps", "seed")}
    configs = {}
    for s in setups:
        peak = None if shared is None else (shared + s.own_memory + s.step_growth) / 2**20
        configs[s.name] = {"loss_type": CONFIGS[s.name][0], "noise_source": CONFIGS[s.name][1],
                           "seconds_per_step": statistics.median(s.times), "image_forwards_per_step":
                           statistics.mean(s.call_counts), "image_forwards": s.call_counts,
                           "unet_work_per_step": statistics.mean(s.work_counts), "step_seconds": s.times,
                           "peak_memory_mib": peak}
    dpo = configs["dpo"]
    for c in configs.values():
        c["x_dpo"] = c["seconds_per_step"] / dpo["seconds_per_step"]
        c["floor_x_dpo"] = c["unet_work_per_step"] / dpo["unet_work_per_step"]  # smpo.cost's units
        c["memory_x_dpo"] = None if c["peak_memory_mib"] is None else c["peak_memory_mib"] / dpo["peak_memory_mib"]
    return {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "settings": settings, "configs": configs}


def report(args, setups, shared):
    out = results(args, setups, shared)
    s = out["settings"]
    print(f"\n{args.random_init or args.pretrained_model_name_or_path} ({args.size or 'given'}) on {out['device']}; "
          f"{'full' if args.full_finetune else 'LoRA'}, batch {args.train_batch_size} pair(s), {args.resolution}px, "
          f"{args.mixed_precision}, K={s['num_inversion_steps']}, R={s['num_renoise_steps']}, schedule "
          f"{s['inversion_schedule']}; median of {args.steps} interleaved steps after {args.warmup_steps} warm-up")
    print(f"{'config':<14}{'s/step':>9}{'x DPO':>8}{'img-fwd':>9}{'floor x DPO':>13}{'peak MiB':>10}{'x DPO':>8}")
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for name, c in out["configs"].items():
        print(f"{name:<14}{c['seconds_per_step']:>9.4f}{c['x_dpo']:>8.2f}{c['image_forwards_per_step']:>9.1f}"
              f"{c['floor_x_dpo']:>13.2f}{fmt(c['peak_memory_mib'], '.0f'):>10}{fmt(c['memory_x_dpo'], '.2f'):>8}")
    print("(img-fwd: UNet image-forwards per step; floor: (4 + no-grad inversion image-forwards per image) / 4 UNet "
          "units; peak: torch.cuda.max_memory_allocated of one configuration alone, n/a on the CPU)")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main(parse_args())
