#!/usr/bin/env python
"""Which family and training mode fits on a 24 / 48 / 80 GB GPU, *computed* from parameter counts (no GPU needed).

    python benchmarks/what_fits.py --output_json docs/performance/what_fits.json

The counts are ``benchmarks/step_cost.py --random_init MODEL --count_only``'s (benchmarks/random_models.py, the
published configs). Per mode, the resident memory is bytes per parameter times the counts:

    lora            frozen denoiser bf16 (2 B) + LoRA rank 8 in fp32 with its gradient and 8-bit AdamW state
                    (4 + 4 + 2 B) + VAE bf16 (2 B); text encoders on the CPU (--cache_text_embeddings)
    lora+text       lora, with the text encoders kept on the GPU in bf16 (2 B)
    full-8bit       denoiser fp32 (4 B) + gradient (4 B) + 8-bit AdamW state (2 B) + bf16 reference copy (2 B) + VAE
    full-adamw      as full-8bit with fp32 AdamW state (8 B)

plus an activation allowance for one pair (2 images) at the native resolution with gradient checkpointing
(ACTIVATIONS_GIB below: an assumption, not a measurement; the ReNoise inversion runs without gradients and needs no
more than one forward's activations). A cell "fits" when resident + allowance <= 90% of the card (CUDA context and
fragmentation take the rest), "no" when the resident memory alone exceeds the card, and "tight" in between:
there, only a measurement (benchmarks/gpu_check.sh) decides.
"""

import argparse
import json
import os

import random_models

ACTIVATIONS_GIB = {512: 3.0, 1024: 8.0}  # assumed, per pair with gradient checkpointing at the native resolution
CARDS_GIB = (24, 48, 80)
BF16, FP32, ADAM8, ADAM32 = 2, 4, 2, 8
MODES = {  # bytes per parameter: (denoiser, lora adapters, vae, text encoders)
    "lora": (BF16, FP32 + FP32 + ADAM8, BF16, 0),
    "lora+text": (BF16, FP32 + FP32 + ADAM8, BF16, BF16),
    "full-8bit": (FP32 + FP32 + ADAM8 + BF16, 0, BF16, 0),
    "full-adamw": (FP32 + FP32 + ADAM32 + BF16, 0, BF16, 0),
}


def verdict(resident, allowance, card):
    if resident + allowance <= 0.9 * card:
        return "fits"
    return "no" if resident > card else "tight"


def what_fits(counts):
    text = sum(v for k, v in counts.items() if k.startswith("text_encoder"))
    allowance = ACTIVATIONS_GIB[random_models.NATIVE_RESOLUTION[counts["model"]]]
    rows = {}
    for mode, (denoiser, lora, vae, encoders) in MODES.items():
        resident = (denoiser * counts["denoiser_params"] + lora * counts["lora_params"] + vae * counts["vae_params"]
                    + encoders * text) / 2**30
        rows[mode] = {"resident_gib": round(resident, 1), "activation_allowance_gib": allowance,
                      **{f"{card}GB": verdict(resident, allowance, card) for card in CARDS_GIB}}
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_json", default=None)
    args = p.parse_args()
    out = {"computed": "from parameter counts, not measured (benchmarks/what_fits.py)", "modes": {}, "counts": {}}
    print(f"| family | mode | resident GiB | + activations GiB | {' | '.join(f'{c} GB' for c in CARDS_GIB)} |")
    print("|---|---|---|---|" + "---|" * len(CARDS_GIB))
    for model in random_models.MODELS:
        counts = random_models.count_parameters(model)
        out["counts"][model], out["modes"][model] = counts, what_fits(counts)
        for mode, row in out["modes"][model].items():
            cells = " | ".join(f"{row[f'{c}GB']} (computed)" for c in CARDS_GIB)
            print(f"| {model} | {mode} | {row['resident_gib']} | {row['activation_allowance_gib']} | {cells} |")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
