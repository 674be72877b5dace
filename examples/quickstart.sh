#!/usr/bin/env bash
# The embedded default: a short SmPO run on tiny random-weight models, offline, on the CPU.
#   bash examples/quickstart.sh [WORK_DIR]      (default: ./smpo-quickstart)
# 1. build the tiny assets, 2. score the pairs with the tiny reward model (each skipped when
# WORK_DIR already holds its output: the tests reuse their session's assets), 3. train a LoRA with
# SmPO (smoothed weights + ReNoise inversion) through accelerate, 4. load it and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-smpo-quickstart}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

[ -d "$WORK/assets/tiny-sd" ] || python examples/make_tiny_assets.py "$WORK/assets"
[ -d "$WORK/pairs-scored" ] || python score_pairs.py --dataset_name "$WORK/assets/tiny-pickapic" \
  --reward_model_name_or_path "$WORK/assets/tiny-reward" --output_dir "$WORK/pairs-scored" --device cpu
accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_smpo_diffusion.py \
  --pretrained_model_name_or_path "$WORK/assets/tiny-sd" --dataset_name "$WORK/pairs-scored" \
  --output_dir "$WORK/smpo-lora" --resolution 32 --train_batch_size 4 --max_train_steps 8 \
  --learning_rate 1e-4 --rank 8 --use_8bit_adam --checkpointing_steps 4 --seed 0
python examples/inference_lora.py --pretrained_model_name_or_path "$WORK/assets/tiny-sd" \
  --lora_weights "$WORK/smpo-lora" --prompt "a red circle on grey" --resolution 32 \
  --num_inference_steps 10 --device cpu --output "$WORK/sample.png"
echo "quick start done: LoRA in $WORK/smpo-lora, losses in $WORK/smpo-lora/metrics.jsonl, image $WORK/sample.png"
