#!/usr/bin/env bash
# Serve the OpenAI-compatible API (serve.py): /v1/models, /v1/chat/completions, /v1/completions on
# http://127.0.0.1:$PORT/v1 (this machine only unless --host and --api_key say otherwise).
#
# Hardware: none required; defaults serve the embedded SmolLM2-135M-Instruct on the CPU. With a GPU,
# a 7B base in fp16 needs about 14 GB; several ids in TOT_CUDA shard it (device_map="auto"), or with
# --engine vllm become vLLM's --tensor-parallel-size. Start-up: seconds (CPU, embedded).
#
# Override from the environment (PORT: the API's port, default 8000):
#   MODEL_PATH=meta-llama/Llama-2-7b-hf LORA_PATH=lora-Vicuna TOT_CUDA=0 PORT=8000 bash scripts/serve.sh
# and any serve.py flag by appending it:
#   bash scripts/serve.sh --lora chat=lora-Vicuna-chat --api_key sk-local
#   bash scripts/serve.sh --engine vllm --lora vicuna=lora-Vicuna      # pip install vllm; GPUs
set -euo pipefail
cd "$(dirname "$0")/.."

API_PORT="${PORT:-8000}"  # common.sh gives PORT the torchrun default; the API's port is read first
source scripts/common.sh
serve serve.py "$API_PORT" "$@"
