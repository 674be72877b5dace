"""The experiment's stages in order (world and base model, preference data, training runs, evaluation, outputs),
each timed; results.json keeps the timings with the machine's core count and the thread counts used."""

import os
import shlex
import shutil
import sys
import time

import numpy as np

from . import report
from .base import base_key, train_base
from .data import preference_data
from .experiment import ROOT, method
from .family import FAMILIES
from .runs import (accelerate_cmd, cached_stage, checkpoint_dirs, claim_runs_dir, evaluate_checkpoint, init_evaluation,
                   load_pipeline, parallel, python_env, read_json, run, run_dir, run_record, sample)
from .stats import aggregate, compare_with_dpo, summarize
from .world import RESOLUTION, draw_disks


def main(args):
    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected here
    os.environ.update({k: v for k, v in python_env(args).items() if k.endswith("OFFLINE")})
    cfg, family = args.cfg, FAMILIES[args.family]
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    timings, t_start = {}, time.time()
    machine = {"nproc": os.cpu_count(), "load_average_at_start": os.getloadavg(), "jobs": args.jobs,
               "torch_threads": args.threads, "base_threads": args.base_threads,
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    print(f"toy alignment, {args.mode} mode, {family.name} base, in {work}")
    torch.set_num_threads(args.base_threads)  # nothing else runs during the base, data and sampling stages

    # 1-2. the world and the base model (cached on the settings that make it)
    key, key_cfg = base_key(cfg, args.seed, family)
    base_dir = os.path.join(work, f"base-{key}")
    t0 = time.time()

    def build_base():
        world, _ = draw_disks(np.random.default_rng(args.seed), cfg["world_size"])
        log = train_base(cfg, world, base_dir, args.seed, tqdm, family)
        return {**log, "seconds": time.time() - t0, "threads": args.base_threads, "settings": key_cfg}

    base_log, timings["base_cached"] = cached_stage(base_dir, build_base, rebuild=args.rebuild_base)
    print(f"{'reusing the cached' if timings['base_cached'] else 'trained the'} base model {base_dir} "
          f"(trained in {base_log['seconds']:.0f} s)")
    timings["base_s"] = time.time() - t0

    # 3. preference data, reward model, scores (cached on their settings too)
    t0 = time.time()
    scored, data_log, _ = preference_data(args, cfg, work, base_dir, key, tqdm)
    print("data: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in data_log.items()))
    timings["data_s"] = time.time() - t0
    renoise = any("renoise" in method(m)["flags"] for m in args.methods)
    if renoise and args.family == "flow" and None in (args.num_inversion_steps, args.num_renoise_steps):  # the probe
        inversion_probe(args, work, base_dir, key, scored, timings)
    args.num_inversion_steps = args.num_inversion_steps or 10  # without a renoise method: unused, the scripts' default

    # 4. the training runs: every method with every training seed, same settings
    t0 = time.time()
    runs_dir = os.path.join(work, "runs" if args.data_source == "world" else "runs-on-policy")
    claim_runs_dir(runs_dir, base_dir, scored)
    runs = [(name, seed) for name in args.methods for seed in args.train_seeds]
    inverting_first = sorted(runs, key=lambda r: "renoise" not in method(r[0])["flags"])  # the longest runs first
    for line in parallel(lambda r: train(args, base_dir, scored, runs_dir, r, timings), inverting_first, args.jobs,
                         tqdm, "training runs"):
        tqdm.write(line)
    timings["train_s"] = time.time() - t0

    # 5. evaluation on fixed seeds
    t0 = time.time()
    eval_seed = 10_000 + args.seed
    pipe = load_pipeline(base_dir)
    base_images = sample(pipe, cfg, eval_seed)
    base = summarize(base_images, base_images)
    jobs = [(name, seed, step, path) for name, seed in runs
            for step, path in checkpoint_dirs(run_dir(runs_dir, name, seed)).items()]
    evaluated = parallel(evaluate_checkpoint, jobs, args.jobs, tqdm, "evaluating", unit="model",
                         init=(init_evaluation, (base_dir, cfg, eval_seed, base_images, args.threads)))
    torch.set_num_threads(args.base_threads)  # init_evaluation set --threads here when --jobs is 1
    records = {r: run_record(run_dir(runs_dir, *r)) for r in runs}
    command = shlex.join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    results = {"mode": args.mode, "command": command,
               "settings": settings(args), "data": data_log, "base_model": base_log, "base": base,
               "methods": aggregate({m: method(m, family) for m in args.methods}, runs, jobs, evaluated, base,
                                    records)}
    compare_with_dpo(results)
    grid_rows, grid_labels = [base_images[:cfg["grid_samples"]]], ["base"]
    for name in args.methods:  # the first training seed's final model
        pipe.load_lora_weights(checkpoint_dirs(run_dir(runs_dir, name, args.train_seeds[0]))[cfg["steps"]])
        grid_rows.append(sample(pipe, {**cfg, "num_eval_samples": cfg["grid_samples"]}, eval_seed))
        grid_labels.append(f"{method(name, family)['short']} @{cfg['steps']}")
        pipe.unload_lora_weights()
    timings["eval_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start
    results.update(timings=timings, machine=machine)
    suffix = ("" if args.data_source == "world" else "_on_policy") + (f"_{args.tag}" if args.tag else "")
    report.write_outputs(results, work, suffix, grid_rows, grid_labels)
    if args.record:
        report.record(results, args.record_file, args.record)
    return results


def settings(args):
    """Everything that sets the experiment's numbers (the mode's sizes and the flags)."""
    return {**args.cfg, "learning_rate": args.learning_rate, "beta_dpo": args.beta_dpo, "rank": args.rank,
            "num_inversion_steps": args.num_inversion_steps, "inversion_schedule": args.inversion_schedule,
            "rater_temperature": args.rater_temperature, "reward_noise": args.reward_noise, "seed": args.seed,
            "data_source": args.data_source, "train_seeds": args.train_seeds,
            **({"family": args.family, "num_renoise_steps": args.num_renoise_steps,
                "inversion_choice": getattr(args, "inversion_choice", None)} if args.family == "flow" else {})}


def train(args, base_dir, scored, runs_dir, run_key, timings):
    """One LoRA run of the family's training script through accelerate launch (a method with a training seed)."""
    cfg, family = args.cfg, FAMILIES[args.family]
    name, seed = run_key
    out = run_dir(runs_dir, name, seed)
    if args.reuse_runs and cfg["steps"] in checkpoint_dirs(out):
        return f"  {method(name, family)['label']} (seed {seed}): reusing {out}"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.time()
    common = ["--pretrained_model_name_or_path", base_dir, "--dataset_name", scored, "--resolution", str(RESOLUTION),
              "--train_batch_size", str(cfg["batch_size"]), "--max_train_steps", str(cfg["steps"]),
              "--learning_rate", str(args.learning_rate), "--lr_scheduler", "constant", "--beta_dpo", str(args.beta_dpo),
              "--rank", str(args.rank), "--num_inversion_steps", str(args.num_inversion_steps),
              "--inversion_schedule", args.inversion_schedule, "--checkpointing_steps", str(cfg["checkpoint_every"]),
              "--seed", str(seed), *family.train_flags]
    if args.num_renoise_steps is not None:
        common += ["--num_renoise_steps", str(args.num_renoise_steps)]
    # a method's own flags come last: they override the common K, schedule and beta
    run(accelerate_cmd(family.script) + common + method(name)["flags"] + ["--output_dir", out], args, out + ".log")
    timings[f"train_{name}_seed{seed}_s"] = time.time() - t0
    return f"  {method(name, family)['label']} (seed {seed}): {cfg['steps']} steps in {time.time() - t0:.0f} s"


# in the probe's cache folder name: 2 inverts VAE posterior samples as training does (1, unnamed: posterior means,
# whose derived noise std 0.55-0.73 understated training's ~1.1 on the flow base)
PROBE_VERSION = 2


def inversion_probe(args, work, base_dir, key, scored, timings):
    """The flow inversion's K and R (unless given): benchmarks/inversion_probe.py on the flow base and the world
    pairs (cached), then choose_inversion(). Sets args.num_inversion_steps, args.num_renoise_steps and
    args.inversion_choice (what was chosen from what)."""
    t0, cfg = time.time(), args.cfg
    folder = os.path.join(work, f"probe{PROBE_VERSION}-{key}-{cfg['probe_latents']}-"
                                f"{'_'.join(map(str, cfg['probe_k']))}-{'_'.join(map(str, cfg['probe_r']))}")

    def probe():
        run([sys.executable, os.path.join(ROOT, "benchmarks", "inversion_probe.py"), "--pretrained_model_name_or_path",
             base_dir, "--dataset_name", scored, "--num_latents", str(cfg["probe_latents"]), "--num_inversion_steps",
             *map(str, cfg["probe_k"]), "--num_renoise_steps", *map(str, cfg["probe_r"]), "--output_dir", folder,
             "--seed", str(args.seed), *FAMILIES[args.family].sample_flags], args, os.path.join(folder, "probe.log"),
            threads=args.base_threads)
        return read_json(os.path.join(folder, "probe.json"))

    probed, _ = cached_stage(folder, probe)
    k, r = choose_inversion(probed)
    given = args.num_inversion_steps, args.num_renoise_steps
    args.num_inversion_steps = given[0] or k
    args.num_renoise_steps = given[1] if given[1] is not None else r
    args.inversion_choice = {"probe": os.path.join(folder, "probe.json"), "chosen": [k, r],
                             "given": [v for v in given], "err_train": {n: v["err_train"] for n, v in
                                                                         probed["sources"].items()}}
    print(f"flow inversion probe ({folder}): K = {k}, R = {r} chosen; training with K = {args.num_inversion_steps}, "
          f"R = {args.num_renoise_steps}")
    timings["probe_s"] = time.time() - t0


def choose_inversion(probed, std_tolerance=0.05, err_tolerance=0.01, max_std=1.5):
    """(K, R) for the flow inversion from the probe: the cheapest candidate (fewest transformer forwards, then fewest
    steps) that agrees with the most exact one probed (the most forwards): in every sigma bucket its derived noise's
    std within ``std_tolerance`` of that one's, its velocity error averaged over the training density (err_train)
    above that one's by less than ``err_tolerance`` x forward noise's, and its noise nowhere inflated (std below
    ``max_std``: the inflated small-t target made SD's grid_above unstable, docs/inversion.md). On SD the noise
    scale is what set K = 5 apart from K = 10 (std 0.37-0.72 vs 0.51-0.81, docs/inversion.md)."""
    sources = probed["sources"]
    inverted = [v for v in sources.values() if v["num_inversion_steps"]]
    exact = max(inverted, key=lambda v: (v["forwards"], v["num_inversion_steps"]))
    slack = err_tolerance * sources["forward"]["err_train"]

    def agrees(v):
        return (v["err_train"] <= exact["err_train"] + slack
                and all(abs(row["std"] - exact["buckets"][b]["std"]) <= std_tolerance and row["std"] < max_std
                        for b, row in v["buckets"].items()))

    chosen = min([v for v in inverted if agrees(v)] or [exact], key=lambda v: (v["forwards"], v["num_inversion_steps"]))
    return chosen["num_inversion_steps"], chosen["num_renoise_steps"]
