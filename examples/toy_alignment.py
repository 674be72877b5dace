#!/usr/bin/env python
"""A CPU-sized preference-alignment experiment that shows whether SmPO moves a model toward what people prefer.

    python examples/toy_alignment.py --quick          # the README's first command (its time: the README)
    python examples/toy_alignment.py                  # the full experiment (about half an hour on 2 cores)
    python examples/toy_alignment.py --minimal        # a smoke test of every stage (CI, ~1 min)
    python examples/toy_alignment.py --family flow    # the same on a flow-matching base (docs/flow.md)

Offline, everything in fp32 on the CPU, written to --work_dir (default ./toy-alignment):

1. A synthetic world: 32x32 coloured disks on grey, caption "a disk". The true preference is the
   disk's *warmth*, cos(hue - 30 deg) in [-1, 1] (orange best, cyan/blue worst), measured from
   pixels (`true_preference`). Raters are noisy: each pair's binary label is drawn from a
   Bradley-Terry model of the warmth, p(image 0 preferred) = sigmoid((w0 - w1) / rater_temperature),
   so near-ties are coin flips and some labels are flipped.
2. A tiny base text-to-image model trained on the whole world (all hues, so it is neutral): an
   AutoencoderKL, a UNet2DConditionModel and a char-level CLIP text encoder, saved as a real
   StableDiffusionPipeline in WORK/base-<key>/ (cached: a rerun with the same settings skips it).
3. A Pick-a-Pic-schema preference dataset (caption, jpg_0, jpg_1, label_0) of world pairs, and a
   tiny reward model (a transformers CLIPModel + CLIPProcessor trained for the purpose) whose
   cosine(image, caption) is 0.2 + 0.08 * (warmth + noise), noise ~ N(0, reward_noise) per
   training image: a PickScore stand-in whose score range equals PickScore's min-max range (tau).
   The pairs are scored by `score_pairs.py`, run as a user would.
4. Three LoRA runs of `train_smpo_diffusion.py` through `accelerate launch`, same steps, beta,
   learning rate, batch and seed: Diffusion-DPO (human labels, forward noise), SmPO smoothing only
   (reward-smoothed weights, forward noise) and full SmPO (smoothing + ReNoise inversion, `exact`,
   K = 10: the training scripts' defaults; docs/inversion.md compares the schedules and K).
5. Evaluation of the base and every checkpoint on fixed seeds: mean true preference of the samples
   (with its standard error), diversity (normalised entropy of the hue histogram; 1 = all hues
   equally often) and drift (RMS pixel distance to the base model's sample from the same seed).

Outputs in WORK: results.json (with the stage timings, thread counts and the machine's core count),
results.md, preference_vs_step.png, samples_grid.png, and a table in the terminal.

--family flow swaps the base for an SD3-style transformer on a rectified flow (a StableDiffusion3Pipeline without
T5, trained from scratch on the same world with the flow-matching loss) and trains it with
train_smpo_diffusion_sd3.py; SmPO's inversion steps K and refinements R are then chosen by a probe of the flow
inversion on the base (benchmarks/inversion_probe.py), unless given. The data, reward model, evaluation and outputs
are the same code.

The code is the package examples/toy/ (one module per concern; see its __init__.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # smpo, from a checkout
# Threads that wait sleep instead of spinning: with 2 threads on a 2-core machine that runs anything else, spinning
# made a base UNet step ~5x slower (2 threads, measured back to back on a busy 2-core machine: passive 0.62 s,
# spinning 3.0 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from toy.experiment import parse_args  # noqa: E402  (examples/ is on the path: this file's folder)
from toy.pipeline import main  # noqa: E402

if __name__ == "__main__":
    main(parse_args(description=__doc__))
