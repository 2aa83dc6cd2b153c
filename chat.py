"""Multi-turn chat with a base model and an optional LoRA adapter, streaming as it generates.

    python chat.py                            # gradio chat page on http://127.0.0.1:7860
    python chat.py --lora_path lora-Vicuna-chat --port 7861
    python chat.py --cli                      # terminal chat; /clear resets, /exit quits

History is kept within --max_memory tokens (room for --max_new_tokens included): the oldest
turns are dropped first and the current question is never dropped. The page has Submit/Stop,
Regenerate, Clear, Reset parameters and Save chat, a choice of instruction (system prompt) and
prompt template, and a named API endpoint `/chat` that streams the reply.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from generate import resolve_prompt_type
from prompt import STOP_STRINGS, Conversation, StopStringFilter, fit_history
from utils import (UserError, add_generation_args, add_model_args, cli_errors, load_for_inference,
                   params_from_args, setup_logging)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_generation_args(p, {"max_new_tokens": 256, "do_sample": False})
    p.add_argument("--cli", action="store_true", help="chat in the terminal")
    p.add_argument("--max_memory", type=int, default=1024,
                   help="history budget in tokens, including room for --max_new_tokens")
    p.add_argument("--system", default=None, help="instruction / system prompt replacing the default preamble")
    p.add_argument("--save_dir", default="chat_logs", help="where Save chat appends conversations (JSONL)")
    from webui import add_server_args

    add_server_args(p)
    return p


# Instructions offered on the page; "Template default" keeps the template's own preamble/system.
SYSTEM_PRESETS = {
    "Template default": "",
    "Helpful assistant": "You are a helpful, honest assistant. Answer clearly and concisely.",
    "中文助手": "你是一个乐于助人的中文助手，回答准确、简洁、有条理。",
    "Translator zh<->en": "You translate between Chinese and English. Reply with the translation only.",
    "Code helper": "You are an expert programmer. Answer with short explanations and correct, runnable code.",
}


def reply_stream(model, tokenizer, prompt_type: str, history: list[tuple[str, str]], question: str,
                 params, max_memory: int, system: str | None = None, cancel=None):
    """Yield the growing reply to `question` given the history; the core of every chat front end.

    The instruct template has no turns, so with it only the current question is sent.
    """
    from streaming import stream_generate

    if prompt_type == "instruct":
        history = []
    conv = Conversation(turns=history + [(question, None)], system=system or None)
    _, ids = fit_history(prompt_type, conv, tokenizer, max_memory, params.max_new_tokens)
    stop = StopStringFilter(prompt_type)
    text = ""
    for update in stream_generate(model, tokenizer, ids, params, STOP_STRINGS[prompt_type], cancel):
        text = update.text
        yield stop.update(text)
        if stop.done:
            break
    yield stop.update(text, final=True)


def message_text(content) -> str:
    """The text of a chatbot message: gradio 6 hands content back as [{"type": "text", "text"}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return str(content)


def pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """Chatbot messages [{"role", "content"}, ...] -> completed (user, assistant) turns."""
    out, user = [], None
    for m in messages:
        content = message_text(m["content"])
        if m["role"] == "user":
            user = content
        elif m["role"] == "assistant" and user is not None:
            out.append((user, content))
            user = None
    return out


def check_save_dir(save_dir: str, lora_path: str | None) -> str:
    """The folder to save chats in, refusing `/` and anything inside the adapter folder."""
    if not save_dir or not save_dir.strip():
        raise UserError("choose a folder to save the chat in")
    path = os.path.realpath(os.path.expanduser(save_dir.strip()))
    if path == os.path.realpath("/"):
        raise UserError("refusing to save chats in /; choose a folder of your own")
    if lora_path:
        lora = os.path.realpath(lora_path)
        if path == lora or path.startswith(lora + os.sep):
            raise UserError(f"refusing to save chats inside the adapter folder {lora_path}; choose another folder")
    return path


def save_chat(save_dir: str, record: dict, lora_path: str | None) -> str:
    """Append one conversation as a JSON line to SAVE_DIR/chat_history.jsonl; returns the file."""
    folder = check_save_dir(save_dir, lora_path)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "chat_history.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def build_page(model, tokenizer, args, default_prompt_type: str, title: str):
    import gradio as gr

    from webui import (CONTROL_DEFAULTS, CONTROL_ORDER, StopRegistry, generation_controls, params_from_controls,
                       session_of)

    stops = StopRegistry()
    cleared: set = set()  # sessions that pressed Clear while (or before) a reply streamed
    model_info = {"model_path": args.model_path, "lora_path": args.lora_path, "quant": args.quant}

    def respond(message: str, history: list, system: str, prompt_type: str, max_memory: float, *controls,
                request: gr.Request = None):
        """Stream the reply to `message` after `history`; yields ("", history + the growing reply)."""
        message = (message or "").strip()
        history = list(history or [])
        if not message:
            yield "", history
            return
        session = session_of(request)
        cleared.discard(session)
        cancel = stops.start(session)
        shown = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        try:
            params = params_from_controls(controls)
            if int(max_memory) <= params.max_new_tokens:
                raise UserError(f"max memory {int(max_memory)} leaves no room beyond max new tokens "
                                f"{params.max_new_tokens}; raise it")
            for text in reply_stream(model, tokenizer, prompt_type, pairs(history), message, params,
                                     int(max_memory), system, cancel):
                shown[-1] = {"role": "assistant", "content": text}
                yield "", shown
            if session in cleared:  # Clear stopped this reply: its last update must not refill the chat
                yield "", []
        except Exception as e:  # out of memory, bad settings: show it in the chat, keep serving
            _free_memory()
            shown[-1] = {"role": "assistant", "content": f"**Error:** {type(e).__name__}: {e}"}
            yield "", shown
        finally:
            stops.finish(session, cancel)

    def regenerate(history: list, system: str, prompt_type: str, max_memory: float, *controls,
                   request: gr.Request = None):
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not history:
            yield "", history
            return
        last = history.pop()
        yield from respond(message_text(last["content"]), history, system, prompt_type, max_memory, *controls, request=request)

    def save(history: list, save_dir: str, system: str, prompt_type: str, max_memory: float, *controls):
        if not history:
            return "Nothing to save yet."
        record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), **model_info,
                  "prompt_type": prompt_type, "system": system, "max_memory": int(max_memory),
                  "parameters": dict(zip(CONTROL_ORDER, controls)),
                  "conversation": [{"role": m["role"], "content": message_text(m["content"])} for m in history]}
        try:
            path = save_chat(save_dir, record, args.lora_path)
        except (UserError, OSError) as e:
            return f"Not saved: {e}"
        return f"Saved to `{path}`"

    def reset():
        d = CONTROL_DEFAULTS
        return [d[k] for k in CONTROL_ORDER] + [args.max_memory, "Template default", "", default_prompt_type]

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot")
                message = gr.Textbox(label="Message", placeholder="Type a message and press Enter",
                                     elem_id="message")
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary")
                    stop = gr.Button("Stop")
                    regen = gr.Button("Regenerate")
                    clear = gr.Button("Clear history")
                with gr.Row():
                    save_dir = gr.Textbox(value=args.save_dir, label="Save folder", scale=3)
                    save_btn = gr.Button("Save chat", scale=1)
                status = gr.Markdown()
            with gr.Column(scale=2):
                preset = gr.Dropdown(list(SYSTEM_PRESETS), value="Template default", label="Instruction")
                system = gr.Textbox(value=args.system or "", lines=3, label="Instruction text (editable)",
                                    placeholder="empty: the template's own preamble / system prompt")
                prompt_type = gr.Radio(["chat", "chat_template", "instruct"], value=default_prompt_type,
                                       label="Prompt template (instruct: single turn, no history)")
                max_memory = gr.Slider(128, 8192, step=64, value=args.max_memory,
                                       label="Max memory (tokens of history + answer)")
                controls = generation_controls(gr, {"max_new_tokens": args.max_new_tokens})
                reset_btn = gr.Button("Reset parameters")
        preset.change(lambda name: SYSTEM_PRESETS.get(name, ""), inputs=preset, outputs=system, queue=False,
                      api_visibility="private")
        settings = [system, prompt_type, max_memory, *controls]
        events = [
            submit.click(respond, inputs=[message, chatbot, *settings], outputs=[message, chatbot], api_name="chat"),
            message.submit(respond, inputs=[message, chatbot, *settings], outputs=[message, chatbot],
                           api_visibility="private"),
            regen.click(regenerate, inputs=[chatbot, *settings], outputs=[message, chatbot], api_name="regenerate"),
        ]
        stop.click(stops.stop_request, inputs=None, outputs=None, queue=False, cancels=events,
                   api_visibility="private")
        def clear_history(request: gr.Request):
            session = session_of(request)
            cleared.add(session)  # a reply still streaming ends with an empty chat, not its own text
            stops.stop(session)
            return [], ""

        clear.click(clear_history, outputs=[chatbot, status], queue=False, api_visibility="private")
        save_btn.click(save, inputs=[chatbot, save_dir, *settings], outputs=status, api_visibility="private")
        reset_btn.click(reset, outputs=[*controls, max_memory, preset, system, prompt_type], queue=False,
                        api_visibility="private")
    return page


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_cli(args) -> None:
    prompt_type = resolve_prompt_type(args, "chat")
    model, tokenizer = load_for_inference(args.model_path, args.lora_path, args.quant,
                                          trust_remote_code=args.trust_remote_code)
    params = params_from_args(args)
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
        for shown_now in reply_stream(model, tokenizer, prompt_type, history, question, params,
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
    params_from_args(args)  # validate the flags before loading anything
    if args.cli:
        return run_cli(args)
    from webui import launch, parse_auth

    parse_auth(args.auth)

    prompt_type = resolve_prompt_type(args, "chat")
    model, tokenizer = load_for_inference(args.model_path, args.lora_path, args.quant,
                                          trust_remote_code=args.trust_remote_code)
    title = f"Vicuna-LoRA chat: {args.model_path}" + (f" + {args.lora_path}" if args.lora_path else "")
    launch(build_page(model, tokenizer, args, prompt_type, title), args)


def main(argv: list[str] | None = None):
    setup_logging()
    args = build_parser().parse_args(argv)
    return cli_errors(run)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
