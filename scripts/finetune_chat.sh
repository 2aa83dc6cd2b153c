#!/usr/bin/env bash
# Multi-turn chat tuning: finetune_chat.py (chatv1 prompt, LoRA on every linear layer, cutoff 2048)
# on the shipped chat sample (sample/chat/data_sample.jsonl, 120 conversations: 8 held out, 112
# trained for 3 epochs, about 21 optimizer steps of 16 conversations), supervising every assistant turn.
#
# Hardware: none required; it trains the embedded SmolLM2-135M-Instruct (fp32 on CPU, bf16/fp16 on
# GPU). Expected time: about 37 seconds per optimizer step on a 2-core CPU VM (measured, packed
# rows), about 13 minutes in all; add --max_steps 3 for a smoke run. One GPU: a
# few minutes (estimated). A 7B base model at cutoff 2048 needs one 40 GB GPU, or add --quant 4bit
# (QLoRA) for a 24 GB one.
#
# Override from the environment:  TOT_CUDA=0,1 PORT=12345 DATA_PATH=... OUTPUT_PATH=... MODEL_PATH=...
# and any finetune.py flag by appending it (later flags win):  scripts/finetune_chat.sh --train_on last
# The recipe is CHAT_RECIPE in scripts/common.sh (also the chat preset of the training page, train_web.py).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

DATA_PATH="${DATA_PATH:-sample/chat/data_sample.jsonl}"
OUTPUT_PATH="${OUTPUT_PATH:-lora-Vicuna-chat}"

launch finetune_chat.py \
  --data_path "$DATA_PATH" \
  --output_path "$OUTPUT_PATH" \
  "${CHAT_RECIPE[@]}" \
  "$@"
