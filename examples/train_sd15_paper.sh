#!/usr/bin/env bash
# SmPO on SD 1.5 at the paper's scale (method notes, section 5): full fine-tuning, fp16,
# 1 pair per GPU x 128 accumulation x 8 GPUs = 1024 pairs per update, 200 updates,
# lr 1e-8 scaled by the effective batch (--scale_lr: ~1e-5), constant lr with 100 warm-up steps,
# beta 2000, 20% empty prompts, checkpoints every 50 updates, and the authors' inversion and data
# exactly as their released code ran (pinned diffusers 0.20): --inversion_schedule grid_above with
# 5 inversion steps, and pairs whose human label is a tie left out (--drop_human_ties).
# docs/inversion.md says what each schedule does and what it measured.
# The authors started from an SFT-tuned UNet: pass yours with --unet_init (optional).
# First score the pairs (PickScore):
#   python score_pairs.py --dataset_name PICKAPIC_V2 --output_dir pickapic_v2-scored
set -euo pipefail
accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 train_smpo_diffusion.py \
  --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
  --dataset_name pickapic_v2-scored \
  --output_dir smpo-sd15 \
  --full_finetune ${UNET_INIT:+--unet_init "$UNET_INIT"} \
  --loss_type smpo --noise_source renoise --num_inversion_steps 5 --num_renoise_steps 1 \
  --inversion_schedule grid_above --inversion_model policy --drop_human_ties \
  --beta_dpo 2000 --proportion_empty_prompts 0.2 \
  --resolution 512 --train_batch_size 1 --gradient_accumulation_steps 128 \
  --max_train_steps 200 --learning_rate 1e-8 --scale_lr \
  --lr_scheduler constant_with_warmup --lr_warmup_steps 100 \
  --mixed_precision fp16 --checkpointing_steps 50 --seed 0 "$@"
