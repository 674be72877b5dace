#!/usr/bin/env bash
# SmPO LoRA on SDXL for one 24 GB GPU: rank 8, fp16, 8-bit AdamW, gradient checkpointing,
# the fp16-fix VAE, 1 pair per step x 64 accumulation. The reference is the same UNet with its
# adapters disabled, so only one SDXL UNet is in memory. Memory was not measured on a GPU here:
# see docs/performance.md ("What fits on one GPU").
set -euo pipefail
accelerate launch --num_processes 1 --mixed_precision fp16 train_smpo_diffusion_sdxl.py \
  --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
  --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \
  --dataset_name pickapic_v2-scored \
  --output_dir smpo-sdxl-lora \
  --rank 8 --use_8bit_adam --gradient_checkpointing --mixed_precision fp16 \
  --loss_type smpo --noise_source renoise --num_inversion_steps 10 \
  --beta_dpo 5000 --proportion_empty_prompts 0.2 \
  --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 64 \
  --max_train_steps 1000 --learning_rate 1e-5 --lr_scheduler constant_with_warmup --lr_warmup_steps 100 \
  --checkpointing_steps 100 --run_validation --validation_steps 200 --seed 0 "$@"
