# Shared launcher for scripts/*.sh; source it, do not run it.
#
# Environment (each has a default; set it to override):
#   TOT_CUDA    GPU ids, comma-separated ("0", "0,1"). Unset or empty: whatever device torch finds
#               (CPU on a machine without a GPU). Two or more ids: one torchrun process per GPU (DDP).
#   PORT        torchrun master port (default 12345); change it to run two jobs on one machine.
#   PAGE_PORT   the port of a page (chat.sh, generate.sh; default 7860), passed to `serve`.
#   MODEL_PATH  base model (HF id, local folder or .gguf). Empty: the entry script's default,
#               the embedded SmolLM2-135M-Instruct, so nothing is downloaded.
#   PYTHON      interpreter (default: the project's .venv/bin/python when there is one (make install),
#               else python).  TORCHRUN  launcher (default: .venv/bin/torchrun when there is one, else torchrun).
#
# Usage, from a script that has already done  cd "$(dirname "$0")/.."  (paths are relative to
# the repository root):
#   source scripts/common.sh
#   launch finetune.py --flag value ... "$@"

TOT_CUDA="${TOT_CUDA:-}"
PORT="${PORT:-12345}"
MODEL_PATH="${MODEL_PATH:-}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$PWD/.venv/bin/python" ]]; then PYTHON="$PWD/.venv/bin/python"; else PYTHON=python; fi
fi
if [[ -z "${TORCHRUN:-}" ]]; then
  if [[ -x "$PWD/.venv/bin/torchrun" ]]; then TORCHRUN="$PWD/.venv/bin/torchrun"; else TORCHRUN=torchrun; fi
fi

# require_python MODULE...: stop with one line saying what to install when PYTHON is missing or
# lacks one of the modules (checked without importing them, so it costs a fraction of a second).
require_python() {
  if ! command -v "$PYTHON" > /dev/null 2>&1; then
    echo "error: no Python interpreter '$PYTHON'; run  make install  (creates .venv with everything), or set PYTHON" >&2
    exit 1
  fi
  local missing
  missing=$("$PYTHON" -c 'import importlib.util, sys
print(next((m for m in sys.argv[1:] if importlib.util.find_spec(m) is None), ""))' "$@") || missing="?"
  if [[ -n "$missing" ]]; then
    echo "error: $PYTHON cannot import ${missing}; run  make install  (creates .venv), or  $PYTHON -m pip install -r requirements.txt" >&2
    exit 1
  fi
}

# The instruction-tuning recipe (Chinese-Vicuna's schedule on the shipped sample) that
# finetune.sh, finetune_4bit.sh, finetune_deepspeed.sh and finetune_continue.sh share; each adds its
# own flags, and flags given after these win. Change the recipe here, once.
INSTRUCT_SCHEDULE=(--prompt_type instruct --cutoff_len 256 --micro_batch_size 4 --batch_size 32 --num_epochs 3
                   --learning_rate 3e-4 --warmup_steps 10 --test_size 16 --eval_steps 10 --save_steps 10
                   --save_total_limit 2)
INSTRUCT_LORA=(--lora_r 8 --lora_alpha 16 --lora_dropout 0.05 --lora_target_modules q_proj,v_proj)  # new adapters
# QLoRA (finetune_4bit.sh): the instruction recipe with the base model in 4-bit NF4.
QLORA=(--quant 4bit)
# The multi-turn chat recipe (finetune_chat.sh): every assistant turn supervised, long context, LoRA on
# every linear layer, on the shipped chat sample.
CHAT_RECIPE=(--prompt_type chat --train_on all --cutoff_len 2048 --micro_batch_size 2 --batch_size 16 --num_epochs 3
             --learning_rate 3e-4 --warmup_steps 5 --lora_r 8 --lora_alpha 16 --lora_dropout 0.05
             --lora_target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --test_size 8
             --eval_steps 7 --save_steps 7 --save_total_limit 2)
# The presets of the training page (train_web.py), which reads these arrays from here: name and arrays.
PRESETS=(instruction "INSTRUCT_SCHEDULE INSTRUCT_LORA" chat "CHAT_RECIPE" QLoRA "INSTRUCT_SCHEDULE INSTRUCT_LORA QLORA")

# launch ENTRY [ARGS...]: run ENTRY with plain python (0 or 1 GPU) or torchrun (2+ GPUs).
# --model_path goes first, so a --model_path among ARGS (or the caller's "$@") still wins.
launch() {
  local entry="$1"
  shift
  local n_gpus=0
  local ids=()
  if [[ -n "$TOT_CUDA" ]]; then
    IFS=',' read -r -a ids <<< "$TOT_CUDA"
    n_gpus=${#ids[@]}
    export CUDA_VISIBLE_DEVICES="$TOT_CUDA"
  fi

  local cmd=()
  if (( n_gpus > 1 )); then
    cmd=("$TORCHRUN" --nproc_per_node "$n_gpus" --master_port "$PORT" "$entry")
  else
    cmd=("$PYTHON" "$entry")
  fi
  if [[ -n "$MODEL_PATH" ]]; then
    cmd+=(--model_path "$MODEL_PATH")
  fi
  cmd+=("$@")

  run_logged "${cmd[@]}"
}

# serve ENTRY PAGE_PORT [ARGS...]: a gradio page (generate.py, chat.py) in one process on PAGE_PORT. TOT_CUDA
# only selects the GPUs: with several, the page shards the model over them (device_map="auto")
# instead of starting one process per GPU. MODEL_PATH (or BASE_MODEL, the name the serving scripts
# document) and LORA_PATH become --model_path / --lora_path; ARGS come last, so they win.
serve() {
  local entry="$1" page_port="$2"
  shift 2
  if [[ -n "$TOT_CUDA" ]]; then
    export CUDA_VISIBLE_DEVICES="$TOT_CUDA"
  fi
  local cmd=("$PYTHON" "$entry" --port "$page_port")
  local model="${MODEL_PATH:-${BASE_MODEL:-}}"
  if [[ -n "$model" ]]; then
    cmd+=(--model_path "$model")
  fi
  if [[ -n "${LORA_PATH:-}" ]]; then
    cmd+=(--lora_path "$LORA_PATH")
  fi
  cmd+=("$@")
  run_logged "${cmd[@]}"
}

# run_logged CMD...: the exact command on stderr, so a log records what ran (stdout stays the
# program's own), then replace this shell with it.
run_logged() {
  echo "+ CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}" "$(printf '%q ' "$@")" >&2
  exec "$@"
}
