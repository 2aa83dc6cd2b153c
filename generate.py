"""Question answering with a base model and an optional LoRA adapter: a web page or one shot.

    python generate.py                                   # gradio page on http://127.0.0.1:7860
    python generate.py --lora_path lora-Vicuna --show_beam
    python generate.py --instruction "Give three tips for staying healthy."   # print and exit

The page streams the answer as it is generated (all four decoding modes, beams included), has a
Stop button and a named API endpoint `/generate` (gradio_client) that streams the same text.
The one-shot mode prints only the response on stdout (logs go to stderr); it generates through
the page's path, so both give the same answer for the same settings. Decoding is greedy unless
asked: --do_sample samples, --num_beams 4 is beam search (both: beam sampling); the flags are
also the page's starting values (with --show_beam, beams start at 2 or more). The prompt template is
the one the adapter was trained with (read from its training_config.json) unless --prompt_type
says otherwise. A prompt that cannot be answered within the model's context (prompt tokens +
--max_new_tokens > max_position_embeddings) is refused with the numbers, never cut; the page also
refuses an instruction or input longer than --max_input_chars characters.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from errors import UserError, check_utf8, cli_errors, setup_logging
from generation import GenerationParams
from models import add_model_args, load_for_inference, resolve_prompt_type
from prompt import STOP_STRINGS, Conversation, build_prompt_ids, extract_response
from webui import HelpFormatter, add_server_args

EXAMPLES = [
    ["Give three tips for staying healthy.", ""],
    ["Translate the sentence into English.", "我明天要去图书馆还书。"],
    ["用三句话介绍一下长城。", ""],
    ["Write a Python function that checks whether a number is prime.", ""],
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    GenerationParams.add_args(p)
    p.add_argument("--instruction", default=None, help="answer this instruction, print and exit (no page)")
    p.add_argument("--input", default="", help="optional context for the instruction (default: none)")
    p.add_argument("--show_beam", action="store_true", help="on the page, stream every beam side by side")
    add_server_args(p)
    return p


def prompt_ids(model, tokenizer, prompt_type: str, instruction: str, context: str, max_new_tokens: int,
               cli: bool = False) -> list[int]:
    """The prompt ids; refuses (UserError, with the numbers) a prompt that cannot be answered
    within the model's context. `cli`: name the command-line flags instead of the page's boxes."""
    from generation import check_context

    ids = build_prompt_ids(prompt_type, Conversation(turns=[(instruction, None)], input=context), tokenizer)
    fields = "--instruction and --input" if cli else "instruction and input"
    check_context(model, len(ids), max_new_tokens, prompt=f"the prompt ({fields} in the {prompt_type} template)",
                  new_name="--max_new_tokens" if cli else "max new tokens",
                  fix="shorten --instruction/--input" if cli else "shorten the instruction or input")
    return ids


def answer_stream(model, tokenizer, prompt_type: str, instruction: str, context: str, params,
                  cancel=None, all_beams: bool = False, ids: list[int] | None = None):
    """Yield (answer so far, [beam texts] or None) while generating; the page's core.

    `ids`: the prompt, when prompt_ids already built (and checked) it.
    """
    from generation import stream_generate

    if ids is None:
        ids = prompt_ids(model, tokenizer, prompt_type, instruction, context, params.max_new_tokens)
    for update in stream_generate(model, tokenizer, ids, params, STOP_STRINGS[prompt_type], cancel, all_beams):
        beams = [extract_response(b, prompt_type) for b in update.beams] if update.beams else None
        yield extract_response(update.text, prompt_type), beams


def build_page(model, tokenizer, prompt_type: str, title: str, show_beam: bool = False,
               max_chars: int | None = None, start: GenerationParams | None = None):
    """The QA page; its controls start at `start` (the flags; GenerationParams() by default)."""
    import gradio as gr

    from webui import (MAX_INPUT_CHARS, StopRegistry, check_text, generation_controls, gets_request, guard_requests,
                       page_error, session_of)

    stops = StopRegistry()
    max_beams = 10
    max_chars = max_chars or MAX_INPUT_CHARS
    start = start or GenerationParams()
    if show_beam:  # beams side by side need beams
        start = dataclasses.replace(start, num_beams=max(2, start.num_beams))
    d = start  # the API's defaults: the controls' starting values

    @gets_request
    def generate(instruction, context="", temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
                 num_beams=d.num_beams, max_new_tokens=d.max_new_tokens, min_new_tokens=d.min_new_tokens,
                 repetition_penalty=d.repetition_penalty, do_sample=d.do_sample, request=None):
        """Stream the answer to `instruction` (with the optional `context`)."""
        try:
            instruction = check_text("Instruction", instruction, max_chars)
            context = check_text("Input (optional context)", context, max_chars)
            if not instruction.strip():
                raise UserError("Type an instruction first.")
            params = GenerationParams.from_controls((temperature, top_p, top_k, num_beams, max_new_tokens,
                                                     min_new_tokens, repetition_penalty, do_sample), controls,
                                                    seed=start.seed)
            ids = prompt_ids(model, tokenizer, prompt_type, instruction, context, params.max_new_tokens)
        except UserError as e:
            raise page_error(e) from None
        session = session_of(request)
        cancel = stops.start(session)
        try:
            for text, beams in answer_stream(model, tokenizer, prompt_type, instruction, context, params, cancel,
                                             all_beams=show_beam, ids=ids):
                if show_beam:
                    beams = (beams or [text])[:max_beams]
                    yield [text] + [gr.update(value=b, visible=True) for b in beams] + \
                        [gr.update(value="", visible=False)] * (max_beams - len(beams))
                else:
                    yield text
        finally:
            stops.finish(session, cancel)

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}\nPrompt template: `{prompt_type}`. The answer streams as it is generated.")
        with gr.Row():
            with gr.Column():
                instruction = gr.Textbox(lines=3, label="Instruction", placeholder="Ask or instruct something")
                context = gr.Textbox(value="", lines=2, label="Input (optional context)")
                controls = generation_controls(gr, start)
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary")
                    stop = gr.Button("Stop")
            with gr.Column():
                output = gr.Textbox(lines=14, label="Answer", elem_id="answer")
                beam_boxes = []
                if show_beam:
                    with gr.Row():
                        beam_boxes = [gr.Textbox(lines=6, label=f"Beam {i + 1}", visible=False)
                                      for i in range(max_beams)]
        gr.Examples(EXAMPLES, inputs=[instruction, context])
        event = submit.click(generate, inputs=[instruction, context, *controls], outputs=[output, *beam_boxes],
                             api_name="generate")
        stop.click(gets_request(stops.stop_request), inputs=None, outputs=None, queue=False, cancels=[event],
                   api_visibility="private")
    return guard_requests(page, max_chars)


def run(args) -> str | None:
    check_utf8("--instruction", args.instruction)
    check_utf8("--input", args.input)
    if args.instruction is not None and not args.instruction.strip():
        raise UserError("--instruction is empty; pass the question to answer")
    # the adapter's template, else a merged or quantized model folder's own training_config.json
    prompt_type = resolve_prompt_type(args.prompt_type, args.lora_path or args.model_path, "instruct")
    params = GenerationParams.from_args(args)  # validate the flags before loading anything
    if args.instruction is None:
        from webui import check_limit_flag, parse_auth

        parse_auth(args.auth)
        check_limit_flag("max_input_chars", args.max_input_chars)
    model, tokenizer = load_for_inference(args.model_path, args.lora_path, args.quant,
                                          trust_remote_code=args.trust_remote_code)
    if args.instruction is None:
        from webui import launch

        title = f"Vicuna-LoRA: {args.model_path}" + (f" + {args.lora_path}" if args.lora_path else "")
        launch(build_page(model, tokenizer, prompt_type, title, args.show_beam, args.max_input_chars, params), args)
        return None
    from generation import generate_text

    ids = prompt_ids(model, tokenizer, prompt_type, args.instruction, args.input, params.max_new_tokens, cli=True)
    answer = extract_response(generate_text(model, tokenizer, ids, params, STOP_STRINGS[prompt_type]), prompt_type)
    print(answer, flush=True)
    return answer


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
