"""The one LoRA training core behind finetune.py, finetune_4bit.py and finetune_chat.py.

`run(args)` takes finetune.py's parsed flags: it checks every flag and the output folder, reads
and validates the data, tokenizes and masks it (prompt.py), loads the base model (models.py) with
a new or continued LoRA adapter, trains with the HF Trainer on packed rows, and saves the adapter
atomically (checkpoints.py). `Plan` holds what is resolved once from the flags and the machine
(processes, gradient accumulation, device, dtype, checkpointing).

Imported by the entry scripts after argument parsing, so `--help` and flag errors stay fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch.utils.checkpoint import checkpoint
from transformers import (AttentionInterface, DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import is_flash_attn_2_available

from checkpoints import (ADAPTER_FILES, SAMPLES_LOG, TRAINER_LOG, publish_files, remove_earlier_checkpoints,
                         reset_run_logs, staging_folder)
from data import (DataFile, as_prompt, load_data_files, load_prompts, mix, parse_shares, read_eval_prompts,
                  split_files)
from errors import UserError, logger, one_line
from generation import GenerationParams, check_context, generate_text
from models import (ADAPTER_CONFIG, adapter_key_report, device_map_for, load_adapter, load_model, load_tokenizer,
                    pick_dtype, refuse_compressed_base, resolve_model_path, save_training_config, target_modules)
from prompt import (IGNORE_INDEX, STOP_STRINGS, build_prompt_ids, encode_example, extract_response, measure_example,
                    question_text)


DEFAULT_EVAL_PROMPTS = 4  # --eval_prompts default: this many held-out records, or of DEFAULT_PROMPTS_FILE
DEFAULT_PROMPTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "heldout_prompts.json")


def build_examples(convs, args, tokenizer, counts: dict | None = None) -> tuple[list[dict], int]:
    """Tokenized, masked, truncated examples; returns (examples, dropped_count). `counts`, when
    given, gets "truncated": how many kept examples lost tokens at --cutoff_len."""
    examples, dropped, truncated = [], 0, 0
    for conv in convs:
        ex, cut = encode_example(args.prompt_type, conv, tokenizer, args.cutoff_len, args.train_on)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
            truncated += cut
    if counts is not None:
        counts["truncated"] = counts.get("truncated", 0) + truncated
    return examples, dropped


def plot_loss(log_history: list[dict], path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Plan:
    """How this process trains, resolved once from the flags and the machine."""

    world_size: int  # processes (torchrun); 1 without DDP
    rank: int
    grad_accum: int  # micro-batches per optimizer step in each process
    on_gpu: bool
    gradient_checkpointing: bool
    dtype: torch.dtype  # load dtype; mixed precision on a GPU follows it

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_args(cls, args) -> "Plan":
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        grad_accum = args.batch_size // args.micro_batch_size
        if grad_accum % world_size:
            raise UserError(f"--batch_size {args.batch_size} / --micro_batch_size {args.micro_batch_size} "
                            f"= {grad_accum} is not divisible by the {world_size} processes")
        on_gpu = torch.cuda.is_available()
        return cls(world_size=world_size, rank=int(os.environ.get("RANK", 0)), grad_accum=grad_accum // world_size,
                   on_gpu=on_gpu, gradient_checkpointing=on_gpu if args.gradient_checkpointing is None
                   else args.gradient_checkpointing, dtype=pick_dtype(args.bf16, args.fp16))

    def total_steps(self, args, n_train: int) -> int:
        """The optimizer steps the run will take (as the Trainer counts them)."""
        if args.max_steps > 0:
            return args.max_steps
        batches = math.ceil(n_train / (args.micro_batch_size * self.world_size))
        return max(1, math.ceil(args.num_epochs * max(1, batches // self.grad_accum)))


def run(args, data: tuple[list[DataFile], list | None] | None = None) -> str | None:
    """The run for flags that train_args.check_args passed: data, model, training, final save.
    `data`: train_args.preflight's ([DataFile], --eval_prompts prompts) (read here when None)."""
    files, prompts = data or (load_data_files(args.data_path), read_eval_prompts(args.eval_prompts, args.prompt_type))
    if args.inspect_data:
        return inspect_data(args, files)
    n_records = sum(len(f.conversations) for f in files)
    test_size = args.test_size if args.test_size is not None else min(200, n_records // 10)
    splits = split_files(files, test_size, args.seed, args.data_path)
    model_path = resolve_model_path(args.model_path)
    refuse_compressed_base(model_path, args.model_path)
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    tokenizer.padding_side = "right"
    counts: dict = {}
    train_examples, test_examples, file_counts = build_training_mix(args, files, splits, tokenizer, counts)
    dropped = sum(c["dropped_examples"] for c in file_counts)
    plan = Plan.from_args(args)
    data_format = ",".join(dict.fromkeys(f.format for f in files))
    log_summary(args, data_format, n_records, train_examples, test_examples, counts["truncated"],
                plan.total_steps(args, len(train_examples)), file_counts)
    if prompts is None:  # the default: the first held-out records, or our sample prompts
        held_out = [conv for _, test_convs in splits for conv in test_convs]
        prompts = [as_prompt(c) for c in held_out[:DEFAULT_EVAL_PROMPTS]] or \
            load_prompts(DEFAULT_PROMPTS_FILE)[:DEFAULT_EVAL_PROMPTS]

    model, resolved = load_trainable_model(args, model_path, plan)
    trainer = make_trainer(args, plan, model, tokenizer, train_examples, test_examples)
    if prompts:
        samples = GenerationSamples(prompts, args.prompt_type, tokenizer, args.eval_max_new_tokens, args.output_path,
                                    every=None if test_examples else args.eval_steps,
                                    writers=trainer.callback_handler.callbacks, wandb=args.wandb)
        samples.check_context(model)
        trainer.add_callback(samples)
    config = {
        "base_model": args.model_path,
        "base_model_resolved": model_path,
        "prompt_type": args.prompt_type,
        "data_format": data_format,
        "data_files": file_counts,
        "num_train_examples": len(train_examples),
        "num_eval_examples": len(test_examples),
        "dropped_examples": dropped,
        "gradient_accumulation_steps": plan.grad_accum,
        "world_size": plan.world_size,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "args": vars(args),
        **resolved,
    }
    if args.overwrite_output_dir and plan.rank == 0 and os.path.isdir(args.output_path):
        remove_earlier_checkpoints(args.output_path)
        reset_run_logs(args.output_path)
    lr_watch, progress, stop = LearningRateWatch(), ProgressLog(args.output_path), GracefulStop()
    for callback in (SaveConfig(config), lr_watch, FiniteGradients(args.learning_rate), progress, stop):
        trainer.add_callback(callback)
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        if stop.stopped_at is not None:
            checkpoint = os.path.join(args.output_path, f"checkpoint-{stop.stopped_at}")
            progress.write(trainer.state, "stop", checkpoint=checkpoint)
            if plan.rank == 0:
                logger.info("stopped at step %d: checkpoint saved to %s; continue with --resume_from_checkpoint %s",
                            stop.stopped_at, checkpoint, checkpoint)
        elif plan.rank == 0:
            # lora_B starts at zero: still zero after steps at a positive learning rate means a broken
            # run; after steps at rate 0 only (one step inside the warmup) it is what the user asked for
            save_final_adapter(trainer, args.output_path, config, updated=lr_watch.max_lr > 0)
            progress.write(trainer.state, "end", adapter=args.output_path)
    except Exception as e:
        close_progress_bars(trainer)  # so the error starts a line of its own
        if not is_write_failure(e):
            raise
        where = getattr(e, "filename", None) or args.output_path
        raise UserError(f"writing {where} failed ({getattr(e, 'strerror', None) or one_line(e)}); free disk space "
                        "or pass another --output_path (checkpoints written completely before are kept)") from None
    finally:
        stop.restore_handlers()
    return args.output_path


def build_training_mix(args, files: list[DataFile], splits: list[tuple[list, list]], tokenizer,
                       counts: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(train examples in the --data_shares mix, eval examples, each file's counts for the log and
    training_config.json) from each file's (train, test) conversations."""
    per_file, test_examples, file_counts = [], [], []
    for file, (train_convs, test_convs) in zip(files, splits):
        file_train, dropped_train = build_examples(train_convs, args, tokenizer, counts)
        file_test, dropped_test = build_examples(test_convs, args, tokenizer, counts)
        per_file.append(file_train)
        test_examples += file_test
        file_counts.append({"path": file.path, "format": file.format, "records": len(file.conversations),
                            "train_examples": len(file_train), "eval_examples": len(file_test),
                            "dropped_examples": dropped_train + dropped_test})
    dropped = sum(c["dropped_examples"] for c in file_counts)
    if dropped:
        logger.warning("dropped %d of %d records whose response lies beyond --cutoff_len %d",
                       dropped, sum(len(f.conversations) for f in files), args.cutoff_len)
    shares = parse_shares(args.data_shares, len(files))
    empty = [file.path for file, examples in zip(files, per_file) if not examples]
    if len(empty) == len(files) or (empty and shares):  # a share of nothing cannot be drawn
        raise UserError(f"{empty[0] if shares else args.data_path}: no training example keeps a supervised token "
                        f"within --cutoff_len {args.cutoff_len}; raise --cutoff_len")
    mixed = mix(per_file, shares, args.seed)
    for entry, part, share in zip(file_counts, mixed, shares or [None] * len(files)):
        entry.update(share=share, in_training_mix=len(part))
    return [ex for part in mixed for ex in part], test_examples, file_counts


def inspect_data(args, files: list[DataFile]) -> None:
    """--inspect_data FILE: every record of every data file as one JSON line, in file order:
    {"where", "length", "cut", "input_ids", "labels"} for an example ("length": its tokens before
    --cutoff_len, "cut": whether the cut shortened it), {"where", "length", "dropped": true} for a
    record with no supervised token within --cutoff_len."""
    if os.path.exists(args.inspect_data):
        raise UserError(f"--inspect_data {args.inspect_data} exists; pass a new file name")
    tokenizer = load_tokenizer(resolve_model_path(args.model_path), args.trust_remote_code)
    kept = cut = dropped = 0
    with open(args.inspect_data, "w", encoding="utf-8") as f:
        for conv in (conv for file in files for conv in file.conversations):
            ex, truncated, length = measure_example(args.prompt_type, conv, tokenizer, args.cutoff_len, args.train_on)
            if ex is None:
                line = {"where": conv.where, "length": length, "dropped": True}
                dropped += 1
            else:
                line = {"where": conv.where, "length": length, "cut": truncated, **ex}
                kept, cut = kept + 1, cut + truncated
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    logger.info("wrote %d examples to %s (%d cut at --cutoff_len %d; %d dropped: no supervised token "
                "within it)", kept, args.inspect_data, cut, args.cutoff_len, dropped)


def close_progress_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


def is_write_failure(e: BaseException) -> bool:
    """A full disk, a quota or a file-size limit, as the libraries that write checkpoints report it:
    OSError (Python), SafetensorError "I/O error" (safetensors), "unexpected pos" / "file write
    failed" (torch.save's zip writer)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return (type(e).__name__ == "SafetensorError" and "I/O error" in text) or (
        isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text))


def log_summary(args, data_format: str, n_records: int, train: list[dict], test: list[dict], truncated: int,
                total_steps: int, file_counts: list[dict]) -> None:
    """What the run will do, and each thing that would surprise a user, before any weight loads."""
    if len(file_counts) > 1:
        for c in file_counts:
            share = f", share {c['share']:g}" if c["share"] is not None else ""
            logger.info("%s: %s format, %d records: %d train / %d eval examples, %d in the training mix%s",
                        c["path"], c["format"], c["records"], c["train_examples"], c["eval_examples"],
                        c["in_training_mix"], share)
    n_tokens = sum(len(e["input_ids"]) for e in train)
    n_sup = sum(sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in train)
    logger.info("%s: %s format, %d train / %d eval examples, %d tokens (%d supervised), %d optimizer steps",
                args.data_path, data_format, len(train), len(test), n_tokens, n_sup, total_steps)
    if truncated:
        logger.warning("%d of %d examples were cut at --cutoff_len %d (their ends are not trained on); "
                       "raise --cutoff_len to keep them whole", truncated, len(train) + len(test), args.cutoff_len)
    if args.test_size is None and test:
        logger.info("held out %d of %d records for evaluation (--test_size default: 200 or a tenth of the "
                    "data; pass --test_size N to choose, 0 for none)", len(test), n_records)
    if args.warmup_steps >= total_steps:
        logger.warning("--warmup_steps %d is not below this run's %d optimizer steps: the learning rate never "
                       "reaches --learning_rate %g; pass a smaller --warmup_steps (e.g. %d)", args.warmup_steps,
                       total_steps, args.learning_rate, max(0, total_steps // 10))


def save_final_adapter(trainer, out: str, config: dict, updated: bool) -> None:
    """Write the adapter into `out` so that, killed at any moment, `out` has either no
    adapter_config.json or a complete adapter: everything is written and checked in a hidden
    staging folder inside `out`, then renamed into place with adapter_config.json last."""
    with staging_folder(os.path.join(out, "adapter")) as staged:
        trainer.save_model(staged)
        adapter_key_report(staged, trainer.model, updated=updated, shown_as=out)
        save_training_config(staged, config)
        png = plot_loss(trainer.state.log_history, os.path.join(staged, "loss.png"))
        keep = tuple(n for n in os.listdir(staged) if n not in ADAPTER_FILES)  # e.g. peft's README.md
        publish_files(staged, out, last=ADAPTER_CONFIG, keep_existing=keep)
    logger.info("adapter saved to %s%s", out, f"; loss curve: {os.path.join(out, 'loss.png')}" if png else "")


def load_trainable_model(args, model_path: str, plan: Plan):
    """Base model (optionally 8/4-bit) wrapped with a fresh or continued LoRA adapter."""
    set_seed(args.seed)  # LoRA's lora_A init draws from the global RNG: same seed, same adapter
    dtype, gradient_checkpointing = plan.dtype, plan.gradient_checkpointing
    model = load_model(model_path, quant=args.quant, dtype=dtype, device_map=device_map_for(args.quant, plan.ddp),
                       trust_remote_code=args.trust_remote_code)
    if args.quant != "none":
        loaded = {name: p.dtype for name, p in model.named_parameters()}
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        if dtype == torch.bfloat16:
            # peft upcasts every non-quantized weight to float32, which fp16 training needs; bf16 does
            # not (RMSNorm already reduces in float32), and on a 7B model the upcast embedding, head
            # and float32 residual stream cost about 2 GB of a QLoRA run's memory. Put them back.
            for name, p in model.named_parameters():
                if loaded.get(name) == torch.bfloat16 and p.dtype == torch.float32:
                    p.data = p.data.to(torch.bfloat16)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    if args.lora_path:
        model = load_adapter(model, args.lora_path, trainable=True)
        lora = model.peft_config["default"]
        logger.info("continuing adapter %s (r=%d, targets %s) with a fresh schedule",
                    args.lora_path, lora.r, sorted(lora.target_modules))
    else:
        lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=target_modules(args.lora_target_modules), bias="none",
                          task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise UserError(f"--lora_target_modules {args.lora_target_modules}: {str(e).splitlines()[0]}") from None
    # name the base as the user did (the embedded model's name, a hub id), not the cache folder it
    # resolved to: adapter_config.json travels to other machines
    model.peft_config["default"].base_model_name_or_path = args.model_path
    # We never resize the vocabulary, so every save (checkpoint-N, final) leaves the base's embeddings
    # out. peft's default ("auto") finds that out by reading config.json of base_model_name_or_path,
    # which names the user's base, not a folder: it asks the hub and warns offline.
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("trainable parameters: %s of %s (%.3f%%), dtype %s, quant %s",
                f"{trainable:,}", f"{total:,}", 100 * trainable / total, dtype, args.quant)
    resolved = {"dtype": str(dtype).removeprefix("torch."), "lora_r": lora.r, "lora_alpha": lora.lora_alpha,
                "lora_target_modules": sorted(lora.target_modules) if not isinstance(lora.target_modules, str)
                else lora.target_modules}
    return model, resolved


def make_trainer(args, plan: Plan, model, tokenizer, train_examples: list[dict],
                 test_examples: list[dict]) -> "SupervisedLossTrainer":
    """The HF Trainer for a plan: packed (or length-grouped padded) batches, our loss."""
    on_gpu, ddp, dtype, gradient_checkpointing = plan.on_gpu, plan.ddp, plan.dtype, plan.gradient_checkpointing
    report_to = ["tensorboard"]
    if args.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install wandb") from None
        report_to.append("wandb")
    has_eval = bool(test_examples)
    training_args = TrainingArguments(
        output_dir=args.output_path,
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=args.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit or None,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        optim="paged_adamw_8bit" if (on_gpu and args.quant == "4bit") else "adamw_torch",
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        report_to=report_to,
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        prediction_loss_only=True,
        ddp_find_unused_parameters=False if ddp else None,
        ddp_backend=None if on_gpu or not ddp else "gloo",
        use_cpu=not on_gpu,
        # tokens/s in trainer_log.jsonl: a packed row has no padding (and may hold the pad id as a
        # real token: EOS), a padded batch counts its attention mask
        include_num_input_tokens_seen="all" if args.packing else "non_padding",
        train_sampling_strategy="group_by_length" if (args.group_by_length and not args.packing) else "random",
        dataloader_num_workers=0,
        deepspeed=args.deepspeed,
    )
    if args.packing:
        # One [1, sum of lengths] row per micro-batch; no attention_mask, so transformers derives the
        # block-diagonal causal mask from the restarting position_ids (SDPA, eager and flash-attention).
        # The sequence boundaries (cu_seq_lens_*) ride along for flash-attention and PACKED_ATTENTION.
        collator = DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=True,
                                              separator_id=IGNORE_INDEX)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not on_gpu:  # measured on the CPU (docs/performance.md)
            use_packed_attention(base)
        elif dtype != torch.float32 and is_flash_attn_2_available():
            # varlen flash-attention over the packed row, bounded by cu_seq_lens: no [T x T] mask
            base.set_attn_implementation("flash_attention_2")
            logger.info("attention: flash_attention_2 over packed rows")
        # otherwise (a GPU without flash-attn): SDPA with the block-diagonal mask
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                          pad_to_multiple_of=8, return_tensors="pt")
    trainer = SupervisedLossTrainer(model=model, args=training_args, data_collator=collator,
                                    train_dataset=Dataset.from_list(train_examples),
                                    eval_dataset=Dataset.from_list(test_examples) if has_eval else None)
    for printer in (ProgressCallback, PrinterCallback):  # logs as numbers, not strings
        if trainer.pop_callback(printer) is not None:
            trainer.add_callback(NumericProgress())
    return trainer


PACKED_ATTENTION = "sdpa_packed"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """SDPA that runs a padding-free packed row one example at a time.

    With a packed row, plain SDPA gets a [T x T] block-diagonal mask and computes every block, masked
    or not (on the CPU it also loses the causal kernel's skipping); here each example between two
    `cu_seq_lens_q` boundaries gets its own causal SDPA call, so the work is sum(len^2) / 2 instead
    of T^2. Anything else (padded batches, generation with a cache) goes to transformers' SDPA with
    the mask it built.
    """
    bounds = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    bounds = bounds.tolist() if bounds is not None and query.shape[0] == 1 else None
    if bounds is None or bounds[0] != 0 or bounds[-1] != query.shape[2] or key.shape[2] != query.shape[2]:
        # not one whole packed row (a padded batch, generation with a cache): keep the mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # split, not slicing: the backward of a slice allocates and zero-fills a full-size gradient per
    # example, the backward of split concatenates the pieces once
    outputs = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True,
                                      **kwargs)[0]
               for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))]
    return torch.cat(outputs, dim=1), None


def use_packed_attention(model) -> None:
    """Switch an SDPA model to packed_sdpa_attention (registered with transformers once)."""
    if PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # padded batches keep their mask
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(PACKED_ATTENTION)


def supervised_token_loss(model, inputs: dict, chunk_size: int = 2048):
    """(sum of token losses, number of tokens) computing logits only where a label is supervised.

    The prompt is about 40 % of an instruction example: its positions never reach the vocabulary
    projection. `logits_to_keep` (a boolean [batch, seq] mask) makes the model return logits for
    the kept positions only, flattened to [n_supervised, vocab]; cross-entropy then runs in float32
    chunk by chunk under activation checkpointing, so no [tokens x vocab] float32 tensor is ever
    alive for backward.
    """
    labels = inputs["labels"]
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    target = labels[:, 1:]  # position t predicts token t + 1
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = target != IGNORE_INDEX
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # [n, vocab]
    logits = logits.reshape(-1, logits.shape[-1])
    wanted = target[keep[:, :-1]]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, wanted.numel(), chunk_size):
        total = total + checkpoint(_cross_entropy_sum, logits[start:start + chunk_size],
                                   wanted[start:start + chunk_size], use_reentrant=False)
    return total, wanted.numel()


def _cross_entropy_sum(logits, target):
    return F.cross_entropy(logits.float(), target, reduction="sum")


class SupervisedLossTrainer(Trainer):
    """HF Trainer whose loss skips unsupervised positions (see supervised_token_loss)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, count = supervised_token_loss(model, inputs)
        if not bool(total.isfinite()):
            raise UserError(f"step {self.state.global_step + 1}: the loss is {float(total.detach())}: training diverged; "
                            f"lower --learning_rate (now {self.args.learning_rate:g}) or check the data "
                            "(checkpoints written so far are kept)")
        if num_items_in_batch is None:  # evaluation, or a collator the Trainer cannot count
            self.loss_is_scaled_for_ga = False
            loss = total / max(count, 1)
        else:  # normalized over every token of the accumulated (and all-process) batch
            self.loss_is_scaled_for_ga = True
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients back
        return (loss, {}) if return_outputs else loss  # no logits to hand back: prediction_loss_only


class SaveConfig(TrainerCallback):
    """Write the training config into every checkpoint folder (on the main process)."""

    def __init__(self, config: dict):
        self.config = config

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                save_training_config(folder, self.config)


class FiniteGradients(TrainerCallback):
    """Stop with a one-line error before an optimizer step would write NaN or inf into the adapter.
    (fp16 mixed precision is left to its loss scaler, which skips such steps on purpose.)"""

    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16 or model is None:
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if grads and not bool(torch.stack([g.detach().float().norm() for g in grads]).isfinite().all()):
            raise UserError(f"step {state.global_step + 1}: the gradients hold NaN or infinite values: training "
                            f"diverged; lower --learning_rate (now {self.learning_rate:g}) or check the data "
                            "(checkpoints written so far are kept)")


class GracefulStop(TrainerCallback):
    """SIGTERM or SIGINT (the training page's Stop, Ctrl-C) ends the run at the end of the current
    optimizer step with a normal checkpoint-N (the Trainer's own save), which --resume_from_checkpoint
    continues exactly; `stopped_at` is then that step and the final adapter is not written.

    The handlers live while train() runs, in the main thread of every process (torchrun forwards a
    signal to all of them; the request is shared at each step end, so all processes stop at the
    same step). A second signal gets the default behaviour back: it kills at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}

    def _request(self, signum, frame):
        self.requested = True
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)  # the next one is not caught
        logger.info("%s: stopping after this optimizer step and saving a checkpoint (send it again to kill "
                    "at once)", signal.Signals(signum).name)

    def restore_handlers(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.restore_handlers()


class ProgressLog(TrainerCallback):
    """OUTPUT/trainer_log.jsonl (LLaMA-Factory's name): one JSON line per event, appended by the
    main process, for the training page and scripts. Every line has "event" ("start", "log",
    "eval", "save", "stop", "end"), "step", "total_steps", "epoch", "elapsed_s" and "remaining_s"
    (this process's training time so far and the estimate for the steps left, at its pace),
    "tokens_per_s" (input tokens per second of training in this process) and "learning_rate";
    "log" adds "loss", "eval" adds "eval_loss", "save" and "stop" add "checkpoint" (the folder),
    "end" adds "adapter" (the output folder). A resumed run appends: the last line of a step wins."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, TRAINER_LOG)
        self.started = time.monotonic()
        self.first_step, self.first_tokens, self.learning_rate = 0, 0, None

    def write(self, state, event: str, **values) -> None:
        if not state.is_world_process_zero:
            return
        elapsed = time.monotonic() - self.started
        done = state.global_step - self.first_step
        tokens = state.num_input_tokens_seen - self.first_tokens
        line = {"event": event, "step": state.global_step, "total_steps": state.max_steps, "epoch": state.epoch,
                "elapsed_s": round(elapsed, 3),
                "remaining_s": round(elapsed / done * (state.max_steps - state.global_step), 3) if done > 0 else None,
                "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 and tokens else None,
                "learning_rate": self.learning_rate, **values}
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.started = time.monotonic()
        self.first_step, self.first_tokens = state.global_step, state.num_input_tokens_seen
        self._scheduler_rate(lr_scheduler)
        self.write(state, "start")

    def _scheduler_rate(self, lr_scheduler) -> None:
        if lr_scheduler is not None:
            self.learning_rate = lr_scheduler.get_last_lr()[0]

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.learning_rate = logs.get("learning_rate", self.learning_rate)
            self.write(state, "log", loss=logs["loss"])
        elif "eval_loss" in logs:
            self.write(state, "eval", eval_loss=logs["eval_loss"])

    def on_save(self, args, state, control, **kwargs):
        self.write(state, "save", checkpoint=os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


class GenerationSamples(TrainerCallback):
    """--eval_prompts: greedy answers to a few prompts at every evaluation (with `every`, at every
    `every`-th step: a run without a held-out split), on the main process, appended to
    OUTPUT/samples.jsonl as {"step", "index", "prompt" (the question as a person reads it),
    "answer"}, and written to TensorBoard (text "samples/N") and to wandb (a table) when they log.

    The answers are what generate.py prints for the adapter at that step with the default decoding
    (generation.generate_text, the template's stop strings; --eval_max_new_tokens tokens at most).
    Training is not changed: the model is switched to eval mode and back, nothing keeps gradients,
    and every random generator (python, numpy, torch, CUDA) is put back as it was, so the trained
    adapter is bitwise the one a run without samples gives.
    """

    def __init__(self, prompts: list, prompt_type: str, tokenizer, max_new_tokens: int, folder: str,
                 every: int | None = None, writers: list | None = None, wandb: bool = False):
        self.prompt_type, self.tokenizer, self.every = prompt_type, tokenizer, every
        self.questions = [question_text(conv) for conv in prompts]
        self.wheres = [conv.where for conv in prompts]
        self.prompt_ids = [build_prompt_ids(prompt_type, conv, tokenizer) for conv in prompts]
        self.params = GenerationParams(max_new_tokens=max_new_tokens)
        self.path = os.path.join(folder, SAMPLES_LOG)
        self.writers = writers if writers is not None else []  # the Trainer's callbacks: TensorBoard's
        self.wandb = wandb

    def check_context(self, model) -> None:
        """Refuse, before training, a prompt whose answer would not fit the model's context."""
        for where, ids in zip(self.wheres, self.prompt_ids):
            check_context(model, len(ids), self.params.max_new_tokens, prompt=f"the eval prompt {where}".strip(),
                          new_name="--eval_max_new_tokens", fix="shorten it (--eval_prompts)")

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.every is None:
            self.write_samples(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every is not None and state.global_step % self.every == 0:
            self.write_samples(state, model)

    def answers(self, model) -> list[str]:
        """The greedy answer to every prompt, leaving the model's mode and every RNG as they were."""
        import random

        import numpy as np

        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [extract_response(generate_text(model, self.tokenizer, ids, self.params,
                                                       STOP_STRINGS[self.prompt_type]), self.prompt_type)
                        for ids in self.prompt_ids]
        finally:
            model.train(training)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if rng[3] is not None:
                torch.cuda.set_rng_state_all(rng[3])

    def write_samples(self, state, model) -> None:
        if not state.is_world_process_zero or model is None:
            return
        step = state.global_step
        rows = [{"step": step, "index": i, "prompt": q, "answer": a}
                for i, (q, a) in enumerate(zip(self.questions, self.answers(model)))]
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        for callback in self.writers:
            tb = getattr(callback, "tb_writer", None)
            if tb is not None:
                for row in rows:
                    tb.add_text(f"samples/{row['index']}", f"**prompt**\n\n{row['prompt']}\n\n**answer**\n\n"
                                f"{row['answer']}", step)
                tb.flush()
        if self.wandb:
            import wandb

            if wandb.run is not None:
                wandb.log({"eval/samples": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})


class LearningRateWatch(TrainerCallback):
    """The largest learning rate any optimizer step of this process used (`.max_lr`)."""

    def __init__(self):
        self.max_lr = 0.0

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if lr_scheduler is not None:
            self.max_lr = max(self.max_lr, *lr_scheduler.get_last_lr())


class NumericProgress(ProgressCallback):
    """The Trainer's progress bar, with each log as one line of numbers (`step 10: loss 2.028, ...`)
    instead of a dict of strings."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = f"step {state.global_step}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items() if k != "total_flos")
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            logger.info("%s", line)

