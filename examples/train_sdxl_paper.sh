#!/usr/bin/env bash
# SmPO on SDXL at the paper's scale (method notes, section 5): full fine-tuning, fp16, Adafactor,
# gradient checkpointing, the fp16-fix VAE, 10 inversion steps, beta 5000,
# 1 pair per GPU x 128 accumulation x 8 GPUs = 1024 pairs per update, 200 updates,
# lr 1e-8 scaled by the effective batch (--scale_lr), 100 warm-up steps, 20% empty prompts, and the
# authors' inversion and data exactly as their released code ran (pinned diffusers 0.20):
# --inversion_schedule grid_above with 10 inversion steps, human-label ties left out (--drop_human_ties).
set -euo pipefail
accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 train_smpo_diffusion_sdxl.py \
  --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
  --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \
  --dataset_name pickapic_v2-scored \
  --output_dir smpo-sdxl \
  --full_finetune --optimizer adafactor --gradient_checkpointing \
  --loss_type smpo --noise_source renoise --num_inversion_steps 10 --num_renoise_steps 1 \
  --inversion_schedule grid_above --inversion_model policy --drop_human_ties \
  --beta_dpo 5000 --proportion_empty_prompts 0.2 \
  --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 128 \
  --max_train_steps 200 --learning_rate 1e-8 --scale_lr \
  --lr_scheduler constant_with_warmup --lr_warmup_steps 100 \
  --mixed_precision fp16 --checkpointing_steps 50 --seed 0 "$@"
