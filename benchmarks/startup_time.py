#!/usr/bin/env python
"""How long each script takes to answer before any heavy work: ``--help``, and a run whose model is missing.

    python benchmarks/startup_time.py --label after      # writes docs/startup_time.json (merged by label)

    python benchmarks/startup_time.py --label before --root OLD_CHECKOUT   # e.g. a `git archive` of an older commit
    python benchmarks/startup_time.py --label x --scripts evaluate.py --output /tmp/x.json   # one script, elsewhere

For every script it times, in a fresh Python process each time, ``python SCRIPT --help`` and a run whose
``--pretrained_model_name_or_path`` (or, for score_pairs.py, ``--reward_model_name_or_path``) is a folder
that does not exist, which must fail before any model loads; and, as the floor both stand on,
``python -c "import torch"``. Each command runs ``--repeats`` times; the median wall time is kept.
Results are stored under ``--label`` with the commit, the core count and the load average before and
after: on a shared, loaded machine everything reads slower, torch's import included.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_smpo_diffusion.py", "train_smpo_diffusion_sdxl.py", "train_smpo_diffusion_sd3.py",
           "train_smpo_diffusion_flux.py", "evaluate.py", "generate_pairs.py", "score_pairs.py")


def missing_model_args(script, tmp):
    """Arguments that pass the parser but name a model folder that does not exist."""
    missing, data, out = os.path.join(tmp, "no-such-model"), os.path.join(tmp, "prompts.txt"), os.path.join(tmp, "out")
    if script.startswith("train_"):
        return ["--pretrained_model_name_or_path", missing, "--dataset_name", tmp, "--output_dir", out]
    if script == "evaluate.py":
        return ["--pretrained_model_name_or_path", missing, "--lora_weights", tmp, "--prompts_file", data,
                "--output_dir", out, "--device", "cpu"]
    if script == "generate_pairs.py":
        return ["--pretrained_model_name_or_path", missing, "--prompts_file", data, "--output_dir", out,
                "--device", "cpu"]
    return ["--dataset_name", tmp, "--reward_model_name_or_path", missing, "--output_dir", out, "--device", "cpu"]


def time_command(cmd, root, repeats, expect_failure):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if (proc.returncode != 0) != expect_failure:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help='e.g. "before" or "after"')
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=os.path.join(HERE, "docs", "startup_time.json"))
    p.add_argument("--root", default=HERE, help="the checkout whose scripts are timed (default: this one)")
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS, metavar="SCRIPT",
                   help="time only these (default: all of them)")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    results = {"import torch": round(time_command([sys.executable, "-c", "import torch"], args.root, args.repeats,
                                                  False), 2)}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "prompts.txt"), "w") as f:
            f.write("a photo of a cat\n")
        for script in args.scripts:
            path = os.path.join(args.root, script)
            if not os.path.exists(path):  # an older checkout: the flow scripts came later
                continue
            results[script] = {
                "help_s": round(time_command([sys.executable, path, "--help"], args.root, args.repeats, False), 2),
                "missing_model_s": round(time_command([sys.executable, path, *missing_model_args(script, tmp)],
                                                      args.root, args.repeats, True), 2)}
            print(script, results[script], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.root, capture_output=True, text=True)
    entry = {"commit": commit.stdout.strip() or "(not a git checkout: see --root's origin)", "cpus": os.cpu_count(),
             "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "repeats": args.repeats,
             "median_seconds": results}
    stored = {}
    if os.path.exists(args.output):
        with open(args.output) as f:
            stored = json.load(f)
    stored[args.label] = entry
    with open(args.output, "w") as f:
        json.dump(stored, f, indent=1)
        f.write("\n")
    print(f"wrote {args.output} [{args.label}]")


if __name__ == "__main__":
    main()
