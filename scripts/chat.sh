#!/usr/bin/env bash
# Serve the multi-turn chat page (chat.py): streaming replies, Stop, Regenerate, Clear, Save,
# API endpoint /chat. Opens on http://127.0.0.1:$PORT (this machine only).
#
# Hardware: none required; defaults run the embedded SmolLM2-135M-Instruct on the CPU. With a GPU,
# a 7B base in fp16 needs about 14 GB (8-bit: about 8 GB, pass --quant 8bit); several ids in
# TOT_CUDA shard the model over those GPUs (device_map="auto"). Start-up: seconds (CPU, embedded).
#
# Override from the environment:
#   BASE_MODEL=meta-llama/Llama-2-7b-hf LORA_PATH=lora-Vicuna-chat TOT_CUDA=0 PORT=7860 bash scripts/chat.sh
# and any chat.py flag by appending it:  bash scripts/chat.sh --save_dir ~/chat_logs
set -euo pipefail
cd "$(dirname "$0")/.."

SERVE_PORT="${PORT:-7860}"  # read before common.sh, whose PORT is torchrun's master port
source scripts/common.sh
serve chat.py "$SERVE_PORT" "$@"
