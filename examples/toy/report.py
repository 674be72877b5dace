"""What the experiment writes: results.json and results.md (one row per method), the preference-vs-step plot,
the grid of samples and the table in the terminal."""

import math
import os

import numpy as np

from .runs import read_json, write_json
from .stats import standard_error
from .world import RESOLUTION, to_uint8


def fmt_se(values):
    """The standard error over training seeds, or why there is none."""
    se = standard_error(values)
    return f"{se:.3f}" if se is not None else f"n/a ({len(values)} seed)"


X_AXES = {"step": "training step", "unet_work": "UNet work, counted (per image: training forward + backward 3, "
                                                "no-grad forward 1)"}


def plot_curves(results, path, size=(720, 440), x="step"):
    """True preference vs step (``x="step"``) or vs counted UNet work (``x="unet_work"``, the cumulative work at
    each evaluated step, mean over seeds) for each method (mean +- 1 SE band), the base as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    ax.axhline(results["base"]["true_preference"], color="grey", linestyle="--", label="base")
    for name, res in results["methods"].items():
        steps = sorted(map(int, res["curve"]))
        mean = np.array([res["curve"][str(s)]["true_preference"] for s in steps])
        se = np.array([res["curve"][str(s)]["true_preference_se"] for s in steps])
        xs = steps if x == "step" else [res["curve"][str(s)]["unet_work"] for s in steps]
        line, = ax.plot(xs, mean, marker="o", markersize=3, label=res["label"])
        ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.15)
    seeds = results["settings"]["train_seeds"]
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("mean true preference (warmth)")
    ax.set_title(f"{results['mode']} mode, {len(seeds)} training seed(s): mean +- 1 SE", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def sample_grid(rows, labels, path, scale=2, label_width=150):
    """One row per model (base first), the same seeds in each column (diffusers' make_image_grid), a label on the left."""
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw

    cell = RESOLUTION * scale
    cells = [Image.fromarray(to_uint8(image)).resize((cell, cell), Image.NEAREST) for images in rows for image in images]
    images = make_image_grid(cells, rows=len(rows), cols=len(rows[0]))
    grid = Image.new("RGB", (label_width + images.width, images.height), "white")
    grid.paste(images, (label_width, 0))
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(labels):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
    grid.save(path)
    return grid.size


def print_table(results):
    base = results["base"]
    header = (f"{'model':<32}{'step':>6}  {'true pref +- se':>16}  {'vs base (se)':>12}  {'diversity':>9}  {'drift':>6}")
    print("\n" + header + "\n" + "-" * len(header))
    print(f"{'base':<32}{0:>6}  {base['true_preference']:>+8.3f} +- {base['true_preference_se']:.3f}  {'':>12}  "
          f"{base['diversity']:>9.3f}  {0.0:>6.3f}")
    for name, res in results["methods"].items():
        for step in sorted(res["curve"], key=int):
            row = res["curve"][step]
            z = (row["true_preference"] - base["true_preference"]) / math.hypot(row["true_preference_se"],
                                                                                base["true_preference_se"])
            print(f"{res['label']:<32}{int(step):>6}  {row['true_preference']:>+8.3f} +- "
                  f"{row['true_preference_se']:.3f}  {z:>+12.1f}  {row['diversity']:>9.3f}  {row['drift']:>6.3f}")
    if "steps_to_dpo_final" in results:
        print(f"\n{dpo_level_note(results)}" if not results.get("dpo_final_above_base", True) else
              f"\nsteps to reach Diffusion-DPO's final mean preference ({results['dpo_final']:+.3f}): "
              + ", ".join(f"{results['methods'][k]['label']}: {v if v is not None else 'not reached'}"
                          for k, v in results["steps_to_dpo_final"].items()))
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"{'model':<32}{'AUC':>7}{'UNet work/step x DPO':>22}{'work to DPO level x DPO':>25}"
              f"{'wall-clock s/step x DPO':>25}")
        for name, res in results["methods"].items():
            print(f"{res['label']:<32}{res['auc']:>+7.3f}{fmt(res['unet_work_per_step_vs_dpo']):>22}"
                  f"{fmt(res['unet_work_to_dpo_final_vs_dpo']):>25}{fmt(res['step_cost_vs_dpo']):>25}")


def dpo_level_note(results):
    return (f"Diffusion-DPO's final mean preference ({results['dpo_final']:+.3f}) is not above the base's "
            f"({results['base']['true_preference']:+.3f}): every method 'reaches' it at step 0, so the steps and work "
            "to reach it are not given (-); compare the curves and AUC instead.")


