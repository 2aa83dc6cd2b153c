#!/usr/bin/env bash
# GPU check of serve.py --engine vllm (docs/performance.md): starts `vllm serve` with a LoRA adapter on
# the embedded SmolLM2-135M-Instruct and compares its greedy answers (base and adapter) with
# serve.py --engine hf through the OpenAI API.
# Hardware: one CUDA GPU (any size); needs `pip install vllm` and the model wheel; no network.
# Expected time: 2-4 minutes (vLLM start-up dominates).
# Usage: bash tools/gpu_check_vllm.sh [--tokens 32] [--json out.json]   CPU: bash tools/gpu_check_vllm.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" tools/gpu_check_vllm.py "$@"
