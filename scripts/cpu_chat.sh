#!/usr/bin/env bash
# Chat with a fine-tuned model on the CPU, in pure C++: merge the LoRA adapter into its base
# (tools/merge_lora.py), export a GGUF (tools/convert_gguf.py, checked against the HF model when
# small), build the engine once (make cpp) and start `vicuna chat` on the file.
#
# Hardware: CPU only, no GPU. Memory: the merge holds about one tensor at a time; the chat needs the
# GGUF's size (q8_0: about 1 byte per parameter). Expected time with the default embedded
# SmolLM2-135M-Instruct on 2 cores: about 1 minute for merge + export + check, 1-2 minutes for the
# first engine build; a 7B base takes about 10 minutes to merge and export (and 7 GB at q8_0).
# Steps whose output already exists are skipped, so a second run starts chatting in seconds.
#
# Override from the environment:
#   BASE_MODEL   base model: HF id, local folder or the embedded name (default: SmolLM2-135M-Instruct)
#   LORA_PATH    adapter folder; empty: export the base model as is
#   OUT_DIR      where the merged model and the GGUF go (default: outputs/cpu-chat)
#   OUTTYPE      f32, f16, q8_0, q4_0 or q4_1 (default: q8_0)
#   PROMPT_TYPE  instruct or chat (default: the adapter's, from its training_config.json)
#   THREADS      engine threads (default: all cores)
#   PYTHON, MAKE, VICUNA   interpreter, make, engine binary
# e.g.  LORA_PATH=lora-Vicuna OUTTYPE=q4_1 bash scripts/cpu_chat.sh --temp 0.7
# Extra arguments go to `vicuna chat`.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_MODEL="${BASE_MODEL:-SmolLM2-135M-Instruct}"
LORA_PATH="${LORA_PATH:-}"
OUT_DIR="${OUT_DIR:-outputs/cpu-chat}"
OUTTYPE="${OUTTYPE:-q8_0}"
PROMPT_TYPE="${PROMPT_TYPE:-}"
THREADS="${THREADS:-$(nproc 2>/dev/null || echo 4)}"
PYTHON="${PYTHON:-python}"
MAKE="${MAKE:-make}"
VICUNA="${VICUNA:-tools/vicuna.cpp/build/vicuna}"

# run CMD...: print the exact command on stderr, then run it.
run() {
  echo "+ $(printf '%q ' "$@")" >&2
  "$@"
}

model="$BASE_MODEL"
if [[ -n "$LORA_PATH" ]]; then
  model="$OUT_DIR/merged"
  if [[ ! -f "$model/config.json" ]]; then
    run "$PYTHON" tools/merge_lora.py \
      --model_path "$BASE_MODEL" \
      --lora_path "$LORA_PATH" \
      --output_path "$model"
  fi
fi

gguf="$OUT_DIR/model.$OUTTYPE.gguf"
if [[ ! -f "$gguf" ]]; then
  convert=(tools/convert_gguf.py
    --model_path "$model"
    --outfile "$gguf"
    --outtype "$OUTTYPE")
  if [[ -n "$PROMPT_TYPE" ]]; then
    convert+=(--prompt_type "$PROMPT_TYPE")
  fi
  run "$PYTHON" "${convert[@]}"
fi

if [[ ! -x "$VICUNA" ]]; then
  run "$MAKE" cpp
fi

chat=("$VICUNA" chat -m "$gguf" -t "$THREADS")
if [[ -n "$PROMPT_TYPE" ]]; then
  chat+=(--prompt-type "$PROMPT_TYPE")
fi
echo "+ $(printf '%q ' "${chat[@]}" "$@")" >&2
exec "${chat[@]}" "$@"
