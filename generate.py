"""Question answering with a base model and an optional LoRA adapter: a web page or one shot.

    python generate.py                                   # gradio page on http://127.0.0.1:7860
    python generate.py --lora_path lora-Vicuna --show_beam
    python generate.py --instruction "Give three tips for staying healthy."   # print and exit

The page streams the answer as it is generated (all four decoding modes, beams included), has a
Stop button and a named API endpoint `/generate` (gradio_client) that streams the same text.
The one-shot mode prints only the response on stdout (logs go to stderr). The prompt template is
the one the adapter was trained with (read from its training_config.json) unless --prompt_type
says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from prompt import STOP_STRINGS, Conversation, build_prompt_ids, extract_response
from utils import (add_generation_args, add_model_args, cli_errors, load_for_inference, load_training_config,
                   logger, params_from_args, setup_logging)

EXAMPLES = [
    ["Give three tips for staying healthy.", ""],
    ["Translate the sentence into English.", "我明天要去图书馆还书。"],
    ["用三句话介绍一下长城。", ""],
    ["Write a Python function that checks whether a number is prime.", ""],
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p, {"num_beams": 4, "max_new_tokens": 256})
    p.add_argument("--instruction", default=None, help="answer this instruction, print and exit (no page)")
    p.add_argument("--input", default="", help="optional context for the instruction")
    p.add_argument("--show_beam", action="store_true", help="on the page, stream every beam side by side")
    from webui import add_server_args

    add_server_args(p)
    return p


def resolve_prompt_type(args, default: str) -> str:
    """--prompt_type, else the template the adapter was trained with, else `default`."""
    if args.prompt_type:
        return args.prompt_type
    saved = load_training_config(args.lora_path).get("prompt_type")
    if saved:
        logger.info("prompt type %r, as the adapter was trained", saved)
    return saved or default


def answer_stream(model, tokenizer, prompt_type: str, instruction: str, context: str, params,
                  cancel=None, all_beams: bool = False):
    """Yield (answer so far, [beam texts] or None) while generating; the page's core."""
    from streaming import stream_generate

    ids = build_prompt_ids(prompt_type, Conversation(turns=[(instruction, None)], input=context), tokenizer)
    for update in stream_generate(model, tokenizer, ids, params, STOP_STRINGS[prompt_type], cancel, all_beams):
        beams = [extract_response(b, prompt_type) for b in update.beams] if update.beams else None
        yield extract_response(update.text, prompt_type), beams


def build_page(model, tokenizer, prompt_type: str, title: str, show_beam: bool = False):
    import gradio as gr

    from webui import StopRegistry, generation_controls, params_from_controls, session_of

    stops = StopRegistry()
    max_beams = 10

    def generate(instruction: str, context: str, *controls, request: gr.Request = None):
        if not instruction or not instruction.strip():
            raise gr.Error("Type an instruction first.")
        params = params_from_controls(controls)
        session = session_of(request)
        cancel = stops.start(session)
        try:
            for text, beams in answer_stream(model, tokenizer, prompt_type, instruction, context, params, cancel,
                                             all_beams=show_beam):
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
                context = gr.Textbox(lines=2, label="Input (optional context)")
                controls = generation_controls(gr, {"num_beams": 4 if not show_beam else 2})
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
        stop.click(stops.stop_request, inputs=None, outputs=None, queue=False, cancels=[event],
                   api_visibility="private")
    return page


def run(args) -> str | None:
    prompt_type = resolve_prompt_type(args, "instruct")
    if args.instruction is not None and not args.instruction.strip():
        from utils import UserError

        raise UserError("--instruction is empty; pass the question to answer")
    params = params_from_args(args)  # validate the flags before loading anything
    if args.instruction is None:
        from webui import parse_auth

        parse_auth(args.auth)
    model, tokenizer = load_for_inference(args.model_path, args.lora_path, args.quant,
                                          trust_remote_code=args.trust_remote_code)
    if args.instruction is None:
        from webui import launch

        title = f"Vicuna-LoRA: {args.model_path}" + (f" + {args.lora_path}" if args.lora_path else "")
        launch(build_page(model, tokenizer, prompt_type, title, args.show_beam), args)
        return None
    from utils import generate_text

    if params.seed is not None:
        from transformers import set_seed

        set_seed(params.seed)
    conv = Conversation(turns=[(args.instruction, None)], input=args.input)
    ids = build_prompt_ids(prompt_type, conv, tokenizer)
    text = generate_text(model, tokenizer, ids, params.generate_kwargs(tokenizer), STOP_STRINGS[prompt_type])
    answer = extract_response(text, prompt_type)
    print(answer, flush=True)
    return answer


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
