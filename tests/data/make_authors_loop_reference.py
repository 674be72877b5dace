"""Regenerate ``authors_loop_diffusers020.pt``: the SmPO authors' training inversion loop, run literally.

The reference implementation of SmPO-Diffusion (its ``train.py``) re-noises each clean latent ``x0`` to
its sampled training timestep ``t0`` with diffusers' ``DDIMInverseScheduler`` and one ReNoise-style
averaging step per grid level. This script runs that loop *with the real diffusers 0.20.0 scheduler*
(the version the authors pinned), so the project's own re-implementation (``smpo/renoise.py``) can be
tested against it without diffusers installed. The loop, per (steps_offset, K, t0), as in ``train.py``::

    inverse_scheduler = DDIMInverseScheduler(**CONFIG, steps_offset=offset)
    inverse_scheduler.set_timesteps(K)
    z = x0
    for g in inverse_scheduler.timesteps[inverse_scheduler.timesteps < t0]:
        e0 = eps(z, g)
        z1 = inverse_scheduler.step(e0, g, z).prev_sample
        e1 = eps(z1, g)
        z = inverse_scheduler.step((e0 + e1) / 2, g, z).prev_sample
    abar = inverse_scheduler.alphas_cumprod            # float32, shape (1000,)
    noise = (z - abar[t0].sqrt() * x0) / (1 - abar[t0]).sqrt()

``g`` is handed to ``step`` exactly as the authors did: a 0-d int64 tensor taken from the scheduler's own
``timesteps``. The first ``g`` is negative (diffusers rolls the grid and puts ``grid[1] - 1000 // K``
first; ``step`` then uses ``alphas_cumprod[0]`` for it, since ``set_alpha_to_one=False``).

Stand-in for the UNet (``eps``), elementwise, defined for negative ``g``; evaluate it exactly as written,
in torch, on a float32 ``z``, with ``g`` a python float of the timestep value (``float(g)``)::

    torch.tanh(0.8 * z + 0.3) * (1.0 + g / 2000.0) + 0.05 * math.sin(g / 100.0)

Everything is float32 and on the CPU. Each t0 in 0..999 is its own batch of one (one pair per GPU, as the
authors trained); ``x0[t0]`` (shape (1, 4, 2, 2)) is the clean latent for that t0.

Scheduler config (Stable Diffusion 1.5's), run once with ``steps_offset=1`` and once with ``steps_offset=0``::

    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon", timestep_spacing="leading"

Saved dict (``torch.save``; only tensors, lists, dicts, str, int, float and bool, so ``torch.load`` with
``weights_only=True`` reads it):

- ``"x0"``: (1000, 4, 2, 2) float32, ``torch.randn(..., generator=torch.Generator().manual_seed(0))``.
- ``"t0"``: (1000,) int64, ``arange(1000)``; row i of every tensor belongs to t0 = i.
- ``"alphas_cumprod"``: (1000,) float32, the scheduler's.
- ``"eps_formula"``: the formula above, as a string.
- ``"diffusers_version"``, ``"torch_version"``: strings.
- ``"config"``: the scheduler config above (without steps_offset).
- ``"timesteps"``: {f"offset{o}_K{K}": the list ``set_timesteps(K)`` made}.
- for o in (1, 0) and K in (5, 10), ``f"offset{o}_K{K}"``: {
  ``"z"``: (1000, 4, 2, 2) float32, the final noisy latent;
  ``"noise"``: (1000, 4, 2, 2) float32, the implied noise;
  ``"g"``: list of 1000 lists of ints, the timesteps passed to eps in order (each is passed twice per
  step, listed once per step);
  ``"timesteps"``: the same list as ``"timesteps"`` above }.

Run from the repository root with a venv holding diffusers 0.20.0 (not a project requirement)::

    python3 -m venv /work/venv020
    /work/venv020/bin/pip install torch==2.13.0   # a CPU build
    /work/venv020/bin/pip install diffusers==0.20.0 'huggingface_hub<0.20' numpy
    /work/venv020/bin/python tests/data/make_authors_loop_reference.py
"""
import math
import os
import sys

import torch

import diffusers
from diffusers import DDIMInverseScheduler

EPS_FORMULA = "torch.tanh(0.8 * z + 0.3) * (1.0 + g / 2000.0) + 0.05 * math.sin(g / 100.0)"

CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
OFFSETS = (1, 0)
STEPS = (5, 10)
NUM_T0 = 1000
SHAPE = (NUM_T0, 4, 2, 2)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "authors_loop_diffusers020.pt")


def eps(z, g):
    """The UNet stand-in; ``g`` is the scheduler's timestep (a 0-d tensor), used as a python float."""
    g = float(g)
    return torch.tanh(0.8 * z + 0.3) * (1.0 + g / 2000.0) + 0.05 * math.sin(g / 100.0)


def authors_loop(inverse_scheduler, x0, t0):
    """One pair's inversion, as the authors' train.py: returns (z, noise, [g per step])."""
    z = x0
    seen = []
    for g in inverse_scheduler.timesteps[inverse_scheduler.timesteps < t0]:
        seen.append(int(g))
        e0 = eps(z, g)
        z1 = inverse_scheduler.step(e0, g, z).prev_sample
        e1 = eps(z1, g)
        z = inverse_scheduler.step((e0 + e1) / 2, g, z).prev_sample
    abar = inverse_scheduler.alphas_cumprod
    noise = (z - abar[t0].sqrt() * x0) / (1 - abar[t0]).sqrt()
    return z, noise, seen


def main():
    assert diffusers.__version__ == "0.20.0", diffusers.__version__
    torch.set_num_threads(1)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    data = {
        "x0": x0,
        "t0": torch.arange(NUM_T0),
        "eps_formula": EPS_FORMULA,
        "diffusers_version": str(diffusers.__version__),
        "torch_version": str(torch.__version__),
        "config": dict(CONFIG),
        "timesteps": {},
    }
    for offset in OFFSETS:
        for K in STEPS:
            key = f"offset{offset}_K{K}"
            inverse_scheduler = DDIMInverseScheduler(**CONFIG, steps_offset=offset)
            assert inverse_scheduler.alphas_cumprod.dtype == torch.float32
            inverse_scheduler.set_timesteps(K)
            grid = [int(t) for t in inverse_scheduler.timesteps]
            zs, noises, gs = torch.empty(SHAPE), torch.empty(SHAPE), []
            for t0 in range(NUM_T0):
                z, noise, seen = authors_loop(inverse_scheduler, x0[t0:t0 + 1], t0)
                assert z.dtype == torch.float32 and noise.dtype == torch.float32
                zs[t0], noises[t0] = z[0], noise[0]
                gs.append(seen)
            assert torch.isfinite(zs).all() and torch.isfinite(noises).all()
            data["timesteps"][key] = grid
            data[key] = {"z": zs, "noise": noises, "g": gs, "timesteps": grid}
            if "alphas_cumprod" not in data:
                data["alphas_cumprod"] = inverse_scheduler.alphas_cumprod.clone()
            else:
                assert torch.equal(data["alphas_cumprod"], inverse_scheduler.alphas_cumprod)
            print(f"{key}: grid {grid}", file=sys.stderr)
    torch.save(data, OUT)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
