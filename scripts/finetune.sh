#!/usr/bin/env bash
# Instruction-tune a LoRA adapter (q_proj,v_proj; r=8) with finetune.py on the shipped instruction
# sample (sample/instruct/data_sample.jsonl, 314 records: 16 held out, 298 trained for 3 epochs,
# about 30 optimizer steps of 32 examples).
#
# Hardware: none required; it trains the embedded SmolLM2-135M-Instruct (fp32 on CPU, bf16/fp16 on
# GPU). Expected time: on a 2-core CPU VM about 33 seconds per optimizer step, so about 15 minutes
# in all (measured: 2 steps in 65 s, packed rows); add --max_steps 3 for a smoke run. One GPU: a few
# minutes (estimated, not measured). A 7B base model (MODEL_PATH=meta-llama/Llama-2-7b-hf) needs one
# 24 GB GPU, or TOT_CUDA=0,1 for two GPUs with DDP.
#
# Override from the environment:  TOT_CUDA=0,1 PORT=12345 DATA_PATH=... OUTPUT_PATH=... MODEL_PATH=...
# and any finetune.py flag by appending it (later flags win):  scripts/finetune.sh --num_epochs 1
# For a full data set raise --batch_size 128 --eval_steps 200 --save_steps 200 --test_size 200.
# The schedule and LoRA shape are INSTRUCT_SCHEDULE / INSTRUCT_LORA in scripts/common.sh (shared with
# finetune_4bit.sh, finetune_deepspeed.sh and finetune_continue.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

DATA_PATH="${DATA_PATH:-sample/instruct/data_sample.jsonl}"
OUTPUT_PATH="${OUTPUT_PATH:-lora-Vicuna}"

launch finetune.py \
  --data_path "$DATA_PATH" \
  --output_path "$OUTPUT_PATH" \
  "${INSTRUCT_SCHEDULE[@]}" \
  "${INSTRUCT_LORA[@]}" \
  "$@"
