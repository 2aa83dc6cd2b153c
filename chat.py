"""Multi-turn chat with a base model and an optional LoRA adapter, streaming as it generates.

    python chat.py --cli                      # terminal chat; /clear resets, /exit quits
    python chat.py --cli --lora_path lora-Vicuna-chat

History is kept within --max_memory tokens (room for --max_new_tokens included): the oldest
turns are dropped first and the current question is never dropped.
"""

from __future__ import annotations

import argparse
import sys

from generate import resolve_prompt_type
from prompt import STOP_STRINGS, Conversation, StopStringFilter, fit_history
from utils import (UserError, add_generation_args, add_model_args, cli_errors, generation_kwargs,
                   load_for_inference, setup_logging, stream_generate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p, {"max_new_tokens": 256, "do_sample": False})
    p.add_argument("--cli", action="store_true", help="chat in the terminal")
    p.add_argument("--max_memory", type=int, default=1024,
                   help="history budget in tokens, including room for --max_new_tokens")
    p.add_argument("--system", default=None, help="instruction / system prompt replacing the default preamble")
    return p


def reply_stream(model, tokenizer, prompt_type: str, history: list[tuple[str, str]], question: str,
                 gen_kwargs: dict, max_memory: int, system: str | None = None):
    """Yield the growing reply to `question` given the history; the core of every chat front end."""
    conv = Conversation(turns=history + [(question, None)], system=system)
    _, ids = fit_history(prompt_type, conv, tokenizer, max_memory, gen_kwargs["max_new_tokens"])
    stop = StopStringFilter(prompt_type)
    text = ""
    for text in stream_generate(model, tokenizer, ids, gen_kwargs, STOP_STRINGS[prompt_type]):
        yield stop.update(text)
        if stop.done:
            break
    yield stop.update(text, final=True)


def run_cli(args) -> None:
    prompt_type = resolve_prompt_type(args, "chat")
    model, tokenizer = load_for_inference(args.model_path, args.lora_path, args.quant,
                                          trust_remote_code=args.trust_remote_code)
    gen_kwargs = generation_kwargs(args, tokenizer)
    if args.seed is not None:
        from transformers import set_seed

        set_seed(args.seed)
    history: list[tuple[str, str]] = []
    print("Chat with the model. /clear forgets the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            question = input("User: ")
        except EOFError:
            break
        command = question.strip()
        if command == "/exit":
            break
        if command == "/clear":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not command:
            continue
        print("Assistant: ", end="", flush=True)
        shown = ""
        for shown_now in reply_stream(model, tokenizer, prompt_type, history, question, gen_kwargs,
                                      args.max_memory, args.system):
            if shown_now.startswith(shown):
                print(shown_now[len(shown):], end="", flush=True)
            shown = shown_now
        print(flush=True)
        history.append((question, shown.strip()))


def run(args) -> None:
    if args.max_memory <= args.max_new_tokens:
        raise UserError(f"--max_memory {args.max_memory} leaves no room for history and question beyond "
                        f"--max_new_tokens {args.max_new_tokens}; raise --max_memory")
    if not args.cli:
        raise UserError("pass --cli to chat in the terminal")
    run_cli(args)


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
