#!/bin/bash
# Few-step tiny SD and SDXL runs (smpo+renoise, dpo+forward, --seed 0) whose metrics.jsonl
# benchmarks/same_losses.py compares between two checkouts (docs/flow.md: "SD and SDXL unchanged").
#   bash benchmarks/same_losses_runs.sh CHECKOUT ASSETS OUTROOT
# ASSETS: examples/make_tiny_assets.py output with ASSETS/scored (score_pairs.py of ASSETS/tiny-pickapic).
set -e
CODE=$(cd "$1" && pwd); A=$2; O=$3
mkdir -p "$O"
cd "$CODE"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$CODE
for model in sd sdxl; do
  script=train_smpo_diffusion.py; [ $model = sdxl ] && script=train_smpo_diffusion_sdxl.py
  for combo in "smpo renoise" "dpo forward"; do
    set -- $combo
    python -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
      --dynamo_backend no --cpu $script --pretrained_model_name_or_path $A/tiny-$model --dataset_name $A/scored \
      --output_dir $O/$model-$1-$2 --resolution 32 --train_batch_size 2 --max_train_steps 3 --learning_rate 1e-3 \
      --seed 0 --checkpointing_steps 1000 --loss_type $1 --noise_source $2 --num_inversion_steps 3 \
      > $O/$model-$1-$2.log 2>&1
  done
done
