#!/usr/bin/env bash
# Continue fine-tuning an existing LoRA adapter on new data: finetune.py --lora_path, which loads
# the adapter's own r, alpha and target modules (ours, plain peft or legacy Chinese-Vicuna) and
# starts a fresh schedule. To resume an interrupted run instead (optimizer, scheduler and data
# position restored), run the original script with --resume_from_checkpoint OUTPUT/checkpoint-N.
#
# Hardware and time: as scripts/finetune.sh (about 15 minutes on a 2-core CPU VM with the embedded
# model and the instruction sample; a few minutes on one GPU). MODEL_PATH must be the base model
# the adapter was trained on.
#
# Required:  LORA_PATH=lora-Vicuna scripts/finetune_continue.sh
# Override from the environment:  TOT_CUDA=0,1 PORT=12345 DATA_PATH=... OUTPUT_PATH=... MODEL_PATH=...
# and any finetune.py flag by appending it (later flags win).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

if [[ -z "${LORA_PATH:-}" ]]; then
  echo "$0: error: LORA_PATH is not set; pass the adapter folder to continue, e.g." \
       "LORA_PATH=lora-Vicuna $0 (train one with scripts/finetune.sh)" >&2
  exit 2
fi
DATA_PATH="${DATA_PATH:-sample/instruct/data_sample.jsonl}"
OUTPUT_PATH="${OUTPUT_PATH:-lora-Vicuna-continue}"

launch finetune.py \
  --lora_path "$LORA_PATH" \
  --data_path "$DATA_PATH" \
  --output_path "$OUTPUT_PATH" \
  "${INSTRUCT_SCHEDULE[@]}" \
  "$@"
