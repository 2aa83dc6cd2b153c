"""Training throughput: the Chinese-Vicuna recipe against our default path, in one command.

    python tools/bench_train.py [--num_examples 64] [--data PATH ...]     (make bench-train)

All variants train the same examples, model and LoRA settings (embedded SmolLM2-135M, LoRA r=8 on
q_proj,v_proj, micro-batch 4, cutoff 256, fp32 on the CPU, one pass, no eval, no checkpoints):

  recipe  Chinese-Vicuna: every example padded to --cutoff_len, one example per row, the model's
          own loss over full [tokens x vocab] logits (prompt masked with -100, as it did).
  ours    finetune.py's default: padding-free packing of each micro-batch into one row, attention
          per example, logits and loss only at supervised positions.
  trl     TRL's SFTTrainer with padding_free=True on the same tokenized examples and labels (only
          when trl is installed).

Each variant runs in its own process so its peak RSS is its own. Printed: wall time of
`trainer.train()`, effective (non-pad) tokens per second, peak RSS, the ratio ours/recipe, and the
padding bound (the recipe's padded tokens / real tokens: the speed-up from dropping padding alone).
Data: mixed Chinese/English alpaca records from ../shared/data when present (benchmarks only),
otherwise sample/instruct/data_sample.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
DEFAULT_DATA = [os.path.join(SHARED, "alpaca_en_hikariming_0-3252.json"),
                os.path.join(SHARED, "alpaca_zh_hikariming_0-3252.json")]


def pick_examples(paths: list[str], n: int, seed: int):
    """n records, alternating between the files (mixed languages), skipping empty outputs."""
    import random

    from data import load_conversations

    pools = []
    for path in paths:
        _, convs = load_conversations(path)
        convs = [c for c in convs if c.turns[0][1].strip()]
        random.Random(seed).shuffle(convs)
        pools.append(convs)
    out = []
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    return out


def trl_trainer(args, model, tokenizer, examples, opts, on_gpu):
    """TRL's SFTTrainer, padding-free, on the same tokenized examples and labels (prompt masked)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=args.output_path, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                       num_train_epochs=1, learning_rate=3e-4, warmup_steps=0, logging_steps=1000,
                       save_strategy="no", report_to=[], seed=opts.seed, data_seed=opts.seed,
                       use_cpu=not on_gpu, dataloader_num_workers=0, max_steps=opts.max_steps or -1,
                       padding_free=True, packing=False, max_length=None, bf16=on_gpu and opts.bf16,
                       gradient_checkpointing=bool(args.gradient_checkpointing))  # TRL defaults it to on
    return SFTTrainer(model=model, args=config, processing_class=tokenizer,
                      train_dataset=Dataset.from_list(examples))


