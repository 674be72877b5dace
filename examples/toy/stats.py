"""The numbers: summaries of a model's samples, curves over training seeds, comparisons with Diffusion-DPO."""

import math

import numpy as np

from .world import hue_diversity, true_preference


def standard_error(values):
    """Standard error of the mean of ``values``; None when there is one value (no spread to measure)."""
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def summarize(images, base_images):
    """Mean true preference (+ its standard error, and the paired gain over the base on the same seeds),
    hue diversity, drift from the base's samples (RMS pixel distance, pixels in [0, 1]) and the disk rate."""
    pref, has_disk = true_preference(images)
    gain = pref - true_preference(base_images)[0]
    se = (lambda x: standard_error(x) or 0.0)
    return {"true_preference": float(pref.mean()), "true_preference_se": se(pref),
            "paired_gain": float(gain.mean()), "paired_gain_se": se(gain),
            "diversity": hue_diversity(images),
            "drift": float(np.sqrt(((images - base_images) ** 2).mean(axis=(1, 2, 3))).mean()),
            "disk_rate": float(has_disk.mean())}


def aggregate(methods, runs, jobs, evaluated, base, records):
    """Per method: each seed's curve, and the curve over seeds (mean; SE over seeds when there are several,
    else the one run's sampling SE), its final point, area under the curve, the UNet work counted by the
    training loop (per step, and the cumulative work at each evaluated step: ``curve[step]["unet_work"]``), the
    wall-clock s/step and the training metrics.

    ``methods``: {name: {"label", "flags"}}; ``runs``: (name, seed) pairs; ``jobs``: (name, seed, step, path) of
    each evaluated checkpoint and ``evaluated`` its summary; ``records``: {(name, seed): runs.run_record()}.
    """
    per_run = {}
    for (name, seed, step, _), row in zip(jobs, evaluated):
        per_run.setdefault((name, seed), {"0": dict(base)})[str(step)] = row
    out = {}
    for name, method in methods.items():
        seeds = {seed: per_run[(name, seed)] for n, seed in runs if n == name}
        curve = {}
        for step in sorted(next(iter(seeds.values())), key=int):
            rows = [c[step] for c in seeds.values()]
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            if len(rows) > 1:
                mean["true_preference_se"] = standard_error([r["true_preference"] for r in rows])
            mean["unet_work"] = float(np.mean([records[(name, seed)]["unet_work_total"].get(int(step), 0)
                                               for seed in seeds]))  # cumulative, mean over seeds
            curve[step] = mean
        final = curve[str(max(map(int, curve)))]
        metrics = [records[(name, seed)]["metrics_last"] for seed in seeds]
        speeds = [v for v in (records[(name, seed)]["seconds_per_step"] for seed in seeds) if v]
        out[name] = {
            "label": method["label"], "flags": method["flags"], "curve": curve, "final": final,
            "final_gain_in_se": (final["true_preference"] - base["true_preference"]) / math.hypot(
                final["true_preference_se"], base["true_preference_se"]),
            "auc": area_under_curve(curve), "auc_by_seed": {str(s): area_under_curve(c) for s, c in seeds.items()},
            "final_by_seed": {str(s): c[str(max(map(int, c)))]["true_preference"] for s, c in seeds.items()},
            "unet_work_per_step": float(np.mean([work_per_step(records[(name, seed)]) for seed in seeds])),
            "seconds_per_step": float(np.median(speeds)) if speeds else None,  # wall-clock: the machine's load too
            "train_metrics_last": {k: float(np.mean([m[k] for m in metrics])) for k in
                                   ("loss", "implicit_acc", "weight", "model_minus_ref_w", "model_minus_ref_l",
                                    "noise_std_w", "noise_std_l") if k in metrics[0]},
        }
    return out


def work_per_step(record):
    """A run's UNet work per optimizer step (its total over its steps)."""
    totals = record["unet_work_total"]
    return totals[max(totals)] / max(totals)


def area_under_curve(curve):
    """Mean true preference over the training steps (trapezoids between evaluated steps, the base at 0)."""
    steps = sorted(map(int, curve))
    values = [curve[str(s)]["true_preference"] for s in steps]
    return float(np.trapezoid(values, steps) / steps[-1]) if steps[-1] else values[0]


def compare_with_dpo(results):
    """Steps and counted UNet work to reach Diffusion-DPO's final mean preference, UNet work per step, each
    relative to DPO; also the wall-clock s/step and the wall-clock cost to get there (machine load included)."""
    if "dpo" not in results["methods"]:
        return
    dpo = results["methods"]["dpo"]
    level = dpo["final"]["true_preference"]
    results["dpo_final"] = level
    # A level the base already holds (DPO ended at or below where it started) is reached by every method at step 0:
    # no cost to compare, so none is given (the report says why; compare the curves and AUC instead).
    base_level = dpo["curve"].get("0", {}).get("true_preference")
    results["dpo_final_above_base"] = base_level is None or level > base_level
    results["steps_to_dpo_final"] = {k: steps_to_reach(r["curve"], level) if results["dpo_final_above_base"] else None
                                     for k, r in results["methods"].items()}
    for name, res in results["methods"].items():
        speed = res["seconds_per_step"] / dpo["seconds_per_step"] if res["seconds_per_step"] and dpo["seconds_per_step"] else None
        res["step_cost_vs_dpo"] = speed
        steps, dpo_steps = results["steps_to_dpo_final"][name], results["steps_to_dpo_final"]["dpo"]
        res["cost_to_dpo_final_vs_dpo"] = speed * steps / dpo_steps if speed and steps and dpo_steps else None
        res["unet_work_per_step_vs_dpo"] = res["unet_work_per_step"] / dpo["unet_work_per_step"]
        res["unet_work_to_dpo_final"] = res["curve"][str(steps)]["unet_work"] if steps is not None else None
        dpo_work = dpo["curve"][str(dpo_steps)]["unet_work"] if dpo_steps else None
        res["unet_work_to_dpo_final_vs_dpo"] = (res["unet_work_to_dpo_final"] / dpo_work
                                                if res["unet_work_to_dpo_final"] is not None and dpo_work else None)


def steps_to_reach(curve, level):
    """First evaluated step whose mean true preference reaches ``level`` (None if never)."""
    for step, row in sorted(curve.items(), key=lambda kv: int(kv[0])):
        if row["true_preference"] >= level:
            return int(step)
    return None
