#!/usr/bin/env bash
# QLoRA: finetune_4bit.py (the finetune.py trainer with the base model in 4-bit NF4, paged 8-bit
# AdamW on GPU) on the shipped instruction sample, with the recipe of scripts/finetune.sh.
#
# Hardware: meant for one CUDA GPU (bitsandbytes); a 7B base model fits in about 6 GB, a 13B one in
# about 10 GB. Expected time with the embedded SmolLM2-135M-Instruct: one GPU, a few minutes
# (estimated, not measured). Without a GPU, bitsandbytes' CPU backend runs it too: about 45 seconds
# per optimizer step of 32 examples on a 2-core CPU VM (measured, packed rows), about 20 minutes in all.
#
# Override from the environment:  TOT_CUDA=0 PORT=12345 DATA_PATH=... OUTPUT_PATH=... MODEL_PATH=...
# and any finetune.py flag by appending it (later flags win):  scripts/finetune_4bit.sh --lora_r 16
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

DATA_PATH="${DATA_PATH:-sample/instruct/data_sample.jsonl}"
OUTPUT_PATH="${OUTPUT_PATH:-lora-Vicuna-4bit}"

launch finetune_4bit.py \
  --data_path "$DATA_PATH" \
  --output_path "$OUTPUT_PATH" \
  "${INSTRUCT_SCHEDULE[@]}" \
  "${INSTRUCT_LORA[@]}" \
  "${QLORA[@]}" \
  "$@"
