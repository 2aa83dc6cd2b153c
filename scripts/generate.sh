#!/usr/bin/env bash
# Serve the question-answer page (generate.py): streaming answers, beam search, Stop button,
# API endpoint /generate. Opens on http://127.0.0.1:$PAGE_PORT (this machine only).
#
# Hardware: none required; defaults run the embedded SmolLM2-135M-Instruct on the CPU. With a GPU,
# a 7B base in fp16 needs about 14 GB (8-bit: about 8 GB, pass --quant 8bit); several ids in
# TOT_CUDA shard the model over those GPUs (device_map="auto"). Start-up: seconds (CPU, embedded).
#
# Override from the environment (PAGE_PORT: the page's port, default 7860; PORT is the training
# scripts' torchrun master port and does not move the page):
#   BASE_MODEL=meta-llama/Llama-2-7b-hf LORA_PATH=lora-Vicuna TOT_CUDA=0 PAGE_PORT=7860 bash scripts/generate.sh
# and any generate.py flag by appending it:  bash scripts/generate.sh --show_beam --host 0.0.0.0
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PORT:-}" && -z "${PAGE_PORT:-}" ]]; then  # PORT served the page before it had its own name
  echo "note: PORT is the training scripts' torchrun master port; set PAGE_PORT for the page's port" >&2
fi
source scripts/common.sh
serve generate.py "${PAGE_PORT:-7860}" "$@"
