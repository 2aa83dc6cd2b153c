"""The flags of the training entry scripts (finetune.py, finetune_4bit.py, finetune_chat.py).

DEFAULTS is the one visible place for the training recipe's defaults; each variant script changes
a few of them and calls `main`. Nothing heavy is imported here: torch, transformers and peft load
(in train.py) only once the flags parse, so `--help` and flag errors are instant.
"""

from __future__ import annotations

import argparse

from errors import cli_errors
from prompt import PROMPT_TYPES
from errors import setup_logging

# Defaults in one visible place (Chinese-Vicuna's where it had them). Variants override a few.
from models import EMBEDDED_MODEL, QUANT_CHOICES

# Defaults in one visible place (Chinese-Vicuna's where it had them). Variants override a few.
DEFAULTS = dict(
    data_path="sample/instruct/data_sample.jsonl",
    output_path="lora-Vicuna",
    model_path=EMBEDDED_MODEL,
    prompt_type="instruct",
    quant="none",
    cutoff_len=256,
    micro_batch_size=4,
    batch_size=128,
    num_epochs=3,
    max_steps=-1,
    learning_rate=3e-4,
    warmup_steps=100,
    lora_r=8,
    lora_alpha=16,
    lora_dropout=0.05,
    lora_target_modules="q_proj,v_proj",
    train_on="all",
    test_size=None,  # 200 records, or a tenth of the data when that is fewer
    eval_steps=200,
    save_steps=200,
    save_total_limit=3,
    logging_steps=10,
    seed=42,
)


def build_parser(defaults: dict, description: str | None = None) -> argparse.ArgumentParser:
    d = defaults
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data_path", default=d["data_path"], help="JSON/JSONL instruction or chat data (format auto-detected)")
    a("--output_path", default=d["output_path"], help="where the adapter, checkpoints and logs go")
    a("--model_path", default=d["model_path"],
      help=f"base model: Hugging Face id, local folder or .gguf file (default: embedded {EMBEDDED_MODEL})")
    a("--prompt_type", choices=PROMPT_TYPES, default=d["prompt_type"], help="prompt template")
    a("--quant", choices=QUANT_CHOICES, default=d["quant"], help="load the base model in 8-bit or 4-bit (QLoRA)")
    a("--cutoff_len", type=int, default=d["cutoff_len"], help="truncate examples to this many tokens")
    a("--micro_batch_size", type=int, default=d["micro_batch_size"], help="examples per device per step")
    a("--batch_size", type=int, default=d["batch_size"], help="examples per optimizer step, all devices")
    a("--num_epochs", type=float, default=d["num_epochs"])
    a("--max_steps", type=int, default=d["max_steps"], help="optimizer steps; overrides --num_epochs when > 0")
    a("--learning_rate", type=float, default=d["learning_rate"])
    a("--warmup_steps", type=int, default=d["warmup_steps"])
    a("--lora_r", type=int, default=d["lora_r"])
    a("--lora_alpha", type=int, default=d["lora_alpha"])
    a("--lora_dropout", type=float, default=d["lora_dropout"])
    a("--lora_target_modules", default=d["lora_target_modules"],
      help="comma-separated module names, or all-linear")
    a("--train_on", choices=("all", "last"), default=d["train_on"],
      help="chat: supervise every assistant turn, or only the last (Chinese-Vicuna's recipe)")
    a("--packing", action=argparse.BooleanOptionalAction, default=True,
      help="pack each micro-batch into one row without padding (positions restart per example, "
           "attention never crosses examples); --no-packing pads each batch to its longest example")
    a("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
      help="with --no-packing: batches of examples of similar length, so little padding is computed "
           "(transformers' LengthGroupedSampler; packed rows have no padding to save)")
    a("--test_size", type=int, default=d["test_size"],
      help="records held out for evaluation (0: none; None: 200, or a tenth of the data when fewer)")
    a("--eval_steps", type=int, default=d["eval_steps"])
    a("--save_steps", type=int, default=d["save_steps"])
    a("--save_total_limit", type=int, default=d["save_total_limit"], help="checkpoints kept (0: all)")
    a("--logging_steps", type=int, default=d["logging_steps"])
    a("--resume_from_checkpoint", default=None,
      help="checkpoint-N folder to continue (optimizer, scheduler, RNG and data position restored)")
    a("--lora_path", default=None,
      help="continue-finetune this adapter (ours, plain peft or legacy Chinese-Vicuna) with a fresh schedule")
    a("--seed", type=int, default=d["seed"])
    a("--wandb", action="store_true", help="also log to Weights & Biases (pip install wandb)")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="trade compute for memory (default: on with a GPU, off on CPU); on a card with room to spare "
           "--no-gradient_checkpointing trains 1.6-2.2x faster (docs/performance.md)")
    a("--bf16", action="store_true", help="train in bfloat16 (default: auto, bf16/fp16 on GPU, fp32 on CPU)")
    a("--fp16", action="store_true", help="train in float16")
    a("--overwrite_output_dir", action="store_true",
      help="write into a non-empty output folder: replaces only the adapter files (adapter_config.json, "
           "adapter_model.safetensors, training_config.json, loss.png) and never deletes a file")
    a("--deepspeed", metavar="JSON", default=None,
      help="DeepSpeed config for HF Trainer, e.g. config-sample/zero2.json (pip install deepspeed)")
    a("--inspect_data", metavar="FILE", default=None,
      help="write every example as {input_ids, labels} JSON lines to FILE and exit")
    a("--trust_remote_code", action="store_true", help="allow model code from the hub (off by default)")
    return p


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default in --help."""


def main(argv: list[str] | None = None, defaults: dict | None = None, description: str | None = None):
    """Parse the flags (DEFAULTS changed by `defaults`), then train; the entry scripts' `main`."""
    setup_logging()
    args = build_parser({**DEFAULTS, **(defaults or {})}, description).parse_args(argv)
    import train  # torch, transformers and peft load only once the flags parse

    return cli_errors(train.run)(args)