def markdown_table(results):
    """results.md: one row per method, the numbers the README and docs/inversion.md quote."""
    base = results["base"]
    seeds = results["settings"]["train_seeds"]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    lines = [f"{results['mode']} mode, data {results['settings'].get('data_source', 'world')}, training seeds {seeds}; "
             f"base {base['true_preference']:+.3f} +- {base['true_preference_se']:.3f} (diversity {base['diversity']:.3f}). "
             "Final and AUC: mean +- SE over the seeds; vs base: (final - base) / combined SE. UNet work: counted "
             "image-forwards (training forward + backward 3, no-grad forward 1; smpo/cost.py); wall-clock s/step: "
             "timed on the machine that ran it, load included.", "",
             "| method | final | vs base | AUC | steps to DPO final | diversity | drift | UNet work/step x DPO | "
             "UNet work to DPO final x DPO | wall-clock s/step x DPO | m_w - r_w | m_l - r_l | noise std w / l |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results["methods"].items():
        final, last = res["final"], res["train_metrics_last"]
        aucs = list(res["auc_by_seed"].values())
        lines.append(
            f"| {res['label']} | {final['true_preference']:+.3f} +- {final['true_preference_se']:.3f} | "
            f"{res['final_gain_in_se']:+.1f} SE | {res['auc']:+.3f} +- {fmt_se(aucs)} | "
            f"{fmt(results.get('steps_to_dpo_final', {}).get(name), 'd')} | {final['diversity']:.3f} | {final['drift']:.3f} | "
            f"{fmt(res.get('unet_work_per_step_vs_dpo'), '.2f')} | {fmt(res.get('unet_work_to_dpo_final_vs_dpo'), '.2f')} | "
            f"{fmt(res.get('step_cost_vs_dpo'), '.2f')} | "
            f"{last.get('model_minus_ref_w', float('nan')):+.4f} | {last.get('model_minus_ref_l', float('nan')):+.4f} | "
            f"{last.get('noise_std_w', float('nan')):.2f} / {last.get('noise_std_l', float('nan')):.2f} |")
    note = [] if results.get("dpo_final_above_base", True) else ["", dpo_level_note(results)]
    return "\n".join(lines + note + ["", *curve_table(results)]) + "\n"


def curve_table(results):
    """Lines of a table: each method's preference at each evaluated step (mean +- SE), the UNet work it had
    spent by then (mean over seeds, in DPO steps: units / DPO's work per step) and each seed's final."""
    steps = sorted({int(s) for res in results["methods"].values() for s in res["curve"]} - {0})
    dpo = results["methods"].get("dpo", {}).get("unet_work_per_step")
    unit = f"DPO steps of work ({dpo:.0f} units each)" if dpo else "UNet work units"
    lines = [f"Preference at each evaluated step, mean +- SE over seeds [UNet work spent by then, in {unit}]:", "",
             "| method | " + " | ".join(f"step {s}" for s in steps) + " | finals by seed |",
             "|---|" + "---|" * (len(steps) + 1)]
    for res in results["methods"].values():
        cells = []
        for s in steps:
            row = res["curve"].get(str(s))
            work = row["unet_work"] / dpo if row and dpo else (row or {}).get("unet_work")
            cells.append("-" if row is None else f"{row['true_preference']:+.3f} +- {row['true_preference_se']:.3f} "
                                                 f"[{work:.0f}]")
        finals = " / ".join(f"{v:+.3f}" for v in res["final_by_seed"].values())
        lines.append(f"| {res['label']} | " + " | ".join(cells) + f" | {finals} |")
    return lines


def write_outputs(results, work, suffix, grid_rows, grid_labels):
    """results{suffix}.json and .md, preference_vs_step{suffix}.png, preference_vs_unet_work{suffix}.png,
    samples_grid{suffix}.png; the tables and times in the terminal."""
    results["plot_size"] = plot_curves(results, os.path.join(work, f"preference_vs_step{suffix}.png"))
    results["work_plot_size"] = plot_curves(results, os.path.join(work, f"preference_vs_unet_work{suffix}.png"),
                                            x="unet_work")
    results["grid_size"] = sample_grid(grid_rows, grid_labels, os.path.join(work, f"samples_grid{suffix}.png"))
    write_json(os.path.join(work, f"results{suffix}.json"), results)
    with open(os.path.join(work, f"results{suffix}.md"), "w") as f:
        f.write(markdown_table(results))
    print_table(results)
    t, m = results["timings"], results["machine"]
    print(f"\ntimes: base {t['base_s']:.0f} s ({'cached' if t['base_cached'] else 'trained'}), data {t['data_s']:.0f} s, "
          f"training {t['train_s']:.0f} s, evaluation {t['eval_s']:.0f} s, total {t['total_s']:.0f} s "
          f"({m['nproc']} cores; base {m['base_threads']} threads, runs {m['jobs']} x {m['torch_threads']})")
    print(f"wrote {work}/results{suffix}.json, preference_vs_step{suffix}.png, preference_vs_unet_work{suffix}.png, "
          f"samples_grid{suffix}.png")


def record(results, path, key):
    """results under ``key`` in the JSON file ``path`` (made if missing; its other keys kept)."""
    records = read_json(path) if os.path.exists(path) else {}
    if not isinstance(records, dict):
        raise SystemExit(f"{path} is not a JSON object: not overwriting it (--record {key})")
    records[key] = results
    write_json(path, records)
    print(f"recorded the results as {key!r} in {path}")
