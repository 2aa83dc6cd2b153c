#!/usr/bin/env bash
# Chat with a fine-tuned model on the CPU, in pure C++ (tools/vicuna.cpp), in the template the
# adapter was trained with.
#
#   LORA_PATH=lora-Vicuna bash scripts/cpu_chat.sh
#
# With LORA_PATH and nothing else: build the engine once (make cpp), export the adapter alone as a
# GGUF LoRA adapter (tools/convert_gguf.py --lora_path, checked against transformers + peft when
# small) and run it on the shipped Q4_1 SmolLM2 file: `vicuna chat -m BASE.gguf --lora ADAPTER.gguf`.
# The adapter GGUF carries its prompt type, so the chat opens in the trained template. No merge, and
# the fine-tune survives intact: a merged q4_1 export of the embedded base (itself dequantized from
# Q4_1) rounds most of a LoRA change back onto the base (docs/notes.md).
# MERGE=1: merge the adapter into its base (tools/merge_lora.py), export the merged folder as one
# GGUF of OUTTYPE (tools/convert_gguf.py; its chat template is the trained one) and chat with it.
#
# Everything goes under OUT_DIR/<adapter name>-<key>/, the key a hash of the adapter's files and the
# base's name, so another adapter (or the same folder retrained) never reuses a stale export. Steps
# whose output exists are skipped (the tools write their outputs atomically), so a second run starts
# chatting in seconds. Uses the project's .venv when there is one (make install) and says in one line
# what to install when something is missing.
#
# Hardware: CPU only. Expected time with the embedded SmolLM2-135M-Instruct on 2 cores: 1-2 minutes
# for the first engine build, seconds for the adapter export; MERGE=1 about 1 minute for merge +
# export + check (a 7B base: about 10 minutes and 7 GB at q8_0).
#
# Override from the environment:
#   BASE_MODEL   base model: HF id, local folder, .gguf or the embedded name (default: SmolLM2-135M-Instruct,
#                whose shipped Q4_1 GGUF is the base file; another base is exported once to OUTTYPE)
#   LORA_PATH    adapter folder; empty: chat with the base model as is
#   MERGE        1: merge and export one GGUF instead of base + adapter GGUF (default: empty)
#   OUT_DIR      where exports go (default: outputs/cpu-chat)
#   OUTTYPE      merged / base export: f32, f16, q8_0, q6_k, q5_k_m, q5_1, q5_0, q4_k_m, q4_1 or q4_0
#                (default: q8_0);
#                the adapter GGUF: f32, f16 or q8_0 (default: f16)
#   PROMPT_TYPE  instruct, chat or chat_template (default: the adapter's, from its training_config.json)
#   THREADS      engine threads (default: all cores)
#   PYTHON, MAKE, VICUNA   interpreter (default: .venv/bin/python if present), make, engine binary
# e.g.  LORA_PATH=lora-Vicuna bash scripts/cpu_chat.sh --temp 0.7
#       LORA_PATH=lora-Vicuna MERGE=1 OUTTYPE=f16 bash scripts/cpu_chat.sh
# Extra arguments go to `vicuna chat`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

EMBEDDED=SmolLM2-135M-Instruct
BASE_MODEL="${BASE_MODEL:-$EMBEDDED}"
LORA_PATH="${LORA_PATH:-}"
MERGE="${MERGE:-}"
OUT_DIR="${OUT_DIR:-outputs/cpu-chat}"
OUTTYPE="${OUTTYPE:-}"
PROMPT_TYPE="${PROMPT_TYPE:-}"
THREADS="${THREADS:-$(nproc 2>/dev/null || echo 4)}"
MAKE="${MAKE:-make}"
VICUNA="${VICUNA:-tools/vicuna.cpp/build/vicuna}"

# run CMD...: print the exact command on stderr, then run it.
run() {
  echo "+ $(printf '%q ' "$@")" >&2
  "$@"
}

die() {
  echo "error: $*" >&2
  exit 1
}

if [[ -n "$LORA_PATH" && ! -d "$LORA_PATH" ]]; then
  die "LORA_PATH=$LORA_PATH: no such adapter folder"
fi
require_python torch transformers safetensors peft gguf

# The engine first: the adapter export checks itself with it (--verify) when it is built.
if [[ ! -x "$VICUNA" ]]; then
  if ! command -v cmake > /dev/null 2>&1; then
    die "building vicuna.cpp needs cmake and a C++17 compiler: apt-get install cmake g++ (or brew install cmake)"
  fi
  run "$MAKE" cpp
