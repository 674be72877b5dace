"""What the experiment runs: the methods compared, the sizes of each mode and the command-line flags."""

import argparse
import os
import re

from .family import FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    # each image's own generation noise (docs/prior_noise.md): needs pairs that record it (--data_source on_policy)
    "smpo_prior": {"label": "SmPO smoothing + prior noise", "short": "SmPO prior",
                   "flags": ["--loss_type", "smpo", "--noise_source", "prior"]},
    "dpo_prior": {"label": "Diffusion-DPO + prior noise", "short": "DPO prior",
                  "flags": ["--loss_type", "dpo", "--noise_source", "prior"]},
}
PRIOR = ["smpo_prior", "dpo_prior"]
ABLATION = ["dpo", "smpo_smooth", "smpo_exact10", "smpo_above5", "smpo_above10", "smpo_below5", "refinv_exact10",
            "refinv_above5"]
DEFAULT_METHODS = ["dpo", "smpo_smooth", "smpo"]
BETA_VARIANT = re.compile(r"dpo_beta(\d+(?:\.\d+)?)$")  # dpo_beta<N>: Diffusion-DPO with --beta_dpo N (a beta sweep)


def method(name, family=FAMILIES["sd"]):
    """A method's {"label", "short", "flags"}: METHODS[name], or dpo_beta<N> (dpo at --beta_dpo N; its flags come
    after the experiment's, so its beta wins). Labels name the family's DPO (Flow-DPO on the flow base)."""
    variant = BETA_VARIANT.match(name)
    if variant:
        beta = variant.group(1)
        spec = {"label": f"Diffusion-DPO beta {beta}", "short": f"DPO b{beta}",
                "flags": METHODS["dpo"]["flags"] + ["--beta_dpo", beta]}
    else:
        spec = METHODS[name]
    return {**spec, "label": spec["label"].replace("Diffusion-DPO", family.dpo_name),
            "short": spec["short"].replace("Diffusion-DPO", family.dpo_name)}

# Sizes of each mode. The family's base_keys (family.py) make the base cache key; the others are the experiment.
PRESETS = {
    "minimal": dict(world_size=256, vae_channels=(8, 16), vae_steps=20, unet_channels=(16, 32), unet_steps=20,
                    base_batch=16, num_pairs=48, reward_steps=20, steps=4, batch_size=4, checkpoint_every=2,
                    num_eval_samples=8, eval_inference_steps=4, grid_samples=4),
    "quick": dict(world_size=2000, vae_channels=(16, 32), vae_steps=200, unet_channels=(32, 64), unet_steps=600,
                  base_batch=32, num_pairs=1000, reward_steps=300, steps=60, batch_size=8, checkpoint_every=20,
                  num_eval_samples=96, eval_inference_steps=20, grid_samples=8),
    "full": dict(world_size=4000, vae_channels=(16, 32), vae_steps=400, unet_channels=(32, 64), unet_steps=1500,
                 base_batch=32, num_pairs=2000, reward_steps=500, steps=200, batch_size=8, checkpoint_every=50,
                 num_eval_samples=256, eval_inference_steps=25, grid_samples=8),
}
# The flow base (--family flow): an SD3-style transformer instead of the UNet, otherwise the SD sizes except where
# given here. Full mode is sized for the whole flow experiment (base, world pairs and on-policy pairs with 3 seeds,
# a beta sweep: the commands of docs/flow.md) to run in about 40 minutes on 2 cores (an estimate from measured
# per-forward costs, docs/flow.md). probe_*: the flow inversion probe that chooses SmPO's K and R
# (pipeline.choose_inversion) from these candidates.
FLOW_PRESETS = {
    "minimal": dict(flow_layers=1, flow_heads=2, flow_head_dim=8, flow_steps=20, probe_latents=4, probe_k=(2,),
                    probe_r=(0, 1)),
    "quick": dict(flow_layers=2, flow_heads=4, flow_head_dim=16, flow_steps=600, probe_latents=16, probe_k=(5, 10),
                  probe_r=(0, 1)),
    "full": dict(flow_layers=2, flow_heads=4, flow_head_dim=16, flow_steps=1500, probe_latents=32, probe_k=(5, 10),
                 probe_r=(0, 1), num_pairs=1600, steps=160, checkpoint_every=40, num_eval_samples=128,
                 eval_inference_steps=20),
}


