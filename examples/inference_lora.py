#!/usr/bin/env python
"""Generate with a base pipeline (SD 1.x/2.x, SDXL, SD3 / SD3.5 or FLUX) plus a LoRA trained by SmPO.

    python examples/inference_lora.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --lora_weights smpo-sdxl-lora --prompt "a fox in the snow" --output fox.png
    python examples/inference_lora.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
        --lora_weights smpo-sd35m-lora --prompt "a fox in the snow" --guidance_scale 4.5 --output fox.png

The pipeline class is the one the folder's model_index.json names (StableDiffusion3Pipeline, FluxPipeline, ...);
a pipeline saved without a component (SD3 with text_encoder_3=None) loads without it.

Writes OUTPUT (the LoRA image) and OUTPUT with a -base suffix (the same seed without the LoRA)
so the two can be compared.
"""

import argparse
import os
import sys

import torch
from diffusers import DiffusionPipeline

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from smpo.sampling import saved_without  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--lora_weights", required=True, help="folder with pytorch_lora_weights.safetensors")
    p.add_argument("--prompt", required=True)
    p.add_argument("--resolution", type=int, default=None, help="default: the pipeline's own")
    p.add_argument("--num_inference_steps", type=int, default=30)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="sample.png")
    return p.parse_args(argv)


def main(args):
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=dtype,
                                             **saved_without(args.pretrained_model_name_or_path)).to(args.device)
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}

    def sample():
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        return pipe(args.prompt, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                    generator=generator, **size).images[0]

    stem, ext = os.path.splitext(args.output)
    sample().save(f"{stem}-base{ext}")
    pipe.load_lora_weights(args.lora_weights)
    sample().save(args.output)
    print(f"wrote {args.output} (with LoRA) and {stem}-base{ext} (without)")


if __name__ == "__main__":
    main(parse_args())
