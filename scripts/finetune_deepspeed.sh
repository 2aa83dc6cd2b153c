#!/usr/bin/env bash
# finetune.py with DeepSpeed ZeRO-2 (config-sample/zero2.json) through the HF Trainer integration:
# optimizer state and gradients are sharded across GPUs, so larger base models or batches fit.
# torchrun launches it (not the `deepspeed` launcher); the Trainer initialises DeepSpeed itself.
#
# Hardware: two or more CUDA GPUs (default TOT_CUDA=0,1) and `pip install deepspeed`, which is not
# in requirements.txt. On the instruction sample with the embedded SmolLM2-135M-Instruct it takes
# about a minute on two GPUs; with a 7B base model (MODEL_PATH=meta-llama/Llama-2-7b-hf) ZeRO-2
# fits it on two 24 GB GPUs. Not with --quant 8bit/4bit: ZeRO does not shard bitsandbytes weights.
#
# Override from the environment:  TOT_CUDA=0,1,2,3 PORT=12345 DATA_PATH=... OUTPUT_PATH=...
# MODEL_PATH=... DS_CONFIG=..., and any finetune.py flag by appending it (later flags win).
# --batch_size / --micro_batch_size must divide into a whole number of steps per GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
TOT_CUDA="${TOT_CUDA-0,1}"
source scripts/common.sh

DATA_PATH="${DATA_PATH:-sample/instruct/data_sample.jsonl}"
OUTPUT_PATH="${OUTPUT_PATH:-lora-Vicuna-deepspeed}"
DS_CONFIG="${DS_CONFIG:-config-sample/zero2.json}"

launch finetune.py \
  --deepspeed "$DS_CONFIG" \
  --data_path "$DATA_PATH" \
  --output_path "$OUTPUT_PATH" \
  "${INSTRUCT_SCHEDULE[@]}" \
  "${INSTRUCT_LORA[@]}" \
  "$@"