def parse_args(argv=None, description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="The README's first command: a few minutes.")
    mode.add_argument("--minimal", action="store_true", help="Tiny sizes, a few steps: checks every stage (CI).")
    p.add_argument("--family", default="sd", choices=list(FAMILIES),
                   help="sd: a UNet base (epsilon), trained with train_smpo_diffusion.py; flow: an SD3-style "
                        "transformer base (rectified flow, no T5), trained with train_smpo_diffusion_sd3.py (docs/flow.md).")
    p.add_argument("--work_dir", default="toy-alignment")
    p.add_argument("--steps", type=int, default=None, help="Training steps of each method (default: per mode).")
    p.add_argument("--checkpoint_every", type=int, default=None, help="Evaluate every N steps (default: per mode).")
    p.add_argument("--batch_size", type=int, default=None, help="Pairs per training step (default: per mode).")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--beta_dpo", type=float, default=None,
                   help="KL strength, -0.5 * beta convention (default: 500 for sd; for flow the same converted to "
                        "velocity errors, 500 x E[(1 - s)^2] = 56). Method dpo_beta<N> trains Diffusion-DPO at beta N.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    p.add_argument("--num_inversion_steps", type=int, default=None,
                   help="K for full SmPO. sd: 10, the training scripts' default (the paper's ablation choice; "
                        "docs/inversion.md compares K = 5 and 10). flow: chosen by the flow inversion probe unless "
                        "given.")
    p.add_argument("--num_renoise_steps", type=int, default=None,
                   help="R for full SmPO on the flow base (default: chosen by the probe with K); sd runs take the "
                        "script's default (1).")
    p.add_argument("--num_eval_samples", type=int, default=None)
    p.add_argument("--eval_inference_steps", type=int, default=None, help="DDIM steps when sampling.")
    p.add_argument("--rater_temperature", type=float, default=0.3,
                   help="Bradley-Terry temperature of the simulated human raters (in warmth units); a negative one "
                        "makes raters who prefer cold hues (the labels reversed: a control).")
    p.add_argument("--reward_noise", type=float, default=0.15, help="Noise std of the reward model's targets.")
    p.add_argument("--inversion_schedule", default="exact", choices=["exact", "grid_above", "grid_below"],
                   help="The inversion schedule of the 'smpo' and 'smpo_refinv' methods (docs/inversion.md).")
    p.add_argument("--data_source", default="world", choices=["world", "on_policy"],
                   help="world: pairs of world images (like Pick-a-Pic's pairs of other models' samples); on_policy: "
                        "pairs of the base model's own samples made by generate_pairs.py, scored by the same reward "
                        "model and labelled by the same simulated raters.")
    p.add_argument("--on_policy_pairs", type=int, default=None,
                   help="Pairs sampled for --data_source on_policy (default: the mode's number of world pairs).")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, metavar="METHOD",
                   help=f"Of {', '.join(METHODS)}, dpo_beta<N> (Diffusion-DPO at --beta_dpo N) or 'ablation', which "
                        f"stands for {' '.join(ABLATION)}.")
    p.add_argument("--tag", default=None,
                   help="Appended to the output files' names (results_TAG.json, ...), e.g. for a beta sweep beside the "
                        "main comparison in the same --work_dir.")
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
    p.add_argument("--base_threads", type=int, default=None,
                   help="torch threads for the stages that run alone: the base model, the reward model, scoring and "
                        "sampling (default: --jobs x --threads, the cores the parallel stages use). The base's weights "
                        "may differ in float rounding with the thread count (its cache key does not hold it).")
    p.add_argument("--record", metavar="KEY", default=None,
                   help="Also write this run's results (settings, command line, every number) into --record_file "
                        "under KEY, replacing that key: how the docs' figures are stored.")
    p.add_argument("--record_file", default=os.path.join(ROOT, "docs", "results.json"),
                   help="The JSON file --record writes into (default: the checkout's docs/results.json).")
    p.add_argument("--rebuild_base", action="store_true", help="Retrain the base model even if it is cached.")
    args = p.parse_args(argv)
    args.mode = "minimal" if args.minimal else "quick" if args.quick else "full"
    cfg = dict(PRESETS[args.mode], **(FLOW_PRESETS[args.mode] if args.family == "flow" else {}))
    for key in ("steps", "checkpoint_every", "batch_size", "num_eval_samples", "eval_inference_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    args.cfg = cfg
    # each method once, in order ("dpo ablation" would otherwise train dpo twice into the same folder)
    args.methods = list(dict.fromkeys(m for name in args.methods for m in (ABLATION if name == "ablation" else [name])))
    unknown = [m for m in args.methods if m not in METHODS and not BETA_VARIANT.match(m)]
    if unknown:
        p.error(f"unknown method(s) {' '.join(unknown)}: choose from {', '.join(METHODS)}, dpo_beta<N> or ablation")
    family = FAMILIES[args.family]
    if args.beta_dpo is None:
        args.beta_dpo = family.default_beta()
    if family.name == "sd" and args.num_inversion_steps is None:
        args.num_inversion_steps = 10
    if family.name == "sd" and args.num_renoise_steps is not None:
        p.error("--num_renoise_steps is for --family flow (the SD runs keep the script's default, 1)")
    if family.name == "flow" and args.inversion_schedule != "exact":
        p.error("--inversion_schedule grid_above / grid_below replay the SD authors' DDIM grid: --family flow inverts "
                "with exact only")
    args.base_threads = args.base_threads or args.jobs * args.threads
    args.train_seeds = args.train_seeds if args.train_seeds is not None else [args.seed]
    prior = [m for m in args.methods if m in PRIOR]
    if prior and args.data_source != "on_policy":
        p.error(f"{' '.join(prior)} train on each image's generation noise, which only --data_source on_policy "
                "records (generate_pairs.py)")
    return args


