#!/usr/bin/env bash
# SmPO (renoise), smoothing only, prior and Diffusion-DPO: step time and peak memory of the real architectures
# (random weights, nothing downloaded) on this machine's GPU, in one command, within about 11 minutes on one
# H200-class GPU:
#
#   bash benchmarks/gpu_check.sh                   # writes OUT_DIR (default: $OUT, else gpu-check/)
#   bash benchmarks/gpu_check.sh --dry_run         # the same runs on the tiny configs on the CPU (a few minutes)
#   bash benchmarks/gpu_check.sh --prepare_wheels  # with internet: download the packages into wheels/ (git-ignored)
#
# Packages a bare CUDA image lacks (diffusers, datasets, bitsandbytes, ...) are installed from wheels/ with
# `pip install --no-index`: prepare that folder once where the internet is reachable, on the same Python version
# and platform, and copy it with the repository. torch is never installed here (keep the image's CUDA build).
# Each run is benchmarks/step_cost.py --random_init MODEL (see docs/performance.md); its table goes to
# OUT_DIR/NAME.txt and its JSON to OUT_DIR/NAME.json; OUT_DIR/counts.jsonl holds every family's parameter counts.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-${OUT:-gpu-check}}
RUN_LIMIT=${RUN_LIMIT:-100}  # seconds per run: 6 runs + the counts, 11 minutes at most (RUN_LIMIT=75: 9)
requirements() { grep -vE '^(#|torch|pytest|matplotlib)' requirements.txt; }

if [ "${1:-}" = "--prepare_wheels" ]; then
  requirements > /tmp/smpo-gpu-requirements.txt
  "$PY" -m pip download --dest wheels --only-binary=:all: -r /tmp/smpo-gpu-requirements.txt || exit 1
  rm -f wheels/torch-* wheels/nvidia_* wheels/triton-*  # the image's own CUDA torch stays
  echo "wheels/ is ready ($(ls wheels | wc -l) files); copy it with the repository"
  exit 0
fi

mode=gpu
ARGS=(--mixed_precision bf16 --use_8bit_adam --gradient_checkpointing --cache_text_embeddings
      --warmup_steps 2 --steps 5)
if [ "${1:-}" = "--dry_run" ]; then
  mode=dry_run
  ARGS+=(--device cpu --size tiny --resolution 64 --warmup_steps 1 --steps 2 --threads 1)
elif ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device is visible to torch: run on a GPU machine, or pass --dry_run to rehearse on the CPU"; exit 1
fi

if [ -d wheels ]; then
  requirements > /tmp/smpo-gpu-requirements.txt
  "$PY" -m pip install --quiet --no-index --find-links wheels -r /tmp/smpo-gpu-requirements.txt || exit 1
elif ! "$PY" -c "import diffusers, transformers, accelerate, peft, datasets, bitsandbytes" 2>/dev/null; then
  echo "packages are missing and there is no wheels/ folder: run 'bash benchmarks/gpu_check.sh --prepare_wheels'" \
       "where the internet is reachable and copy wheels/ here"; exit 1
fi

mkdir -p "$OUT_DIR"
{ date -u +"%Y-%m-%d %H:%M UTC"; echo "mode: $mode"; git rev-parse --short HEAD 2>/dev/null
  "$PY" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} > "$OUT_DIR/environment.txt"

status=0
run() {  # NAME step_cost.py-flags...
  local name=$1; shift
  echo "== $name"
  timeout "$RUN_LIMIT" "$PY" benchmarks/step_cost.py "$@" "${ARGS[@]}" --output_json "$OUT_DIR/$name.json" \
    > "$OUT_DIR/$name.txt" 2> "$OUT_DIR/$name.log"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "$name failed (exit $rc$([ $rc -eq 124 ] && echo ", over ${RUN_LIMIT}s")): see $OUT_DIR/$name.log" \
      | tee -a "$OUT_DIR/$name.txt"
    status=1
  fi
  sed -n '/^[a-z0-9-]* ([a-z]*) on /,/^(img-fwd/p' "$OUT_DIR/$name.txt"
}

SECONDS=0
run sd15-lora --random_init sd15
run sd15-full --random_init sd15 --full_finetune
run sdxl-lora --random_init sdxl
run sdxl-full --random_init sdxl --full_finetune
run sd35-medium-lora --random_init sd35-medium
run flux-dev-lora --random_init flux-dev
: > "$OUT_DIR/counts.jsonl"
for model in sd15 sdxl sd35-medium sd35-large flux-dev; do
  "$PY" benchmarks/step_cost.py --random_init "$model" --count_only >> "$OUT_DIR/counts.jsonl" 2>> "$OUT_DIR/counts.log"
done
echo "done in ${SECONDS}s; tables and JSON in $OUT_DIR/"
exit $status