fi

# export_model FOLDER OUTFILE TYPE [PROMPT_TYPE]: tools/convert_gguf.py, unless OUTFILE exists.
export_model() {
  local folder="$1" outfile="$2" type="$3" prompt_type="${4:-}"
  if [[ -f "$outfile" ]]; then
    return
  fi
  local convert=(tools/convert_gguf.py --model_path "$folder" --outfile "$outfile" --outtype "$type")
  if [[ -n "$prompt_type" ]]; then
    convert+=(--prompt_type "$prompt_type")
  fi
  run "$PYTHON" "${convert[@]}"
}

# The base's GGUF: the shipped Q4_1 file for the embedded model, a .gguf as given, else an export.
base_gguf() {
  if [[ "$BASE_MODEL" == "$EMBEDDED" ]]; then
    "$PYTHON" -c 'from models import embedded_gguf_path; print(embedded_gguf_path())'
  elif [[ "$BASE_MODEL" == *.gguf ]]; then
    echo "$BASE_MODEL"
  else
    # Exported in the adapter's template (its own prompt type wins in vicuna; chat_template means
    # the base file's template, which is then the base tokenizer's own).
    local name out prompt_type="${PROMPT_TYPE:-}"
    if [[ -z "$prompt_type" ]]; then
      prompt_type="$("$PYTHON" -c 'import sys; from models import resolve_prompt_type
print(resolve_prompt_type(None, sys.argv[1] or None, "instruct"))' "$LORA_PATH")"
    fi
    name="$(basename "${BASE_MODEL%/}")"
    out="$OUT_DIR/base-$name.$prompt_type.${OUTTYPE:-q8_0}.gguf"
    export_model "$BASE_MODEL" "$out" "${OUTTYPE:-q8_0}" "$prompt_type" >&2
    echo "$out"
  fi
}

chat=("$VICUNA" chat -t "$THREADS")
if [[ -z "$LORA_PATH" ]]; then
  base="$(base_gguf)"
  chat+=(-m "$base")
else
  # Keyed on the adapter's content and the base: a new adapter never meets an old export.
  shopt -s nullglob
  adapter_files=("$LORA_PATH"/*.json "$LORA_PATH"/*.safetensors "$LORA_PATH"/*.bin)
  shopt -u nullglob
  key="$( (echo "$BASE_MODEL"; cat "${adapter_files[@]}" < /dev/null) | sha256sum | cut -c1-12)"
  work="$OUT_DIR/$(basename "${LORA_PATH%/}")-$key"
  mkdir -p "$work"
  if [[ -n "$MERGE" && "$MERGE" != 0 ]]; then
    if [[ ! -f "$work/merged/config.json" ]]; then
      run "$PYTHON" tools/merge_lora.py --model_path "$BASE_MODEL" --lora_path "$LORA_PATH" \
        --output_path "$work/merged"
    fi
    gguf="$work/merged.${OUTTYPE:-q8_0}.gguf"
    export_model "$work/merged" "$gguf" "${OUTTYPE:-q8_0}" "$PROMPT_TYPE"
    chat+=(-m "$gguf")
  else
    case "${OUTTYPE:-f16}" in
      f32|f16|q8_0) adapter_type="${OUTTYPE:-f16}" ;;
      *) adapter_type=f16 ;;  # an adapter GGUF is f32, f16 or q8_0; the base keeps its own type
    esac
    base="$(base_gguf)"
    adapter="$work/adapter.$adapter_type.gguf"
    if [[ ! -f "$adapter" ]]; then
      convert=(tools/convert_gguf.py --lora_path "$LORA_PATH" --model_path "$BASE_MODEL" --base_gguf "$base"
               --outfile "$adapter" --outtype "$adapter_type")
      if [[ -n "$PROMPT_TYPE" ]]; then
        convert+=(--prompt_type "$PROMPT_TYPE")
      fi
      run "$PYTHON" "${convert[@]}"
    fi
    chat+=(-m "$base" --lora "$adapter")
  fi
fi

if [[ -n "$PROMPT_TYPE" ]]; then
  chat+=(--prompt-type "$PROMPT_TYPE")
fi
echo "+ $(printf '%q ' "${chat[@]}" "$@")" >&2
exec "${chat[@]}" "$@"
