#!/usr/bin/env python
"""Compare the per-step metrics of two sets of training runs (the same seeds, before and after a refactor).

    python benchmarks/same_losses.py BEFORE_ROOT AFTER_ROOT --out docs/flow/sd_losses_unchanged.json

Each root holds run folders (e.g. sd-smpo-renoise/) with a metrics.jsonl; for every run present in both,
it records each step's loss in both and the largest absolute difference of every logged metric.
"""

import argparse
import json
import os


def steps(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "step" in row]


def compare(before, after):
    rows_b, rows_a = steps(before), steps(after)
    keys = sorted(k for k, v in rows_b[0].items() if isinstance(v, (int, float)) and k != "step")
    return {"steps": len(rows_b), "loss_before": [r["loss"] for r in rows_b], "loss_after": [r["loss"] for r in rows_a],
            "max_abs_diff": {k: max(abs(b[k] - a[k]) for b, a in zip(rows_b, rows_a)) for k in keys},
            "same_step_count": len(rows_b) == len(rows_a)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    runs = sorted(d for d in os.listdir(args.before) if os.path.exists(os.path.join(args.before, d, "metrics.jsonl")))
    result = {run: compare(os.path.join(args.before, run), os.path.join(args.after, run)) for run in runs}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for run, r in result.items():
        print(f"{run}: {r['steps']} steps, largest loss difference {r['max_abs_diff']['loss']:.3g}")


if __name__ == "__main__":
    main()
