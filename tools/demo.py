"""`make demo`: fine-tune a LoRA on the sample data with the embedded model on CPU, then show
how the same held-out questions are answered before and after.

    python tools/demo.py [--max_steps 30] [--output_path outputs/demo-lora]

The sample data teaches a persona ("Little Vicuna" / "小羊驼") and a fixed sign-off, so the change
is visible after a few minutes of CPU training. Training goes through train_args.main, exactly as
`python finetune.py` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_args  # noqa: E402
from errors import cli_errors, logger, setup_logging  # noqa: E402
from models import EMBEDDED_MODEL  # noqa: E402
from prompt import STOP_STRINGS, Conversation, build_prompt_ids, extract_response  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=os.path.join(ROOT, "sample/instruct/data_sample.jsonl"))
    p.add_argument("--prompts", default=os.path.join(ROOT, "sample/heldout_prompts.json"))
    p.add_argument("--output_path", default=os.path.join(ROOT, "outputs/demo-lora"))
    p.add_argument("--model_path", default=EMBEDDED_MODEL)
    p.add_argument("--max_steps", type=int, default=24)
    p.add_argument("--max_new_tokens", type=int, default=96)
    return p.parse_args(argv)


def answer_all(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    from generation import generate_batch

    ids = [build_prompt_ids("instruct", Conversation(turns=[(p["instruction"], None)], input=p.get("input", "")),
                            tokenizer) for p in prompts]
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1, "repetition_penalty": 1.1,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "temperature": None, "top_p": None, "top_k": None}
    texts = generate_batch(model, tokenizer, ids, gen, STOP_STRINGS["instruct"])
    return [extract_response(t, "instruct") for t in texts]


def show(prompts, before, after) -> None:
    wrap = lambda s: textwrap.indent(s if s else "(empty)", "      ")  # noqa: E731
    for p, b, a in zip(prompts, before, after):
        q = p["instruction"] + (f"  [{p['input']}]" if p.get("input") else "")
        print(f"\n=== {q}")
        print("  base model:")
        print(wrap(b))
        print("  with the LoRA:")
        print(wrap(a))


def run(args) -> None:
    from models import load_adapter, load_for_inference

    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    t0 = time.time()
    model, tokenizer = load_for_inference(args.model_path)
    logger.info("answering %d held-out prompts with the base model", len(prompts))
    before = answer_all(model, tokenizer, prompts, args.max_new_tokens)

    t1 = time.time()
    train_args.main([
        "--data_path", args.data_path, "--output_path", args.output_path, "--model_path", args.model_path,
        "--max_steps", str(args.max_steps), "--micro_batch_size", "4", "--batch_size", "8",
        "--learning_rate", "2e-3", "--warmup_steps", "3", "--lora_r", "16", "--lora_alpha", "32",
        "--lora_target_modules", "all-linear", "--cutoff_len", "256", "--test_size", "8",
        "--eval_steps", "12", "--save_steps", str(args.max_steps), "--logging_steps", "1",
        "--overwrite_output_dir",
    ])
    t2 = time.time()

    logger.info("answering the same prompts with the fine-tuned adapter")
    tuned = load_adapter(model, args.output_path)
    after = answer_all(tuned, tokenizer, prompts, args.max_new_tokens)
    show(prompts, before, after)
    print(f"\nadapter: {args.output_path}")
    print(f"loss curve: {os.path.join(args.output_path, 'loss.png')}")
    print(f"time: {t2 - t1:.0f} s training, {time.time() - t0:.0f} s in all")


def main(argv=None):
    setup_logging()
    cli_errors(run)(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
