#!/usr/bin/env bash
# Serve the training page (train_web.py): model, preset (the recipes in scripts/common.sh), data
# check with rendered examples, the exact finetune.py command, Start / Stop / Resume, live loss
# curves, samples and log, and the commands to chat with, merge and export the adapter when it ends.
# Opens on http://127.0.0.1:$PAGE_PORT (this machine only).
#
# Hardware: none for the page itself; the runs it starts need what scripts/finetune*.sh need (the
# embedded SmolLM2-135M-Instruct trains on a CPU). Start-up: seconds.
#
# The page reads data and models, and writes outputs, only inside the folders it is started with:
# --work_dir (default train_web_runs/: uploads, logs, outputs) and each --allow_dir (default: the
# repository root, where this script runs). Override from the environment:
#   MODEL_PATH=meta-llama/Llama-2-7b-hf LORA_PATH=... TOT_CUDA=0 PAGE_PORT=7860 bash scripts/train_web.sh
# and any train_web.py flag by appending it:  bash scripts/train_web.sh --allow_dir ~/data --work_dir ~/runs
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PORT:-}" && -z "${PAGE_PORT:-}" ]]; then  # PORT served the page before it had its own name
  echo "note: PORT is the training scripts' torchrun master port; set PAGE_PORT for the page's port" >&2
fi
source scripts/common.sh
serve train_web.py "${PAGE_PORT:-7860}" "$@"