def run_variant(variant: str, opts) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    import train
    import train_args
    from models import load_tokenizer, resolve_model_path
    from prompt import IGNORE_INDEX

    torch.set_num_threads(opts.threads)
    on_gpu = torch.cuda.is_available()
    paths = opts.data or ([p for p in DEFAULT_DATA if os.path.isfile(p)] or
                          [os.path.join(ROOT, "sample/instruct/data_sample.jsonl")])
    convs = pick_examples(paths, opts.num_examples, opts.seed)
    model_path = resolve_model_path(opts.model_path)
    args = train_args.build_parser(train_args.DEFAULTS).parse_args([
        "--model_path", opts.model_path, "--output_path", os.path.join(opts.workdir, variant),
        "--cutoff_len", str(opts.cutoff_len), "--micro_batch_size", "4", "--batch_size", "4",
        "--num_epochs", "1", "--learning_rate", "3e-4", "--warmup_steps", "0", "--test_size", "0",
        "--save_steps", "100000", "--logging_steps", "1000", "--seed", str(opts.seed),
        "--lora_r", "8", "--lora_target_modules", "q_proj,v_proj", "--quant", opts.quant]
        + (["--max_steps", str(opts.max_steps)] if opts.max_steps else [])
        + (["--bf16"] if opts.bf16 else [])
        # Chinese-Vicuna on a GPU: fp16 weights, peft's prepare_model_for_int8_training (float32
        # upcast, gradient checkpointing on by default in the peft it used) and fp16 autocast.
        + (["--fp16"] if on_gpu and variant == "recipe" and not opts.bf16 else [])
        + (["--gradient_checkpointing"] if on_gpu and not opts.no_checkpointing else ["--no-gradient_checkpointing"])
        + ([] if variant == "ours" else ["--no-packing"]))  # trl: its own collator
    tokenizer = load_tokenizer(model_path)
    tokenizer.padding_side = "right"
    examples, dropped = train.build_examples(convs, args, tokenizer)
    real_tokens = sum(len(e["input_ids"]) for e in examples)
    plan = train.Plan.from_args(args)
    model, _ = train.load_trainable_model(args, model_path, plan)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if variant == "ours":
        trainer = train.make_trainer(args, plan, model, tokenizer, examples, [])
        trainer.args.save_strategy = "no"
        computed_tokens = real_tokens
    elif variant == "trl":
        trainer = trl_trainer(args, model, tokenizer, examples, opts, on_gpu)
        computed_tokens = real_tokens
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=opts.cutoff_len,
                                          label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
        targs = TrainingArguments(output_dir=args.output_path, per_device_train_batch_size=4,
                                  gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=3e-4,
                                  warmup_steps=0, logging_steps=1000, save_strategy="no", report_to=[],
                                  seed=opts.seed, data_seed=opts.seed, remove_unused_columns=False,
                                  use_cpu=not on_gpu, dataloader_num_workers=0, max_steps=opts.max_steps or -1,
                                  fp16=on_gpu and not opts.bf16,
                                  bf16=on_gpu and opts.bf16)
        trainer = Trainer(model=model, args=targs, data_collator=collator, train_dataset=Dataset.from_list(examples))
        computed_tokens = len(examples) * opts.cutoff_len
    # Steady state: per-step real tokens (counted in the collator) over per-step end times, after
    # opts.warmup_steps steps (CUDA/cuBLAS/bitsandbytes initialisation lands in the first steps).
    batch_tokens, step_ends = [], []
    collate = trainer.data_collator

    def counting_collator(features):
        batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        return collate(features)

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if on_gpu:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    trainer.data_collator = counting_collator
    trainer.add_callback(StepClock())
    start, cpu_start = time.perf_counter(), time.process_time()
    if opts.profile:  # where the time goes: operators by self CPU time, over the whole run
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=opts.profile), file=sys.stderr)
    else:
        trainer.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    w = opts.warmup_steps
    steady = (sum(batch_tokens[w + 1:len(step_ends)]) / (step_ends[-1] - step_ends[w])
              if len(step_ends) > w + 1 else None)
    steps = trainer.state.global_step
    if opts.max_steps:  # only the examples the steps consumed
        real_tokens = sum(len(e["input_ids"]) for e in examples[:steps * 4])
    return {"steps": steps, "quant": opts.quant,
            "peak_vram_gb": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None, "variant": variant, "examples": len(examples), "dropped": dropped, "real_tokens": real_tokens,
            "computed_tokens": computed_tokens, "wall_s": wall, "tokens_per_s": real_tokens / wall,
            "steady_tokens_per_s": steady, "first_step_s": step_ends[0] - start if step_ends else None,
            "cpu_s": cpu, "tokens_per_cpu_s": real_tokens / cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "data": [os.path.basename(p) for p in paths]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_examples", type=int, default=64)
    p.add_argument("--cutoff_len", type=int, default=256)
    p.add_argument("--model_path", default="SmolLM2-135M-Instruct")
    p.add_argument("--data", nargs="*", default=None, help="data files (default: shared alpaca en+zh)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/bench_train")
    p.add_argument("--quant", choices=("none", "8bit", "4bit"), default="none")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: one pass)")
    p.add_argument("--warmup_steps", type=int, default=2, help="steps left out of the steady-state rate")
    p.add_argument("--no_checkpointing", action="store_true", help="no gradient checkpointing on a GPU")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="with --variant: print the N operators with the most self CPU time (torch.profiler)")
    p.add_argument("--variant", choices=("recipe", "ours", "trl"),
                   help="run only this variant, in this process, and print its figures as JSON")
    opts = p.parse_args(argv)
    if opts.variant:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(run_variant(opts.variant, opts)))
        return
    variants = ["recipe", "ours"]
    try:
        import trl  # noqa: F401
        variants.append("trl")
    except ImportError:
        pass
    results = {}
    for variant in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant] + (argv or sys.argv[1:])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = results["recipe"], results["ours"]
    bound = a["computed_tokens"] / a["real_tokens"]
    print(f"data: {', '.join(a['data'])}; {a['examples']} examples, {a['real_tokens']} real tokens, "
          f"cutoff {opts.cutoff_len}, {opts.threads} threads")
    print(f"{'variant':<8} {'wall s':>8} {'eff tok/s':>10} {'steady':>8} {'CPU s':>8} {'tok/CPU s':>10} "
          f"{'peak RSS MB':>12}")
    for r in results.values():
        steady = f"{r['steady_tokens_per_s']:>8.1f}" if r["steady_tokens_per_s"] else f"{'n/a':>8}"
        print(f"{r['variant']:<8} {r['wall_s']:>8.1f} {r['tokens_per_s']:>10.1f} {steady} {r['cpu_s']:>8.1f} "
              f"{r['tokens_per_cpu_s']:>10.1f} {r['peak_rss_mb']:>12.0f}")

    def ratios(x, y):
        steady = (f", {x['steady_tokens_per_s'] / y['steady_tokens_per_s']:.2f}x steady"
                  if x["steady_tokens_per_s"] and y["steady_tokens_per_s"] else "")
        return x["tokens_per_s"] / y["tokens_per_s"], x["tokens_per_cpu_s"] / y["tokens_per_cpu_s"], steady

    ratio, cpu_ratio, steady = ratios(b, a)
    print(f"ours/recipe: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time{steady}   padding bound: {bound:.2f}x   "
          f"({ratio / bound:.0%} / {cpu_ratio / bound:.0%} of the bound)")
    if "trl" in results:
        ratio, cpu_ratio, steady = ratios(b, results["trl"])
        print(f"ours/TRL SFTTrainer (padding-free): {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time{steady}")
    else:
        print("TRL SFTTrainer: not installed (pip install trl to compare)")
    print("(CPU time is less disturbed than wall time when other jobs share the machine)")


if __name__ == "__main__":
    main()
