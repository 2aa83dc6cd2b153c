"""The flags of the training entry scripts (finetune.py, finetune_4bit.py, finetune_chat.py), and
every check that can run before torch loads.

DEFAULTS is the one visible place for the training recipe's defaults; each variant script changes
a few of them and calls `main`. `main` parses, then `preflight` checks every flag, the output
folder, a resumed checkpoint and the whole data file, so a mistake is one line in a second, not
after torch, transformers and peft have loaded (in train.py, imported last).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os

from checkpoints import check_output_folder, check_resume_checkpoint
from data import data_paths, load_data_files, parse_shares, read_eval_prompts
from errors import UserError, cli_errors, setup_logging
from models import EMBEDDED_MODEL, QUANT_CHOICES, target_modules
from prompt import PROMPT_TYPES

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
    eval_max_new_tokens=128,
    save_steps=200,
    save_total_limit=3,
    logging_steps=10,
    seed=42,
)


def build_parser(defaults: dict, description: str | None = None) -> argparse.ArgumentParser:
    d = defaults
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data_path", default=d["data_path"],
      help="JSON/JSONL instruction or chat data (format auto-detected per file); several files: a.jsonl,b.json "
           "(each read and checked on its own, formats may differ; the held-out records are taken from each "
           "file in proportion to its size)")
    a("--data_shares", metavar="S1,S2", default=None,
      help="with several --data_path files: the share of the training examples each gives (positive, summing "
           "to 1; the total stays the number of training examples): a file with more than its share is "
           "subsampled without repeats, one with fewer is repeated, both drawn with --seed; without it every "
           "example of every file is trained once")
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
    a("--eval_prompts", metavar="FILE", default=None,
      help="prompts (any data format; answers are not needed) answered greedily at every evaluation (every "
           "--eval_steps without a held-out split) into OUTPUT/samples.jsonl, TensorBoard and wandb; without it "
           "the first 4 held-out records, or of sample/heldout_prompts.json without a held-out split; none: off")
    a("--eval_max_new_tokens", type=int, default=d["eval_max_new_tokens"],
      help="the longest answer to an --eval_prompts prompt, in tokens")
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
      help="replace an earlier run of finetune.py in --output_path: its adapter files and checkpoint-N "
           "folders; a file it did not write is never touched")
    a("--deepspeed", metavar="JSON", default=None,
      help="DeepSpeed config for HF Trainer, e.g. config-sample/zero2.json (pip install deepspeed)")
    a("--inspect_data", metavar="FILE", default=None,
      help="write every example as JSON lines to FILE and exit: {where (file:line), length (tokens before "
           "--cutoff_len), cut, input_ids, labels}, or {where, length, dropped: true} for a record with no "
           "supervised token within --cutoff_len")
    a("--trust_remote_code", action="store_true", help="allow model code from the hub (off by default)")
    return p


def check_args(args) -> None:
    """Every flag in range and every combination possible, before anything loads or is written."""
    for name in ("cutoff_len", "micro_batch_size", "batch_size", "lora_r", "lora_alpha",
                 "eval_steps", "save_steps", "logging_steps", "eval_max_new_tokens"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("warmup_steps", "save_total_limit"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.test_size is not None and args.test_size < 0:
        raise UserError(f"--test_size must be >= 0, got {args.test_size}")
    if not 0 < args.learning_rate <= 1:  # also false for nan; AdamW overflows on lr/(1-beta1) past 3e37
        raise UserError(f"--learning_rate must be > 0 and at most 1, got {args.learning_rate}; "
                        "the recipes use 3e-4 (LoRA) to 2e-4 (QLoRA)")
    if not math.isfinite(args.num_epochs):
        raise UserError(f"--num_epochs must be a finite number, got {args.num_epochs}")
    if args.batch_size % args.micro_batch_size:
        raise UserError(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                        f"{args.micro_batch_size}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.bf16 and args.fp16:
        raise UserError("--bf16 and --fp16 exclude each other; pass one")
    if args.resume_from_checkpoint and args.lora_path:
        raise UserError("--resume_from_checkpoint continues a run, --lora_path starts a new one from an "
                        "adapter; pass one of them")
    if args.deepspeed and not os.path.isfile(args.deepspeed):
        raise UserError(f"--deepspeed {args.deepspeed}: no such file; see config-sample/zero2.json")
    if args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--deepspeed {args.deepspeed} needs the deepspeed package: pip install deepspeed")
    if args.max_steps <= 0 and args.num_epochs <= 0:
        raise UserError("--num_epochs must be > 0 (or pass --max_steps)")
    parse_shares(args.data_shares, len(data_paths(args.data_path)))
    targets = target_modules(args.lora_target_modules)
    if args.resume_from_checkpoint:
        check_resume_checkpoint(args.resume_from_checkpoint, args.lora_r, args.lora_alpha, targets)
    if not args.inspect_data:
        check_output_folder(args.output_path, args.resume_from_checkpoint, args.overwrite_output_dir)


def preflight(args) -> tuple[list, list | None]:
    """Everything that can be checked before torch loads: the flags, the output folder, a resumed
    checkpoint, every data file and the --eval_prompts file, which are returned: ([DataFile],
    prompts or None for the default)."""
    check_args(args)
    files = load_data_files(args.data_path)
    return files, None if args.inspect_data else read_eval_prompts(args.eval_prompts, args.prompt_type)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default in --help."""


def main(argv: list[str] | None = None, defaults: dict | None = None, description: str | None = None):
    """Parse the flags (DEFAULTS changed by `defaults`), then train; the entry scripts' `main`."""
    setup_logging()
    args = build_parser({**DEFAULTS, **(defaults or {})}, description).parse_args(argv)
    data = cli_errors(preflight)(args)  # a bad flag, folder or record answers before torch loads
    import train

    return cli_errors(train.run)(args, data)
