"""Answer one instruction with a base model and an optional LoRA adapter.

    python generate.py --instruction "Give three tips for staying healthy."
    python generate.py --model_path decapoda/llama-7b --lora_path lora-Vicuna --instruction "..."

Prints only the response on stdout (logs go to stderr), so it composes with shell pipes. The
prompt template is the one the adapter was trained with (read from its training_config.json)
unless --prompt_type says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from prompt import STOP_STRINGS, Conversation, build_prompt_ids, extract_response
from utils import (UserError, add_generation_args, add_model_args, cli_errors, generation_kwargs,
                   load_for_inference, load_training_config, logger, setup_logging)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p, {"num_beams": 4, "max_new_tokens": 256})
    p.add_argument("--instruction", default=None, help="the instruction to answer")
    p.add_argument("--input", default="", help="optional context for the instruction")
    return p


def resolve_prompt_type(args, default: str) -> str:
    """--prompt_type, else the template the adapter was trained with, else `default`."""
    if args.prompt_type:
        return args.prompt_type
    saved = load_training_config(args.lora_path).get("prompt_type")
    if saved:
        logger.info("prompt type %r, as the adapter was trained", saved)
    return saved or default


def run(args) -> str:
    if args.instruction is None or not args.instruction.strip():
        raise UserError("pass the question with --instruction TEXT (and optionally --input TEXT)")
    prompt_type = resolve_prompt_type(args, "instruct")
    model, tokenizer = load_for_inference(args.model_path, args.lora_path, args.quant,
                                          trust_remote_code=args.trust_remote_code)
    from utils import generate_text

    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    conv = Conversation(turns=[(args.instruction, None)], input=args.input)
    ids = build_prompt_ids(prompt_type, conv, tokenizer)
    text = generate_text(model, tokenizer, ids, generation_kwargs(args, tokenizer), STOP_STRINGS[prompt_type])
    answer = extract_response(text, prompt_type)
    print(answer, flush=True)
    return answer


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
