#!/usr/bin/env python
"""Build tiny, random-weight stand-ins for everything SmPO training needs, offline, in seconds.

    python examples/make_tiny_assets.py OUT_DIR

writes

    OUT_DIR/tiny-sd/          StableDiffusionPipeline   (epsilon prediction)
    OUT_DIR/tiny-sd-vpred/    the same weights, v-prediction scheduler
    OUT_DIR/tiny-sdxl/        StableDiffusionXLPipeline (two text encoders, micro-conditioning)
    OUT_DIR/tiny-sd3/         StableDiffusion3Pipeline  (two CLIP encoders + T5, rectified flow, shift 3)
    OUT_DIR/tiny-sd3-no-t5/   the same without T5 (text_encoder_3=None: zero T5 embeddings)
    OUT_DIR/tiny-flux/        FluxPipeline (CLIP + T5, guidance-distilled like FLUX.1-dev, 16-channel VAE)
    OUT_DIR/tiny-reward/      CLIPModel + CLIPProcessor (a PickScore stand-in)
    OUT_DIR/tiny-pickapic/    a `save_to_disk` dataset with the Pick-a-Pic v2 column schema:
                              JPEG bytes of uneven sizes, one tie (label_0 = 0.5)

All models are real diffusers/transformers classes with random weights, so the training scripts
run their real code paths on them. Nothing is downloaded.
"""

import argparse
import io
import json
import os
import string

import numpy as np
import torch
from PIL import Image

CAPTIONS = [
    "a red circle on grey",
    "a blue square",
    "a cat wearing a hat",
    "sunset over the sea",
    "a green tree in a field",
    "an astronaut riding a horse",
    "a bowl of fruit",
    "a small yellow house",
]
# (width, height) of the two images of each pair: deliberately uneven and different within a pair.
SIZES = [((48, 40), (40, 56)), ((64, 32), (36, 36)), ((33, 47), (50, 38)), ((40, 40), (72, 40))]


def make_tokenizer():
    """A CLIPTokenizer over single characters; model_max_length=77 as in CLIP (no giant padding)."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def text_config(vocab_size, hidden=32, projection_dim=32, intermediate_size=37):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def make_vae(**extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
        norm_num_groups=8, sample_size=32, **extra,
    )


def make_t5_tokenizer():
    """A T5TokenizerFast over single characters, from a `tokenizers` Unigram model (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list(string.ascii_lowercase + string.digits + ".,!?'-")
    model = Tokenizer(models.Unigram([(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)], unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def make_unet(cross_attention_dim, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16, **extra,
    )


def scheduler(prediction_type="epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def build_sd(out_dir):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=make_vae(), text_encoder=CLIPTextModel(text_config(len(tokenizer))), tokenizer=tokenizer,
        unet=make_unet(32), scheduler=scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(os.path.join(out_dir, "tiny-sd"))
    pipe.scheduler = scheduler("v_prediction")
    pipe.save_pretrained(os.path.join(out_dir, "tiny-sd-vpred"))


def build_sdxl(out_dir):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    tokenizer = make_tokenizer()
    te1 = CLIPTextModel(text_config(len(tokenizer), hidden=32))
    te2 = CLIPTextModelWithProjection(text_config(len(tokenizer), hidden=32, projection_dim=32))
    unet = make_unet(
        64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=make_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
        tokenizer_2=make_tokenizer(), unet=unet, scheduler=scheduler(),
    )
    pipe.save_pretrained(os.path.join(out_dir, "tiny-sdxl"))


def build_sd3(out_dir):
    """SD3-style: two CLIP encoders with projection (pooled 32 + 32), T5 (d_model 64 = the CLIP states joined),
    an SD3 transformer on 4 latent channels, a VAE with shift and scaling factors, FlowMatch scheduler shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(3)
    tokenizer = make_tokenizer()
    t5_tokenizer = make_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=8, d_ff=37, num_layers=1,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                          joint_attention_dim=64, pooled_projection_dim=64),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=make_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(text_config(len(tokenizer))), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config(len(tokenizer))), tokenizer_2=make_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(os.path.join(out_dir, "tiny-sd3"))
    pipe.text_encoder_3 = pipe.tokenizer_3 = None
    pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(os.path.join(out_dir, "tiny-sd3-no-t5"))


def build_flux(out_dir):
    """FLUX.1-dev in miniature: CLIP (pooled) + T5 (sequence) text encoders, a guidance-embedding
    FluxTransformer2DModel on 2x2-packed 16-channel latents, FLUX's VAE latent shift/scale and its
    dynamically shifted FlowMatchEulerDiscreteScheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(4)
    tokenizer, t5_tokenizer = make_tokenizer(), make_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
        sample_size=32, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(text_config(len(tokenizer))), tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.save_pretrained(os.path.join(out_dir, "tiny-flux"))


def build_reward(out_dir):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(2)
    tokenizer = make_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=32,
    )
    config = CLIPConfig(text_config=text_config(len(tokenizer)).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=32)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = os.path.join(out_dir, "tiny-reward")
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def jpeg_bytes(rng, size):
    """A random smooth-ish RGB image as JPEG bytes."""
    w, h = size
    low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pickapic_rows(num_pairs, seed=0):
    """Rows with the Pick-a-Pic v2 column schema. Row 2 is a tie (label_0 = 0.5)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_pairs):
        size_0, size_1 = SIZES[i % len(SIZES)]
        label_0 = 0.5 if i == 2 else float(i % 2)
        rows.append({
            "are_different": True,
            "best_image_uid": f"uid-{i}-{0 if label_0 == 1 else 1}",
            "caption": CAPTIONS[i % len(CAPTIONS)],
            "created_at": "2023-05-01 00:00:00",
            "has_label": True,
            "image_0_uid": f"uid-{i}-0",
            "image_0_url": f"https://example.invalid/{i}-0.jpg",
            "image_1_uid": f"uid-{i}-1",
            "image_1_url": f"https://example.invalid/{i}-1.jpg",
            "jpg_0": jpeg_bytes(rng, size_0),
            "jpg_1": jpeg_bytes(rng, size_1),
            "label_0": label_0,
            "label_1": 1.0 - label_0,
            "model_0": "tiny-a",
            "model_1": "tiny-b",
            "ranking_id": i,
            "user_id": 1000 + i % 3,
            "num_example_per_prompt": 1,
            "__index_level_0__": i,
        })
    return rows


def build_dataset(out_dir, num_pairs=16):
    from datasets import Dataset

    Dataset.from_list(pickapic_rows(num_pairs)).save_to_disk(os.path.join(out_dir, "tiny-pickapic"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num_pairs", type=int, default=16)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    build_sd(args.out_dir)
    build_sdxl(args.out_dir)
    build_sd3(args.out_dir)
    build_flux(args.out_dir)
    build_reward(args.out_dir)
    build_dataset(args.out_dir, args.num_pairs)
    with open(os.path.join(args.out_dir, "README.json"), "w") as f:
        json.dump({"made_by": "examples/make_tiny_assets.py", "random_weights": True}, f)
    print(f"tiny assets written to {args.out_dir}")


if __name__ == "__main__":
    main()
